"""Building blocks shared by the model families. Every parameter names its logical axes (see parallel.py)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str) -> Any:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype '{name}' (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def check_dtypes(cfg: Any) -> Any:
    """Config checks shared by the families: `dtype` and `param_dtype` name a known dtype."""
    for name in ("dtype", "param_dtype"):
        if getattr(cfg, name, "float32") not in DTYPES:
            yield name, f"unknown dtype '{getattr(cfg, name)}' (choose from {', '.join(DTYPES)})"


def constrain(x: jax.Array, logical: tuple[str | None, ...]) -> jax.Array:
    """Pins an activation's sharding by logical names, when a mesh is active (a no-op otherwise)."""
    from fastserve.parallel import logical_to_spec  # the rules table lives there, never in a model

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, x.shape, mesh))


def pool2d(x: jax.Array, window: tuple[int, int], strides: tuple[int, int], padding: str = "VALID",
           kind: str = "max") -> jax.Array:
    """Max or average pooling over H, W of x [B, H, W, C] with nnx's semantics (the average leaves padding out).

    Windows that tile the input (window == strides, and VALID padding or sizes the window divides) are a reshape
    and a reduction: with its backward pass that runs about 2× faster on XLA:CPU than reduce_window and its
    select-and-scatter (measured on bench_vision's CNN layers: 45 vs 77 ms forward + backward for a 14×14×64
    batch of 128). At ties a max's gradient is shared among them rather than given to the first (both valid
    subgradients; after a ReLU the tied zeros get none either way)."""
    (kh, kw), (sh, sw) = window, strides
    h, w = x.shape[-3], x.shape[-2]
    padding = padding.upper() if isinstance(padding, str) else padding
    tiles = (kh, kw) == (sh, sw) and (padding == "VALID" or (padding == "SAME" and h % kh == 0 and w % kw == 0))
    if not tiles:
        if kind == "max":
            return nnx.max_pool(x, window, strides=strides, padding=padding)
        return nnx.avg_pool(x, window, strides=strides, padding=padding, count_include_pad=False)
    ho, wo = h // kh, w // kw
    x = x[..., :ho * kh, :wo * kw, :]
    t = x.reshape(*x.shape[:-3], ho, kh, wo, kw, x.shape[-1])
    return t.max(axis=(-4, -2)) if kind == "max" else t.mean(axis=(-4, -2))


def gelu(x: jax.Array) -> jax.Array:
    """The exact (erf) GELU, x·Φ(x) = ½x(1 + erf(x/√2)), as BERT and PyTorch compute it. jax.nn.gelu(approximate=
    False) goes through erfc, which XLA expands into two polynomial branches evaluated for every element: on CPU
    that was 2.5× slower (forward 2.7 vs 1.1 ms on [2048, 1536]; 7 % of a MiniLM fine-tuning step). Both are within
    6e-7 of a float64 reference there."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476))


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w [in, out], with a backward pass laid out for XLA:CPU.

    Plain autodiff gives the weight gradient as dot(x, dy) contracting the token axis of both, and XLA:CPU then
    transposes dy — the [tokens, out] activation gradient, fused into the elementwise op that produces it — before
    an Eigen matmul: ~13 % of a train step (d512 decoder, measured with experiments/profile_train.py). Computing
    (dyᵀ·x)ᵀ instead moves the transpose onto the small [out, in] result. Same math (equal up to float rounding).
    """
    return jnp.dot(x, w)


def _matmul_fwd(x, w):
    return jnp.dot(x, w), (x, w)


def _matmul_bwd(res, dy):
    x, w = res
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    return jnp.dot(dy, w.T), jnp.dot(dy2.T, x2).T


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Linear(nnx.Module):
    """y = x @ W (+ b), W of shape (in, out) stored in `param_dtype`, computed in `dtype`."""

    def __init__(self, in_features: int, out_features: int, axes: tuple[str, str], *, rngs: nnx.Rngs,
                 use_bias: bool = False, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 init_std: float = 0.02):
        init = nnx.initializers.normal(init_std)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype), out_sharding=axes)
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype), out_sharding=(axes[1],)) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        # the CPU-laid-out backward only where it was measured to help; elsewhere plain autodiff (which also
        # keeps forward-mode differentiation through the layer)
        dot = matmul if jax.default_backend() == "cpu" else jnp.dot
        y = dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-5, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)  # the variance in float32 even under bfloat16 compute
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class Embed(nnx.Module):
    """Token embedding table (vocab, embed); `attend` reuses it as the output projection (tied embeddings)."""

    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, init_std: float = 0.02):
        init = nnx.initializers.normal(init_std)
        self.embedding = nnx.Param(init(rngs.params(), (vocab, dim), param_dtype), out_sharding=("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding, half-split layout (HF `rotate_half`). x: [B, T, H, D], positions: [B, T]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq           # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array | None = None,
              k_pos: jax.Array | None = None, *, causal: bool = True, k_valid: jax.Array | None = None,
              q_segments: jax.Array | None = None, k_segments: jax.Array | None = None) -> jax.Array:
    """Grouped-query attention for every family: causal or bidirectional, self or cross, padded, packed.

    q: [B, T, H, D]; k, v: [B, S, K, D] with H a multiple of K. Returns [B, T, H·D]. A query sees key s when
    - causal: k_pos[s] <= q_pos[t] (absolute positions [B, T] / [B, S]) — training (S = T) and decoding from a KV
      cache alike (slots past the query's position are masked whatever they hold);
    - k_valid [B, S] (bool) is true: padding keys are never seen (encoders, cross-attention to a padded source);
    - q_segments [B, T] == k_segments [B, S]: packed documents do not see each other.
    A query that sees no key (a padding query) gets a uniform average: finite, and its output is ignored.

    Laid out heads-major as plain batched matmuls over (B, K) — the G query heads of a KV group stacked along the
    query axis — and the 1/sqrt(D) scale folded into q (T·D multiplies, not T·S): on XLA:CPU this measured ~4 %
    faster per train step than the 5-D einsum form it replaced, which needed extra transposes around each matmul.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    qh = (q * d ** -0.5).reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                 # [B, K, S, D]
    scores = jnp.einsum("bkqd,bksd->bkqs", qh, kh, preferred_element_type=jnp.float32)
    mask = None                                                                # [B, 1, G·T or 1, S]

    def both(m):
        return m if mask is None else mask & m
    if causal:
        q_rows = jnp.tile(q_pos, (1, g))                                       # [B, G·T], group-major like qh
        mask = both(k_pos[:, None, None, :] <= q_rows[:, None, :, None])
    if k_valid is not None:
        mask = both(k_valid.astype(bool)[:, None, None, :])
    if q_segments is not None:
        q_rows = jnp.tile(q_segments, (1, g))
        mask = both(k_segments[:, None, None, :] == q_rows[:, None, :, None])
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, vh)                             # [B, K, G·T, D]
    return out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h * d)

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


def constrain(x: jax.Array, logical: tuple[str | None, ...]) -> jax.Array:
    """Pins an activation's sharding by logical names, when a mesh is active (a no-op otherwise)."""
    from fastserve.parallel import logical_to_spec  # the rules table lives there, never in a model

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, x.shape, mesh))


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


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """Causal grouped-query attention by absolute positions.

    q: [B, T, H, D]; k, v: [B, S, K, D] with H a multiple of K; q_pos: [B, T]; k_pos: [B, S].
    A query sees the keys whose position is <= its own, which covers training (S = T) and decoding from a
    KV cache (S = cache length; slots past the query's position are masked whatever they hold).

    Laid out heads-major as plain batched matmuls over (B, K) — the G query heads of a KV group stacked along the
    query axis — and the 1/sqrt(D) scale folded into q (T·D multiplies, not T·S): on XLA:CPU this measured ~4 %
    faster per train step than the 5-D einsum form it replaced, which needed extra transposes around each matmul.
    """
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = h // kv
    qh = (q * d ** -0.5).reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                 # [B, K, S, D]
    scores = jnp.einsum("bkqd,bksd->bkqs", qh, kh, preferred_element_type=jnp.float32)
    q_pos = jnp.tile(q_pos, (1, g))                                            # [B, G·T], group-major like qh
    mask = k_pos[:, None, None, :] <= q_pos[:, None, :, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, vh)                             # [B, K, G·T, D]
    return out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h * d)

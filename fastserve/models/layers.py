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
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
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
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    mask = k_pos[:, None, None, None, :] <= q_pos[:, None, None, :, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h * d)

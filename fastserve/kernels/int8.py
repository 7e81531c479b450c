"""x @ dequantize(int8 kernel, scales) for weight-only int8 layers: the C++ kernel on CPU, XLA elsewhere.

Scales: per output channel, shape (N,), or per group of `group` rows of K, shape (ceil(K / group), N) (the last
group may be shorter). `int8_matmul` lowers to the `fastserve_int8_matmul` custom call on CPU when the kernel
library is available (fastserve.kernels.build) and to the dequantize-then-dot that XLA fuses on TPU / GPU; one
traced function holds both branches (`jax.lax.platform_dependent`), so a multi-platform export keeps each.
Large row counts (prefill, evaluation) take the XLA path on CPU too: there the dequantized kernel is reused across
many rows and the kernel's advantage is gone (measured on SmolLM2's shapes, 2 cores, AVX-512: a 576×1536 product
takes 55 µs in the kernel vs 142 µs as a float32 dot at 1 row, 369 vs 555 µs at 16 rows, and no better from 64
rows up).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fastserve.kernels import build

# Above this many rows of x the CPU path is dequantize-then-dot as well (see the module docstring).
KERNEL_MAX_ROWS = 32


def group_count(k: int, group: int | None) -> int:
    return 1 if group is None else -(-k // group)


def dequantize(q: jax.Array, scale: jax.Array, group: int | None = None) -> jax.Array:
    """float32 (K, N) weights from int8 codes (K, N) and scales (N,) or (ceil(K / group), N)."""
    w = q.astype(jnp.float32)
    if group is None:
        return w * scale.astype(jnp.float32)
    per_row = jnp.repeat(scale.astype(jnp.float32), group, axis=0, total_repeat_length=scale.shape[0] * group)
    return w * per_row[:q.shape[0]]


def int8_matmul_xla(x: jax.Array, q: jax.Array, scale: jax.Array, group: int | None = None) -> jax.Array:
    """The reference: float32 x @ dequantize(q, scale)."""
    return jnp.dot(x.astype(jnp.float32), dequantize(q, scale, group))


def int8_matmul_kernel(x: jax.Array, q: jax.Array, scale: jax.Array, group: int | None = None,
                       threads: int = 0) -> jax.Array:
    """The C++ kernel as a custom call (CPU only; the library must be loaded: `build.load()`).
    threads: 0 = XLA's intra-op pool, 1 = the calling thread only."""
    k, n = q.shape
    scales = scale.reshape(1, n) if group is None else scale
    call = jax.ffi.ffi_call(build.INT8_TARGET, jax.ShapeDtypeStruct(x.shape[:-1] + (n,), jnp.float32),
                            vmap_method="sequential")
    return call(x.astype(jnp.float32), q, scales.astype(jnp.float32), group=int(k if group is None else group),
                threads=int(threads))


def _rows(x: jax.Array) -> int | None:
    """x's row count, or None when a dimension is symbolic (an export for any batch size)."""
    dims = x.shape[:-1]
    return math.prod(int(d) for d in dims) if all(isinstance(d, (int, np.integer)) for d in dims) else None


def int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, group: int | None = None) -> jax.Array:
    """float32 x (..., K) @ dequantize(q (K, N), scale) → (..., N): the C++ kernel on CPU where it is available and
    x has at most KERNEL_MAX_ROWS rows (or a symbolic count), XLA otherwise."""
    rows = _rows(x)
    if (rows is not None and rows > KERNEL_MAX_ROWS) or build.load() is None:
        return int8_matmul_xla(x, q, scale, group)
    return jax.lax.platform_dependent(x, q, scale, cpu=lambda *a: int8_matmul_kernel(*a, group=group),
                                      default=lambda *a: int8_matmul_xla(*a, group=group))


def int8_matmul_nt(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """float32 x (..., K) @ (q (N, K) × scale (N,) per row)ᵀ → (..., N): a tied int8 embedding table (vocab, dim)
    used as the LM head, each output one contiguous row of q (the (K, N) kernel would stride N bytes per row of
    K — 48 KiB apart for SmolLM2's vocabulary, a TLB miss per row). The C++ kernel on CPU for at most
    KERNEL_MAX_ROWS rows, XLA's dequantize-then-dot otherwise."""
    rows = _rows(x)

    def xla(x, q, scale):
        return jnp.dot(x.astype(jnp.float32), (q.astype(jnp.float32) * scale.astype(jnp.float32)[:, None]).T)

    if (rows is not None and rows > KERNEL_MAX_ROWS) or build.load() is None:
        return xla(x, q, scale)
    return jax.lax.platform_dependent(x, q, scale, cpu=int8_matmul_nt_kernel, default=xla)


def int8_matmul_nt_kernel(x: jax.Array, q: jax.Array, scale: jax.Array, threads: int = 0) -> jax.Array:
    """The C++ kernel of `int8_matmul_nt` as a custom call (CPU only; the library must be loaded)."""
    n = q.shape[0]
    call = jax.ffi.ffi_call(build.INT8_NT_TARGET, jax.ShapeDtypeStruct(x.shape[:-1] + (n,), jnp.float32),
                            vmap_method="sequential")
    return call(x.astype(jnp.float32), q, scale.astype(jnp.float32), threads=int(threads))

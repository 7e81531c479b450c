"""x @ dequantize(int8 kernel, scales) for weight-only int8 layers: the C++ kernel on CPU, XLA elsewhere.

Scales: per output channel, shape (N,), or per group of `group` rows of K, shape (ceil(K / group), N) (the last
group may be shorter). `int8_matmul` lowers to the `fastserve_int8_matmul` custom call on CPU when the kernel
library is available (fastserve.kernels.build) and to the dequantize-then-dot that XLA fuses on TPU / GPU; one
traced function holds both branches (`jax.lax.platform_dependent`), so a multi-platform export keeps each.
With activations="int8" (W8A8) x is quantized to int8 per block of 32 (`quantize_activations`), on every path: the
CPU kernel multiplies the bytes (AVX-512 VNNI where available: ~2× the float kernel's work on in-cache weights,
`experiments/int8_stream.py --hot` on the 2-core Zen 4 host), XLA rounds x the same way and multiplies in float32 (equal up to float
rounding), so prefill, evaluation and decoding see the same activations.
Large row counts (prefill, evaluation) of float-activation products take the XLA path on CPU too: there the
dequantized kernel is reused across many rows and the kernel's advantage is gone (measured on SmolLM2's shapes,
2 cores, AVX-512: a 576×1536 product takes 55 µs in the kernel vs 142 µs as a float32 dot at 1 row, 369 vs 555 µs
at 16 rows, and no better from 64 rows up). W8A8 products keep the kernel at any row count where the CPU has
AVX-512 VNNI: from 32 rows it packs each 64-column weight panel once and runs every group of rows over it (one
thread: 250-290 GOPS at 32-128 rows on SmolLM2's shapes, where XLA's W8A8 path — the whole matrix dequantized at
every call — reached 65-175 and the float32 dot 60-200 on two; `python experiments/int8_stream.py --gemm`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fastserve.kernels import build

# Above this many rows of x the CPU path is dequantize-then-dot as well, except W8A8 where the CPU has VNNI (see the
# module docstring).
KERNEL_MAX_ROWS = 32
# activations="int8" (W8A8): x is quantized per block of this many values along K; K and the weight group must be
# multiples of it, else the product keeps float activations
ACTIVATION_BLOCK = 32
ACTIVATIONS = ("float32", "int8")   # an int8 layer's activations: float, or int8 per block of 32 (W8A8)


def group_count(k: int, group: int | None) -> int:
    return 1 if group is None else -(-k // group)


def dequantize(q: jax.Array, scale: jax.Array, group: int | None = None) -> jax.Array:
    """float32 (K, N) weights from int8 codes (K, N) and scales (N,) or (ceil(K / group), N)."""
    w = q.astype(jnp.float32)
    if group is None:
        return w * scale.astype(jnp.float32)
    per_row = jnp.repeat(scale.astype(jnp.float32), group, axis=0, total_repeat_length=scale.shape[0] * group)
    return w * per_row[:q.shape[0]]


def quantize_activations(x: jax.Array) -> jax.Array:
    """x (..., K) rounded as the W8A8 kernel rounds it, back in float32: per block of ACTIVATION_BLOCK values,
    int8 codes round(x · 127 / max|x|) times max|x| / 127 (K a multiple of ACTIVATION_BLOCK)."""
    x = x.astype(jnp.float32)
    blocks = x.reshape(x.shape[:-1] + (x.shape[-1] // ACTIVATION_BLOCK, ACTIVATION_BLOCK))
    d = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True) / jnp.float32(127)
    inv = jnp.where(d > 0, 1 / jnp.where(d > 0, d, 1), 0)
    return (jnp.clip(jnp.rint(blocks * inv), -127, 127) * d).reshape(x.shape)


def int8_matmul_xla(x: jax.Array, q: jax.Array, scale: jax.Array, group: int | None = None) -> jax.Array:
    """The reference: float32 x @ dequantize(q, scale)."""
    return jnp.dot(x.astype(jnp.float32), dequantize(q, scale, group))


def _tile_call(target: str, x: jax.Array, q: jax.Array, scale: jax.Array, group: int | None, threads: int
               ) -> jax.Array:
    k, n = q.shape
    scales = scale.reshape(1, n) if group is None else scale
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(x.shape[:-1] + (n,), jnp.float32), vmap_method="sequential")
    return call(x.astype(jnp.float32), q, scales.astype(jnp.float32), group=int(k if group is None else group),
                threads=int(threads))


def _rows_call(target: str, x: jax.Array, q: jax.Array, scale: jax.Array, threads: int) -> jax.Array:
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(x.shape[:-1] + (q.shape[0],), jnp.float32),
                            vmap_method="sequential")
    return call(x.astype(jnp.float32), q, scale.astype(jnp.float32), threads=int(threads))


def int8_matmul_kernel(x: jax.Array, q: jax.Array, scale: jax.Array, group: int | None = None,
                       threads: int = 0) -> jax.Array:
    """The C++ kernel as a custom call (CPU only; the library must be loaded: `build.load()`).
    threads: 0 = the kernels' helpers or XLA's intra-op pool, 1 = the calling thread only."""
    return _tile_call(build.INT8_TARGET, x, q, scale, group, threads)


def _rows(x: jax.Array) -> int | None:
    """x's row count, or None when a dimension is symbolic (an export for any batch size)."""
    dims = x.shape[:-1]
    return math.prod(int(d) for d in dims) if all(isinstance(d, (int, np.integer)) for d in dims) else None


def _vnni(lib: build.KernelLibrary) -> bool:
    """Whether the W8A8 kernel runs its VNNI loops here (read at trace time; FASTSERVE_INT8_ISA can narrow it)."""
    return bool(lib.handle.fastserve_int8_q8_vnni())


def vnni_available() -> bool:
    """Whether this process runs the W8A8 kernel's VNNI loops (the library loaded, the CPU reporting avx512_vnni)."""
    lib = build.load()
    return lib is not None and _vnni(lib)


def _w8a8(activations: str, k: int, group: int | None) -> bool:
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations: expected one of {', '.join(ACTIVATIONS)}, got {activations!r}")
    return (activations == "int8" and k % ACTIVATION_BLOCK == 0
            and (group is None or group % ACTIVATION_BLOCK == 0))


def int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, group: int | None = None,
                activations: str = "float32") -> jax.Array:
    """float32 x (..., K) @ dequantize(q (K, N), scale) → (..., N): the C++ kernel on CPU where it is available and
    x has at most KERNEL_MAX_ROWS rows (or a symbolic count), XLA otherwise. activations="int8": the kernel
    quantizes x per block of ACTIVATION_BLOCK and multiplies in integers (W8A8; where K and group allow it), at any
    row count where the CPU has AVX-512 VNNI."""
    rows, w8a8 = _rows(x), _w8a8(activations, q.shape[0], group)

    def xla(x, q, scale):
        return int8_matmul_xla(quantize_activations(x) if w8a8 else x, q, scale, group)

    lib = build.load()
    if lib is None or (rows is not None and rows > KERNEL_MAX_ROWS and not (w8a8 and _vnni(lib))):
        return xla(x, q, scale)
    kernel = int8_matmul_q8_kernel if w8a8 else int8_matmul_kernel
    return jax.lax.platform_dependent(x, q, scale, cpu=lambda *a: kernel(*a, group=group), default=xla)


def int8_matmul_nt(x: jax.Array, q: jax.Array, scale: jax.Array, activations: str = "float32") -> jax.Array:
    """float32 x (..., K) @ (q (N, K) × scale (N,) per row)ᵀ → (..., N): a tied int8 embedding table (vocab, dim)
    used as the LM head, each output one contiguous row of q (the (K, N) kernel would stride N bytes per row of
    K — 48 KiB apart for SmolLM2's vocabulary, a TLB miss per row). The C++ kernel on CPU for at most
    KERNEL_MAX_ROWS rows, XLA's dequantize-then-dot otherwise; activations="int8" as in `int8_matmul`."""
    rows, w8a8 = _rows(x), _w8a8(activations, q.shape[1], None)

    def xla(x, q, scale):
        x = quantize_activations(x) if w8a8 else x.astype(jnp.float32)
        return jnp.dot(x, (q.astype(jnp.float32) * scale.astype(jnp.float32)[:, None]).T)

    if (rows is not None and rows > KERNEL_MAX_ROWS) or build.load() is None:
        return xla(x, q, scale)
    kernel = int8_matmul_nt_q8_kernel if w8a8 else int8_matmul_nt_kernel
    return jax.lax.platform_dependent(x, q, scale, cpu=kernel, default=xla)


# ------------------------------------------------------------------------- W8A8 weights in the VNNI loops' layout

PANEL = 64   # columns per packed panel (csrc/int8_q8_vnni.cc)


def packable(k: int, n: int, group: int | None) -> bool:
    """Whether a (k, n) W8A8 kernel can be stored as VNNI panels: n a multiple of PANEL, k and group of
    ACTIVATION_BLOCK."""
    return n % PANEL == 0 and _w8a8("int8", k, group)


def pack_vnni(q: jax.Array) -> jax.Array:
    """int8 (K, N) → (N / 64, K, 64): the panels the VNNI loops read (csrc/int8_q8_vnni.cc's `Prepacked`). Column
    64p + 16L + 4j + i, rows 4kq .. 4kq + 3 lie in panel p, vector 4kq + j, bytes 16L + 4i .. 16L + 4i + 3: each
    64-byte vector is one vpdpbusd operand, a panel one contiguous stream."""
    k, n = q.shape
    a = q.reshape(k // 4, 4, n // PANEL, 4, 4, 4)       # (kq, r, p, L, j, i)
    return a.transpose(2, 0, 4, 3, 5, 1).reshape(n // PANEL, k, PANEL)


def unpack_vnni(packed: jax.Array) -> jax.Array:
    """`pack_vnni`'s inverse: (N / 64, K, 64) → (K, N)."""
    p, k, _ = packed.shape
    a = packed.reshape(p, k // 4, 4, 4, 4, 4)           # (p, kq, j, L, i, r)
    return a.transpose(1, 5, 0, 3, 2, 4).reshape(k, p * PANEL)


def packed_columns(packed: jax.Array, columns: jax.Array) -> jax.Array:
    """Column `columns` (any shape of ints) of a packed (K, N) matrix → (*columns.shape, K): a tied embedding's rows
    looked up in its packed LM head."""
    p, k, _ = packed.shape
    c = columns % PANEL
    a = packed.reshape(p, k // 4, 4, 4, 4, 4)           # (p, kq, j, L, i, r)
    rows = a[columns // PANEL, :, (c % 16) // 4, c // 16, c % 4, :]   # (*columns.shape, kq, r)
    return rows.reshape(columns.shape + (k,))


def int8_matmul_packed(x: jax.Array, packed: jax.Array, scale: jax.Array, group: int | None = None) -> jax.Array:
    """W8A8 x (..., K) @ dequantize(unpack_vnni(packed), scale) → (..., N): the C++ kernel on CPU (the VNNI loops
    where the CPU has them, portable ones elsewhere), XLA's path on the unpacked weights otherwise. scale: (N,) per
    column, or (ceil(K / group), N)."""
    def xla(x, packed, scale):
        return int8_matmul_xla(quantize_activations(x), unpack_vnni(packed), scale, group)

    if build.load() is None:
        return xla(x, packed, scale)
    return jax.lax.platform_dependent(x, packed, scale, cpu=lambda *a: int8_matmul_packed_kernel(*a, group=group),
                                      default=xla)


def int8_matmul_packed_kernel(x: jax.Array, packed: jax.Array, scale: jax.Array, group: int | None = None,
                              threads: int = 0) -> jax.Array:
    """`int8_matmul_packed`'s C++ kernel as a custom call (CPU only; the library must be loaded)."""
    n_panels, k, _ = packed.shape
    n = n_panels * PANEL
    scales = scale.reshape(1, n) if group is None else scale
    call = jax.ffi.ffi_call(build.INT8_Q8_PACKED_TARGET, jax.ShapeDtypeStruct(x.shape[:-1] + (n,), jnp.float32),
                            vmap_method="sequential")
    return call(x.astype(jnp.float32), packed, scales.astype(jnp.float32), group=int(k if group is None else group),
                threads=int(threads))


def int8_matmul_q8_kernel(x: jax.Array, q: jax.Array, scale: jax.Array, group: int | None = None,
                          threads: int = 0) -> jax.Array:
    """The W8A8 C++ kernel as a custom call (CPU only; the library must be loaded): x quantized to int8 per block of
    32 (`quantize_activations`), times q × scale. K and `group` must be multiples of ACTIVATION_BLOCK."""
    return _tile_call(build.INT8_Q8_TARGET, x, q, scale, group, threads)


def int8_matmul_nt_q8_kernel(x: jax.Array, q: jax.Array, scale: jax.Array, threads: int = 0) -> jax.Array:
    """The W8A8 C++ kernel of `int8_matmul_nt` (x quantized per block of 32) as a custom call (CPU only)."""
    return _rows_call(build.INT8_NT_Q8_TARGET, x, q, scale, threads)


def int8_matmul_nt_kernel(x: jax.Array, q: jax.Array, scale: jax.Array, threads: int = 0) -> jax.Array:
    """The C++ kernel of `int8_matmul_nt` as a custom call (CPU only; the library must be loaded)."""
    return _rows_call(build.INT8_NT_TARGET, x, q, scale, threads)

"""Attention implementations per backend, chosen in one place:
`model.attention: auto | xla | fused | blocked | cudnn | splash`.

- `xla`: `layers.attention`, the plain masked-softmax reference (every case: causal or not, cross, padded, packed,
  KV-cached decoding).
- `fused` (CPU): fastserve's C++ kernel (fastserve/kernels/attention.py): each (batch, KV head) pair in the core's
  cache, every query attending to its own causal window only, flash-style backward. float32, head dim 16 / 32 / 64 /
  128, one device; where it cannot run, asking for it by name is an error naming why. Its speed against the others
  and PyTorch's SDPA, per layer and length: experiments/bench_attention.py.
- `blocked` (any backend, made for XLA:CPU): causal self-attention in query blocks, each query block attending only
  to the keys at or before its last row, so the fully masked blocks above the diagonal are never computed and no
  T×T mask exists. The backward is a flash-style custom VJP that recomputes each block's probabilities from the
  saved log-sum-exp (residuals O(T), not O(T²)). One attention layer's forward + backward (B·T = 2048 tokens,
  8 heads of 64, CPU): 0.94× the reference's time at T=256, 0.64× at 1024, 0.45× at 2048; JAX's own autodiff of
  the same blocked forward was 1.29× the reference at T=256 (it stores every block's probabilities) and on a par
  with the custom VJP at 1024 / 2048.
- `cudnn` (GPU): `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused flash attention; it takes
  bfloat16 / float16 inputs only.
- `splash` (TPU): the Pallas splash-attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`); off a
  TPU it runs in Pallas interpret mode (correct but slow: for tests).
- `auto`: splash on TPU, cudnn on GPU for 16-bit inputs (xla for float32); on CPU fused where it runs, else
  blocked from `CPU_BLOCKED_MIN_LENGTH` tokens on (below it the reference was measured as fast or faster).

The fused kernels cover causal self-attention (training and prefill without a cache), which is where the time
goes; everything else (bidirectional, cross-attention, decoding against a KV cache) takes the `xla` path.
They mask causally by *index*, the reference by *position*: the two agree whenever positions increase along the
sequence within each segment — true for training batches, packed ones included (positions restart per segment).
A query that sees no key at all (possible only with `k_valid`) gets an unspecified finite output, as in the reference.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "xla", "fused", "blocked", "cudnn", "splash")
# Train step of the 23M decoder of experiments/bench_train.py on the 2-core CPU, same run, medians (2026-12-02):
# at T=256 blocked (128-row blocks) 22.1 s/step vs xla 23.6 (64-row blocks: 23.6); at T=128 blocked (64-row
# blocks) 34.5 vs xla 32.1 — slower. (Absolute times on a host loaded ~8×; the ratios are what was compared.)
CPU_BLOCKED_MIN_LENGTH = 256
BLOCK = 128  # query rows per block of the blocked kernel


def check_attention(cfg: Any) -> Iterator[tuple[str, str]]:
    """Config check: `attention` names a known implementation."""
    value = getattr(cfg, "attention", "auto")
    if value not in IMPLEMENTATIONS:
        yield "attention", f"unknown attention implementation '{value}' (choose from {', '.join(IMPLEMENTATIONS)})"


def resolve(implementation: str, dtype: Any, length: int, backend: str | None = None,
            heads: tuple[int, int, int] | None = None) -> str:
    """The implementation `auto` stands for on this backend, for inputs of `dtype` and sequence `length`;
    `heads` = (query heads, KV heads, head dim) where known (the fused CPU kernel has bodies for some head dims)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention: unknown implementation '{implementation}' "
                         f"(choose from {', '.join(IMPLEMENTATIONS)})")
    if implementation != "auto":
        return implementation
    backend = backend or jax.default_backend()
    if backend == "tpu":
        return "splash"
    if backend == "gpu":
        return "cudnn" if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"
    if heads is not None and fused_unsupported(dtype, heads) is None:
        return "fused"
    return "blocked" if length >= CPU_BLOCKED_MIN_LENGTH else "xla"


def fused_unsupported(dtype: Any, heads: tuple[int, int, int]) -> str | None:
    """Why the fused CPU kernel cannot run attention of `dtype` with (query heads, KV heads, head dim) here."""
    from fastserve.kernels.attention import unsupported

    n_heads, n_kv_heads, head_dim = heads
    return unsupported(dtype, head_dim, n_heads, n_kv_heads)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array | None = None,
                     segments: jax.Array | None = None, k_valid: jax.Array | None = None, *,
                     implementation: str = "auto") -> jax.Array:
    """Causal self-attention (q: [B, T, H, D], k/v: [B, T, K, D]) → [B, T, H·D] by the chosen implementation.

    `positions` [B, T] (default 0..T-1), `segments` [B, T] (packed documents), `k_valid` [B, T] (padding keys):
    the same meaning as in `layers.attention`, which is the `xla` implementation and the reference.
    """
    from fastserve.models.layers import attention as reference

    heads = (q.shape[2], k.shape[2], q.shape[3])
    impl = resolve(implementation, q.dtype, q.shape[1], heads=heads)
    if impl == "fused":
        return fused_attention(q, k, v, positions, segments, k_valid)
    if impl == "xla":
        b, t = q.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        return reference(q, k, v, positions, positions, k_valid=k_valid, q_segments=segments, k_segments=segments)
    if impl == "blocked":
        return blocked_attention(q, k, v, positions, segments, k_valid)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, segments, k_valid)
    return splash_attention(q, k, v, segments, k_valid, interpret=jax.default_backend() != "tpu")


# -------------------------------------------------------------------------------------------- fused (CPU)

def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array | None = None,
                    segments: jax.Array | None = None, k_valid: jax.Array | None = None) -> jax.Array:
    """Causal self-attention by the fused C++ kernel on CPU, the reference on any other platform (one traced
    function holds both, so an export for several platforms keeps each); raises ValueError naming why where the
    kernel cannot take these inputs."""
    from fastserve.kernels.attention import causal_attention_kernel
    from fastserve.models.layers import attention as reference

    why = fused_unsupported(jnp.result_type(q, k), (q.shape[2], k.shape[2], q.shape[3]))
    if why:
        raise ValueError(f"model.attention: fused: {why}; use auto, xla or blocked")
    b, t = q.shape[:2]
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    def xla(q, k, v, positions, segments, k_valid):
        return reference(q, k, v, positions, positions, k_valid=k_valid, q_segments=segments, k_segments=segments)

    def kernel(q, k, v, positions, segments, k_valid):
        return causal_attention_kernel(q, k, v, segments, k_valid)

    return jax.lax.platform_dependent(q, k, v, positions, segments, k_valid, cpu=kernel, default=xla)


def cached_decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, where: jax.Array,
                            lengths: jax.Array, xla: Any, *, paged: bool = False) -> jax.Array:
    """Attention of the new tokens of a KV-cached step (q [b, t, H, D]) against their rows of the cache: query (i, j)
    sees the first lengths[i, j] positions of row where[i] of caches [B, S, K, D], or, `paged`, of blocks where[i, :]
    of [N, P, K, D] → [b, t, H·D]. The C++ kernel on CPU, reading the rows in place and each query only up to its own
    length (t tokens of a row: t queries of that row, so a prompt piece costs its real positions, causal included),
    where it can take the inputs (float32, a compiled head dim, one device); else, and on other platforms, `xla()`
    (the caller's gather-and-attend path, one traced function holding both)."""
    from fastserve.kernels.attention import decode_attention_kernel, paged_decode_attention_kernel
    if fused_unsupported(jnp.result_type(q, k_cache), (q.shape[2], k_cache.shape[2], q.shape[3])):
        return xla()
    kernel = paged_decode_attention_kernel if paged else decode_attention_kernel
    b, t, h, d = q.shape

    def flat(q, k_cache, v_cache, where, lengths):     # one query per (row, token)
        out = kernel(q.reshape(b * t, 1, h, d), k_cache, v_cache, jnp.repeat(where, t, axis=0), lengths.reshape(-1))
        return out.reshape(b, t, h * d)
    return jax.lax.platform_dependent(q, k_cache, v_cache, where, lengths, cpu=flat, default=lambda *_: xla())


# ------------------------------------------------------------------------------------------ blocked (CPU)

def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array | None = None,
                      segments: jax.Array | None = None, k_valid: jax.Array | None = None,
                      block: int | None = None) -> jax.Array:
    """Causal self-attention that computes only the key blocks at or below the diagonal (see the module doc)."""
    block = block or BLOCK
    b, t, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    # heads-major, the G query heads of a KV group side by side: [B, K, G, T, D]; keys [B, K, T, D]
    qh = (q * d ** -0.5).reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    seen = {"pos": positions, "seg": segments, "valid": None if k_valid is None else k_valid.astype(bool)}
    out = _blocked(qh, kh, vh, seen, block)                                    # [B, K, G, T, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h * d)


def _row_blocks(t: int, block: int) -> list[tuple[int, int]]:
    return [(r0, min(t, r0 + block)) for r0 in range(0, t, block)]


def _block_scores(qi, kh, seen, r0, r1):
    """Masked scores of query rows [r0, r1) against keys [0, r1): [B, K, G, rows, r1] in float32."""
    s = jnp.einsum("bkgqd,bksd->bkgqs", qi, kh[:, :, :r1], preferred_element_type=jnp.float32)
    pos = seen["pos"]
    keep = pos[:, None, :r1] <= pos[:, r0:r1, None]                           # [B, rows, r1]
    if seen["seg"] is not None:
        keep = keep & (seen["seg"][:, None, :r1] == seen["seg"][:, r0:r1, None])
    if seen["valid"] is not None:
        keep = keep & seen["valid"][:, None, :r1]
    return jnp.where(keep[:, None, None], s, jnp.finfo(jnp.float32).min)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked(qh, kh, vh, seen, block):
    return _blocked_fwd(qh, kh, vh, seen, block)[0]


def _blocked_fwd(qh, kh, vh, seen, block):
    outs, lses = [], []
    for r0, r1 in _row_blocks(qh.shape[3], block):
        s = _block_scores(qh[:, :, :, r0:r1], kh, seen, r0, r1)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - m)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vh.dtype), vh[:, :, :r1]) / denom.astype(vh.dtype)
        outs.append(o)
        lses.append(m + jnp.log(denom))
    out = jnp.concatenate(outs, axis=3)
    return out, (qh, kh, vh, seen, out, lses)


def _blocked_bwd(block, res, dout):
    qh, kh, vh, seen, out, lses = res
    t = qh.shape[3]
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    dqs, dk, dv = [], jnp.zeros(kh.shape, jnp.float32), jnp.zeros(vh.shape, jnp.float32)
    for (r0, r1), lse in zip(_row_blocks(t, block), lses):
        qi, doi = qh[:, :, :, r0:r1], dout[:, :, :, r0:r1]
        p = jnp.exp(_block_scores(qi, kh, seen, r0, r1) - lse)                  # the forward's probabilities
        dp = jnp.einsum("bkgqd,bksd->bkgqs", doi, vh[:, :, :r1], preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, :, :, r0:r1])
        dqs.append(jnp.einsum("bkgqs,bksd->bkgqd", ds.astype(kh.dtype), kh[:, :, :r1]))
        pad = ((0, 0), (0, 0), (0, t - r1), (0, 0))
        dv = dv + jnp.pad(jnp.einsum("bkgqs,bkgqd->bksd", p.astype(doi.dtype), doi,
                                     preferred_element_type=jnp.float32), pad)
        dk = dk + jnp.pad(jnp.einsum("bkgqs,bkgqd->bksd", ds.astype(qi.dtype), qi,
                                     preferred_element_type=jnp.float32), pad)
    no_grad = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), seen)
    return jnp.concatenate(dqs, axis=3), dk.astype(kh.dtype), dv.astype(vh.dtype), no_grad


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


# --------------------------------------------------------------------------------------------- cuDNN (GPU)

def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array | None = None,
                    k_valid: jax.Array | None = None, *, implementation: str = "cudnn") -> jax.Array:
    """cuDNN flash attention through `jax.nn.dot_product_attention` (16-bit inputs; causal by index).

    `implementation="xla"` runs the same call through JAX's own XLA path: how the argument plumbing is tested on
    a machine without a GPU.
    """
    if implementation == "cudnn" and jnp.dtype(q.dtype) not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"model.attention: cudnn needs bfloat16 or float16 inputs, got {q.dtype} "
                         f"(set model.dtype: bfloat16, or model.attention: auto / xla)")
    b, t, h, d = q.shape
    mask = None
    if segments is not None:
        mask = segments[:, None, :, None] == segments[:, None, None, :]        # [B, 1, T, T]
    if k_valid is not None:
        valid = jnp.broadcast_to(k_valid.astype(bool)[:, None, None, :], (b, 1, t, t))
        mask = valid if mask is None else mask & valid
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=implementation)
    return out.reshape(b, t, h * d)


# ------------------------------------------------------------------------------------------- splash (TPU)

def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array | None = None,
                     k_valid: jax.Array | None = None, *, interpret: bool = False, block: int = 128) -> jax.Array:
    """The Pallas splash-attention kernel, causal, one multi-query kernel per KV group (grouped-query attention).

    The sequence is padded up to a multiple of `block` (the kernel's tile); padded rows form a segment of their
    own, so no real query sees them.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    tp = math.ceil(t / block) * block
    seg = jnp.zeros((b, t), jnp.int32) if segments is None else segments.astype(jnp.int32)
    kseg = seg if k_valid is None else jnp.where(k_valid.astype(bool), seg, -2)
    pad = ((0, 0), (0, tp - t))
    qseg, kseg = jnp.pad(seg, pad, constant_values=-1), jnp.pad(kseg, pad, constant_values=-1)
    rows = ((0, 0), (0, tp - t), (0, 0), (0, 0))
    qh = jnp.pad(q * d ** -0.5, rows).reshape(b, tp, kv, g, d).transpose(0, 2, 3, 1, 4)   # [B, K, G, Tp, D]
    kh, vh = (jnp.pad(x, rows).transpose(0, 2, 1, 3) for x in (k, v))                  # [B, K, Tp, D]
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = sm.MultiHeadMask([sm.CausalMask((tp, tp)) for _ in range(g)])
    kernel = sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)

    def one_group(qg, kg, vg, qs, ks):                                         # [G, Tp, D], [Tp, D], [Tp]
        return kernel(qg, kg, vg, sk.SegmentIds(q=qs, kv=ks))

    per_group = jax.vmap(one_group, in_axes=(0, 0, 0, None, None))            # over K
    out = jax.vmap(per_group)(qh, kh, vh, qseg, kseg)                          # over B: [B, K, G, Tp, D]
    return out[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, h * d)

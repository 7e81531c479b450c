"""Softmax attention as one fused C++ kernel on CPU, with its backward: bidirectional over padded keys (encoders)
and causal within packed documents (decoder training), grouped-query heads included.

`layers.attention` runs on XLA:CPU as two batched matmuls of [B·H, T, D] and a masked softmax over [B·H, T, S] in
memory; at BERT / MiniLM / small-Llama sizes (head dim 32-64, T ≤ 2048) those matmuls are too small for XLA's dot
emitters (~12-30 GFLOP/s) and attention took ~24 % of a MiniLM fine-tuning step. The kernel (csrc/attention_item.cc)
works one (batch, KV head) pair at a time in the core's cache, gives every query its own window of keys — all of
them minus padding for an encoder, [start of its document, itself] for a causal decoder, so the masked triangle is
never computed — and recomputes the probabilities in the backward pass from the saved log-sum-exp (flash style:
residuals O(T), not O(T·S)). Same masking rule as the reference: a query sees the valid keys of its window; one that
sees none averages all keys uniformly (and passes no gradient to q or k).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from fastserve.kernels import build


def _call_fwd(q, k, v, valid, lo, hi):
    b, t, h, d = q.shape
    call = jax.ffi.ffi_call(build.ATTENTION_FWD_TARGET,
                            (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, h, t), jnp.float32)),
                            vmap_method="sequential")
    return call(q, k, v, valid, lo, hi, scale=np.float32(d ** -0.5))


@jax.custom_vjp
def _attention(q, k, v, valid, lo, hi):
    return _call_fwd(q, k, v, valid, lo, hi)[0]


# Names for the forward's outputs, so that a remat policy can keep them (models/decoder.py REMAT_POLICIES):
# `dots_saveable` alone sees an opaque custom call and recomputes the whole kernel in the backward pass.
SAVEABLE_NAMES = ("attention_kernel_out", "attention_kernel_lse")


def _attention_fwd(q, k, v, valid, lo, hi):
    o, lse = _call_fwd(q, k, v, valid, lo, hi)
    o, lse = (checkpoint_name(x, name) for x, name in zip((o, lse), SAVEABLE_NAMES))
    return o, (q, k, v, valid, lo, hi, o, lse)


def _attention_bwd(res, dout):
    q, k, v, valid, lo, hi, o, lse = res
    call = jax.ffi.ffi_call(build.ATTENTION_BWD_TARGET,
                            (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(k.shape, jnp.float32),
                             jax.ShapeDtypeStruct(v.shape, jnp.float32)), vmap_method="sequential")
    dq, dk, dv = call(q, k, v, valid, lo, hi, o, lse, dout.astype(jnp.float32),
                      scale=np.float32(q.shape[-1] ** -0.5))
    return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def windowed_attention_kernel(q: jax.Array, k: jax.Array, v: jax.Array, k_valid: jax.Array | None,
                              lo: jax.Array, hi: jax.Array) -> jax.Array:
    """The kernel as custom calls (CPU only; the library must be loaded: `build.load()`). q: [B, T, H, D]; k, v:
    [B, S, K, D] with H a multiple of K; k_valid: [B, S] or None (all valid); lo, hi: [B, T] — query t sees key s
    when lo[t] <= s < hi[t] and k_valid[s]. → [B, T, H·D] in q's dtype."""
    b, t, h, d = q.shape
    if k_valid is None:
        k_valid = jnp.ones(k.shape[:2], jnp.int32)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    out = _attention(*f32, k_valid.astype(jnp.int32), lo.astype(jnp.int32), hi.astype(jnp.int32))
    return out.reshape(b, t, h * d).astype(q.dtype)


def padded_attention_kernel(q: jax.Array, k: jax.Array, v: jax.Array, k_valid: jax.Array) -> jax.Array:
    """Bidirectional attention over the valid keys as custom calls (every query's window is all S keys)."""
    b, t = q.shape[:2]
    lo, hi = jnp.zeros((b, t), jnp.int32), jnp.full((b, t), k.shape[1], jnp.int32)
    return windowed_attention_kernel(q, k, v, k_valid, lo, hi)


def causal_windows(segments: jax.Array | None, b: int, t: int) -> tuple[jax.Array, jax.Array]:
    """Each query's causal window [lo, hi): from the first token of its document (a run of equal `segments`
    [B, T], as packing writes them; None: one document per row) up to and including itself."""
    index = jnp.arange(t, dtype=jnp.int32)
    hi = jnp.broadcast_to(index + 1, (b, t))
    if segments is None:
        return jnp.zeros((b, t), jnp.int32), hi
    starts = jnp.concatenate([jnp.ones((b, 1), bool), segments[:, 1:] != segments[:, :-1]], axis=1)
    return jax.lax.cummax(jnp.where(starts, index, 0), axis=1), hi


def causal_attention_kernel(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array | None = None,
                            k_valid: jax.Array | None = None) -> jax.Array:
    """Causal self-attention within packed documents as custom calls. q: [B, T, H, D]; k, v: [B, T, K, D]."""
    lo, hi = causal_windows(segments, q.shape[0], q.shape[1])
    return windowed_attention_kernel(q, k, v, k_valid, lo, hi)


def decode_attention_kernel(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, rows: jax.Array,
                            lengths: jax.Array) -> jax.Array:
    """One decode step's attention read in place from a KV cache, as a custom call (CPU only; the library must be
    loaded). q: [b, 1, H, D] (one token per row); k_cache, v_cache: [B, S, K, D]; rows [b]: each query's cache row;
    lengths [b]: it sees positions [0, length) of that row (a row id outside [0, B), a length of 0 or one past
    S — a masked token at the cache's end —: zeros).
    → [b, 1, H·D] in q's dtype."""
    return _decode_call(build.DECODE_ATTENTION_TARGET, q, k_cache, v_cache, rows, lengths)


def paged_decode_attention_kernel(q: jax.Array, k_blocks: jax.Array, v_blocks: jax.Array, pages: jax.Array,
                                  lengths: jax.Array) -> jax.Array:
    """decode_attention_kernel over a block-paged cache: k_blocks, v_blocks [N, P, K, D]; pages [b, M]: query i's
    position p lives in block pages[i, p // P] at offset p % P. → [b, 1, H·D] in q's dtype."""
    return _decode_call(build.PAGED_DECODE_ATTENTION_TARGET, q, k_blocks, v_blocks, pages, lengths)


def _decode_call(target: str, q: jax.Array, k: jax.Array, v: jax.Array, where: jax.Array, lengths: jax.Array
                 ) -> jax.Array:
    b, _, h, d = q.shape
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((b, h, d), jnp.float32), vmap_method="sequential")
    out = call(q[:, 0].astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), where.astype(jnp.int32),
               lengths.astype(jnp.int32), scale=np.float32(d ** -0.5))
    return out.reshape(b, 1, h * d).astype(q.dtype)


# head dims the C++ kernel has a body for (csrc/attention_item.cc)
HEAD_DIMS = (16, 32, 64, 128)


def unsupported(dtype, head_dim: int, n_heads: int, n_kv_heads: int) -> str | None:
    """Why the kernel cannot take these inputs (None: it can): it takes float32, a compiled head dim, H a multiple
    of K, and no mesh of several devices (an opaque custom call would make XLA gather its inputs onto every one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if jnp.dtype(dtype) != jnp.float32:
        return f"it computes in float32, got {jnp.dtype(dtype).name}"
    if head_dim not in HEAD_DIMS:
        return f"head dim must be one of {HEAD_DIMS}, got {head_dim}"
    if n_heads % n_kv_heads:
        return f"query heads ({n_heads}) must be a multiple of KV heads ({n_kv_heads})"
    devices = jax.device_count() if mesh.empty else mesh.size
    if devices > 1:
        return f"it runs on one device, {'the mesh' if not mesh.empty else 'this process'} has {devices}"
    if build.load() is None:
        return "the kernel library is not available (python -m fastserve.kernels build says why)"
    return None


def padded_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_valid: jax.Array, *, strict: bool = False) -> jax.Array:
    """Bidirectional attention over the valid keys: the kernel on CPU, `layers.attention` elsewhere (one traced
    function holds both, so a multi-platform export keeps each) and for inputs the kernel does not take.
    q: [B, T, H, D]; k, v: [B, S, K, D]; k_valid: [B, S] → [B, T, H·D]. strict: raise instead of falling back
    (`model.attention: fused` asked for the kernel by name)."""
    from fastserve.models.layers import attention as reference

    def xla(q, k, v, k_valid):
        return reference(q, k, v, causal=False, k_valid=k_valid)

    why = unsupported(jnp.result_type(q, k), q.shape[-1], q.shape[2], k.shape[2])
    if why:
        if strict:
            raise ValueError(f"model.attention: fused: {why}; use auto or xla")
        return xla(q, k, v, k_valid)
    return jax.lax.platform_dependent(q, k, v, k_valid, cpu=padded_attention_kernel, default=xla)

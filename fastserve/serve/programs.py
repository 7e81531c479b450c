"""The engine's compiled programs: prefill one bucket-padded prompt, one decode step over every slot, and the
recompute extend. They live at module level with the model's graphdef a static argument, so that engines over the
same model and shapes share their compiled programs (a server and a benchmark may hold several engines)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from fastserve.core import infer


def sample_rows(logits, seeds, counts, temperature, top_k, top_p):
    """infer.sample per row with the row's own key fold_in(key(seed), count)."""
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counts)
    one = lambda lg, k, t, tk, tp: infer.sample(lg[None], k, t[None], tk[None], tp[None])[0]  # noqa: E731
    return jax.vmap(one)(logits, keys, temperature, top_k, top_p)


@functools.partial(jax.jit, static_argnums=0)
def prefill_fn(graphdef, params, tokens, lengths, ints, floats):
    """tokens [1, T] → (first token [1], KV rows [1, T, ...]); ints [3, 1]: seed, count, top_k; floats [2, 1]:
    temperature, top_p."""
    model = nnx.merge(graphdef, params)
    cache = model.init_cache(tokens.shape[0], tokens.shape[1])
    logits, cache = infer.prefill(model, tokens, lengths, cache)
    return sample_rows(logits, ints[0], ints[1], floats[0], ints[2], floats[1]), cache


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=3)
def decode_fn(graphdef, max_len, params, cache, ints, floats):
    """ints [6, S]: token, position, seed, count, top_k, active; floats [2, S]: temperature, top_p."""
    model = nnx.merge(graphdef, params)
    tokens, positions, seeds, counts, top_k, active = ints
    active = active > 0
    positions = jnp.where(active, positions, max_len)      # masked rows: their KV write is dropped
    logits, cache = infer.decode(model, tokens, positions, cache)
    sampled = sample_rows(logits, seeds, counts, floats[0], top_k, floats[1])
    return jnp.where(active, sampled, -1), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def extend_fn(graphdef, params, cache, slot, tokens, start):
    """Writes the KV of tokens [1, T] at positions start, start+1, ... into `slot` (recompute past one bucket)."""
    model = nnx.merge(graphdef, params)
    row = [{n: jax.lax.dynamic_slice_in_dim(c[n], slot, 1, axis=0) for n in ("k", "v")} for c in cache]
    positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    _, row = model(tokens, positions, row)
    return [{n: jax.lax.dynamic_update_slice_in_dim(c[n], r[n], slot, axis=0) for n in ("k", "v")}
            for c, r in zip(cache, row)]

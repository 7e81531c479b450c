"""Inference steps on the same core: prefill, decode, sampling, and a jittable `generate` loop.

Shapes stay static: prompts are right-padded (to a length bucket) with their true lengths alongside, the KV cache
has a fixed number of rows and positions, and sampling parameters are per-row arrays so that one compiled step
serves every mix of requests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 → greedy; top_k 0 → off; top_p 1.0 → off."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0


def sample(logits: jax.Array, rng: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """One token per row. logits [B, V] float32; temperature, top_k, top_p: [B] (per-row settings); rng: one key
    for the batch, or [B] keys (one per row: row i draws as a batch of one with key i).

    Only the work some row needs runs: an all-greedy batch is an argmax, and the sort behind top-k / top-p runs
    only when a sampling row filters (one `lax.switch` on the whole batch): on CPU the sort of SmolLM2-135M's 49k
    vocabulary for 8 rows took longer than the model's decode step."""
    vocab = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    sampling = temperature > 0
    filtering = sampling & (((top_k > 0) & (top_k < vocab)) | (top_p < 1.0))

    def draw(x: jax.Array) -> jax.Array:
        if rng.ndim == 0:
            return jax.random.categorical(rng, x, axis=-1).astype(jnp.int32)
        return jax.vmap(lambda k, row: jax.random.categorical(k, row[None], axis=-1)[0])(rng, x).astype(jnp.int32)

    branch = jnp.where(jnp.any(filtering), 2, jnp.where(jnp.any(sampling), 1, 0))
    sampled = jax.lax.switch(branch, [lambda: greedy, lambda: draw(scaled),
                                      lambda: draw(_top_k_top_p(scaled, top_k, top_p))])
    return jnp.where(sampling, sampled, greedy)


def _top_k_top_p(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """scaled logits with everything outside each row's top-k and top-p set to -inf (k = 0 and p = 1 keep all
    exactly, so a row that does not filter draws the same token whatever its batch-mates ask)."""
    vocab = scaled.shape[-1]
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    # top-k: keep logits >= the k-th largest (k = 0 keeps all)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    scaled = jnp.where(scaled >= kth, scaled, -jnp.inf)
    # top-p: keep the smallest prefix of the sorted distribution whose mass reaches p (always the top token)
    sorted_desc = jnp.where(jnp.arange(vocab)[None, :] < k[:, None], sorted_desc, -jnp.inf)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff_idx = jnp.sum(mass_before < top_p[:, None], axis=-1) - 1
    cutoff = jnp.take_along_axis(sorted_desc, jnp.maximum(cutoff_idx, 0)[:, None], axis=-1)
    cutoff = jnp.where(top_p[:, None] >= 1.0, -jnp.inf, cutoff)   # float rounding must not cut p = 1's tail
    return jnp.where(scaled >= cutoff, scaled, -jnp.inf)


def prefill(model: nnx.Module, tokens: jax.Array, lengths: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
    """Runs right-padded prompts [B, T] through the model, filling the cache; returns each row's last real logits."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, cache = model(tokens, positions, cache, logits_at=lengths - 1)
    return logits[:, 0], cache


def decode(model: nnx.Module, tokens: jax.Array, positions: jax.Array, cache: Any, logits_rows: int | None = None
           ) -> tuple[jax.Array, Any]:
    """One token per row (tokens, positions: [B]) → next-token logits [B, V] (`logits_rows`: of the first that many
    rows only) and the updated cache."""
    named = {} if logits_rows is None else {"logits_rows": logits_rows}
    logits, cache = model(tokens[:, None], positions[:, None], cache, **named)
    return logits[:, 0], cache


def generate(model: nnx.Module, prompts: jax.Array, lengths: jax.Array, rng: jax.Array, *, max_new_tokens: int,
             temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, stop_tokens: jax.Array,
             row_max_new: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Prefill + a `lax.while_loop` of decode steps (jittable; the loop ends when every row is done).

    prompts [B, T] right-padded, lengths [B]; stop_tokens [S] (pad with -1); row_max_new [B] caps rows
    individually (≤ max_new_tokens). Returns (tokens [B, max_new_tokens] padded with -1 after a row ends,
    number generated per row [B]). A stop token is included in the output and counted.
    """
    b = prompts.shape[0]
    row_max_new = jnp.full((b,), max_new_tokens, jnp.int32) if row_max_new is None else row_max_new
    cache = model.init_cache(b, prompts.shape[1] + max_new_tokens)
    logits, cache = prefill(model, prompts, lengths, cache)
    out = jnp.full((b, max_new_tokens), -1, jnp.int32)

    def is_stop(tok):
        return jnp.any(tok[:, None] == stop_tokens[None, :], axis=-1)

    def body(carry):
        i, logits, cache, out, count, done, rng = carry
        rng, sub = jax.random.split(rng)
        tok = sample(logits, sub, temperature, top_k, top_p)
        active = ~done
        out = out.at[:, i].set(jnp.where(active, tok, -1))
        count = count + active.astype(jnp.int32)
        done = done | (active & (is_stop(tok) | (count >= row_max_new)))
        logits, cache = decode(model, tok, lengths + i, cache)
        return i + 1, logits, cache, out, count, done, rng

    def cond(carry):
        i, *_, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    init = (jnp.int32(0), logits, cache, out, jnp.zeros((b,), jnp.int32), row_max_new <= 0, rng)
    _, _, _, out, count, _, _ = jax.lax.while_loop(cond, body, init)
    return out, count


def pad_prompts(token_lists: Sequence[Sequence[int]], buckets: Sequence[int] = (), pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads prompts to the smallest bucket that holds the longest (or to that length without buckets)."""
    if not token_lists or any(len(t) == 0 for t in token_lists):
        raise ValueError("every prompt must have at least one token")
    longest = max(len(t) for t in token_lists)
    fitting = [bk for bk in sorted(buckets) if bk >= longest]
    if buckets and not fitting:
        raise ValueError(f"a prompt of {longest} tokens is longer than the largest bucket ({max(buckets)})")
    width = fitting[0] if fitting else longest
    arr = np.full((len(token_lists), width), pad_id, np.int32)
    for i, t in enumerate(token_lists):
        arr[i, :len(t)] = t
    return arr, np.array([len(t) for t in token_lists], np.int32)

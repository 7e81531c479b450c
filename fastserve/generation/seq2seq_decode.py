"""Encoder–decoder decoding on the inference core: greedy, sampling and beam search, jittable with static shapes.

The encoder runs once per batch; `model.memory_kv` turns its output into every decoder layer's cross-attention
keys and values (computed once, never per step); the decoder then runs one position per `lax.while_loop`
iteration over a self-attention KV cache (`model.init_cache`, `model.decode_step`). No Python loop per token.

A model qualifies (`is_seq2seq`) when it has `encode`, `memory_kv`, `init_cache` and `decode_step`.

Outputs: tokens [B, max_len] (greedy / sampling) or [B, K, max_len] (beam search, best first), each row the
target tokens through its EOS, then `pad_id`. Beam scores are sums of token log-probabilities (EOS included)
divided by length ** length_penalty (the fairseq convention: 0 ranks by total log-probability, 1 by the mean).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fastserve.generation.decoding import sample

# step(tokens [N], t scalar, cache) -> (logits [N, V] float32, cache)
StepFn = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def is_seq2seq(model: Any) -> bool:
    """Whether `model` can be decoded here (an encoder–decoder with a cached decoder step)."""
    return all(hasattr(model, a) for a in ("encode", "memory_kv", "init_cache", "decode_step"))


def model_step(model: Any, src: jax.Array, src_mask: jax.Array, max_len: int, repeat: int = 1
               ) -> tuple[StepFn, Any]:
    """(step function, empty cache) for decoding `src` [B, S]: the encoder and the cross-attention projections
    run here, once; with `repeat` = K each source's memory serves K consecutive rows (beams)."""
    cross = model.memory_kv(model.encode(src, src_mask))
    if repeat > 1:
        cross = jax.tree.map(lambda x: jnp.repeat(x, repeat, axis=0), cross)
        src_mask = jnp.repeat(src_mask, repeat, axis=0)
    cache = model.init_cache(src.shape[0] * repeat, max_len)

    def step(tokens, t, cache):
        return model.decode_step(tokens, t, cache, cross, src_mask)
    return step, cache


def sample_loop(step: StepFn, cache: Any, batch: int, rng: jax.Array, *, max_len: int, bos_id: int, eos_id: int,
                pad_id: int, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Greedy (temperature 0) or sampled decoding: tokens [B, max_len]; the loop ends once every row has EOS."""
    out = jnp.full((batch, max_len), pad_id, jnp.int32)

    def body(carry):
        t, last, cache, out, done, rng = carry
        logits, cache = step(last, t, cache)
        rng, sub = jax.random.split(rng)
        tok = jnp.where(done, pad_id, sample(logits, sub, temperature, top_k, top_p))
        out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], t, axis=1)
        return t + 1, tok, cache, out, done | (tok == eos_id), rng

    def cond(carry):
        t, *_, done, _ = carry
        return (t < max_len) & ~jnp.all(done)

    init = (jnp.int32(0), jnp.full((batch,), bos_id, jnp.int32), cache, out, jnp.zeros((batch,), bool), rng)
    return jax.lax.while_loop(cond, body, init)[3]


def beam_loop(step: StepFn, cache: Any, batch: int, *, beam_size: int, max_len: int, bos_id: int, eos_id: int,
              pad_id: int, length_penalty: float = 1.0, early_stopping: bool = True
              ) -> tuple[jax.Array, jax.Array]:
    """Beam search over a cache of B·K rows (source b's beams are rows b·K … b·K+K-1).

    Each step extends every live beam by every token, keeps the 2K best extensions, moves those ending in EOS
    to the sentence's K finished hypotheses (scored with the length penalty) and continues with the K best
    others. A sentence is done when it holds K finished hypotheses (`early_stopping`) or, without early
    stopping, when no live beam can still beat its worst finished one. A sentence with nothing finished at
    `max_len` returns its live beams. Returns (tokens [B, K, max_len], scores [B, K]), best first.
    """
    k = beam_size
    neg = jnp.float32(-jnp.inf)

    def penalized(logp, length):
        return logp / jnp.power(jnp.asarray(length, jnp.float32), length_penalty)

    def body(carry):
        t, last, cache, seqs, alive_lp, fin_seqs, fin_scores = carry
        logits, cache = step(last.reshape(batch * k), t, cache)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, k, -1)
        vocab = logp.shape[-1]
        cand = (alive_lp[:, :, None] + logp).reshape(batch, k * vocab)
        cand_lp, cand_idx = jax.lax.top_k(cand, 2 * k)                           # [B, 2K]
        beam, tok = cand_idx // vocab, (cand_idx % vocab).astype(jnp.int32)
        cand_seqs = jnp.take_along_axis(seqs, beam[:, :, None], axis=1)
        cand_seqs = jax.lax.dynamic_update_slice_in_dim(cand_seqs, tok[:, :, None], t, axis=2)
        ends = tok == eos_id
        # finished: the best K of (what was finished) ∪ (candidates ending in EOS here)
        new_scores = jnp.where(ends & (cand_lp > neg), penalized(cand_lp, t + 1), neg)
        fin_scores, keep = jax.lax.top_k(jnp.concatenate([fin_scores, new_scores], axis=1), k)
        fin_seqs = jnp.take_along_axis(jnp.concatenate([fin_seqs, cand_seqs], axis=1), keep[:, :, None], axis=1)
        # alive: the best K candidates that did not end (at least K of the 2K: a beam has one EOS extension)
        alive_lp, keep = jax.lax.top_k(jnp.where(ends, neg, cand_lp), k)
        seqs = jnp.take_along_axis(cand_seqs, keep[:, :, None], axis=1)
        rows = (jnp.arange(batch)[:, None] * k + jnp.take_along_axis(beam, keep, axis=1)).reshape(-1)
        cache = jax.tree.map(lambda x: x[rows], cache)
        last = jnp.take_along_axis(tok, keep, axis=1)
        return t + 1, last, cache, seqs, alive_lp, fin_seqs, fin_scores

    def sentence_done(t, alive_lp, fin_scores):
        full = jnp.all(fin_scores > neg, axis=1)
        if early_stopping:
            return full
        # the best a live beam can still reach: its log-prob only falls; the penalty divides by a length ≤ max_len
        best_len = max_len if length_penalty > 0 else t + 1
        return full & (penalized(jnp.max(alive_lp, axis=1), best_len) <= jnp.min(fin_scores, axis=1))

    def cond(carry):
        t, _, _, _, alive_lp, _, fin_scores = carry
        return (t < max_len) & ~jnp.all(sentence_done(t, alive_lp, fin_scores))

    seqs = jnp.full((batch, k, max_len), pad_id, jnp.int32)
    alive_lp = jnp.tile(jnp.concatenate([jnp.zeros((1,)), jnp.full((k - 1,), -jnp.inf)]), (batch, 1))
    init = (jnp.int32(0), jnp.full((batch, k), bos_id, jnp.int32), cache, seqs, alive_lp.astype(jnp.float32),
            seqs, jnp.full((batch, k), neg))
    t, _, _, seqs, alive_lp, fin_seqs, fin_scores = jax.lax.while_loop(cond, body, init)
    any_finished = jnp.any(fin_scores > neg, axis=1)
    tokens = jnp.where(any_finished[:, None, None], fin_seqs, seqs)
    scores = jnp.where(any_finished[:, None], fin_scores, penalized(alive_lp, t))
    return tokens, scores


def translate_tokens(model: Any, src: jax.Array, src_mask: jax.Array, rng: jax.Array | None = None, *,
                     max_len: int, bos_id: int, eos_id: int, pad_id: int, beam_size: int = 1,
                     length_penalty: float = 1.0, early_stopping: bool = True, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """The best target tokens [B, max_len] for each source: beam search when `beam_size` > 1, else greedy
    (temperature 0) or sampling. Jittable with every keyword static."""
    b = src.shape[0]
    if beam_size > 1:
        step, cache = model_step(model, src, src_mask, max_len, repeat=beam_size)
        tokens, _ = beam_loop(step, cache, b, beam_size=beam_size, max_len=max_len, bos_id=bos_id, eos_id=eos_id,
                              pad_id=pad_id, length_penalty=length_penalty, early_stopping=early_stopping)
        return tokens[:, 0]
    step, cache = model_step(model, src, src_mask, max_len)
    rng = jax.random.key(0) if rng is None else rng
    full = lambda v, dt: jnp.full((b,), v, dt)  # noqa: E731
    return sample_loop(step, cache, b, rng, max_len=max_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
                       temperature=full(temperature, jnp.float32), top_k=full(top_k, jnp.int32),
                       top_p=full(top_p, jnp.float32))

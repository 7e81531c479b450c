"""Labelled spans of BIO tag sequences and their exact-match F1 (the CoNLL `conlleval` / seqeval default rules).

Class ids follow one layout, so that the tagging task needs no tag names to find spans: id 0 is `O`, and span type
k (0-based) has `B-` at 2k + 1 and `I-` at 2k + 2 (`bio_tag_names` writes the names). A span starts at a `B-X`, or
at an `I-X` whose previous word is not of type X (`O`, or another type); it continues over the following `I-X`
words. A predicted span counts as correct when a gold span has the same type, start and end.

`span_counts` computes (correct, predicted, gold) span counts on the device for a batch of token sequences in
which only the weighted positions are words (first word pieces; [CLS], [SEP], padding and continuation pieces are
skipped as if absent); being counts, they add up exactly over batches and hosts. `bio_spans` is the same rule on
the host, over tag names, for baselines and tests.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def bio_tag_names(types: Sequence[str]) -> list[str]:
    """Tag names in class-id order: O, B-<type 0>, I-<type 0>, B-<type 1>, …"""
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


def bio_spans(tags: Sequence[str]) -> set[tuple[int, int, str]]:
    """The spans (start, end inclusive, type) of one tag sequence under the conlleval rules."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, t = tag.partition("-")
        if prefix not in ("B", "I", "O"):
            raise ValueError(f"tag {tag!r} at position {i} is not O, B-<type> or I-<type>")
        continues = prefix == "I" and t == kind
        if start is not None and not continues:
            spans.add((start, i - 1, kind))
            start, kind = None, None
        if prefix in ("B", "I") and not continues:
            start, kind = i, t
    return spans


def span_f1(correct: float, predicted: float, gold: float) -> tuple[float, float, float]:
    """(precision, recall, F1) from span counts; 0 where a denominator is 0."""
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * correct / (predicted + gold) if predicted + gold else 0.0
    return precision, recall, f1


def _spans_by_start(classes: jax.Array, words: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """For each position of [B, T] class ids: (a span starts here, its type, the position of its last word)."""
    b, t = classes.shape
    idx = jnp.broadcast_to(jnp.arange(t), (b, t))
    kind = jnp.where(words & (classes > 0), (classes - 1) // 2, -1)
    begins = (classes > 0) & ((classes - 1) % 2 == 0)
    # the previous / next word of each position (t: none), skipping positions that are not words
    last_word = jax.lax.cummax(jnp.where(words, idx, -1), axis=1)
    prev = jnp.concatenate([jnp.full((b, 1), -1), last_word[:, :-1]], axis=1)
    next_word = jax.lax.cummin(jnp.where(words, idx, t), axis=1, reverse=True)
    nxt = jnp.concatenate([next_word[:, 1:], jnp.full((b, 1), t)], axis=1)
    kind_ext = jnp.concatenate([kind, jnp.full((b, 1), -1)], axis=1)
    begins_ext = jnp.concatenate([begins, jnp.zeros((b, 1), bool)], axis=1)
    prev_kind = jnp.take_along_axis(kind_ext, jnp.where(prev < 0, t, prev), axis=1)
    next_kind = jnp.take_along_axis(kind_ext, nxt, axis=1)
    next_begins = jnp.take_along_axis(begins_ext, nxt, axis=1)
    in_span = kind >= 0
    starts = in_span & (begins | (prev_kind != kind))
    ends = in_span & ~((next_kind == kind) & ~next_begins)
    end_pos = jax.lax.cummin(jnp.where(ends, idx, t), axis=1, reverse=True)
    return starts, kind, end_pos


def span_counts(pred: jax.Array, gold: jax.Array, words: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(correct, predicted, gold) span counts (float32) of predicted and gold class ids [B, T] over the positions
    where `words` [B, T] is true."""
    words = words.astype(bool)
    p_start, p_kind, p_end = _spans_by_start(pred, words)
    g_start, g_kind, g_end = _spans_by_start(gold, words)
    correct = p_start & g_start & (p_kind == g_kind) & (p_end == g_end)
    count = lambda x: jnp.sum(x.astype(jnp.float32))  # noqa: E731
    return count(correct), count(p_start), count(g_start)

"""Writing a token sequence's KV into a slot: a new request's prompt, or an evicted job's prompt + generated tokens
when its rows were dropped (recompute).

Without a cached prefix: the sequence's head (up to the largest bucket) is prefilled alone, right-padded to the
smallest fitting bucket, and its rows are inserted into the slot; the rest goes through the extend program in
largest-bucket-sized chunks; the first token is sampled from the logits of the sequence's last token.

With serve.prefix_cache: the longest cached prefix (whole blocks, never the last token) is copied into the slot
from the prefix store and only the rest is computed by extends from that offset, each chunk the smallest bucket
that holds it (every bucket's extend is compiled at start-up then). The prefix is used only when the start-up
profile says copy + extends beat the plain prefill (a short prompt's bucket prefill can be cheaper than an extend
attending over the whole slot). After a prompt is written, its full blocks go into the store.

With serve.prefill_chunk (chunked prefill), a call may write one chunk of that many tokens only: the engine calls
again from the returned position in its next iteration, between decode steps of the running streams.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from fastserve.serve.prefix_cache import PrefixCache


class SlotFiller:
    """Fills slots of `pool` through a backend's prefill / extend; `prefix` (or None) is the prefix cache; `chunk`
    (serve.prefill_chunk, a bucket; 0: off) bounds the prompt tokens one `fill` call writes."""

    def __init__(self, programs: Any, pool: Any, buckets: list[int], pad_id: int, prefix: PrefixCache | None,
                 chunk: int = 0, fused: bool = False):
        if chunk and chunk not in buckets and not fused:
            raise ValueError(f"serve.prefill_chunk={chunk} must be one of serve.buckets={buckets} (0: off) on this "
                             "backend (its chunks are extend calls)")
        self.programs, self.pool, self.buckets, self.pad_id, self.prefix = programs, pool, buckets, pad_id, prefix
        self.chunk = chunk
        self.fitted = prefix is not None or bool(chunk)    # every bucket's extend is compiled: chunks fit the tokens
        self.profile: dict[str, Any] = {}     # set from the engine's start-up profile

    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _chunks(self, start: int, n: int, fitted: bool, size: int = 0) -> list[tuple[int, int]]:
        """(start, width) of the extends writing positions start..n: `size` tokens at most each (0: the largest
        bucket), the last one the smallest bucket holding its tokens when `fitted`."""
        size, out = size or self.buckets[-1], []
        while start < n:
            part = min(size, n - start)
            out.append((start, self._bucket(part) if fitted else size))
            start += part
        return out

    def estimate(self, n: int, cached: int = 0) -> float:
        """Profiled seconds to write n tokens' KV of which the first `cached` come from the prefix store."""
        p = self.profile
        if cached:
            return p["prefix_load_s"] + sum(p["extend_bucket_s"][w] for _, w in self._chunks(cached, n, True))
        head = min(n, self.buckets[-1])
        return p["prefill_s"][self._bucket(head)] + sum(p["extend_bucket_s"][w] if self.fitted else p["extend_s"]
                                                        for _, w in self._chunks(head, n, self.fitted))

    def reusable(self, tokens: Sequence[int]) -> int:
        """Cached prefix tokens a fill of `tokens` would copy (0 when a plain prefill is profiled cheaper)."""
        if self.prefix is None:
            return 0
        cached = self.prefix.lookup(tokens)
        return cached if cached and self.estimate(len(tokens), cached) < self.estimate(len(tokens)) else 0

    def begin(self, seq: Sequence[int], slot: int) -> int:
        """Copies the longest reusable cached prefix of `seq` into `slot` → positions written (0: none)."""
        if self.prefix is None:
            return 0
        self.prefix.queried_tokens += len(seq)
        start = self.prefix.load(seq, slot) if self.reusable(seq) else 0
        self.prefix.hit_tokens += start
        return start

    def fill(self, seq: Sequence[int], slot: int, ints: np.ndarray | None, floats: np.ndarray | None, save: bool,
             start: int = 0, chunked: bool = False, begun: bool = False) -> tuple[int | None, int, int]:
        """Writes the KV of `seq` from position `start` into `slot` → (the token sampled from the last token's
        logits with ints [3, 1] / floats [2, 1] as prefill_fn samples, or None when `ints` is None or the sequence
        is not complete; extends run; positions written so far). `chunked`: one chunk of serve.prefill_chunk
        tokens at most (the caller goes on from the returned position in a later call). `save`: once complete,
        put its full blocks into the prefix store. `begun`: `begin` already ran for this prompt (its prefix lookup
        is not repeated, nor counted twice)."""
        n = len(seq)
        sample = ints is not None
        if not sample:
            ints, floats = np.zeros((3, 1), np.int32), np.array([[0.0], [1.0]], np.float32)
        size = self.chunk if chunked and self.chunk else self.buckets[-1]      # tokens per piece
        tok, budget = None, (size if chunked and self.chunk else n)
        if start == 0:
            start = 0 if begun else self.begin(seq, slot)
            if not start:
                head = seq[:min(size, n)]
                tokens = np.full((1, self._bucket(len(head))), self.pad_id, np.int32)
                tokens[0, :len(head)] = head
                tok, rows = self.programs.prefill(tokens, np.array([len(head)], np.int32), ints, floats)
                self.pool.insert(rows, slot)
                start, budget = len(head), budget - len(head)
        end = min(n, start + max(budget, 0))
        chunks = self._chunks(start, end, self.fitted, size)
        for begin, width in chunks:
            part = seq[begin:min(begin + width, end)]
            chunk = np.full((1, width), self.pad_id, np.int32)
            chunk[0, :len(part)] = part
            tok, self.pool.cache = self.programs.extend(self.pool.cache, np.int32(slot), chunk, np.int32(begin),
                                                        np.int32(len(part) - 1), ints, floats)
        if end < n:
            return None, len(chunks), end
        if save and self.prefix is not None:
            self.prefix.save(seq, slot)
        return (int(jax.device_get(tok)[0]) if sample else None), len(chunks), n

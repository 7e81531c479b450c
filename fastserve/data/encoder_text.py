"""Text for bidirectional encoders (classification, tagging, masked LM): tokenize, wrap in `[CLS] … [SEP]`, truncate,
and batch with per-batch padding to a few length buckets (no packing across examples).

- `encode_texts(tokenizer, texts, max_len, pairs=None)` → `EncodedTexts`: one int32 id array per example,
  `[CLS] a [SEP]` or, for pairs, `[CLS] a [SEP] b [SEP]` with token types 0 … 0 1 … 1 (longest side truncated
  first). The tokenizer's `encode` adds no specials; it names `cls_id`, `sep_id`, `pad_id` (and `mask_id`, `unk_id`; -1 where absent).
- `TextBatches`: endless, deterministic, resumable training batches (`get_state` / `set_state`, as
  `dataset.ExampleBatches`, whose shuffling it reuses). Each global batch is padded to the smallest bucket ≥ its
  longest example, so every host of a multi-host run pads its slice to the same length. With `group_by_length=K`
  each window of K shuffled batches is sorted by length before it is cut into batches, and the epoch's batches are
  shuffled again (as Hugging Face's `group_by_length`): batches of similar lengths pad to small buckets.
- `heldout_text_batches`: every held-out example once, in the given order, padded the same way; the last batch is
  filled with padding examples of weight 0.

Batch: {inputs [B, L] int32, mask [B, L] bool (true on real tokens), token_types [B, L] int32 (pairs only),
labels [B] int32 + weights [B] float32 (one label per example), or labels [B, L] int32 padded with IGNORE_LABEL +
weights [B, L] float32 (1 where a token has a label: per-token labels), or weights [B] alone (no labels: masked LM
draws its own targets)}.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from fastserve.data.dataset import Batch, ExampleBatches, check_process

IGNORE_LABEL = -100   # per-token label of positions that carry none ([CLS], [SEP], padding, continuation pieces)


@dataclass
class EncodedTexts:
    """Wrapped, truncated token ids of each example (+ token types for pairs)."""
    ids: list[np.ndarray]
    token_types: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.ids], np.int64)


def _special_ids(tokenizer: Any) -> tuple[int, int]:
    ids = {n: getattr(tokenizer, n, None) for n in ("cls_id", "sep_id", "pad_id")}
    missing = [n for n, i in ids.items() if i is None or i < 0]
    if missing:
        raise ValueError(f"{type(tokenizer).__name__} has no {', '.join(missing)}: encoder text needs a tokenizer with "
                         "[CLS] / [SEP] / [PAD] pieces (tokenizer.kind: wordpiece, or tokenizer.specials: bert)")
    return int(tokenizer.cls_id), int(tokenizer.sep_id)


def _encode_all(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    batch = getattr(tokenizer, "encode_batch", None)
    return list(batch(list(texts))) if batch is not None else [tokenizer.encode(t) for t in texts]


def wrap(a: Sequence[int], b: Sequence[int] | None, cls_id: int, sep_id: int, max_len: int
         ) -> tuple[np.ndarray, np.ndarray]:
    """(ids, token types) of `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`, at most `max_len` long: the longer of a / b
    loses its last token until the pair fits (BERT's longest-first truncation)."""
    specials = 2 if b is None else 3
    if max_len < specials + (0 if b is None else 1):
        raise ValueError(f"max_len={max_len} leaves no room for text between the {specials} special tokens")
    a, b = list(a), (None if b is None else list(b))
    if b is None:
        a = a[:max_len - specials]
        return np.array([cls_id, *a, sep_id], np.int32), np.zeros(len(a) + 2, np.int32)
    na, nb = len(a), len(b)
    while na + nb > max_len - specials:       # longest first, as Hugging Face's: on a tie the second side loses
        if na > nb:
            na -= 1
        else:
            nb -= 1
    ids = np.array([cls_id, *a[:na], sep_id, *b[:nb], sep_id], np.int32)
    types = np.concatenate([np.zeros(na + 2, np.int32), np.ones(nb + 1, np.int32)])
    return ids, types


def encode_texts(tokenizer: Any, texts: Sequence[str], max_len: int, pairs: Sequence[str] | None = None
                 ) -> EncodedTexts:
    """Tokenizes `texts` (and `pairs`, aligned) and wraps each example in the BERT specials, truncated to max_len."""
    cls_id, sep_id = _special_ids(tokenizer)
    first = _encode_all(tokenizer, texts)
    if pairs is None:
        return EncodedTexts([wrap(a, None, cls_id, sep_id, max_len)[0] for a in first])
    if len(pairs) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(pairs)} pair texts")
    wrapped = [wrap(a, b, cls_id, sep_id, max_len) for a, b in zip(first, _encode_all(tokenizer, pairs))]
    return EncodedTexts([w[0] for w in wrapped], [w[1] for w in wrapped])


def wrap_token_labels(labels: Sequence[Sequence[int]], lengths: Sequence[int]) -> list[np.ndarray]:
    """Per-token labels of single texts aligned with their wrapped ids: IGNORE_LABEL at [CLS] and [SEP], the
    text's labels cut where the text was truncated (`lengths`: the wrapped lengths)."""
    out = []
    for lab, n in zip(labels, lengths):
        inner = np.asarray(lab, np.int32)[:n - 2]
        out.append(np.concatenate([[IGNORE_LABEL], inner, [IGNORE_LABEL] * (n - 1 - len(inner))]).astype(np.int32))
    return out


def length_buckets(max_len: int, count: int = 4, multiple: int = 8) -> list[int]:
    """`count` padded lengths spread evenly up to `max_len`, each a multiple of `multiple` (the last is max_len)."""
    if max_len < 1 or count < 1:
        raise ValueError(f"need max_len >= 1 and count >= 1, got {max_len} and {count}")
    out = {min(max_len, multiple * math.ceil(max_len * (i + 1) / count / multiple)) for i in range(count)}
    return sorted(out | {max_len})


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket ≥ `length`."""
    for b in buckets:
        if b >= length:
            return int(b)
    raise ValueError(f"an example of {length} tokens is longer than the largest bucket {max(buckets)}")


def pad_batch(encoded: EncodedTexts, idx: np.ndarray, length: int, pad_id: int, labels: Any = None,
              valid: np.ndarray | None = None) -> Batch:
    """The examples `idx` of `encoded` padded to `length`: {inputs, mask, [token_types], [labels], weights}.
    `labels`: None, an int array [N] (one per example) or a list of per-token arrays aligned with the ids;
    `valid` [len(idx)] marks real examples (default all; padding examples get weight 0 and an empty mask)."""
    b = len(idx)
    valid = np.ones(b, bool) if valid is None else np.asarray(valid, bool)
    inputs = np.full((b, length), pad_id, np.int32)
    mask = np.zeros((b, length), bool)
    types = np.zeros((b, length), np.int32) if encoded.token_types is not None else None
    per_token = labels is not None and not isinstance(labels, np.ndarray)
    tok_labels = np.full((b, length), IGNORE_LABEL, np.int32) if per_token else None
    for row, i in enumerate(idx):
        if not valid[row]:
            continue
        ids = encoded.ids[i]
        n = len(ids)
        inputs[row, :n], mask[row, :n] = ids, True
        if types is not None:
            types[row, :n] = encoded.token_types[i]
        if per_token:
            tok_labels[row, :n] = labels[i]
    out: Batch = {"inputs": inputs, "mask": mask}
    if types is not None:
        out["token_types"] = types
    if per_token:
        out["labels"] = tok_labels
        out["weights"] = ((tok_labels != IGNORE_LABEL) & mask).astype(np.float32)
    else:
        if labels is not None:
            out["labels"] = np.where(valid, np.asarray(labels)[idx], 0).astype(np.int32)
        out["weights"] = valid.astype(np.float32)
    return out


def _check_aligned(encoded: EncodedTexts, labels: Any) -> None:
    if labels is None:
        return
    if len(labels) != len(encoded):
        raise ValueError(f"{len(encoded)} examples but {len(labels)} labels")
    if not isinstance(labels, np.ndarray):
        bad = [i for i, (ids, lab) in enumerate(zip(encoded.ids, labels)) if len(ids) != len(lab)]
        if bad:
            raise ValueError(f"per-token labels of example {bad[0]} have {len(labels[bad[0]])} entries for "
                             f"{len(encoded.ids[bad[0]])} tokens (wrap them with wrap_token_labels)")


class LengthGroupedOrder(ExampleBatches):
    """ExampleBatches whose epoch permutation puts examples of similar length into the same batch: each window of
    `window` batches of the shuffled order is sorted by length (longest first), cut into batches, and the epoch's
    batches are shuffled, all from (seed, epoch), so the order stays a pure function of the position."""

    def __init__(self, lengths: np.ndarray, global_batch: int, seed: int, window: int, **kw: Any):
        super().__init__({"index": np.arange(len(lengths))}, global_batch, seed, **kw)
        self._lengths, self._window = lengths, window
        self._grouped_epoch, self._grouped = -1, np.arange(len(lengths))

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._grouped_epoch:
            perm, b = super()._permutation(epoch), self._global_batch
            n = self.batches_per_epoch * b       # the epoch's remainder stays dropped, as in ExampleBatches
            span = self._window * b
            grouped = np.concatenate([w[np.argsort(-self._lengths[w], kind="stable")]
                                      for w in (perm[i:min(i + span, n)] for i in range(0, n, span))])
            order = np.random.default_rng([self._seed, epoch, 1]).permutation(self.batches_per_epoch)
            self._grouped = grouped.reshape(-1, b)[order].reshape(-1)
            self._grouped_epoch = epoch
        return self._grouped


class TextBatches:
    """Endless, deterministic, resumable training batches of encoded texts, padded per batch to a length bucket.

    The order is `ExampleBatches`' (a pure function of seed, epoch and position; the epoch's remainder dropped);
    every process computes the global batch, picks the bucket from its longest example and keeps its own slice.
    `group_by_length` > 0 (with shuffle): batches of similar lengths, from windows of that many batches."""

    def __init__(self, encoded: EncodedTexts, labels: Any, global_batch: int, seed: int, buckets: Sequence[int],
                 pad_id: int, shuffle: bool = True, process_index: int = 0, process_count: int = 1,
                 group_by_length: int = 0):
        _check_aligned(encoded, labels)
        self._local = check_process(global_batch, process_index, process_count)
        kw = dict(shuffle=shuffle, what="texts", hint="use a smaller data.batch_size")
        self._order = (LengthGroupedOrder(encoded.lengths, global_batch, seed, group_by_length, **kw)
                       if group_by_length > 0 and shuffle else
                       ExampleBatches({"index": np.arange(len(encoded))}, global_batch, seed, **kw))
        longest = int(encoded.lengths.max())
        bucket_for(longest, buckets)   # fails now, not mid-run, if the buckets cannot hold the longest text
        self.encoded, self.labels, self.buckets, self.pad_id = encoded, labels, sorted(buckets), pad_id
        self._process_index = process_index

    @property
    def batches_per_epoch(self) -> int:
        return self._order.batches_per_epoch

    def __iter__(self) -> "TextBatches":
        return self

    def __next__(self) -> Batch:
        global_idx = next(self._order)["index"]
        length = bucket_for(int(self.encoded.lengths[global_idx].max()), self.buckets)
        mine = global_idx[self._process_index * self._local:(self._process_index + 1) * self._local]
        return pad_batch(self.encoded, mine, length, self.pad_id, self.labels)

    def get_state(self) -> dict[str, int]:
        return self._order.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._order.set_state(state)


def heldout_text_batches(encoded: EncodedTexts, labels: Any, global_batch: int, buckets: Sequence[int], pad_id: int,
                         process_index: int = 0, process_count: int = 1) -> list[Batch]:
    """This host's share of every held-out example once, in order; each global batch padded to its bucket, the last
    one filled with weight-0 padding examples (one batch shape per bucket, padding never counts)."""
    _check_aligned(encoded, labels)
    local = check_process(global_batch, process_index, process_count)
    n = len(encoded)
    out = []
    for start in range(0, n, global_batch):
        global_idx = np.arange(start, start + global_batch)
        valid = global_idx < n
        length = bucket_for(int(encoded.lengths[global_idx[valid]].max()), buckets)
        mine = slice(process_index * local, (process_index + 1) * local)
        out.append(pad_batch(encoded, np.minimum(global_idx[mine], n - 1), length, pad_id, labels, valid[mine]))
    return out

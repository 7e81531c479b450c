"""Language-model batches: packing documents into rows and iterating over them.

Rows hold ``seq_len + 1`` tokens so one row gives both ``inputs = row[:-1]``
and ``targets = row[1:]``; consecutive rows overlap by one token so that every
token of the stream is a target exactly once (except the very first one).
"""

from __future__ import annotations


import numpy as np

from fastserve.data.dataset import ExampleBatches, check_process as _check_process
from fastserve.data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]


def pack_documents(docs: list[str], tokenizer: Tokenizer, seq_len: int) -> np.ndarray:
    """Tokenize ``docs`` into one stream and cut it into int32 rows [N, seq_len + 1].

    Each document becomes ``[bos] + tokens + [eos]`` (BOS only if the tokenizer
    has one). Row ``i`` is ``stream[i*seq_len : i*seq_len + seq_len + 1]``; the
    final incomplete row is dropped.

    Raises:
        ValueError: ``seq_len < 1``, a tokenizer without EOS, or fewer than
            ``seq_len + 1`` tokens in total.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    eos, bos = tokenizer.eos_id, tokenizer.bos_id
    if eos < 0:
        # Without a separator the model could not tell where documents end.
        raise ValueError("tokenizer has no eos_id; packing needs one to separate documents")
    prefix = [bos] if bos >= 0 else []
    pieces = [np.asarray(prefix + ids + [eos], dtype=np.int32) for ids in tokenizer.encode_batch(docs)]
    stream = np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)
    needed = seq_len + 1
    if stream.size < needed:
        raise ValueError(
            f"not enough text to pack: {stream.size} tokens from {len(docs)} documents, "
            f"need at least {needed} (seq_len + 1) for one row"
        )
    num_rows = (stream.size - 1) // seq_len
    index = np.arange(num_rows)[:, None] * seq_len + np.arange(needed)[None, :]
    return stream[index]


def _check_rows(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] < 2:
        raise ValueError(f"rows must be [N, seq_len + 1] with seq_len >= 1, got shape {rows.shape}")
    return rows.astype(np.int32, copy=False)


def _to_batch(rows: np.ndarray, weights: np.ndarray, eos_id: int = -1) -> Batch:
    """{inputs, targets, weights}; with `eos_id` >= 0 also the document `segments` of each input token (a new one
    starts after every EOS) and `positions` restarting at 0 at each document's start."""
    inputs = np.ascontiguousarray(rows[:, :-1])
    batch = {"inputs": inputs, "targets": np.ascontiguousarray(rows[:, 1:]), "weights": weights}
    if eos_id >= 0:
        ends = inputs == eos_id
        segments = np.concatenate([np.zeros_like(ends[:, :1]), ends[:, :-1]], axis=1).cumsum(axis=1).astype(np.int32)
        t = np.arange(inputs.shape[1], dtype=np.int32)[None, :].repeat(len(inputs), 0)
        starts = np.where(np.concatenate([np.ones_like(ends[:, :1]), ends[:, :-1]], axis=1), t, 0)
        batch["segments"] = segments
        batch["positions"] = t - np.maximum.accumulate(starts, axis=1)
    return batch


class LMBatches(ExampleBatches):
    """Training batches of packed rows: {inputs, targets, weights}, each [local_batch, seq_len]."""

    def __init__(self, rows: np.ndarray, global_batch: int, seed: int, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1, eos_id: int = -1):
        super().__init__({"rows": _check_rows(rows)}, global_batch, seed, shuffle, process_index, process_count,
                         what="rows", hint="use more data, a shorter seq_len or a smaller batch")
        self._eos_id = eos_id

    def make_batch(self, examples: dict[str, np.ndarray]) -> Batch:
        rows = examples["rows"]
        return _to_batch(rows, np.ones((rows.shape[0], rows.shape[1] - 1), np.float32), self._eos_id)


def eval_batches(
    rows: np.ndarray, global_batch: int, process_index: int = 0, process_count: int = 1, eos_id: int = -1
) -> list[Batch]:
    """All ``rows`` in order as fixed batches, for evaluation.

    The last partial global batch is padded with all-zero rows whose weights
    are 0, so every batch has the same shape (one compiled eval step) and
    padding does not count in weighted means. Each process gets its contiguous
    slice of every global batch, as in :class:`LMBatches`. No rows gives ``[]``.
    """
    rows = _check_rows(rows)
    local_batch = _check_process(global_batch, process_index, process_count)
    n, width = rows.shape
    num_batches = -(-n // global_batch)
    padded = np.zeros((num_batches * global_batch, width), np.int32)
    padded[:n] = rows
    row_weight = np.zeros((num_batches * global_batch,), np.float32)
    row_weight[:n] = 1.0
    out = []
    for b in range(num_batches):
        start = b * global_batch + process_index * local_batch
        sl = slice(start, start + local_batch)
        weights = np.repeat(row_weight[sl, None], width - 1, axis=1)
        out.append(_to_batch(padded[sl], weights, eos_id))
    return out

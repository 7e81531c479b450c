"""Language-model batches: packing documents into rows and iterating over them.

Rows hold ``seq_len + 1`` tokens so one row gives both ``inputs = row[:-1]``
and ``targets = row[1:]``; consecutive rows overlap by one token so that every
token of the stream is a target exactly once (except the very first one).
"""

from __future__ import annotations

from typing import Any

import numpy as np

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


def _check_process(global_batch: int, process_index: int, process_count: int) -> int:
    """Validate the process layout and return the per-process batch size."""
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1, got {global_batch}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index < process_count, got {process_index} and {process_count}"
        )
    if global_batch % process_count:
        raise ValueError(
            f"global_batch {global_batch} is not divisible by process_count {process_count}"
        )
    return global_batch // process_count


def _check_rows(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] < 2:
        raise ValueError(f"rows must be [N, seq_len + 1] with seq_len >= 1, got shape {rows.shape}")
    return rows.astype(np.int32, copy=False)


def _to_batch(rows: np.ndarray, weights: np.ndarray) -> Batch:
    return {
        "inputs": np.ascontiguousarray(rows[:, :-1]),
        "targets": np.ascontiguousarray(rows[:, 1:]),
        "weights": weights,
    }


class LMBatches:
    """Endless, deterministic and resumable iterator of training batches.

    The batch sequence is a pure function of (rows, global_batch, seed,
    shuffle) and the position ``(epoch, index)``; every process computes the
    same global batch and keeps only its contiguous slice, so no coordination
    between hosts is needed. The remainder of each epoch (``len(rows) %
    global_batch`` rows) is skipped so all batches have one shape.
    """

    def __init__(
        self,
        rows: np.ndarray,
        global_batch: int,
        seed: int,
        shuffle: bool = True,
        process_index: int = 0,
        process_count: int = 1,
    ):
        self._rows = _check_rows(rows)
        self._local_batch = _check_process(global_batch, process_index, process_count)
        if len(self._rows) < global_batch:
            raise ValueError(
                f"only {len(self._rows)} rows, fewer than global_batch {global_batch}: "
                "use more data, a shorter seq_len or a smaller batch"
            )
        self._global_batch = global_batch
        self._seed = seed
        self._shuffle = shuffle
        self._process_index = process_index
        self._epoch = 0
        self._index = 0
        self._perm_epoch = -1
        self._perm = np.arange(len(self._rows))

    @property
    def batches_per_epoch(self) -> int:
        """Full global batches per epoch (the remainder is dropped)."""
        return len(self._rows) // self._global_batch

    @property
    def local_batch(self) -> int:
        return self._local_batch

    def _permutation(self, epoch: int) -> np.ndarray:
        # Cached per epoch: regenerating a permutation of N rows every step
        # would cost O(N) per batch.
        if epoch != self._perm_epoch:
            if self._shuffle:
                self._perm = np.random.default_rng([self._seed, epoch]).permutation(len(self._rows))
            else:
                self._perm = np.arange(len(self._rows))
            self._perm_epoch = epoch
        return self._perm

    def __iter__(self) -> LMBatches:
        return self

    def __next__(self) -> Batch:
        perm = self._permutation(self._epoch)
        start = self._index * self._global_batch + self._process_index * self._local_batch
        rows = self._rows[perm[start : start + self._local_batch]]
        self._index += 1
        if self._index == self.batches_per_epoch:
            self._epoch, self._index = self._epoch + 1, 0
        weights = np.ones((self._local_batch, rows.shape[1] - 1), np.float32)
        return _to_batch(rows, weights)

    def get_state(self) -> dict[str, int]:
        """Position of the next batch, as JSON-serializable ints."""
        return {"epoch": int(self._epoch), "index": int(self._index)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume at a position returned by :meth:`get_state`."""
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.batches_per_epoch:
            raise ValueError(
                f"invalid iterator state {state!r}: need epoch >= 0 and "
                f"0 <= index < batches_per_epoch ({self.batches_per_epoch})"
            )
        self._epoch, self._index = epoch, index


def eval_batches(
    rows: np.ndarray, global_batch: int, process_index: int = 0, process_count: int = 1
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
        out.append(_to_batch(padded[sl], weights))
    return out

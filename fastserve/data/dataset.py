"""What every data source hands the trainer: resumable training batches, held-out batches, and what it knows
about the model it feeds (a vocabulary size, a number of classes)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import numpy as np

Batch = dict[str, np.ndarray]


class ResumableBatches(Protocol):
    """An endless iterator of this host's share of each global batch; `get_state` / `set_state` make a resumed
    run see exactly the batches an uninterrupted one would."""

    def __next__(self) -> Batch: ...
    def __iter__(self) -> Iterator[Batch]: ...
    def get_state(self) -> dict[str, Any]: ...
    def set_state(self, state: dict[str, Any]) -> None: ...


@dataclass
class Dataset:
    train: ResumableBatches
    eval: list[Batch]                      # this host's held-out batches
    train_rows: int                        # examples (sequences, images, pairs) in the training split
    eval_rows: int
    description: str                       # "N train / M held-out sequences of T tokens", for the start-up line
    tokenizer: Any = None                  # text sources: encode / decode / bos_id / eos_id / pad_id
    eval_texts: list[str] = field(default_factory=list)  # raw held-out texts (LM samples)
    # model config fields this data determines: filled where the config leaves them at 0, checked otherwise
    model_fields: dict[str, int] = field(default_factory=dict)


def fill_model_config(model_cfg: Any, fields: dict[str, int]) -> Any:
    """`model_cfg` with each of `fields` filled in where it is 0; a set value smaller than the data needs fails."""
    updates = {}
    for name, needed in fields.items():
        have = getattr(model_cfg, name, None)
        if have is None:
            continue
        if have == 0:
            updates[name] = needed
        elif have < needed:
            raise ValueError(f"model.{name}={have} is smaller than the data needs ({needed}); leave it at 0 to "
                             f"take it from the data")
    return dataclasses.replace(model_cfg, **updates) if updates else model_cfg


def check_process(global_batch: int, process_index: int, process_count: int) -> int:
    """Validates the process layout and returns the per-process batch size."""
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1, got {global_batch}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index} and {process_count}")
    if global_batch % process_count:
        raise ValueError(f"global_batch {global_batch} is not divisible by process_count {process_count}")
    return global_batch // process_count


class ExampleBatches:
    """Endless, deterministic and resumable iterator of training batches over aligned example arrays.

    The batch sequence is a pure function of (examples, global_batch, seed, shuffle) and the position
    `(epoch, index)`; every process computes the same global batch and keeps only its contiguous slice, so hosts
    need no coordination. The remainder of each epoch is skipped so every batch has one shape. `make_batch` turns
    the selected examples into the batch dict (default: the arrays themselves).
    """

    def __init__(self, examples: dict[str, np.ndarray], global_batch: int, seed: int, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1, what: str = "examples", hint: str = "use a smaller batch"):
        sizes = {len(v) for v in examples.values()}
        if len(sizes) != 1:
            raise ValueError(f"example arrays of different lengths: { {k: len(v) for k, v in examples.items()} }")
        self._examples = examples
        self._n = sizes.pop()
        self._local_batch = check_process(global_batch, process_index, process_count)
        if self._n < global_batch:
            raise ValueError(f"only {self._n} {what}, fewer than global_batch {global_batch}: {hint}")
        self._global_batch, self._seed, self._shuffle = global_batch, seed, shuffle
        self._process_index = process_index
        self._epoch = self._index = 0
        self._perm_epoch = -1
        self._perm = np.arange(self._n)

    @property
    def batches_per_epoch(self) -> int:
        """Full global batches per epoch (the remainder is dropped)."""
        return self._n // self._global_batch

    @property
    def local_batch(self) -> int:
        return self._local_batch

    def _permutation(self, epoch: int) -> np.ndarray:
        # cached per epoch: a fresh permutation of N examples every step would cost O(N) per batch
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self._seed, epoch])
            self._perm = rng.permutation(self._n) if self._shuffle else np.arange(self._n)
            self._perm_epoch = epoch
        return self._perm

    def make_batch(self, examples: dict[str, np.ndarray]) -> Batch:
        return examples

    def __iter__(self) -> ExampleBatches:
        return self

    def __next__(self) -> Batch:
        perm = self._permutation(self._epoch)
        start = self._index * self._global_batch + self._process_index * self._local_batch
        idx = perm[start:start + self._local_batch]
        self._index += 1
        if self._index == self.batches_per_epoch:
            self._epoch, self._index = self._epoch + 1, 0
        return self.make_batch({k: v[idx] for k, v in self._examples.items()})

    def get_state(self) -> dict[str, int]:
        """Position of the next batch, as JSON-serializable ints."""
        return {"epoch": int(self._epoch), "index": int(self._index)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Resumes at a position returned by `get_state`."""
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.batches_per_epoch:
            raise ValueError(f"invalid iterator state {state!r}: need epoch >= 0 and 0 <= index < batches_per_epoch "
                             f"({self.batches_per_epoch})")
        self._epoch, self._index = epoch, index


def padded_eval_batches(examples: dict[str, np.ndarray], global_batch: int, process_index: int = 0,
                        process_count: int = 1) -> list[Batch]:
    """Every example once, in order, as fixed-shape batches with a per-example `weights` entry: the last partial
    global batch is padded with zero examples of weight 0 (one compiled eval step; padding never counts)."""
    local = check_process(global_batch, process_index, process_count)
    n = len(next(iter(examples.values())))
    if n == 0:
        return []
    total = -(-n // global_batch) * global_batch
    def pad(v):
        out = np.zeros((total, *v.shape[1:]), v.dtype)
        out[:n] = v
        return out
    padded = {k: pad(v) for k, v in examples.items()}
    padded["weights"] = (np.arange(total) < n).astype(np.float32)
    out = []
    for start in range(process_index * local, total, global_batch):
        out.append({k: v[start:start + local] for k, v in padded.items()})
    return out

"""`data.source: synthetic_classes` — seeded, variable-length token sequences with labels only bidirectional
context can read at the [CLS] position: for tests and recipes of sequence classifiers (no download, no tokenizer).

Every sequence is `[CLS] t1 ... tn [PAD] ...` (CLS id 1 at position 0, pad id 0, `mask` true on the n+1 real
tokens), n drawn uniformly so the length varies in [min_len, seq_len]. Ids 2 .. 1+num_classes are markers, the rest
ordinary tokens. Rules:
- `first` (default): every marker appears once, at a random position; the label is the marker that comes first.
  Reading it needs positions *after* [CLS] (a causal model sees nothing from position 0) and their order.
- `present`: exactly one marker appears, somewhere; the label is which one (easier: no order needed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fastserve.checks import at_least, positive
from fastserve.data.dataset import Dataset, ExampleBatches, padded_eval_batches

PAD_ID, CLS_ID, FIRST_MARKER = 0, 1, 2
RULES = ("first", "present")


@dataclass
class SyntheticClassesConfig:
    source: str = "synthetic_classes"
    rule: str = "first"            # first: which marker comes first | present: which (single) marker appears
    num_classes: int = 2
    vocab_size: int = 32           # ids: 0 pad, 1 [CLS], 2 .. 1+num_classes markers, the rest ordinary tokens
    seq_len: int = 32              # padded length (including [CLS])
    min_len: int = 8               # shortest real length (including [CLS])
    train_examples: int = 2048
    eval_examples: int = 512
    batch_size: int = 32           # global batch
    seed: int = 0                  # the data's own seed: the same examples whatever train.seed is
    shuffle: bool = True

    def checks(self):
        yield from positive(self, "num_classes", "seq_len", "min_len", "train_examples", "batch_size")
        yield from at_least(self, 0, "eval_examples")
        if self.rule not in RULES:
            yield "rule", f"expected one of {', '.join(RULES)}, got {self.rule!r}"
        if self.num_classes < 2:
            yield "num_classes", f"must be at least 2, got {self.num_classes}"
        if self.vocab_size < FIRST_MARKER + self.num_classes + 1:
            yield "vocab_size", (f"must be at least {FIRST_MARKER + self.num_classes + 1} (pad, [CLS], "
                                 f"{self.num_classes} markers and one ordinary token), got {self.vocab_size}")
        markers = self.num_classes if self.rule == "first" else 1
        if self.min_len < markers + 1:
            yield "min_len", (f"must leave room for [CLS] and {markers} marker(s): at least {markers + 1}, "
                              f"got {self.min_len}")
        if self.min_len > self.seq_len:
            yield "min_len", f"must be <= seq_len={self.seq_len}, got {self.min_len}"
        if self.train_examples < self.batch_size:
            yield "train_examples", f"fewer than one batch of {self.batch_size}, got {self.train_examples}"

    def load(self, cfg: Any) -> Dataset:
        import jax

        pi, pc = jax.process_index(), jax.process_count()
        train = make_examples(self, self.train_examples, split=0)
        held_out = make_examples(self, self.eval_examples, split=1)
        batches = ClassBatches(train, self.batch_size, cfg.train.seed, self.shuffle, pi, pc)
        eval_batches = padded_eval_batches(held_out, self.batch_size, pi, pc) if self.eval_examples else []
        if cfg.train.eval_batches > 0:
            eval_batches = eval_batches[:cfg.train.eval_batches]
        return Dataset(batches, eval_batches, self.train_examples, self.eval_examples,
                       f"{self.train_examples} train / {self.eval_examples} held-out sequences of {self.min_len}-"
                       f"{self.seq_len} tokens, {self.num_classes} classes (rule: {self.rule})",
                       model_fields={"vocab_size": self.vocab_size, "num_classes": self.num_classes})


class ClassBatches(ExampleBatches):
    """Training batches {inputs, mask, labels, weights (ones)}."""

    def make_batch(self, examples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**examples, "weights": np.ones(len(examples["labels"]), np.float32)}


def make_examples(cfg: SyntheticClassesConfig, n: int, split: int) -> dict[str, np.ndarray]:
    """{inputs [n, seq_len] int32, mask [n, seq_len] bool, labels [n] int32}, a pure function of (cfg, split)."""
    rng = np.random.default_rng([cfg.seed, split])
    c, t = cfg.num_classes, cfg.seq_len
    lengths = rng.integers(cfg.min_len, t + 1, size=n)                                # real tokens incl. [CLS]
    inputs = rng.integers(FIRST_MARKER + c, cfg.vocab_size, size=(n, t)).astype(np.int32)
    labels = np.zeros(n, np.int32)
    for i in range(n):
        slots = rng.permutation(np.arange(1, lengths[i]))                             # positions after [CLS]
        if cfg.rule == "first":
            positions = slots[:c]                                                     # marker j at positions[j]
            inputs[i, positions] = FIRST_MARKER + np.arange(c)
            labels[i] = int(np.argmin(positions))
        else:
            labels[i] = rng.integers(c)
            inputs[i, slots[0]] = FIRST_MARKER + labels[i]
    mask = np.arange(t)[None, :] < lengths[:, None]
    inputs[:, 0] = CLS_ID
    inputs[~mask] = PAD_ID
    return {"inputs": inputs, "mask": mask, "labels": labels}

"""`data.source: arrays` — examples from NumPy files: {x, y} arrays in a `.npz` (or a pair of `.npy` files).

`path` holds the training arrays (`x_key`, `y_key`; default `x`, `y`); held-out examples come from `eval_path`, or
from the last `validation_split` of `path` (never trained on, as Keras's `validation_split`). Batches are
{inputs: x, labels: y, weights [B]} for the `classify` task (integer labels [N]) and the `keras_loss` task (labels in
the form its loss takes: ids, one-hot rows, targets). Integer x stays int32 (token ids), other x becomes float32.

What the data determines is filled into the model config where it leaves a field at 0: `num_classes` (integer
labels: max + 1), and for square NHWC images `image_size` and `channels`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastserve.checks import positive
from fastserve.data.dataset import Dataset, ExampleBatches, padded_eval_batches


@dataclass
class ArraysDataConfig:
    source: str = "arrays"
    path: str = ""                 # .npz with the training arrays (or x.npy: then y is `y_path`)
    y_path: str = ""               # only for a .npy `path`: the labels' .npy
    eval_path: str = ""            # .npz with held-out arrays (same keys); empty: the `validation_split` tail
    x_key: str = "x"
    y_key: str = "y"
    validation_split: float = 0.0  # fraction held out from the end of `path` when `eval_path` is empty
    batch_size: int = 32           # global batch
    shuffle: bool = True

    def checks(self):
        yield from positive(self, "batch_size")
        if not 0 <= self.validation_split < 1:
            yield "validation_split", f"must be in [0, 1), got {self.validation_split}"
        if self.eval_path and self.validation_split:
            yield "validation_split", "give either eval_path or validation_split, not both"

    def load(self, cfg: Any) -> Dataset:
        import jax

        x, y = self._read(self.path, self.y_path, "path")
        n = len(x)
        if self.eval_path:
            ex, ey = self._read(self.eval_path, "", "eval_path")
        else:
            split_at = math.ceil(n * (1 - self.validation_split))   # Keras 3's rule: the tail is held out
            x, y, ex, ey = x[:split_at], y[:split_at], x[split_at:], y[split_at:]
        if len(x) < self.batch_size:
            raise ValueError(f"data.path {self.path}: {len(x)} training examples, fewer than one batch of "
                             f"data.batch_size={self.batch_size}")
        pi, pc = jax.process_index(), jax.process_count()
        train = ArrayBatches({"inputs": x, "labels": y}, self.batch_size, cfg.train.seed, self.shuffle, pi, pc)
        held_out = padded_eval_batches({"inputs": ex, "labels": ey}, self.batch_size, pi, pc) if len(ex) else []
        if cfg.train.eval_batches > 0:
            held_out = held_out[:cfg.train.eval_batches]
        fields = {}
        if y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
            fields["num_classes"] = int(max(y.max(), ey.max() if len(ey) else 0)) + 1
        if x.ndim == 4 and x.shape[1] == x.shape[2]:
            fields.update(image_size=int(x.shape[1]), channels=int(x.shape[3]))
        return Dataset(train, held_out, len(x), len(ex),
                       f"{len(x)} train / {len(ex)} held-out examples of shape {tuple(x.shape[1:])} from {self.path}",
                       model_fields=fields)

    def _read(self, path: str, y_path: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        if not path:
            raise ValueError(f"data.{key} is empty: give the .npz file holding the '{self.x_key}' and '{self.y_key}' "
                             "arrays")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data.{key}: {path} does not exist")
        if path.endswith(".npy"):
            if not y_path or not os.path.isfile(y_path):
                raise FileNotFoundError(f"data.{key} is a .npy file ({path}): data.y_path must name the labels' .npy")
            x, y = np.load(path), np.load(y_path)
        else:
            with np.load(path) as f:
                missing = [k for k in (self.x_key, self.y_key) if k not in f.files]
                if missing:
                    raise ValueError(f"data.{key}: {path} has arrays {f.files}, not {missing} (data.x_key / data.y_key)")
                x, y = f[self.x_key], f[self.y_key]
        if len(x) != len(y):
            raise ValueError(f"data.{key}: {path} has {len(x)} inputs but {len(y)} labels")
        return as_inputs(x), as_labels(y)


# copy=False: an array already of the dtype is used as it is (measured: copying Fashion-MNIST's 172 MB at every
# fit call cost up to 1.5 s of page faults, longer than the MLP's epoch)
def as_inputs(x: Any) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(np.int32 if np.issubdtype(x.dtype, np.integer) else np.float32, copy=False)


def as_labels(y: Any) -> np.ndarray:
    y = np.asarray(y)
    integer = np.issubdtype(y.dtype, np.integer) or y.dtype == bool
    return y.astype(np.int32 if integer else np.float32, copy=False)


class ArrayBatches(ExampleBatches):
    """Training batches {inputs, labels, weights (ones)}."""

    def make_batch(self, examples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**examples, "weights": np.ones(len(examples["labels"]), np.float32)}

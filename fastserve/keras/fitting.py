"""`Sequential.fit`'s loop: data checks, the validation split, epochs (whole epochs in one dispatch for
device-resident dense nets; step by step for conv nets), callbacks and the History.

Two compiled train steps serve the step-by-step loop: full batches run without batch norm's example mask (its
masked reductions cost ~10% of a conv net's step, measured on bench_vision's CNN), and only a padded last batch
runs the masked step, so padding rows still count in no statistic.
"""
from __future__ import annotations

import math
import time
from typing import Any, Sequence

import jax
import numpy as np

from fastserve import layers as L, parallel
from fastserve.core.steps import split_micro_batches
from fastserve.core.trainer import evaluate_params
from fastserve.data.dataset import padded_eval_batches
from fastserve.keras.callbacks import Callback, History
from fastserve.keras.training import RESIDENT_BYTES, class_weight_vector, epoch_plan
from fastserve.tasks.keras_loss import KerasLoss


class FullBatchKerasLoss(KerasLoss):
    """The keras_loss task for batches without padding rows: the model gets no example mask."""

    def outputs(self, model, batch, rngs):
        model.accepts_example_mask = False   # this trace's copy of the model only
        return super().outputs(model, batch, rngs)


def split_validation(x: np.ndarray, y: np.ndarray, validation_split: float) -> tuple:
    """(x, y, (x_val, y_val)): Keras 3 holds out the tail, which is never trained on."""
    split_at = math.ceil(len(x) * (1 - validation_split))
    if split_at == len(x) or split_at == 0:
        raise ValueError(f"validation_split={validation_split} of {len(x)} examples leaves "
                         f"{len(x) - split_at} for validation and {split_at} for training")
    return x[:split_at], y[:split_at], (x[split_at:], y[split_at:])


def pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """The batch padded to `size` rows of zeros, with `weights` 1 on the real rows and 0 on the padding."""
    n = len(batch["inputs"])
    out = {k: np.concatenate([v, np.zeros((size - n, *v.shape[1:]), v.dtype)]) if n < size else v
           for k, v in batch.items()}
    out["weights"] = (np.arange(size) < n).astype(np.float32)
    return out


def fit(model: Any, x: Any, y: Any, batch_size: int | None, epochs: int, verbose: Any,
        callbacks: Sequence[Callback] | None, validation_split: float, validation_data: tuple | None,
        shuffle: bool, class_weight: dict | None, initial_epoch: int) -> History:
    """`model.fit(...)` (fastserve.keras.model.Sequential): see its docstring."""
    model._require_compiled("fit")
    if not 0 <= validation_split < 1:
        raise ValueError(f"validation_split must be in [0, 1), got {validation_split}")
    x, y = model._check_data(x, y)
    if y is None:
        raise ValueError("fit() needs labels y")
    val = None
    if validation_data is not None:
        if len(validation_data) != 2:
            raise ValueError("validation_data must be (x_val, y_val) (sample weights are not supported)")
        val = model._check_data(*validation_data, what="validation_data")
    elif validation_split:
        x, y, val = split_validation(x, y, validation_split)
    example_weights = None if class_weight is None else class_weight_vector(
        class_weight, y, int(np.prod(model._plan()[-1].output_shape)))
    n, b = len(x), batch_size or 32
    pad_to = model._batch_size(batch_size)
    steps_per_epoch = -(-n // b)
    model._ensure_train_state(steps_per_epoch * max(epochs - initial_epoch, 1))
    task, mesh = model._task(), model._get_mesh()
    eval_step = model._eval_step(task)
    # whole epochs in one dispatch (make_epoch_runner) — but not for convolutions: XLA:CPU runs them ~6× slower
    # inside a loop (measured on bench_vision's CNN: 1.9 vs 0.3 CPU-s per step), so conv nets go step by step
    has_conv = any(isinstance(spec, L.Conv2D) for spec in model._specs)
    resident = x.nbytes + y.nbytes <= RESIDENT_BYTES and not has_conv
    if resident:
        rep = parallel.replicated(mesh)
        x_dev, y_dev = jax.device_put(x, rep), jax.device_put(y, rep)
        model._train_step(task)
    verbose = 1 if verbose == "auto" else int(verbose)

    history = History()
    cbs = [*(callbacks or []), history]   # last, as Keras: it records what the others add to the logs
    for cb in cbs:
        cb.set_model(model)
        cb.set_params({"epochs": epochs, "steps": steps_per_epoch, "verbose": verbose})
    model.stop_training = False
    for cb in cbs:
        cb.on_train_begin()
    model._fits += 1
    for epoch in range(initial_epoch, epochs):
        for cb in cbs:
            cb.on_epoch_begin(epoch)
        t0 = time.perf_counter()
        order = (np.random.default_rng([model.seed, model._fits, epoch]).permutation(n) if shuffle
                 else np.arange(n))
        if resident:
            plan = epoch_plan(order, b, pad_to, example_weights)
            model._state, total = model._epoch_runner()(model._state, x_dev, y_dev, *plan)
            sums = [total]
        else:
            sums = _steps_one_by_one(model, task, x, y, order, b, pad_to, example_weights)
        # metric sums stay on the devices until here: one transfer per epoch
        total = {k: np.sum([np.asarray(s[k], np.float64) for s in jax.device_get(sums)], axis=0) for k in sums[0]}
        logs = task.summarize(total)
        if val is not None:
            batches = padded_eval_batches({"inputs": val[0], "labels": val[1]}, pad_to)
            logs.update({f"val_{k}": v for k, v in
                         evaluate_params(eval_step, model._variables(), batches, task, mesh, {}).items()})
        if verbose:
            print(f"Epoch {epoch + 1}/{epochs}\n{steps_per_epoch}/{steps_per_epoch} - "
                  f"{time.perf_counter() - t0:.1f}s - " + " - ".join(f"{k}: {v:.4f}" for k, v in logs.items()),
                  flush=True)
        model.epochs_done = epoch + 1
        for cb in cbs:
            cb.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    for cb in cbs:
        cb.on_train_end()
    model.history = history
    return history


def _steps_one_by_one(model: Any, task: KerasLoss, x: np.ndarray, y: np.ndarray, order: np.ndarray, b: int,
                      pad_to: int, example_weights: np.ndarray | None) -> list[dict]:
    """One epoch, each batch copied to the devices; the metric sums of every step, still on the devices."""
    mesh, sums = model._get_mesh(), []
    for start in range(0, len(order), b):
        rows = order[start:start + b]
        batch = {"inputs": x[rows], "labels": y[rows]}
        if example_weights is not None:
            batch["sample_weights"] = example_weights[rows]
        padded = len(rows) < pad_to
        batch = pad_batch(batch, pad_to)
        batch = parallel.host_to_global(split_micro_batches(batch, 1), mesh, leading=1)
        step = model._train_step(task) if padded else model._train_step(FullBatchKerasLoss(task.cfg, task.loss_fn),
                                                                         key="train_full")
        model._state, metrics = step(model._state, batch, {})
        sums.append({k: v for k, v in metrics.items() if k not in ("grad_norm", "learning_rate")})
    return sums

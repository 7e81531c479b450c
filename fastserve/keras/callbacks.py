"""Keras-style callbacks for `Sequential.fit`: `Callback`, `History` (always attached; `fit` returns it),
`EarlyStopping`, `ModelCheckpoint`, `LearningRateScheduler` and `ReduceLROnPlateau`. Epoch-level hooks only (`on_train_begin/end`, `on_epoch_begin/end`): a batch-level hook would need
the metrics of every step on the host, a device→host sync per step."""
from __future__ import annotations

import logging
import math
from typing import Any

log = logging.getLogger(__name__)


class Callback:
    def __init__(self):
        self.model: Any = None
        self.params: dict[str, Any] = {}

    def set_model(self, model: Any) -> None:
        self.model = model

    def set_params(self, params: dict[str, Any]) -> None:
        self.params = params

    def on_train_begin(self, logs: dict | None = None) -> None: ...
    def on_train_end(self, logs: dict | None = None) -> None: ...
    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None: ...
    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None: ...


class History(Callback):
    """`history.history`: {"loss": [per epoch], "accuracy": [...], "val_loss": [...], ...}; `history.epoch`."""

    def __init__(self):
        super().__init__()
        self.history: dict[str, list[float]] = {}
        self.epoch: list[int] = []

    def on_train_begin(self, logs=None):
        self.epoch = []

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.append(epoch)
        for k, v in (logs or {}).items():
            self.history.setdefault(k, []).append(v)


class EarlyStopping(Callback):
    """Stops `fit` once `monitor` has not improved by more than `min_delta` for `patience` epochs (Keras's rules:
    `mode` auto is "max" for accuracies, "min" otherwise; `baseline`; `start_from_epoch`). With
    `restore_best_weights`, the weights of the best epoch are put back when it stops training."""

    def __init__(self, monitor: str = "val_loss", min_delta: float = 0.0, patience: int = 0, verbose: int = 0,
                 mode: str = "auto", baseline: float | None = None, restore_best_weights: bool = False,
                 start_from_epoch: int = 0):
        super().__init__()
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"EarlyStopping mode must be auto, min or max, got {mode!r}")
        self.monitor, self.min_delta, self.patience, self.verbose = monitor, abs(min_delta), patience, verbose
        self.baseline, self.restore_best_weights, self.start_from_epoch = baseline, restore_best_weights, start_from_epoch
        self.mode = mode if mode != "auto" else ("max" if "acc" in monitor or "auc" in monitor else "min")
        self.on_train_begin()

    def _better(self, current: float, reference: float) -> bool:
        if self.mode == "min":
            return current < reference - self.min_delta
        return current > reference + self.min_delta

    def on_train_begin(self, logs=None):
        self.wait, self.stopped_epoch, self.best_epoch = 0, 0, 0
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_weights = None

    def on_epoch_end(self, epoch, logs=None):
        current = (logs or {}).get(self.monitor)
        if current is None:
            log.warning("EarlyStopping: metric '%s' is not available (have: %s)", self.monitor, ", ".join(logs or {}))
            return
        if epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights = self.model.get_weights()
        self.wait += 1
        if self._better(current, self.best):
            self.best, self.best_epoch = current, epoch
            if self.restore_best_weights:
                self.best_weights = self.model.get_weights()
            if self.baseline is None or self._better(current, self.baseline):
                self.wait = 0
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.model.stop_training = True
            if self.restore_best_weights and self.best_weights is not None:
                if self.verbose:
                    print(f"Restoring model weights from the end of the best epoch: {self.best_epoch + 1}.")
                self.model.set_weights(self.best_weights)

    def on_train_end(self, logs=None):
        if self.stopped_epoch > 0 and self.verbose:
            print(f"Epoch {self.stopped_epoch + 1}: early stopping")


def _mode(mode: str, monitor: str, who: str) -> str:
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"{who} mode must be auto, min or max, got {mode!r}")
    return mode if mode != "auto" else ("max" if "acc" in monitor or "auc" in monitor else "min")


class ModelCheckpoint(Callback):
    """Saves the model (`model.save`: weights, batch-norm statistics, optimizer state, the epoch reached) at the end
    of every epoch, or only when `monitor` improved (`save_best_only`). `filepath` may name the epoch and the logs
    (`"ckpt/epoch{epoch:02d}-{val_loss:.3f}"`, epochs counted from 1 as Keras does). Resuming: `load_model(path)`
    then `fit(..., initial_epoch=saved.epoch)` continues exactly where the saved run was (the same batches, the
    same dropout draws). `save_weights_only` is accepted for Keras compatibility: a fastserve save always holds
    the optimizer state too."""

    def __init__(self, filepath: str, monitor: str = "val_loss", verbose: int = 0, save_best_only: bool = False,
                 save_weights_only: bool = False, mode: str = "auto", save_freq: str = "epoch",
                 initial_value_threshold: float | None = None):
        super().__init__()
        if save_freq != "epoch":
            raise ValueError(f"ModelCheckpoint: only save_freq='epoch' is supported, got {save_freq!r}")
        self.filepath, self.monitor, self.verbose = str(filepath), monitor, verbose
        self.save_best_only, self.save_weights_only = save_best_only, save_weights_only
        self.mode = _mode(mode, monitor, "ModelCheckpoint")
        self.best = initial_value_threshold if initial_value_threshold is not None else (
            math.inf if self.mode == "min" else -math.inf)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        path = self.filepath.format(epoch=epoch + 1, **logs)
        if self.save_best_only:
            current = logs.get(self.monitor)
            if current is None:
                log.warning("ModelCheckpoint: metric '%s' is not available (have: %s)", self.monitor, ", ".join(logs))
                return
            better = current < self.best if self.mode == "min" else current > self.best
            if not better:
                return
            if self.verbose:
                print(f"Epoch {epoch + 1}: {self.monitor} improved from {self.best:.5f} to {current:.5f}, saving "
                      f"model to {path}")
            self.best = current
        elif self.verbose:
            print(f"Epoch {epoch + 1}: saving model to {path}")
        self.model.save(path)


class LearningRateScheduler(Callback):
    """Sets the learning rate at the start of every epoch to `schedule(epoch, lr)` (epoch from 0, lr the current
    one), as Keras's. The rate lives in the optimizer state, so changing it compiles nothing."""

    def __init__(self, schedule, verbose: int = 0):
        super().__init__()
        self.schedule, self.verbose = schedule, verbose

    def on_epoch_begin(self, epoch, logs=None):
        lr = float(self.schedule(epoch, self.model.learning_rate))
        if not math.isfinite(lr) or lr < 0:
            raise ValueError(f"LearningRateScheduler: the schedule returned {lr} for epoch {epoch}")
        self.model.learning_rate = lr
        if self.verbose:
            print(f"Epoch {epoch + 1}: LearningRateScheduler setting learning rate to {lr}.")

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = self.model.learning_rate


class ReduceLROnPlateau(Callback):
    """Multiplies the learning rate by `factor` once `monitor` has not improved by more than `min_delta` for
    `patience` epochs, then waits `cooldown` epochs; never below `min_lr` (Keras's rules)."""

    def __init__(self, monitor: str = "val_loss", factor: float = 0.1, patience: int = 10, verbose: int = 0,
                 mode: str = "auto", min_delta: float = 1e-4, cooldown: int = 0, min_lr: float = 0.0):
        super().__init__()
        if not 0 < factor < 1:
            raise ValueError(f"ReduceLROnPlateau factor must be in (0, 1), got {factor}")
        self.monitor, self.factor, self.patience, self.verbose = monitor, factor, patience, verbose
        self.mode = _mode(mode, monitor, "ReduceLROnPlateau")
        self.min_delta, self.cooldown, self.min_lr = min_delta, cooldown, min_lr
        self.on_train_begin()

    def on_train_begin(self, logs=None):
        self.wait = self.cooldown_counter = 0
        self.best = math.inf if self.mode == "min" else -math.inf

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        logs["learning_rate"] = self.model.learning_rate
        current = logs.get(self.monitor)
        if current is None:
            log.warning("ReduceLROnPlateau: metric '%s' is not available (have: %s)", self.monitor, ", ".join(logs))
            return
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        better = current < self.best - self.min_delta if self.mode == "min" else current > self.best + self.min_delta
        if better:
            self.best, self.wait = current, 0
            return
        if self.cooldown_counter > 0:
            return
        self.wait += 1
        if self.wait >= self.patience:
            old = self.model.learning_rate
            if old > self.min_lr:
                new = max(old * self.factor, self.min_lr)
                self.model.learning_rate = new
                if self.verbose:
                    print(f"Epoch {epoch + 1}: ReduceLROnPlateau reducing learning rate to {new}.")
                self.cooldown_counter, self.wait = self.cooldown, 0

"""`train.task: keras_loss` — Keras's losses and metrics by name, as a task of the core (the loss `compile()` names).

Batch: {inputs, labels, weights [B] (0 for padding examples), optionally sample_weights [B] (class weights: they
scale the loss, not the metrics)}; `labels` is y_true in whatever form the loss takes
(one-hot [B, C] for categorical_crossentropy, ids [B] for sparse_categorical_crossentropy, the outputs' shape for
binary_crossentropy / mse / mae). The model returns its last layer's outputs before the final activation (the
sequential family: `final_activation` names it; other families: logits, taken as "linear").

Losses follow Keras's definitions (keras.losses, "sum over batch size" reduction): a per-example loss (a mean over
the non-batch axes after the class axis is reduced), weighted and summed here, divided by the summed weights by the
core. `from_logits`: whether the model's outputs are logits (Keras's flag). With `from_logits: false` a final softmax
(categorical / sparse) or sigmoid (binary) is folded into the loss, computed from the pre-activation logits
(log-softmax / log-sigmoid: stable, equal to Keras's up to its 1e-7 clipping); any other final activation takes
Keras's probability form (renormalized, clipped to [1e-7, 1 − 1e-7]).

Metrics (`metrics: [accuracy, mae, ...]`) are per-example means summed like the loss; `accuracy` resolves as Keras
does: binary when the output has one unit (or the loss is binary), sparse when the labels have one axis fewer than
the outputs (or a last axis of 1), categorical otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fastserve.checks import near
from fastserve.tasks.base import Task, weighted_mean

EPSILON = 1e-7  # keras.config.epsilon()
LOSSES = ("categorical_crossentropy", "sparse_categorical_crossentropy", "binary_crossentropy", "mse", "mae")
LOSS_ALIASES = {"mean_squared_error": "mse", "mean_absolute_error": "mae"}
METRICS = ("accuracy", "acc", "categorical_accuracy", "sparse_categorical_accuracy", "binary_accuracy", "mae", "mse",
           "mean_absolute_error", "mean_squared_error")
CUSTOM = "custom"  # a Python callable given to compile() (not writable in YAML)


def canonical_loss(name: str) -> str:
    return LOSS_ALIASES.get(name, name)


@dataclass
class KerasLossConfig:
    name: str = "keras_loss"
    loss: str = "categorical_crossentropy"   # one of LOSSES (or their long Keras names)
    from_logits: bool = False
    metrics: list[str] = field(default_factory=list)

    def checks(self):
        loss = canonical_loss(self.loss)
        if loss not in LOSSES and loss != CUSTOM:
            yield "loss", f"unknown loss '{self.loss}'{near(self.loss, LOSSES)} (choose from {', '.join(LOSSES)})"
        for m in self.metrics:
            if m not in METRICS:
                yield "metrics", f"unknown metric '{m}'{near(m, METRICS)} (choose from {', '.join(METRICS)})"
        if len(set(self.metrics)) != len(self.metrics):
            yield "metrics", f"a metric is named twice: {self.metrics}"

    def build(self, loss_fn: Callable | None = None) -> "KerasLoss":
        return KerasLoss(self, loss_fn)


def _reduce(per: jax.Array) -> jax.Array:
    """[B, ...] → [B]: the mean over the non-batch axes (Keras's mean over every per-sample loss entry)."""
    return per.reshape(per.shape[0], -1).mean(axis=1) if per.ndim > 1 else per


def _sparse_ids(y: jax.Array, out: jax.Array) -> jax.Array:
    return (y[..., 0] if y.ndim == out.ndim else y).astype(jnp.int32)


def per_example_loss(loss: str, y: jax.Array, out: jax.Array, logits: bool) -> jax.Array:
    """Keras's loss `loss` per example [B]. `out`: logits when `logits`, else the model's (activated) outputs."""
    y32 = y.astype(jnp.float32)
    if loss in ("categorical_crossentropy", "sparse_categorical_crossentropy"):
        target = y32 if loss == "categorical_crossentropy" else jax.nn.one_hot(_sparse_ids(y, out), out.shape[-1])
        if logits:
            log_p = jax.nn.log_softmax(out, axis=-1)
        else:
            p = out / jnp.sum(out, axis=-1, keepdims=True)
            log_p = jnp.log(jnp.clip(p, EPSILON, 1 - EPSILON))
        return _reduce(-jnp.sum(target * log_p, axis=-1))
    if y.ndim == out.ndim - 1:  # [B] targets for [B, 1] outputs
        y32 = y32[..., None]
    if loss == "binary_crossentropy":
        if logits:
            per = optax.sigmoid_binary_cross_entropy(out, y32)
        else:
            p = jnp.clip(out, EPSILON, 1 - EPSILON)
            per = -(y32 * jnp.log(p) + (1 - y32) * jnp.log(1 - p))
        return _reduce(per.mean(axis=-1))
    if loss == "mse":
        return _reduce(jnp.mean((y32 - out) ** 2, axis=-1))
    if loss == "mae":
        return _reduce(jnp.mean(jnp.abs(y32 - out), axis=-1))
    raise ValueError(f"unknown loss '{loss}' (choose from {', '.join(LOSSES)})")


def resolve_accuracy(name: str, loss: str, y_shape: tuple, out_shape: tuple) -> str:
    """The accuracy Keras means by `accuracy` / `acc` for these shapes (static at trace time)."""
    if name not in ("accuracy", "acc"):
        return name
    if loss == "binary_crossentropy" or out_shape[-1] == 1:
        return "binary_accuracy"
    if loss == "sparse_categorical_crossentropy" or len(y_shape) == len(out_shape) - 1 or (
            len(y_shape) == len(out_shape) and y_shape[-1] == 1):
        return "sparse_categorical_accuracy"
    return "categorical_accuracy"


def per_example_metric(name: str, y: jax.Array, pred: jax.Array) -> jax.Array:
    """[B] per-example value of a (resolved) metric; `pred`: the model's probabilities / values."""
    if name == "categorical_accuracy":
        return _reduce((jnp.argmax(y, -1) == jnp.argmax(pred, -1)).astype(jnp.float32))
    if name == "sparse_categorical_accuracy":
        return _reduce((_sparse_ids(y, pred) == jnp.argmax(pred, -1)).astype(jnp.float32))
    y32 = y.astype(jnp.float32)
    if y.ndim == pred.ndim - 1:
        y32 = y32[..., None]
    if name == "binary_accuracy":
        return _reduce(jnp.mean(((pred > 0.5) == (y32 > 0.5)).astype(jnp.float32), axis=-1))
    if name in ("mse", "mean_squared_error"):
        return _reduce(jnp.mean((y32 - pred) ** 2, axis=-1))
    if name in ("mae", "mean_absolute_error"):
        return _reduce(jnp.mean(jnp.abs(y32 - pred), axis=-1))
    raise ValueError(f"unknown metric '{name}'")


class KerasLoss(Task):
    name = "keras_loss"
    unit = "examples"
    batch_keys = ("inputs", "labels", "weights")

    def __init__(self, cfg: KerasLossConfig | None = None, loss_fn: Callable | None = None):
        self.cfg = cfg or KerasLossConfig()
        self.loss_name = canonical_loss(self.cfg.loss)
        if self.loss_name == CUSTOM and loss_fn is None:
            raise ValueError("train.task.loss=custom needs a Python callable (compile(loss=fn)); in a config name "
                             f"one of {', '.join(LOSSES)}")
        self.loss_fn = loss_fn
        self.report = ("loss", *self.cfg.metrics)

    def outputs(self, model, batch, rngs) -> tuple[jax.Array, jax.Array, bool]:
        """(what the loss takes, the model's outputs as Keras's model(x) gives them, whether the former are logits)."""
        extra = {"mask": batch["weights"] > 0} if getattr(model, "accepts_example_mask", False) else {}
        z = model(batch["inputs"], rngs=rngs, **extra).astype(jnp.float32)
        final = getattr(model, "final_activation", "linear")
        from fastserve.models.sequential import activate
        out = activate(final, z)
        if self.cfg.from_logits:
            return out, out, True
        folded = {"categorical_crossentropy": "softmax", "sparse_categorical_crossentropy": "softmax",
                  "binary_crossentropy": "sigmoid"}.get(self.loss_name)
        if folded is not None and final == folded:
            return z, out, True
        return out, out, False

    def loss(self, model, batch, rngs, task_state):
        for_loss, out, logits = self.outputs(model, batch, rngs)
        y, w = batch["labels"], batch["weights"].astype(jnp.float32)
        if self.loss_fn is not None:
            per = self.loss_fn(y, out)
            if jnp.ndim(per) == 0:
                raise ValueError("a custom loss must return one value per example (shape [batch] or [batch, ...]), "
                                 "not a scalar: Keras reduces it over the batch itself")
            per = _reduce(jnp.asarray(per, jnp.float32))
        else:
            per = per_example_loss(self.loss_name, y, for_loss, logits)
        # class weights (fit(class_weight=...)) scale the loss only: Keras divides by the examples, not the weights,
        # and leaves its `metrics` unweighted
        scale = w * batch["sample_weights"].astype(jnp.float32) if "sample_weights" in batch else w
        loss_sum = jnp.sum(per * scale)
        sums = {"loss_sum": loss_sum, "weight": jnp.sum(w)}
        binary = self.loss_name == "binary_crossentropy" or out.shape[-1] == 1
        pred = jax.nn.sigmoid(out) if self.cfg.from_logits and binary else out  # metrics see probabilities
        for m in self.cfg.metrics:
            kind = resolve_accuracy(m, self.loss_name, y.shape, out.shape)
            sums[m] = jnp.sum(per_example_metric(kind, y, pred) * w)
        return loss_sum, sums

    def summarize(self, sums):
        return {"loss": weighted_mean(sums, "loss_sum"), **{m: weighted_mean(sums, m) for m in self.cfg.metrics}}

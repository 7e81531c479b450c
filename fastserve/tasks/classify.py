"""`train.task: classify` — one label per example (a sentence, an image): cross-entropy, accuracy, macro-F1.

Batch: {inputs, labels [B] int, weights [B] (0 for padding examples)} plus, for padded sequences, `mask` [B, T]
(true on real tokens), which is handed to the model. A classifier model (any family) is called as
`model(inputs, mask=..., rngs=...)` → logits [B, num_classes]; `mask` only when the batch has one.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fastserve.tasks.base import Task, weighted_mean


@dataclass
class ClassifyConfig:
    name: str = "classify"
    label_smoothing: float = 0.0

    def checks(self):
        if not 0 <= self.label_smoothing < 1:
            yield "label_smoothing", f"must be in [0, 1), got {self.label_smoothing}"

    def build(self) -> "Classification":
        return Classification(self)


def model_inputs(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The keyword inputs a batch gives a model besides `inputs` (the padding mask, when there is one)."""
    return {"mask": batch["mask"]} if "mask" in batch else {}


class Classification(Task):
    name = "classify"
    unit = "examples"
    report = ("loss", "accuracy", "macro_f1")
    batch_keys = ("inputs", "labels", "weights")

    def __init__(self, cfg: ClassifyConfig | None = None):
        self.cfg = cfg or ClassifyConfig()

    def loss(self, model, batch, rngs, task_state):
        logits = model(batch["inputs"], **model_inputs(batch), rngs=rngs).astype(jnp.float32)
        n_classes = logits.shape[-1]
        labels = batch["labels"]
        weights = batch["weights"].astype(jnp.float32)
        target = optax.smooth_labels(jax.nn.one_hot(labels, n_classes), self.cfg.label_smoothing)
        ce = optax.softmax_cross_entropy(logits, target)
        pred = jnp.argmax(logits, axis=-1)
        loss_sum = jnp.sum(ce * weights)
        # per-class counts sum exactly across batches and hosts: macro-F1 from them at the end
        pred_1h = jax.nn.one_hot(pred, n_classes) * weights[:, None]
        true_1h = jax.nn.one_hot(labels, n_classes) * weights[:, None]
        return loss_sum, {"loss_sum": loss_sum, "weight": jnp.sum(weights),
                          "correct": jnp.sum((pred == labels) * weights),
                          "true_pos": jnp.sum(pred_1h * true_1h, axis=0), "predicted": jnp.sum(pred_1h, axis=0),
                          "actual": jnp.sum(true_1h, axis=0)}

    def summarize(self, sums):
        return {"loss": weighted_mean(sums, "loss_sum"), "accuracy": weighted_mean(sums, "correct"),
                "macro_f1": macro_f1(sums["true_pos"], sums["predicted"], sums["actual"])}


def macro_f1(true_pos, predicted, actual) -> float:
    """Mean over the classes present (in the labels or the predictions) of 2·TP / (predicted + actual)."""
    tp, pred, act = (np.asarray(x, np.float64) for x in (true_pos, predicted, actual))
    present = (pred + act) > 0
    if not present.any():
        return 0.0
    return float(np.mean(2 * tp[present] / (pred[present] + act[present])))

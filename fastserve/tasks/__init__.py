"""Tasks: what a step computes from a model and a batch (loss and metrics). The step builders are task-agnostic.

A task's `loss` returns the *sum* of its per-example losses and a dict of metric sums that includes `weight`
(the number of examples/tokens counted). Sums, not means, so that gradient accumulation over micro-batches and
evaluation over many batches average exactly over tokens; `summarize` turns the sums into reported metrics.

A task that needs more than the model and the batch (a teacher's weights) receives it as `task_state`, a pytree
the steps pass in as a jit *argument* (`make_train_step(..., task_state_shardings=...)`), never as a constant.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import optax


class Task(Protocol):
    name: str

    def loss(self, model: Any, batch: dict[str, jax.Array], rng: jax.Array | None,
             task_state: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        ...

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        ...


class LanguageModeling:
    """Next-token prediction: batch = {inputs, targets, weights} of [B, T]."""

    name = "lm"

    def loss(self, model, batch, rng=None):
        logits, _ = model(batch["inputs"])
        weights = batch["weights"].astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
        loss_sum = jnp.sum(ce * weights)
        return loss_sum, {"loss_sum": loss_sum, "weight": jnp.sum(weights), "correct": jnp.sum(correct * weights)}

    def summarize(self, sums):
        weight = max(float(sums["weight"]), 1e-9)
        loss = float(sums["loss_sum"]) / weight
        return {"loss": loss, "perplexity": math.exp(min(loss, 80.0)), "accuracy": float(sums["correct"]) / weight}


class Distillation:
    """Knowledge distillation: the student matches a teacher's softened next-token distribution, per token.

    loss = alpha · T² · KL(softmax(teacher / T) ‖ softmax(student / T)) + (1 − alpha) · CE(student, targets),
    summed over tokens with the batch's weights. The teacher's params come in as `task_state` (a jit argument);
    its `graphdef` (structure only, no weights) is held here. Without a teacher (`task_state=None`, e.g. when
    `fastserve.evaluate` scores a distilled work dir) the task is plain language modeling.
    """

    name = "distill"

    def __init__(self, teacher_graphdef: Any = None, temperature: float = 2.0, alpha: float = 0.5):
        if not temperature > 0:
            raise ValueError(f"distill.temperature: expected a positive number, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distill.alpha: expected a number in [0, 1], got {alpha}")
        self.teacher_graphdef = teacher_graphdef
        self.temperature, self.alpha = float(temperature), float(alpha)

    def loss(self, model, batch, rng=None, task_state=None):
        from flax import nnx

        logits, _ = model(batch["inputs"])
        logits = logits.astype(jnp.float32)
        weights = batch["weights"].astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
        ce_sum = jnp.sum(ce * weights)
        sums = {"ce_sum": ce_sum, "weight": jnp.sum(weights), "correct": jnp.sum(correct * weights)}
        if task_state is None or self.teacher_graphdef is None:
            return ce_sum, {**sums, "loss_sum": ce_sum}
        teacher_logits, _ = nnx.merge(self.teacher_graphdef, task_state)(batch["inputs"])
        teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
        t = self.temperature
        log_p = jax.nn.log_softmax(teacher_logits / t, axis=-1)
        log_q = jax.nn.log_softmax(logits / t, axis=-1)
        kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)          # per token, ≥ 0
        kl_sum = jnp.sum(kl * weights)
        agree = (jnp.argmax(teacher_logits, axis=-1) == jnp.argmax(logits, axis=-1)).astype(jnp.float32)
        loss_sum = self.alpha * t * t * kl_sum + (1.0 - self.alpha) * ce_sum
        return loss_sum, {**sums, "loss_sum": loss_sum, "kl_sum": kl_sum, "agree": jnp.sum(agree * weights)}

    def summarize(self, sums):
        weight = max(float(sums["weight"]), 1e-9)
        ce = float(sums["ce_sum"]) / weight
        out = {"loss": float(sums["loss_sum"]) / weight, "ce": ce, "perplexity": math.exp(min(ce, 80.0)),
               "accuracy": float(sums["correct"]) / weight}
        if "kl_sum" in sums:
            out.update(kl=float(sums["kl_sum"]) / weight, teacher_agreement=float(sums["agree"]) / weight)
        return out


TASKS: dict[str, Callable[..., Task]] = {"lm": LanguageModeling, "distill": Distillation}


def make_task(name: str, **options: Any) -> Task:
    """The task registered as `name`, built with `options` (e.g. distill: teacher_graphdef, temperature, alpha)."""
    if name not in TASKS:
        raise ValueError(f"unknown train.task '{name}' (choose from {', '.join(TASKS)})")
    return TASKS[name](**options)

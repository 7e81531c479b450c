"""Tasks: what a step computes from a model and a batch (loss and metrics). The step builders are task-agnostic.

A task's `loss` returns the *sum* of its per-example losses and a dict of metric sums that includes `weight`
(the number of examples/tokens counted). Sums, not means, so that gradient accumulation over micro-batches and
evaluation over many batches average exactly over tokens; `summarize` turns the sums into reported metrics.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import optax


class Task(Protocol):
    name: str

    def loss(self, model: Any, batch: dict[str, jax.Array], rng: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
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


TASKS: dict[str, Callable[[], Task]] = {"lm": LanguageModeling}


def make_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown train.task '{name}' (choose from {', '.join(TASKS)})")
    return TASKS[name]()

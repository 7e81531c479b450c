"""Optimizers and learning-rate schedules from an `OptimizerConfig`."""
from __future__ import annotations

from typing import Any

import jax
import optax

from fastserve.config import OPTIMIZERS, SCHEDULES  # the names a config may use (checked when it loads)


def make_schedule(cfg: Any, total_steps: int) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then cosine / linear decay to `min_lr_ratio`× (or constant)."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown optimizer.schedule '{cfg.schedule}' (choose from {', '.join(SCHEDULES)})")
    peak, warmup = cfg.learning_rate, max(0, min(cfg.warmup_steps, total_steps))
    end = peak * cfg.min_lr_ratio
    decay_steps = max(1, total_steps - warmup)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain for `cfg.name`, with global-norm clipping first when `clip_norm` > 0."""
    schedule = make_schedule(cfg, total_steps)
    # Weight decay applies to matrices only: norms scales and biases are left alone.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    if cfg.name == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    elif cfg.name == "adam":
        opt = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    elif cfg.name == "sgd":
        opt = optax.sgd(schedule, momentum=cfg.momentum or None)
    elif cfg.name == "lion":
        opt = optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)
    elif cfg.name == "adafactor":
        opt = optax.adafactor(schedule, weight_decay_rate=cfg.weight_decay or None,
                              weight_decay_mask=decay_mask if cfg.weight_decay else None)
    else:
        raise ValueError(f"unknown optimizer.name '{cfg.name}' (choose from {', '.join(OPTIMIZERS)})")
    if cfg.clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
    return opt, schedule

"""Optimizers and learning-rate schedules from an `OptimizerConfig`.

A scanned decoder (`model.scan_layers`) holds each block parameter stacked over the layers ([L, d, f]). Its optimizer
runs per layer on those leaves (`per_layer`: vmapped over the leading axis), so a scanned run is the same optimizer
as a per-layer one: adafactor's update clipping, parameter-scale factor and factored dims are per-tensor statistics
that would otherwise mix the layers, and the weight-decay mask (matrices only) would take a stacked norm scale [L, d]
for a matrix. adam, sgd and lion are elementwise apart from that mask.
"""
from __future__ import annotations

from typing import Any

import jax
import optax

from fastserve.config import OPTIMIZERS, SCHEDULES  # the names a config may use (checked when it loads)
from fastserve.models.layer_stack import layer_axes, layer_slice


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


def make_optimizer(cfg: Any, total_steps: int, model_cfg: Any = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain for `cfg.name`, with global-norm clipping first when `clip_norm` > 0. Pass the model's config:
    for a scanned decoder (`model_cfg.scanned`) the optimizer runs per layer on the stacked blocks (`per_layer`)."""
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
        opt = adafactor(schedule, cfg.weight_decay, decay_mask)
    else:
        raise ValueError(f"unknown optimizer.name '{cfg.name}' (choose from {', '.join(OPTIMIZERS)})")
    if getattr(model_cfg, "scanned", False):
        opt = per_layer(opt)   # the global-norm clip below sums over every element: the same in either layout
    if cfg.clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
    return opt, schedule


def adafactor(schedule: optax.Schedule, weight_decay: float, decay_mask: Any) -> optax.GradientTransformation:
    """optax.adafactor's chain with its defaults (factored second moments, update clipping at block RMS 1, relative
    step size = parameter RMS), except that weight decay is scaled by the learning rate, as in AdamW: optax adds
    `weight_decay_rate × param` after the learning-rate scaling, so `optimizer.weight_decay: 0.1` would shrink every
    matrix by 10 % a step."""
    return optax.chain(
        optax.scale_by_factored_rms(),
        optax.clip_by_block_rms(1.0),
        optax.scale_by_param_block_rms(),
        optax.add_decayed_weights(weight_decay, mask=decay_mask) if weight_decay else optax.identity(),
        optax.scale_by_learning_rate(schedule),
    )


def per_layer(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` applied to each layer's slice of the stacked block leaves (layer_stack.layer_axes: those under a
    stacked `layers` dict), as it would be to per-layer weights; other leaves as they are. The state has the per-layer
    state's tree with its `layers` leaves stacked (counters stay scalars), so checkpoints convert between layouts
    with layer_stack.stack_layers / unstack_layers. `inner` must treat leaves independently (optax's per-parameter
    transforms do; global-norm clipping does not): a state leaf outside the layers that came to depend on a layer
    makes jax.vmap fail rather than mix them silently."""
    def init(params):
        p_axes = layer_axes(params)
        if 0 not in jax.tree.leaves(p_axes):   # nothing stacked (or optax's placeholder probing the state's tree)
            return inner.init(params)
        s_axes = layer_axes(jax.eval_shape(inner.init, layer_slice(params)))
        return jax.vmap(inner.init, in_axes=(p_axes,), out_axes=s_axes)(params)

    def update(updates, state, params=None):
        u_axes = layer_axes(updates)
        if 0 not in jax.tree.leaves(u_axes):
            return inner.update(updates, state, params)
        s_axes = layer_axes(state)
        return jax.vmap(inner.update, in_axes=(u_axes, s_axes, layer_axes(params)),
                        out_axes=(u_axes, s_axes))(updates, state, params)

    return optax.GradientTransformation(init, update)

"""Set-up of a training run: mesh, optimizer, a fresh sharded train state, then the work dir's newest checkpoint."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import jax

from fastserve import parallel
from fastserve.core.checkpoint import CheckpointMismatch, Checkpointer
from fastserve.config import Config
from fastserve.core.optim import make_optimizer
from fastserve.core.state import abstract_train_state, create_train_state

log = logging.getLogger(__name__)


@dataclass
class TrainSetup:
    mesh: Any
    tx: Any
    schedule: Any
    graphdef: Any
    state: dict
    shardings: Any
    checkpointer: Checkpointer
    start_step: int
    data_state: dict | None
    init_note: str = ""            # train.init_from: what was loaded and what is fresh (the start-up line says it)


def prepare_state(cfg: Config, restore: bool = True) -> TrainSetup:
    """Mesh, optimizer and a fresh sharded state; then the newest readable checkpoint of the work dir, if any, or
    else the weights of `train.init_from` wherever they fit (fastserve.core.init_from)."""
    mesh = parallel.make_mesh(cfg.mesh)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps, cfg.model)   # per layer on scanned blocks
    graphdef, state, shardings = create_train_state(cfg.model, tx, mesh, cfg.train.seed)
    ckpt = Checkpointer(os.path.join(cfg.train.workdir, "checkpoints"), cfg.checkpoint.max_to_keep,
                        cfg.checkpoint.async_save)
    start_step, data_state, init_note = 0, None, ""
    if restore:
        restored = _restore_either_layout(ckpt, cfg.model, state, shardings)
        if restored is not None:
            start_step, state, extra = restored
            data_state = extra.get("data")
            log.info("resumed from step %d of %s", start_step, ckpt.directory)
    if cfg.train.init_from and start_step == 0:   # a resumed run has its own weights: init_from only starts a run
        from fastserve.core.init_from import init_params_from
        params, report = init_params_from(state["params"], shardings["params"], cfg.train.init_from)
        state = {**state, "params": params}
        init_note = report.line()
    return TrainSetup(mesh, tx, schedule, graphdef, state, shardings, ckpt, start_step, data_state, init_note)


def _restore_either_layout(ckpt: Checkpointer, model_cfg: Any, state: dict, shardings: Any):
    """`ckpt.restore_latest` for this state; a checkpoint saved with the other layer layout of the same model
    (stacked ↔ per-layer blocks: `model.scan_layers` changed, or a work dir from before it) is read in that layout
    and converted, optimizer moments included."""
    abstract = abstract_train_state(state, shardings)
    try:
        return ckpt.restore_latest(abstract)
    except CheckpointMismatch as mismatch:
        from fastserve.models.layer_stack import other_layout, stack_layers, unstack_layers
        if other_layout(model_cfg) is None:
            raise
        to_saved, to_ours = (unstack_layers, stack_layers) if model_cfg.scanned else (stack_layers, unstack_layers)
        try:
            found = ckpt.restore_latest(to_saved(abstract))
        except CheckpointMismatch:
            raise mismatch from None   # not a layout change: another model config (the error for this layout says so)
    step, saved, extra = found
    log.info("checkpoint step %d has the other layer layout: converted to %s", step,
             "stacked (scan_layers)" if model_cfg.scanned else "per-layer")
    return step, jax.device_put(to_ours(saved), shardings), extra

"""Set-up of a training run: mesh, optimizer, a fresh sharded train state, then the work dir's newest checkpoint."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from fastserve import parallel
from fastserve.core.checkpoint import Checkpointer
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
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
    graphdef, state, shardings = create_train_state(cfg.model, tx, mesh, cfg.train.seed)
    ckpt = Checkpointer(os.path.join(cfg.train.workdir, "checkpoints"), cfg.checkpoint.max_to_keep,
                        cfg.checkpoint.async_save)
    start_step, data_state, init_note = 0, None, ""
    if restore:
        restored = ckpt.restore_latest(abstract_train_state(state, shardings))
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

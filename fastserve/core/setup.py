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


def prepare_state(cfg: Config, restore: bool = True) -> TrainSetup:
    """Mesh, optimizer and a fresh sharded state; then the newest readable checkpoint of the work dir, if any."""
    mesh = parallel.make_mesh(cfg.mesh)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
    graphdef, state, shardings = create_train_state(cfg.model, tx, mesh, cfg.train.seed)
    ckpt = Checkpointer(os.path.join(cfg.train.workdir, "checkpoints"), cfg.checkpoint.max_to_keep,
                        cfg.checkpoint.async_save)
    start_step, data_state = 0, None
    if restore:
        restored = ckpt.restore_latest(abstract_train_state(state, shardings))
        if restored is not None:
            start_step, state, extra = restored
            data_state = extra.get("data")
            log.info("resumed from step %d of %s", start_step, ckpt.directory)
    return TrainSetup(mesh, tx, schedule, graphdef, state, shardings, ckpt, start_step, data_state)

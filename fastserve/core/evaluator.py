"""Evaluation: `python -m fastserve.evaluate --config FILE [key=value ...]` scores the work dir's latest checkpoint
on the held-out split (loss, perplexity, token accuracy) and prints one JSON line."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
from typing import Any, Sequence

import jax

from fastserve import cli, parallel
from fastserve.core.checkpoint import CheckpointError
from fastserve.config import Config, SourceConfig
from fastserve.core.steps import make_eval_step
from fastserve.tasks import make_task
from fastserve.core.trainer import evaluate_params


def evaluate(cfg: Config) -> dict[str, Any]:
    """Held-out metrics of the newest readable checkpoint in `cfg.train.workdir`, by the config's task (with its
    options: a distillation task loads its teacher and reports the KL too).

    Restores the model's variables only (no optimizer state), so a work dir written by `fastserve.compress` scores
    too: its step-0 checkpoint, and int8 (inference-only) models.
    """
    from fastserve.workdir import load_model

    task = make_task(cfg.train.task)
    cfg = task.configure(cfg)
    workdir = cfg.train.workdir
    if not os.path.isfile(os.path.join(workdir, "config.yaml")):
        raise CheckpointError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}: train first")
    data = cfg.data.load(cfg)
    if not data.eval:
        raise ValueError("there is no held-out split to evaluate on (data.eval_fraction is 0?)")
    loaded = load_model(dataclasses.replace(cfg, source=SourceConfig(kind="checkpoint", path=workdir)))
    task_state, task_shardings = task.init_state(dataclasses.replace(cfg, model=loaded.model_cfg), loaded.mesh)
    eval_step = make_eval_step(loaded.graphdef, task, jax.tree.map(lambda x: x.sharding, loaded.params), loaded.mesh,
                               task_shardings)
    metrics = evaluate_params(eval_step, loaded.params, data.eval, task, loaded.mesh, task_state)
    metrics.update(task.heldout_extra(loaded.graphdef, loaded.params, data, loaded.mesh, cfg))
    return {"step": loaded.step, **metrics}


def _stop_now(signum: int, frame: Any) -> None:
    """SIGTERM ends an evaluation at once: it writes nothing, so there is nothing to finish, and unwinding through
    orbax's and XLA's threads would only print tracebacks."""
    os.write(2, b"evaluate: terminated (SIGTERM) before finishing; nothing was written\n")
    os._exit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = cli.parse(argv, "Evaluate the latest checkpoint of a work dir on held-out data.")
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop_now) if in_main_thread else None
    try:
        parallel.initialize_distributed(cfg.distributed)
        try:
            result = evaluate(cfg)
        except (CheckpointError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    if jax.process_index() == 0:
        print(json.dumps(result))
    bad = {k: v for k, v in result.items() if "loss" in k and isinstance(v, float) and not math.isfinite(v)}
    if bad:  # a NaN score must not pass for a result in scripts that only check the exit status
        print(f"error: held-out {', '.join(f'{k} is {v}' for k, v in bad.items())} for checkpoint step "
              f"{result.get('step')} of {cfg.train.workdir}: its weights hold NaN/inf or the evaluation overflowed "
              "(evaluate an earlier checkpoint, or retrain with a lower learning rate)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

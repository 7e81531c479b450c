"""Evaluation: `python -m fastserve.evaluate --config FILE [key=value ...]` scores the work dir's latest checkpoint
on the held-out split (loss, perplexity, token accuracy) and prints one JSON line."""
from __future__ import annotations

import json
import sys
from typing import Any, Sequence

import jax

from fastserve import cli, parallel
from fastserve.checkpoint import CheckpointError
from fastserve.config import Config
from fastserve.core.steps import make_eval_step
from fastserve.core.tasks import make_task
from fastserve.pipeline import prepare_lm_data, prepare_state, with_vocab
from fastserve.training import evaluate_params


def evaluate(cfg: Config) -> dict[str, Any]:
    """Held-out metrics of the newest readable checkpoint in `cfg.train.workdir`."""
    data = prepare_lm_data(cfg)
    cfg = with_vocab(cfg, data.tokenizer)
    setup = prepare_state(cfg)
    setup.checkpointer.close()
    if setup.start_step == 0:
        raise CheckpointError(f"no checkpoint in {setup.checkpointer.directory}: train first")
    if not data.eval:
        raise ValueError("data.eval_fraction is 0: there is no held-out split to evaluate on")
    task = make_task(cfg.train.task)
    eval_step = make_eval_step(setup.graphdef, task, setup.shardings["params"], setup.mesh)
    metrics = evaluate_params(eval_step, setup.state["params"], data.eval, task, setup.mesh)
    return {"step": setup.start_step, **metrics}


def main(argv: Sequence[str] | None = None) -> int:
    cfg = cli.parse(argv, "Evaluate the latest checkpoint of a work dir on held-out data.")
    parallel.initialize_distributed(cfg.distributed)
    try:
        result = evaluate(cfg)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

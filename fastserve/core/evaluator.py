"""Evaluation: `python -m fastserve.evaluate --config FILE [key=value ...]` scores the work dir's latest checkpoint
on the held-out split (loss, perplexity, token accuracy) and prints one JSON line."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Sequence

import jax

from fastserve import cli, parallel
from fastserve.core.checkpoint import CheckpointError
from fastserve.config import Config, SourceConfig
from fastserve.core.steps import make_eval_step
from fastserve.tasks import make_task
from fastserve.core.setup import prepare_lm_data, with_vocab
from fastserve.core.trainer import evaluate_params


def evaluate(cfg: Config) -> dict[str, Any]:
    """Held-out metrics of the newest readable checkpoint in `cfg.train.workdir`.

    Restores the params only (no optimizer state), so a work dir written by `fastserve.compress` scores too: its
    step-0 checkpoint, and int8 (inference-only) models. A distilled work dir is scored as plain language modeling.
    """
    from fastserve.workdir import load_model

    data = prepare_lm_data(cfg)
    cfg = with_vocab(cfg, data.tokenizer)
    if not data.eval:
        raise ValueError("data.eval_fraction is 0: there is no held-out split to evaluate on")
    workdir = cfg.train.workdir
    if not os.path.isfile(os.path.join(workdir, "config.yaml")):
        raise CheckpointError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}: train first")
    loaded = load_model(dataclasses.replace(cfg, source=SourceConfig(kind="checkpoint", path=workdir)))
    task = make_task(cfg.train.task)
    eval_step = make_eval_step(loaded.graphdef, task, jax.tree.map(lambda x: x.sharding, loaded.params), loaded.mesh)
    metrics = evaluate_params(eval_step, loaded.params, data.eval, task, loaded.mesh)
    return {"step": loaded.step, **metrics}


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

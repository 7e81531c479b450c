"""`python -m fastserve.tune --config configs/X.yaml --space SPACE.yaml [--out TUNE_DIR] [key=value ...]`:
hyper-parameter search over any config key with Optuna.

Each trial is an ordinary work dir TUNE_DIR/trial_NNNN trained from the config with the sampled values; its score
is a held-out metric the task reports (SPACE: `objective`, `direction`); bad trials are pruned at evaluation points
(`train.eval_every`). Re-running the same command resumes the study (TUNE_DIR/study.db) without repeating finished
trials. Writes TUNE_DIR/trials.jsonl, trials.md, best.yaml (`python -m fastserve.train --config TUNE_DIR/best.yaml`)
and objective.png. The search-space format is in fastserve/tuning/space.py; the study in fastserve/tuning/study.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from fastserve import cli
from fastserve.config import ConfigError, load_config


def main(argv: Sequence[str] | None = None) -> int:
    from fastserve.tuning import TuneError, load_spec
    from fastserve.tuning.study import tune

    p = argparse.ArgumentParser(prog="python -m fastserve.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the YAML config every trial starts from")
    p.add_argument("--space", required=True, help="the search-space YAML (see fastserve/tuning/space.py)")
    p.add_argument("--out", help="the tune dir (default: runs/tune_<config name>)")
    p.add_argument("--trials", type=int, help="finished trials the study should hold (overrides the space file)")
    p.add_argument("--timeout", type=float, help="wall seconds for this invocation (overrides timeout_s)")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the base config")
    args = p.parse_args(argv)
    cli.quiet_logs()
    out = args.out or os.path.join("runs", "tune_" + os.path.splitext(os.path.basename(args.config))[0])
    try:
        base = load_config(args.config, args.overrides)
        spec = load_spec(args.space, base)
        if args.trials is not None:
            spec.trials = args.trials
        if args.timeout is not None:
            spec.timeout_s = args.timeout
        summary = tune(base, spec, out, args.seed)
    except (ConfigError, TuneError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    if "best_config" in summary:
        base_note = (f" (baseline {summary['baseline_value']:.4f})" if "baseline_value" in summary else "")
        print(f"best held-out {spec.objective} {summary['best_value']:.4f}{base_note}: trial {summary['best_trial']} "
              f"{summary['best_params']}\ntrain it: python -m fastserve.train --config {summary['best_config']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

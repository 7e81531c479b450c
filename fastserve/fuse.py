"""`python -m fastserve.fuse`: model fusion of work dirs.

    python -m fastserve.fuse --out NEW --uniform RUN1 RUN2 ...   # mean of the weights
    python -m fastserve.fuse --out NEW --greedy RUN1 RUN2 ...    # greedy soup by held-out loss
    python -m fastserve.fuse --out NEW --ema RUN [--decay 0.5]   # EMA over RUN's kept checkpoints
    python -m fastserve.fuse --out NEW --ensemble RUN1 RUN2 ...  # average of the probabilities

The soups write NEW as an ordinary work dir (evaluate, compress, export, serve or fine-tune it); the work dirs must
share the architecture and tokenizer (a mismatch names the first differing parameter / token). `--ensemble`
averages the members' probabilities (members may differ in size; they share the tokenizer / label set) and writes
NEW as a work dir of `model.name: ensemble` (fastserve/fusion/model.py) holding every member: evaluate, generate,
export (prefill / decode / generate with every member's KV cache) and serve it like a single model. Held-out
metrics use the first work dir's config (data, split, task).
The code lives in fastserve/fusion/.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from fastserve import cli
from fastserve.core.checkpoint import CheckpointError


def main(argv: Sequence[str] | None = None) -> int:
    from fastserve.fusion import FusionError, load_member
    from fastserve.fusion import soup as soups
    from fastserve.fusion.members import REPORT_FILE

    p = argparse.ArgumentParser(prog="python -m fastserve.fuse", description=__doc__.split("\n\n")[0])
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--uniform", action="store_true", help="average every work dir's weights")
    how.add_argument("--greedy", action="store_true", help="greedy soup: add a model only if held-out improves")
    how.add_argument("--ema", action="store_true", help="EMA over one work dir's kept checkpoints")
    how.add_argument("--ensemble", action="store_true", help="average the members' probabilities")
    p.add_argument("--out", required=True, help="the new work dir")
    p.add_argument("--decay", type=float, default=0.5, help="--ema: weight of the average so far at each step")
    p.add_argument("--metric", default="loss", help="--greedy: the held-out metric to rank and accept by")
    p.add_argument("--maximize", action="store_true", help="--greedy: higher --metric is better (e.g. accuracy)")
    p.add_argument("--no-heldout", action="store_true", help="--uniform / --ema / --ensemble: skip held-out scoring")
    p.add_argument("workdirs", nargs="+", metavar="RUN")
    args = p.parse_args(argv)
    cli.quiet_logs()
    try:
        if args.ema and len(args.workdirs) != 1:
            raise FusionError(f"--ema averages one run's checkpoints: give one work dir, not {len(args.workdirs)}")
        if not args.ema and len(args.workdirs) < (1 if args.ensemble else 2):
            raise FusionError("give at least two work dirs to fuse")
        members = [load_member(w) for w in args.workdirs]
        if args.ensemble:
            return _ensemble(members, args)
        heldout = None if args.no_heldout and not args.greedy else soups.HeldOut(members[0].cfg, members[0])
        if args.greedy:
            variables, report = soups.greedy_soup(members, heldout, args.metric, args.maximize)
        elif args.uniform:
            variables, report = soups.uniform_soup(members, heldout)
        else:
            variables, report = soups.ema_of_checkpoints(members[0], args.decay, heldout)
        soups.write_soup(members, variables, args.out, report)
    except (FusionError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for row in report.get("members", []):
        print(f"{row['model']:50} held-out {_fmt(row.get('heldout'))}")
    print(f"{report['method']} soup of {len(report['used'])} → {args.out}: held-out {_fmt(report.get('soup'))}")
    print(f"report: {os.path.join(args.out, REPORT_FILE)}")
    return 0


def _ensemble(members, args) -> int:
    from fastserve.fusion.ensemble import ensemble_member, write_ensemble
    from fastserve.fusion.members import REPORT_FILE
    from fastserve.fusion.soup import HeldOut

    report = {"method": "ensemble", "combine": "log(mean softmax)", "used": [m.label for m in members],
              "members": [{"model": m.label} for m in members]}
    if not args.no_heldout:
        for row, m in zip(report["members"], members):
            row["heldout"] = HeldOut(members[0].cfg, m)(m.params)  # every model on the same held-out split
        ens = ensemble_member(members)
        report["ensemble"] = HeldOut(members[0].cfg, ens)(ens.params)
    write_ensemble(members, args.out, report)
    for row in report["members"]:
        print(f"{row['model']:50} held-out {_fmt(row.get('heldout'))}")
    print(f"ensemble of {len(members)} → {args.out}: held-out {_fmt(report.get('ensemble'))}\n"
          f"serve it: python -m fastserve.serve source.path={args.out}   (generate / export / evaluate: --checkpoint "
          f"{args.out})\n"
          f"report: {os.path.join(args.out, REPORT_FILE)}")
    return 0


def _fmt(metrics: dict | None) -> str:
    if not metrics:
        return "(not scored)"
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


if __name__ == "__main__":
    sys.exit(main())

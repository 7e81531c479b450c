"""Checks the claims in the headers of the family recipes (configs/encoder_synthetic.yaml, cnn_synthetic.yaml,
seq2seq_synthetic.yaml): each is trained as its header says, and its final held-out metric must reach the claim.

    python experiments/bench_recipes.py            # every recipe as written (about 2 minutes on 2 cores)
    python experiments/bench_recipes.py --quick    # a third of the steps: only checks that each one learns

Prints one JSON object on its last line and writes experiments/results/bench_recipes.json (full mode).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import fastserve

from provenance import provenance  # experiments/: the script's own directory is on sys.path

# recipe → (metric, the value its header claims at the end, at least); chance levels for --quick
CLAIMS = {
    "configs/encoder_synthetic.yaml": ("accuracy", 0.97, 0.6),
    "configs/cnn_synthetic.yaml": ("accuracy", 0.98, 0.2),
    "configs/seq2seq_synthetic.yaml": ("exact_match", 0.99, 0.05),
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rows = []
    for recipe, (metric, claim, chance) in CLAIMS.items():
        cfg = fastserve.load_config(recipe)
        steps = cfg.train.steps // 3 if args.quick else cfg.train.steps
        workdir = tempfile.mkdtemp(prefix="fastserve-recipe-")
        t0 = time.time()
        quiet = ["train.task.samples=0"] if hasattr(cfg.train.task, "samples") else []
        out = fastserve.train(recipe, f"train.workdir={workdir}", f"train.steps={steps}",
                              f"train.eval_every={steps}", "log.progress=false", *quiet)
        value = out["eval"][metric]
        target = chance if args.quick else claim
        rows.append({"recipe": recipe, "steps": steps, "wall_s": round(time.time() - t0, 1), "metric": metric,
                     "value": round(value, 4), "claim": claim, "met": value >= target})
        print(json.dumps(rows[-1]), flush=True)
    result = {"bench": "recipes", "quick": args.quick, "rows": rows, "all_met": all(r["met"] for r in rows),
              "date": time.strftime("%Y-%m-%d"), **provenance()}
    if not args.quick:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_recipes.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0 if result["all_met"] else 1


if __name__ == "__main__":
    sys.exit(main())

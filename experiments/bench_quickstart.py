"""Checks the claim in configs/quickstart.yaml's header: wall time and held-out loss of the quickstart recipe.

    python experiments/bench_quickstart.py            # the full recipe (300 steps, a few minutes on 2 cores)
    python experiments/bench_quickstart.py --quick    # 60 steps (about a minute): only checks the loss falls

Prints one JSON object on its last line and writes experiments/results/bench_quickstart.json (full mode).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import jax

import fastserve

from provenance import provenance  # experiments/: the script's own directory is on sys.path

CLAIM_FINAL_LOSS = 4.9      # configs/quickstart.yaml: held-out loss at step 300 at or below this


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="fastserve-quickstart-")
    overrides = [f"train.workdir={workdir}", "log.progress=false", "train.task.samples=0"]
    if args.quick:
        overrides += ["train.steps=60", "train.eval_every=60"]
    load_start = os.getloadavg()[0]
    t0 = time.time()
    results = fastserve.train("configs/quickstart.yaml", *overrides)
    wall = time.time() - t0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    evals = {r["step"]: r["loss"] for r in records if r["split"] == "eval"}
    tps = [r["tokens_per_s"] for r in records if r["split"] == "train" and "tokens_per_s" in r]
    out = {
        "bench": "quickstart", "quick": args.quick, "steps": results["step"], "wall_s": round(wall, 1),
        "held_out_loss_step0": round(evals[0], 4), "held_out_loss_final": round(evals[results["step"]], 4),
        "held_out_perplexity_final": round(results["eval"]["perplexity"], 2),
        "tokens_per_s_median": round(sorted(tps)[len(tps) // 2], 1) if tps else None,
        "params": results["params"], "claim_final_loss_max": CLAIM_FINAL_LOSS,
        "claim_met": (evals[results["step"]] <= CLAIM_FINAL_LOSS) if not args.quick else
                     (evals[results["step"]] < evals[0] - 2.0),
        "load_avg_start": round(load_start, 2), "load_avg_end": round(os.getloadavg()[0], 2),
        "jax": jax.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"), **provenance(),
    }
    if not args.quick:
        with open(os.path.join(os.path.dirname(__file__), "results", "bench_quickstart.json"), "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))
    return 0 if out["claim_met"] else 1


if __name__ == "__main__":
    sys.exit(main())

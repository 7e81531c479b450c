"""Model fusion on a small quickstart-like LM: held-out loss of 3 fine-tunes from one start (learning rates
1e-3 / 3e-3 / 6e-3, same seed so the same held-out split and data order), their uniform and greedy soups and
their probability-averaging ensemble, and the ensemble's cost (forward tokens/s vs one member, timed interleaved).

    python experiments/bench_fusion.py            # d128 2-layer model, 150 + 60 steps: 74 s (2 cores, load ~4)
    python experiments/bench_fusion.py --quick    # 40 + 20 steps: 51 s at load ~5 (3.7 min at load ~17; mostly compiles
                                                  # and tokenizer training)

No peer framework is timed: the comparison that matters is fused vs single model, measured in the same run. The
greedy soup is selected on the held-out split it is scored on (as fastserve.fuse --greedy does), so its number is
optimistic by that selection. Prints one JSON object on its last line; writes experiments/results/bench_fusion.json
(and .md) in full mode, bench_fusion_quick.json with --quick.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

from provenance import provenance  # experiments/: the script's own directory is on sys.path

MODEL = ["model.d_model=128", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=344",
         "model.max_seq_len=64", "data.seq_len=64", "data.batch_size=16", "tokenizer.vocab_size=2000",
         "log.progress=false", "log.tensorboard=false", "train.task.samples=0", "optimizer.warmup_steps=10"]
LEARNING_RATES = (1e-3, 3e-3, 6e-3)


def train_run(root: str, name: str, *overrides: str) -> str:
    from fastserve.config import load_config
    from fastserve.core.trainer import train
    workdir = os.path.join(root, name)
    train(load_config("configs/quickstart.yaml", [*MODEL, f"train.workdir={workdir}", *overrides]))
    return workdir


def forward_rate(fn, args, tokens: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return tokens / statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    from fastserve.fusion import load_member
    from fastserve.fusion.ensemble import EnsembleHeldOut, ensemble_forward
    from fastserve.fusion.soup import HeldOut, greedy_soup, uniform_soup

    base_steps, ft_steps = (40, 20) if args.quick else (150, 60)
    root = tempfile.mkdtemp(prefix="fastserve-fusion-")
    load_start = os.getloadavg()[0]
    t0 = time.time()
    base = train_run(root, "base", f"train.steps={base_steps}", f"train.eval_every={base_steps}",
                     "optimizer.learning_rate=3e-3")
    tok = os.path.join(base, "tokenizer.model")
    runs = [train_run(root, f"lr{lr:g}", f"train.steps={ft_steps}", f"train.eval_every={ft_steps}",
                      f"train.init_from={base}", f"tokenizer.path={tok}", f"optimizer.learning_rate={lr}",
                      "optimizer.schedule=cosine") for lr in LEARNING_RATES]
    train_s = time.time() - t0

    members = [load_member(w) for w in runs]
    heldout = HeldOut(members[0].cfg, members[0])
    base_loss = heldout(load_member(base).params)["loss"]
    _, uniform = uniform_soup(members, heldout)
    _, greedy = greedy_soup(members, heldout)
    ensemble = EnsembleHeldOut(members)()

    # cost: one jitted forward of a [16, 64] batch, the best member alone vs the 3-member ensemble, interleaved
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 2000, (16, 64)).astype(np.int32)
    one_fn, one_vars = ensemble_forward(members[:1], ["tokens"])
    ens_fn, ens_vars = ensemble_forward(members, ["tokens"])
    one_jit, ens_jit = jax.jit(one_fn), jax.jit(ens_fn)
    one_rates, ens_rates = [], []
    for _ in range(3 if args.quick else 6):
        one_rates.append(forward_rate(one_jit, (one_vars, tokens), tokens.size, 5))
        ens_rates.append(forward_rate(ens_jit, (ens_vars, tokens), tokens.size, 5))
    one_rate, ens_rate = statistics.median(one_rates[1:] or one_rates), statistics.median(ens_rates[1:] or ens_rates)

    rows = {f"lr={lr:g}": r["heldout"]["loss"] for lr, r in zip(LEARNING_RATES, uniform["members"])}
    best_member = min(rows.values())
    out = {
        "bench": "fusion", "quick": args.quick,
        "model": "decoder d128 2 layers d_ff 344, vocab 2000, seq 64 (pydoc)", "params": int(sum(
            x.size for x in jax.tree.leaves(members[0].params))),
        "base_steps": base_steps, "finetune_steps": ft_steps, "learning_rates": list(LEARNING_RATES),
        "heldout_tokens": int(sum(float(b["weights"].sum()) for b in heldout.data.eval)),
        "heldout_loss": {"base": round(base_loss, 4), **{k: round(v, 4) for k, v in rows.items()},
                         "uniform_soup": round(uniform["soup"]["loss"], 4),
                         "greedy_soup": round(greedy["soup"]["loss"], 4), "ensemble": round(ensemble["loss"], 4)},
        "greedy_used": [os.path.basename(u.split("@")[0]) for u in greedy["used"]],
        "ensemble_minus_best_member": round(ensemble["loss"] - best_member, 4),
        "greedy_minus_best_member": round(greedy["soup"]["loss"] - best_member, 4),
        "forward_tokens_per_s": {"one_member": round(one_rate, 1), "ensemble_of_3": round(ens_rate, 1),
                                 "ratio": round(ens_rate / one_rate, 3)},
        "train_s": round(train_s, 1), "wall_s": round(time.time() - t0, 1),
        "load_avg_start": round(load_start, 2), "load_avg_end": round(os.getloadavg()[0], 2),
        "jax": jax.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"), **provenance(),
    }
    name = "bench_fusion_quick" if args.quick else "bench_fusion"
    results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    with open(os.path.join(results, f"{name}.json"), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(results, f"{name}.md"), "w") as f:
        f.write(f"# fusion ({'quick' if args.quick else 'full'}): held-out loss, {out['model']}\n\n| model | loss |\n"
                "|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in out["heldout_loss"].items()) +
                f"\nensemble forward tokens/s {ens_rate:.0f} vs one member {one_rate:.0f} "
                f"(ratio {ens_rate / one_rate:.2f})\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Model fusion on a small quickstart-like LM: held-out loss of 3 fine-tunes from one start (learning rates
1e-3 / 3e-3 / 6e-3, same seed so the same held-out split and data order), their uniform and greedy soups and
their probability-averaging ensemble (`model.name: ensemble`, as fastserve.fuse --ensemble writes it), and the
ensemble's cost vs one member, timed interleaved: forward tokens/s of a [16, 64] batch, and KV-cached decode
tokens/s (8 rows, one jitted decode step per token as the serving engine runs it, one host transfer per step).

    python experiments/bench_fusion.py            # d128 2-layer model, 150 + 60 steps: 74 s (2 cores, load ~4)
    python experiments/bench_fusion.py --quick    # 40 + 20 steps: 51 s at load ~5 (6.5 min at load ~17; mostly compiles
                                                  # and tokenizer training)
    python experiments/bench_fusion.py --part tune [--tune-dir DIR] [--no-run]
        # the recipe configs/tune_quickstart.yaml (python -m fastserve.tune on the quickstart): runs or resumes the
        # study in DIR, then records the shipped default (trial 0) against the best trial measured in the same study,
        # wall and CPU seconds: experiments/results/tune_quickstart.{json,md,png}. --no-run: record DIR as it is.
        # --quick: 2 trials of 20 steps (a smoke run of the same path; results/tune_quickstart_quick.*)

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
import yaml

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


def forward_program(member):
    """jit of (variables, tokens) → the model's logits (the ensemble's: log of the mean probabilities)."""
    from fastserve.generation.program import model_program
    return model_program(member.loaded.graphdef, lambda model, tokens: model(tokens)[0])


class DecodeTimer:
    """KV-cached greedy decoding of ROWS rows, one jitted step per token (the cache donated, the sampled tokens
    fetched to the host every step, as the serving engine does)."""
    ROWS, CACHE_LEN = 8, 64

    def __init__(self, member):
        from fastserve.generation import decoding as infer
        from fastserve.generation.program import bind
        graphdef, self.params = member.loaded.graphdef, member.params

        def step(variables, cache, tokens, positions):
            logits, cache = infer.decode(bind(graphdef, variables), tokens, positions, cache)
            return jax.numpy.argmax(logits, -1).astype(np.int32), cache

        self.step = jax.jit(step, donate_argnums=1)
        self.init = jax.jit(lambda v: bind(graphdef, v).init_cache(self.ROWS, self.CACHE_LEN))

    def rate(self, steps: int) -> float:
        cache, tokens = self.init(self.params), np.ones(self.ROWS, np.int32)
        t = time.perf_counter()
        for i in range(steps):
            tokens, cache = self.step(self.params, cache, tokens, np.full(self.ROWS, i, np.int32))
            tokens = np.asarray(tokens)
        return self.ROWS * steps / (time.perf_counter() - t)


def tune_part(args) -> int:
    """Runs (or resumes, or with --no-run only reads) the quickstart tuning study and records default vs best."""
    import resource
    import shutil
    from fastserve import tune as tune_cli

    out = args.tune_dir or tempfile.mkdtemp(prefix="fastserve-tune-")
    argv = ["--config", "configs/quickstart.yaml", "--space", "configs/tune_quickstart.yaml", "--out", out,
            "train.task.samples=0", "log.progress=false"]
    if args.quick:
        argv += ["--trials", "2", "train.steps=20", "train.eval_every=10", "checkpoint.every=10"]
    t0, load_start = time.time(), os.getloadavg()[0]
    if not args.no_run and tune_cli.main(argv) != 0:
        return 1
    with open(os.path.join(out, "trials.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    finished = sum(r["state"] in ("COMPLETE", "PRUNED") for r in rows)
    budget = 2 if args.quick else int(yaml.safe_load(open("configs/tune_quickstart.yaml"))["trials"])
    baseline = next((r for r in complete if r["baseline"]), None)
    best = min(complete, key=lambda r: r["value"]) if complete else None
    out_json = {
        "bench": "tune_quickstart", "quick": args.quick, "command": "python -m fastserve.tune " + " ".join(argv),
        "trials": len(rows), "complete": len(complete), "budget_trials": budget, "study_finished": finished >= budget, "pruned": sum(r["state"] == "PRUNED" for r in rows),
        "baseline": baseline and {"trial": baseline["trial"], "loss": round(baseline["value"], 4),
                                  "params": baseline["params"]},
        "best": best and {"trial": best["trial"], "loss": round(best["value"], 4), "params": best["params"]},
        "best_minus_default": round(best["value"] - baseline["value"], 4) if best and baseline else None,
        # per trial, summed over its slices: CPU seconds of all threads, and wall (on a shared machine)
        "trial_cpu_s": round(sum(r.get("cpu_seconds") or 0 for r in rows), 1),
        "trial_wall_s": round(sum(r.get("seconds") or 0 for r in rows), 1),
        "rows": [{k: r.get(k) for k in ("trial", "state", "value", "step", "params", "seconds", "cpu_seconds")}
                 for r in rows],
        "wall_s_this_invocation": round(time.time() - t0, 1), "load_avg_start": round(load_start, 2),
        "load_avg_end": round(os.getloadavg()[0], 2),
        "process_cpu_s": round(resource.getrusage(resource.RUSAGE_SELF).ru_utime
                               + resource.getrusage(resource.RUSAGE_SELF).ru_stime, 1),
        "jax": jax.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"), **provenance(),
    }
    name = "tune_quickstart_quick" if args.quick else "tune_quickstart"
    results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    with open(os.path.join(results, f"{name}.json"), "w") as f:
        json.dump(out_json, f, indent=1)
    with open(os.path.join(out, "trials.md")) as f:
        table = f.read().split("\n", 2)[2]
    summary = (f"default (trial {baseline['trial']}) {baseline['value']:.4f} vs best (trial {best['trial']}) "
               f"{best['value']:.4f}" if best and baseline else "no complete default trial yet")
    with open(os.path.join(results, f"{name}.md"), "w") as f:
        f.write(f"# fastserve.tune on the quickstart ({summary})\n\n`{out_json['command']}`\n\n"
                f"{len(complete)} complete, {out_json['pruned']} pruned of {len(rows)} trials; trials' CPU "
                f"{out_json['trial_cpu_s']:.0f} s, wall {out_json['trial_wall_s']:.0f} s"
                + (f" (read from {out} as it was)" if args.no_run else
                   f" (load average {load_start:.1f} → {out_json['load_avg_end']:.1f})")
                + f"; objective vs trial: {name}.png\n\n"
                + ("" if finished >= budget else f"**The study is unfinished: {finished} of its {budget} trials** "
                   "(re-running the command resumes it).\n\n") + table)
    if os.path.isfile(os.path.join(out, "objective.png")):
        shutil.copy(os.path.join(out, "objective.png"), os.path.join(results, f"{name}.png"))
    print(json.dumps({k: v for k, v in out_json.items() if k != "rows"}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--part", choices=("fusion", "tune"), default="fusion")
    ap.add_argument("--tune-dir", help="--part tune: the study's directory (resumed when it exists)")
    ap.add_argument("--no-run", action="store_true", help="--part tune: record the study in --tune-dir as it is")
    args = ap.parse_args()
    if args.part == "tune":
        return tune_part(args)
    from fastserve.fusion import load_member
    from fastserve.fusion.ensemble import ensemble_member
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
    ens = ensemble_member(members)
    ensemble = HeldOut(members[0].cfg, ens)(ens.params)

    # cost: the first member alone vs the 3-member ensemble, interleaved
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 2000, (16, 64)).astype(np.int32)
    one_fwd, ens_fwd = forward_program(members[0]), forward_program(ens)
    one_dec, ens_dec = DecodeTimer(members[0]), DecodeTimer(ens)
    one_rates, ens_rates, one_dec_rates, ens_dec_rates = [], [], [], []
    for _ in range(3 if args.quick else 6):
        one_rates.append(forward_rate(one_fwd, (members[0].params, tokens), tokens.size, 5))
        ens_rates.append(forward_rate(ens_fwd, (ens.params, tokens), tokens.size, 5))
        one_dec_rates.append(one_dec.rate(16))
        ens_dec_rates.append(ens_dec.rate(16))
    def median(xs):  # the first round includes compiles
        return statistics.median(xs[1:] or xs)
    one_rate, ens_rate = median(one_rates), median(ens_rates)
    one_dec_rate, ens_dec_rate = median(one_dec_rates), median(ens_dec_rates)

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
        "decode_tokens_per_s": {"rows": DecodeTimer.ROWS, "cache_len": DecodeTimer.CACHE_LEN,
                                "one_member": round(one_dec_rate, 1), "ensemble_of_3": round(ens_dec_rate, 1),
                                "ratio": round(ens_dec_rate / one_dec_rate, 3)},
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
                f"(ratio {ens_rate / one_rate:.2f})\n"
                f"ensemble KV-cached decode tokens/s {ens_dec_rate:.0f} vs one member {one_dec_rate:.0f} "
                f"(ratio {ens_dec_rate / one_dec_rate:.2f}; {DecodeTimer.ROWS} rows)\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

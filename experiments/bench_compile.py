"""Compile time against depth (scanned vs per-layer blocks) and bfloat16 vs float32 training speed, on this CPU.

    .venv/bin/python experiments/bench_compile.py            # full mode (~15-25 min on the loaded 2-core host)
    .venv/bin/python experiments/bench_compile.py --quick    # one round, fewer steps: a few minutes

1. Compile time. fastserve's real train step (`create_train_state` + `make_train_step`, as `fastserve.train` builds
   it: AdamW, global-norm clipping) of a decoder with d_model 256, 4 heads, SwiGLU 688, vocab 4000, seq 128 × batch 8,
   at 6 and 24 layers, with `model.scan_layers` on (the blocks stacked, one `lax.scan`) and off (24 blocks traced
   and compiled one by one). Time = trace + lower + XLA compile of a fresh jit (no persistent compilation cache);
   the four variants run in alternating rounds and each figure is the median over rounds. Goal (issue 15):
   compile(24) / compile(6) ≤ 1.3 with scanned layers.
   Peer, full mode only: torch.compile (inductor) of the same model shapes in PyTorch, time of its first step
   (the compile) at 6 and 24 layers — experiments/bench_train_torch.py's model.
2. bfloat16 vs float32. The same train step (6 layers, scanned) with `model.dtype` bfloat16 (float32 master weights
   and Adam state; softmax, norms and the loss in float32) and float32: tokens/s over alternating rounds of steps,
   and MFU of each against the matmul peak of its own dtype measured in the same run (fastserve.core.perf). XLA:CPU
   has no fast bfloat16 matmul on most x86 cores (it converts), so bfloat16 is expected to be slower here; it is
   for accelerators.

The last line printed is one JSON object; it is also written to experiments/results/bench_compile.json
(bench_compile_quick.json with --quick) with a summary .md beside it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import numpy as np

from provenance import provenance  # experiments/: the script's own directory is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = ["model.vocab_size=4000", "model.d_model=256", "model.n_heads=4", "model.d_ff=688", "model.max_seq_len=128",
         "data.seq_len=128", "data.batch_size=8", "mesh.data=1", "optimizer.warmup_steps=0"]
SEQ, BATCH, VOCAB = 128, 8, 4000


def train_step(overrides: list[str]):
    """(jitted train step, state, one batch [1, B, T]) for the bench model with `overrides`."""
    import jax

    from fastserve import parallel
    from fastserve.config import load_config
    from fastserve.core.optim import make_optimizer
    from fastserve.core.state import create_train_state
    from fastserve.core.steps import make_train_step, split_micro_batches
    from fastserve.tasks import make_task
    cfg = load_config(None, [*MODEL, *overrides])
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
    tx, schedule = make_optimizer(cfg.optimizer, 1000, cfg.model)
    graphdef, state, shardings = create_train_state(cfg.model, tx, mesh, seed=0)
    step = make_train_step(graphdef, make_task("lm"), tx, schedule, shardings, mesh)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ + 1)).astype(np.int32)
    batch = split_micro_batches({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                                 "weights": np.ones((BATCH, SEQ), np.float32)}, 1)
    return step, state, batch, cfg


def compile_seconds(layers: int, scan: bool) -> dict:
    """Trace + lower and XLA compile times of a fresh train step."""
    step, state, batch, _ = train_step([f"model.n_layers={layers}", f"model.scan_layers={str(scan).lower()}"])
    t0 = time.perf_counter()
    lowered = step.lower(state, batch, {})
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"trace_lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0}


def torch_compile_seconds(layers: int) -> float:
    """Seconds of torch.compile's first training step (the compile) for the same shapes at `layers`."""
    from bench_train_torch import build_torch_bench
    cfg = dict(vocab_size=VOCAB, d_model=256, n_layers=layers, n_heads=4, n_kv_heads=4, d_ff=688, max_seq_len=SEQ,
               tie_embeddings=True, rope_theta=10000.0, norm_eps=1e-5)
    bench = build_torch_bench(cfg, SEQ, BATCH, lambda i: 1e-3, compile=True)
    return bench.run(1)[0]


def compile_rows(rounds: int, with_torch: bool) -> dict:
    variants = [(6, True), (24, True), (6, False), (24, False)]
    times: dict[str, list[dict]] = {f"{'scanned' if s else 'per_layer'}_{n}": [] for n, s in variants}
    for r in range(rounds):
        for n, s in (variants if r % 2 == 0 else variants[::-1]):   # alternate the order between rounds
            key = f"{'scanned' if s else 'per_layer'}_{n}"
            times[key].append(compile_seconds(n, s))
            print(f"round {r}: {key} {times[key][-1]['total_s']:.2f} s", file=sys.stderr, flush=True)
    med = {k: {m: statistics.median(t[m] for t in v) for m in v[0]} for k, v in times.items()}
    out = {"median": med, "runs": times,
           "scanned_24_over_6": med["scanned_24"]["total_s"] / med["scanned_6"]["total_s"],
           "per_layer_24_over_6": med["per_layer_24"]["total_s"] / med["per_layer_6"]["total_s"],
           "per_layer_over_scanned_at_24": med["per_layer_24"]["total_s"] / med["scanned_24"]["total_s"]}
    if with_torch:
        try:
            t6, t24 = torch_compile_seconds(6), torch_compile_seconds(24)
            out["torch_compile"] = {"first_step_s_6": t6, "first_step_s_24": t24, "24_over_6": t24 / t6}
        except Exception as e:  # torch is not a fastserve dependency; a peer that cannot run is said, not hidden
            out["torch_compile"] = {"unavailable": f"{type(e).__name__}: {e}"[:300]}
    return out


def dtype_rows(rounds: int, steps: int) -> dict:
    import jax

    from fastserve.core.perf import measure_matmul_peak
    contenders = {dt: train_step(["model.n_layers=6", f"model.dtype={dt}"]) for dt in ("float32", "bfloat16")}
    states = {dt: c[1] for dt, c in contenders.items()}
    step_times: dict[str, list[float]] = {dt: [] for dt in contenders}
    losses: dict[str, list[float]] = {dt: [] for dt in contenders}
    peaks: dict[str, list[float]] = {dt: [] for dt in contenders}
    for dt, (step, _, batch, _) in contenders.items():   # compile + warm up
        states[dt], m = step(states[dt], batch, {})
        jax.block_until_ready(m)
    for r in range(rounds):
        for dt, (step, _, batch, _) in contenders.items():
            for _ in range(steps):
                t = time.perf_counter()
                states[dt], m = step(states[dt], batch, {})
                losses[dt].append(float(m["loss_sum"] / m["weight"]))   # the host read ends the step
                step_times[dt].append(time.perf_counter() - t)
            peaks[dt].append(measure_matmul_peak(n=1024, dtype=dt, repeats=3))
    cfg = contenders["float32"][3].model
    from fastserve.models.decoder import count_flops_per_token
    flops = count_flops_per_token(cfg, SEQ)
    out = {}
    for dt in contenders:
        tok_s = BATCH * SEQ / statistics.median(step_times[dt])
        peak = max(peaks[dt])
        out[dt] = {"tokens_per_s": tok_s, "median_step_s": statistics.median(step_times[dt]),
                   "matmul_peak_gflops": peak / 1e9, "mfu_vs_own_dtype_peak": tok_s * flops / peak,
                   "first_loss": losses[dt][0], "last_loss": losses[dt][-1]}
    out["bf16_over_f32_tokens_per_s"] = out["bfloat16"]["tokens_per_s"] / out["float32"]["tokens_per_s"]
    out["flops_per_token"] = flops
    return out


def markdown(r: dict, command: str) -> str:
    c, d = r["compile"], r["dtype"]
    med = c["median"]
    lines = [f"# bench_compile ({r['date']}, commit {r['provenance']['commit'][:10]}"
             f"{', dirty' if r['provenance']['dirty'] else ''})", "", f"`{command}` — {r['cpu_count']} CPU cores, "
             f"jax {r['jax']}", "", "## Compile time of the train step (trace + lower + XLA compile, median of "
             f"{r['rounds']} rounds)", "", "| layers | scanned (s) | per-layer (s) |", "|---|---|---|"]
    for n in (6, 24):
        lines.append(f"| {n} | {med[f'scanned_{n}']['total_s']:.2f} | {med[f'per_layer_{n}']['total_s']:.2f} |")
    lines += ["", f"24 / 6 layers: scanned **{c['scanned_24_over_6']:.2f}×** (goal ≤ 1.3×), per-layer "
              f"{c['per_layer_24_over_6']:.2f}×; at 24 layers per-layer takes {c['per_layer_over_scanned_at_24']:.2f}× "
              "the scanned compile."]
    if "torch_compile" in c:
        t = c["torch_compile"]
        lines += ["", "Peer: torch.compile first step " + (
            f"{t['first_step_s_6']:.1f} s at 6 layers, {t['first_step_s_24']:.1f} s at 24 ({t['24_over_6']:.2f}×)"
            if "unavailable" not in t else f"unavailable ({t['unavailable']})") + "."]
    lines += ["", "## bfloat16 vs float32 training on this CPU (6 layers, scanned)", "",
              "| dtype | tokens/s | matmul peak (GFLOP/s) | MFU vs own-dtype peak | loss first → last |",
              "|---|---|---|---|---|"]
    for dt in ("float32", "bfloat16"):
        x = d[dt]
        lines.append(f"| {dt} | {x['tokens_per_s']:,.0f} | {x['matmul_peak_gflops']:.0f} | "
                     f"{100 * x['mfu_vs_own_dtype_peak']:.1f} % | {x['first_loss']:.3f} → {x['last_loss']:.3f} |")
    lines += ["", f"bfloat16 / float32 tokens/s: **{d['bf16_over_f32_tokens_per_s']:.2f}×** — XLA:CPU converts "
              "bfloat16 matmuls, so slower here is expected; bfloat16 is the accelerator setting.", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one compile round, fewer steps (a few minutes)")
    args = p.parse_args(argv)
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)   # compile times must be real compiles
    import jax
    jax.config.update("jax_enable_compilation_cache", False)
    rounds = 1 if args.quick else 3
    result = {"bench": "bench_compile", "quick": args.quick, "date": datetime.date.today().isoformat(),
              "provenance": provenance(), "cpu_count": os.cpu_count(), "jax": jax.__version__, "rounds": rounds,
              "compile": compile_rows(rounds, with_torch=not args.quick),
              "dtype": dtype_rows(rounds=2 if args.quick else 4, steps=3 if args.quick else 8)}
    c, d = result["compile"], result["dtype"]
    result["headline"] = (f"compile 24/6 layers: scanned {c['scanned_24_over_6']:.2f}x, per-layer "
                          f"{c['per_layer_24_over_6']:.2f}x; bf16/f32 CPU tokens/s {d['bf16_over_f32_tokens_per_s']:.2f}x")
    name = "bench_compile_quick" if args.quick else "bench_compile"
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    command = "python experiments/bench_compile.py" + (" --quick" if args.quick else "")
    with open(os.path.join(HERE, "results", f"{name}.md"), "w") as f:
        f.write(markdown(result, command))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

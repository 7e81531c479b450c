"""Training throughput and MFU of fastserve's real train step against PyTorch (eager and torch.compile), same model.

    .venv/bin/python experiments/bench_train.py            # full mode (~40 min on the loaded 2-core host)
    .venv/bin/python experiments/bench_train.py --quick    # the 256-token row, fastserve vs eager: about a minute

The model is a ~23M-parameter Llama-style decoder (d_model 512, 6 layers, 8 heads of 64, SwiGLU d_ff 1408, vocab
8000, tied embeddings), float32, one device, AdamW (fastserve's default optimizer config: global-norm clipping 1.0,
weight decay on matrices only, cosine schedule). The JAX side goes through `create_train_state` + `make_train_step`
exactly as `fastserve.train` does, with `model.attention: auto`; the PyTorch side (experiments/bench_train_torch.py;
torch is not a fastserve dependency) is an independent implementation of the same shapes with the same init scaling,
following fastserve's learning rate step by step, so both train the same thing and the final losses compare.

Rows: the headline seq 256 × batch 8 (fastserve auto — on CPU the fused C++ attention kernel —, the other fastserve
attentions, the same step with the layers unrolled instead of scanned, PyTorch eager, torch.compile), then seq 1024 × 2 and 2048 × 1 (same tokens per step): fastserve with
`xla`, `blocked` and `fused` attention against PyTorch's fused causal SDPA — blocked and fused skip the masked half
of the scores, so their lead over xla should grow with length.

MFU = tokens/s × FLOPs/token ÷ the float32 2048² matmul peak that each framework reaches in the same run.
FLOPs/token is `count_flops_per_token` (6N + 12·L·H·hd·T), N = the matmul weights only: per layer the q/k/v/o and
gate/up/down kernels, plus the tied embedding once, as the LM head (a vocab×d matmul); the embedding lookup (a
gather) and the norm scales are not matmuls and are left out. Attention counts the full T×T scores (no causal
discount), for every contender alike. Compilation and warm-up steps are excluded. The contenders run in
alternating rounds so that a change of load on the shared host hits all alike; every figure is the median over
all timed steps / peak samples.

The last line printed is one JSON object with every figure; it is also written to
experiments/results/bench_train.json (bench_train_quick.json with --quick) and a summary .md beside it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

from provenance import provenance  # experiments/: the script's own directory is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))

MODEL = dict(vocab_size=8000, d_model=512, n_layers=6, n_heads=8, n_kv_heads=8, d_ff=1408, max_seq_len=256,
             tie_embeddings=True, rope_theta=10000.0, norm_eps=1e-5, dtype="float32", param_dtype="float32")
SEQ, BATCH = 256, 8
TOTAL_STEPS = 10_000  # the cosine schedule's length (both frameworks follow it)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ------------------------------------------------------------------------------------------------- JAX

class JaxBench:
    """fastserve's real train step (`create_train_state` + `make_train_step`) on one fixed random batch."""

    def __init__(self, seed: int = 0, seq: int = SEQ, batch: int = BATCH, attention: str = "auto",
                 scan_layers: bool | None = None):
        import jax

        from fastserve import parallel
        from fastserve.config import MeshConfig, ModelConfig, OptimizerConfig
        from fastserve.core.optim import make_optimizer
        from fastserve.core.state import count_params, create_train_state
        from fastserve.core.steps import make_train_step, split_micro_batches
        from fastserve.models import count_flops_per_token
        from fastserve.models.attention_kernels import resolve
        from fastserve.tasks import make_task

        self.jax = jax
        layout = {} if scan_layers is None else {"scan_layers": scan_layers}   # None: the config's default
        self.cfg = ModelConfig(**{**MODEL, "max_seq_len": max(seq, MODEL["max_seq_len"]), "attention": attention,
                                  **layout})
        heads = (self.cfg.n_heads, self.cfg.n_kv_heads or self.cfg.n_heads, self.cfg.d_model // self.cfg.n_heads)
        self.attention = resolve(attention, self.cfg.dtype, seq, heads=heads)
        self.device = jax.devices()[0]
        mesh = parallel.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=[self.device])
        tx, schedule = make_optimizer(OptimizerConfig(), TOTAL_STEPS, self.cfg)   # per layer on scanned blocks
        graphdef, self.state, shardings = create_train_state(self.cfg, tx, mesh, seed)
        self.n_params = count_params(self.state["params"])
        self.flops_per_token = count_flops_per_token(self.cfg, seq)
        self.step = make_train_step(graphdef, make_task("lm"), tx, schedule, shardings, mesh)
        rng = np.random.default_rng(seed)
        tokens = rng.integers(0, self.cfg.vocab_size, size=(batch, seq + 1), dtype=np.int32)
        data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((batch, seq), np.float32)}
        self.batch = parallel.host_to_global(split_micro_batches(data, 1), mesh, leading=1)
        t = time.perf_counter()
        self.compiled = self.step.lower(self.state, self.batch, {}).compile()
        self.compile_s = time.perf_counter() - t
        self.losses: list[float] = []

    def run(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            self.state, metrics = self.compiled(self.state, self.batch, {})
            self.jax.block_until_ready((self.state, metrics))
            times.append(time.perf_counter() - t)
            self.losses.append(float(metrics["loss_sum"]) / float(metrics["weight"]))
        return times

    def peak(self) -> float:
        from fastserve.core.perf import measure_matmul_peak
        return measure_matmul_peak(2048, "float32", repeats=5, device=self.device)


def fastserve_learning_rates(n: int = TOTAL_STEPS) -> list[float]:
    """The learning rate of each step under fastserve's default optimizer config (what the JAX step follows)."""
    from fastserve.config import OptimizerConfig
    from fastserve.core.optim import make_optimizer

    _, schedule = make_optimizer(OptimizerConfig(), total_steps=TOTAL_STEPS)
    return [float(x) for x in np.asarray(schedule(np.arange(n)))]


def build_torch_bench(seed: int = 0, seq: int = SEQ, batch: int = BATCH, compile: bool = False):
    """The PyTorch baseline (experiments/bench_train_torch.py) of the same model, schedule and init."""
    from bench_train_torch import build_torch_bench as build

    lrs = fastserve_learning_rates()
    return build(MODEL, seq, batch, lambda step: lrs[step], seed=seed, compile=compile)


# ------------------------------------------------------------------------------------------------ main

LONG_ROWS = ((1024, 2), (2048, 1))  # sequence, batch: the same 2048 tokens per step as the 256 × 8 row


def interleave(contenders: dict, rounds: int, steps: int, warmup: int, with_peak: tuple[str, ...] = ()) -> dict:
    """Alternating rounds (each contender: [its matmul peak,] `steps` timed steps) after `warmup` untimed steps,
    so that a change of load on the shared host hits every contender alike."""
    rec = {name: {"times": [], "peaks": []} for name in contenders}
    for b in contenders.values():
        b.run(max(0, warmup - len(b.losses)))
    for r in range(rounds):
        msg = []
        for name, b in contenders.items():
            if name in with_peak:
                rec[name]["peaks"].append(b.peak())
            rec[name]["times"] += b.run(steps)
            msg.append(f"{name} {statistics.median(rec[name]['times'][-steps:]):.3f} s")
        print(f"  round {r + 1}/{rounds}: " + " | ".join(msg) + f" | load {load()[0]}", flush=True)
    return rec


def figures(rec: dict, bench, tokens_per_step: int, flops_per_token: float) -> dict:
    step_s = statistics.median(rec["times"])
    out = {"step_time_median_s": round(step_s, 4), "step_time_min_s": round(min(rec["times"]), 4),
           "tokens_per_s": round(tokens_per_step / step_s, 1), "timed_steps": len(rec["times"]),
           "steps_trained": len(bench.losses), "final_loss": round(bench.losses[-1], 4)}
    if rec["peaks"]:
        peak = statistics.median(rec["peaks"])
        out.update(matmul_peak_gflops=round(peak / 1e9, 1), mfu=round(tokens_per_step / step_s * flops_per_token / peak, 4))
    return out


def torch_unavailable(args) -> str | None:
    if args.no_torch:
        return "--no-torch given"
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch is not installed (optional baseline: .venv/bin/pip install torch): PyTorch baseline skipped"
    return None


def try_torch_compile(seq: int, batch: int):
    """torch.compile'd baseline, compiled by one warm-up step; (bench, None) or (None, why it was skipped)."""
    try:
        tc = build_torch_bench(seq=seq, batch=batch, compile=True)
        t = time.perf_counter()
        tc.run(1)
        tc.compile_s = time.perf_counter() - t
        return tc, None
    except Exception as e:  # inductor needs a working C++ toolchain; report, do not fail the benchmark
        return None, f"torch.compile failed on this machine: {type(e).__name__}: {str(e).splitlines()[0][:200]}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the 256-token row only, fewer steps: about a minute")
    ap.add_argument("--rounds", type=int, help="alternating rounds (default 2 quick, 3 full)")
    ap.add_argument("--steps", type=int, help="timed steps per contender per round, 256-token row (default 2 quick, 3 full)")
    ap.add_argument("--warmup", type=int, help="untimed steps per contender after compilation (default 1 quick, 2 full)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch baselines")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--no-long", action="store_true", help="skip the 1024 / 2048-token rows")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="directory for bench_train.json/.md")
    ap.add_argument("--no-write", action="store_true", help="print only; write no result files")
    args = ap.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 3)
    steps = args.steps or (2 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    load_start = load()
    t_start = time.time()

    import jax
    import jaxlib
    print(f"load average at start: {load_start}; jax {jax.__version__}, {jax.devices()[0]}, {os.cpu_count()} CPUs",
          flush=True)
    torch_skip = torch_unavailable(args)
    compile_skip = torch_skip or ("--no-compile given" if args.no_compile else None) or (
        "--quick: torch.compile is measured in full mode only" if args.quick else None)
    tok = BATCH * SEQ

    # the headline row: fastserve (model.attention: auto) against eager PyTorch, and the other variants beside it
    jb = JaxBench()
    others = [a for a in ("xla", "blocked") if a != jb.attention]
    contenders = {f"fastserve ({jb.attention})": jb}
    print(f"model: {jb.n_params:,} parameters, {jb.flops_per_token / 1e6:.2f} MFLOP/token, {tok} tokens/step; "
          f"attention auto -> {jb.attention}; JAX compile {jb.compile_s:.1f} s", flush=True)
    if not args.quick:
        contenders.update({f"fastserve ({a})": JaxBench(attention=a) for a in others})
        # the blocks one after another instead of one lax.scan (model.scan_layers: false): what the loop costs
        contenders[f"fastserve ({jb.attention}, per-layer)"] = JaxBench(scan_layers=not jb.cfg.scan_layers)
    if not torch_skip:
        contenders["PyTorch eager"] = tb = build_torch_bench()
        if tb.n_params != jb.n_params:
            raise SystemExit(f"PyTorch model has {tb.n_params} parameters, the fastserve one {jb.n_params}")
        print(f"torch {tb.version}, {tb.threads} threads", flush=True)
    tc = None
    if not compile_skip:
        tc, compile_skip = try_torch_compile(SEQ, BATCH)
        if tc:
            contenders["torch.compile"] = tc
            print(f"torch.compile: first step (compilation) {tc.compile_s:.1f} s", flush=True)
    if compile_skip:
        print(f"torch.compile skipped: {compile_skip}", flush=True)
    print(f"seq {SEQ} × batch {BATCH}:", flush=True)
    rec = interleave(contenders, rounds, steps, warmup, with_peak=(f"fastserve ({jb.attention})", "PyTorch eager"))
    main_row = {"seq_len": SEQ, "batch_size": BATCH,
                "contenders": {n: figures(rec[n], b, tok, jb.flops_per_token) for n, b in contenders.items()}}
    rows = [main_row]
    if not args.no_long and not args.quick:
        for seq, batch in LONG_ROWS:
            row = {f"fastserve ({a})": JaxBench(seq=seq, batch=batch, attention=a) for a in ("xla", "blocked", "fused")}
            if not torch_skip:
                row["PyTorch eager"] = build_torch_bench(seq=seq, batch=batch)
            print(f"seq {seq} × batch {batch}:", flush=True)
            long_rec = interleave(row, rounds, 1, 1)
            rows.append({"seq_len": seq, "batch_size": batch,
                         "contenders": {n: figures(long_rec[n], b, seq * batch, 0.0) for n, b in row.items()}})
            del row
    for r in rows:
        c = r["contenders"]
        tps = {n: v["tokens_per_s"] for n, v in c.items()}
        r["ratios"] = {f"{a} / {b}": round(tps[a] / tps[b], 3) for a, b in (
            ("fastserve (fused)", "PyTorch eager"), ("fastserve (fused, per-layer)", "PyTorch eager"),
            ("fastserve (fused)", "fastserve (xla)"),
            ("fastserve (fused)", "fastserve (blocked)"), ("fastserve (blocked)", "fastserve (xla)"),
            ("fastserve (blocked)", "PyTorch eager"), ("fastserve (xla)", "PyTorch eager")) if a in tps and b in tps}

    fast, eager = main_row["contenders"][f"fastserve ({jb.attention})"], main_row["contenders"].get("PyTorch eager")
    compiled = main_row["contenders"].get("torch.compile")
    result = {
        "benchmark": "bench_train", "mode": "quick" if args.quick else "full",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), **provenance(),
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs ({platform.machine()}, {platform.system()})",
        "config": {**MODEL, "seq_len": SEQ, "batch_size": BATCH, "tokens_per_step": tok, "attention": "auto",
                   "optimizer": "adamw lr 3e-3 (cosine over 10,000 steps, warmup 50) b1 0.9 b2 0.95 wd 0.1 "
                                "(matrices) clip 1.0; PyTorch follows the same per-step learning rates",
                   "init": "normal(0.02), residual projections (o, down) 0.02/sqrt(2L), both frameworks",
                   "devices": 1, "rounds": rounds, "steps_per_round": steps, "warmup_steps": warmup},
        "params": jb.n_params, "flops_per_token": jb.flops_per_token,
        "jax": {**fast, "attention": jb.attention, "compile_s": round(jb.compile_s, 2), "version": jax.__version__,
                "jaxlib": jaxlib.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")},
        "torch": eager and {**eager, "version": tb.version, "threads": tb.threads,
                            "attention": "F.scaled_dot_product_attention(is_causal=True)"},
        "torch_skipped": torch_skip,
        "torch_compile": compiled and {**compiled, "first_step_s": round(tc.compile_s, 1)},
        "torch_compile_skipped": compile_skip,
        "ratio_tokens_per_s_jax_over_torch": round(fast["tokens_per_s"] / eager["tokens_per_s"], 3) if eager else None,
        "ratio_tokens_per_s_jax_over_torch_compile":
            round(fast["tokens_per_s"] / compiled["tokens_per_s"], 3) if compiled else None,
        "rows": rows,
    }
    prof = os.path.join(HERE, "results", "profile_train.json")
    if os.path.exists(prof):  # the per-op breakdown of the last experiments/profile_train.py run (its own date)
        with open(prof) as f:
            p = json.load(f)
        result["jax_profile"] = {k: p.get(k) for k in ("date", "step_ms", "thunk_ms_per_step", "by_kind")}
    result["flops_note"] = ("6N + 12·L·H·hd·T; N = matmul weights incl. the tied LM head (vocab×d), excl. the "
                            "embedding lookup and norm scales; attention unmasked T×T")
    result["load_average_start"] = load_start
    result["load_average_end"] = load()
    result["wall_s"] = round(time.time() - t_start, 1)

    if not args.no_write:
        os.makedirs(args.out, exist_ok=True)
        name = "bench_train_quick" if args.quick else "bench_train"
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        with open(os.path.join(args.out, f"{name}.md"), "w") as f:
            f.write(markdown(result, " ".join([".venv/bin/python", "experiments/bench_train.py", *(argv or sys.argv[1:])])))
    print(json.dumps(result), flush=True)
    return result


def markdown(r: dict, command: str) -> str:
    j, t, c = r["jax"], r["torch"], r["config"]
    out = [f"# bench_train — {r['mode']} mode", "",
           f"- date: {r['date']}; commit `{r['commit']}`" + (" (tree dirty: other work in progress)" if r["dirty"] else ""),
           f"- machine: {r['machine']}",
           f"- load average (1/5/15 min): start {r['load_average_start']}, end {r['load_average_end']}",
           f"- command: `{command}`",
           f"- versions: jax {j['version']} (jaxlib {j['jaxlib']})" + (f", torch {t['version']} ({t['threads']} threads)" if t else ""),
           f"- XLA_FLAGS (environment): `{j['xla_flags'] or '(none)'}`",
           f"- model: d_model {c['d_model']}, {c['n_layers']} layers, {c['n_heads']} heads × {c['d_model'] // c['n_heads']}, "
           f"SwiGLU d_ff {c['d_ff']}, vocab {c['vocab_size']}, tied embeddings, float32, 1 device; "
           f"**{r['params']:,} parameters**, {r['flops_per_token'] / 1e6:.2f} MFLOP/token at seq {c['seq_len']} (6N + 12·L·H·hd·T)",
           f"- optimizer: {c['optimizer']}; init: {c['init']}",
           f"- timing: {c['rounds']} alternating rounds × {c['steps_per_round']} timed steps per contender (1 in the "
           f"long rows) after {c['warmup_steps']} warm-up steps, compile excluded (JAX compile {j['compile_s']} s); medians", ""]
    ratio = r["ratio_tokens_per_s_jax_over_torch"]
    out += [f"**fastserve (model.attention: auto → {j['attention']}) / PyTorch eager tokens/s at seq {c['seq_len']} × "
            f"batch {c['batch_size']}: {ratio}**" if ratio else f"PyTorch baseline: {r['torch_skipped']}"]
    if r["ratio_tokens_per_s_jax_over_torch_compile"]:
        out += ["", f"fastserve / torch.compile: {r['ratio_tokens_per_s_jax_over_torch_compile']} "
                    f"(torch.compile's first step, compiling: {r['torch_compile']['first_step_s']} s)"]
    else:
        out += ["", f"torch.compile: {r['torch_compile_skipped']}"]
    out += ["", "| seq × batch | contender | tokens/s | step (s) | MFU | final loss | steps |", "|---|---|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        for name, f in row["contenders"].items():
            mfu = f"{f['mfu']:.1%}" if "mfu" in f else ""
            out.append(f"| {row['seq_len']} × {row['batch_size']} | {name} | {f['tokens_per_s']:.0f} | "
                       f"{f['step_time_median_s']:.3f} | {mfu} | {f['final_loss']} | {f['steps_trained']} |")
    out += ["", "| seq × batch | tokens/s ratios, same run |", "|---|---|"]
    for row in r["rows"]:
        out.append(f"| {row['seq_len']} × {row['batch_size']} | " + "; ".join(f"{k}: **{v}**" for k, v in row["ratios"].items()) + " |")
    out += ["", "Final loss: every contender trains the same fixed random batch for the same number of steps under the "
                "same learning-rate schedule (memorization; different random init per framework).", ""]
    out += profile_section(os.path.join(HERE, "results", "profile_train.json"))
    return "\n".join(out)


def profile_section(path: str) -> list[str]:
    """The per-op breakdown that experiments/profile_train.py last wrote, if any (a separate run: its own date)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        p = json.load(f)
    out = [f"## Where the JAX step's time goes (experiments/profile_train.py, {p.get('date', '?')})", "",
           f"Traced step {p['step_ms']:.0f} ms wall; thunks cover {p['thunk_ms_per_step']:.0f} ms (wall time, "
           "overlapping thunks share it); the rest is Eigen matmuls running asynchronously after their thunk "
           "returned (XLA's plain `dot`, the weight gradients) and scheduling gaps.", "",
           "| ms/step | share | GFLOP/s | kind, fwd/bwd, source |", "|---:|---:|---:|---|"]
    out += [f"| {r['ms_per_step']:.1f} | {r['share']:.1%} | {r['gflops_per_s'] or ''} | {r['what'].strip()} |"
            for r in p["by_source"][:20]]
    if p.get("torch"):
        t = p["torch"]
        out += ["", f"PyTorch baseline, same run (torch.profiler, CPU self time; profiled step {t['step_ms']:.0f} ms):", "",
                "| ms/step | calls/step | op |", "|---:|---:|---|"]
        out += [f"| {r['self_ms_per_step']:.1f} | {r['calls_per_step']} | `{r['op']}` |" for r in t["by_op"][:12]]
    notes = os.path.join(HERE, "results", "bench_train_findings.md")
    if os.path.exists(notes):
        out += ["", "What the profile showed and what was changed: `experiments/results/bench_train_findings.md`."]
    return out + [""]


if __name__ == "__main__":
    main()

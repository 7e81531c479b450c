"""Training throughput and MFU of fastserve's real train step, with a plain PyTorch baseline of the same model.

    .venv/bin/python experiments/bench_train.py            # full mode (a few minutes)
    .venv/bin/python experiments/bench_train.py --quick    # about a minute

The model is a ~23M-parameter Llama-style decoder (d_model 512, 6 layers, 8 heads of 64, SwiGLU d_ff 1408, vocab
8000, tied embeddings, seq 256, batch 8), float32, one device, AdamW (fastserve's default optimizer config:
global-norm clipping 1.0, weight decay on matrices only, cosine schedule). The JAX side goes through
`create_train_state` + `make_train_step` exactly as `fastserve.train` does; the PyTorch side (if torch is
installed; it is not a fastserve dependency) is an independent eager implementation of the same shapes.

MFU = tokens/s × FLOPs/token ÷ the float32 2048² matmul peak that each framework reaches in the same run.
FLOPs/token is `count_flops_per_token` (6N + 12·L·H·hd·T), N = the matmul weights only: per layer the q/k/v/o and
gate/up/down kernels, plus the tied embedding once, as the LM head (a vocab×d matmul); the embedding lookup (a
gather) and the norm scales are not matmuls and are left out. Attention counts the full T×T scores (no causal
discount), for both frameworks alike. The optimized HLO's dots sum to the same figure (experiments/profile_train.py). Compilation and warm-up steps are excluded. The two
frameworks run in alternating rounds (each round: a matmul peak, then a few timed steps) so that a change of
load on the shared host hits both alike; every figure is the median over all timed steps / peak samples.

The last line printed is one JSON object with every figure; it is also written to
experiments/results/bench_train.json and a summary to experiments/results/bench_train.md.
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
    def __init__(self, seed: int = 0):
        import jax

        from fastserve import parallel
        from fastserve.config import MeshConfig, ModelConfig, OptimizerConfig
        from fastserve.core.optim import make_optimizer
        from fastserve.core.state import count_params, create_train_state
        from fastserve.core.steps import make_train_step, split_micro_batches
        from fastserve.tasks import make_task
        from fastserve.models import count_flops_per_token

        self.jax = jax
        self.cfg = ModelConfig(**MODEL)
        self.device = jax.devices()[0]
        mesh = parallel.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=[self.device])
        tx, schedule = make_optimizer(OptimizerConfig(), total_steps=10_000)
        graphdef, self.state, shardings = create_train_state(self.cfg, tx, mesh, seed)
        self.n_params = count_params(self.state["params"])
        self.flops_per_token = count_flops_per_token(self.cfg, SEQ)
        self.step = make_train_step(graphdef, make_task("lm"), tx, schedule, shardings, mesh)
        rng = np.random.default_rng(seed)
        tokens = rng.integers(0, self.cfg.vocab_size, size=(BATCH, SEQ + 1), dtype=np.int32)
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((BATCH, SEQ), np.float32)}
        self.batch = parallel.host_to_global(split_micro_batches(batch, 1), mesh, leading=1)
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


# --------------------------------------------------------------------------------------------- PyTorch

def build_torch_bench(seed: int = 0):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(seed)
    c = MODEL
    d, h, hd, L, V, ff = c["d_model"], c["n_heads"], c["d_model"] // c["n_heads"], c["n_layers"], c["vocab_size"], c["d_ff"]

    class RMSNorm(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(dim))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c["norm_eps"]) * self.scale

    def rope(x, cos, sin):  # x: [B, H, T, D], half-split layout like fastserve.models.layers.rope
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_norm, self.mlp_norm = RMSNorm(d), RMSNorm(d)
            self.q, self.k, self.v, self.o = (nn.Linear(d, h * hd, bias=False) for _ in range(4))
            self.gate, self.up = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False)
            self.down = nn.Linear(ff, d, bias=False)

        def forward(self, x, cos, sin):
            b, t, _ = x.shape
            y = self.attn_norm(x)
            q = rope(self.q(y).view(b, t, h, hd).transpose(1, 2), cos, sin)
            k = rope(self.k(y).view(b, t, h, hd).transpose(1, 2), cos, sin)
            v = self.v(y).view(b, t, h, hd).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.o(a.transpose(1, 2).reshape(b, t, h * hd))
            y = self.mlp_norm(x)
            return x + self.down(F.silu(self.gate(y)) * self.up(y))

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(V, d)
            self.layers = nn.ModuleList(Block() for _ in range(L))
            self.final_norm = RMSNorm(d)
            for p in self.parameters():
                if p.ndim == 2:
                    nn.init.normal_(p, std=0.02)
            inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
            ang = torch.arange(SEQ, dtype=torch.float32)[:, None] * inv
            self.register_buffer("cos", ang.cos(), persistent=False)
            self.register_buffer("sin", ang.sin(), persistent=False)

        def forward(self, tokens):
            x = self.embed(tokens)
            for layer in self.layers:
                x = layer(x, self.cos, self.sin)
            return self.final_norm(x) @ self.embed.weight.T  # tied embeddings

    model = Decoder()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (BATCH, SEQ + 1), generator=g)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    n_params = sum(p.numel() for p in model.parameters())

    class TorchBench:
        losses: list[float] = []

        def run(self, n):
            times = []
            for _ in range(n):
                t = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                logits = model(inputs)
                loss = F.cross_entropy(logits.view(-1, V), targets.view(-1))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                self.losses.append(loss.item())
                times.append(time.perf_counter() - t)
            return times

        def peak(self, n=2048, repeats=5):
            a, b = torch.ones(n, n), torch.ones(n, n)
            torch.matmul(a, b)
            ts = []
            for _ in range(repeats):
                t = time.perf_counter()
                torch.matmul(a, b)
                ts.append(time.perf_counter() - t)
            return 2 * n ** 3 / statistics.median(ts)

    bench = TorchBench()
    bench.n_params = n_params
    bench.version = torch.__version__
    bench.threads = torch.get_num_threads()
    return bench


# ------------------------------------------------------------------------------------------------ main

def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds/steps: about a minute")
    ap.add_argument("--rounds", type=int, help="alternating JAX/PyTorch rounds (default 2 quick, 5 full)")
    ap.add_argument("--steps", type=int, help="timed steps per framework per round (default 3 quick, 6 full)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per framework after compilation")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="directory for bench_train.json/.md")
    ap.add_argument("--no-write", action="store_true", help="print only; write no result files")
    args = ap.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    steps = args.steps or (3 if args.quick else 6)
    load_start = load()
    t_start = time.time()

    import jax
    import jaxlib
    print(f"load average at start: {load_start}; jax {jax.__version__}, {jax.devices()[0]}, {os.cpu_count()} CPUs",
          flush=True)
    jb = JaxBench()
    tok_per_step = BATCH * SEQ
    print(f"model: {jb.n_params:,} parameters, {jb.flops_per_token / 1e6:.2f} MFLOP/token, "
          f"{tok_per_step} tokens/step; JAX compile {jb.compile_s:.1f} s", flush=True)

    tb = None
    torch_skip = None
    if args.no_torch:
        torch_skip = "--no-torch given"
    else:
        try:
            import torch  # noqa: F401
        except ImportError:
            torch_skip = "torch is not installed (optional baseline: .venv/bin/pip install torch): PyTorch baseline skipped"
    if torch_skip:
        print(torch_skip, flush=True)
    else:
        tb = build_torch_bench()
        if tb.n_params != jb.n_params:
            raise SystemExit(f"PyTorch model has {tb.n_params} parameters, the fastserve one {jb.n_params}")
        print(f"torch {tb.version}, {tb.threads} threads", flush=True)

    jb.run(args.warmup)
    if tb:
        tb.run(args.warmup)
    jt, jp, tt, tp = [], [], [], []
    for r in range(rounds):
        jp.append(jb.peak())
        jt += jb.run(steps)
        if tb:
            tp.append(tb.peak())
            tt += tb.run(steps)
        msg = f"round {r + 1}/{rounds}: jax {statistics.median(jt[-steps:]):.3f} s/step, peak {jp[-1] / 1e9:.0f} GFLOP/s"
        if tb:
            msg += f" | torch {statistics.median(tt[-steps:]):.3f} s/step, peak {tp[-1] / 1e9:.0f} GFLOP/s"
        print(msg + f" | load {load()[0]}", flush=True)

    def figures(times, peaks):
        step_s, peak = statistics.median(times), statistics.median(peaks)
        tps = tok_per_step / step_s
        return {"step_time_median_s": round(step_s, 4), "step_time_min_s": round(min(times), 4),
                "tokens_per_s": round(tps, 1), "matmul_peak_gflops": round(peak / 1e9, 1),
                "mfu": round(tps * jb.flops_per_token / peak, 4), "timed_steps": len(times),
                "final_loss": None}

    result = {
        "benchmark": "bench_train", "mode": "quick" if args.quick else "full",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), **provenance(),
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs ({platform.machine()}, {platform.system()})",
        "config": {**MODEL, "seq_len": SEQ, "batch_size": BATCH, "tokens_per_step": tok_per_step,
                   "optimizer": "adamw lr 3e-3 (cosine, warmup 50) b1 0.9 b2 0.95 wd 0.1 (matrices) clip 1.0",
                   "devices": 1, "rounds": rounds, "steps_per_round": steps, "warmup_steps": args.warmup},
        "params": jb.n_params, "flops_per_token": jb.flops_per_token,
        "jax": {**figures(jt, jp), "compile_s": round(jb.compile_s, 2), "version": jax.__version__,
                "jaxlib": jaxlib.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")},
    }
    result["jax"]["final_loss"] = round(jb.losses[-1], 4)
    if tb:
        result["torch"] = {**figures(tt, tp), "version": tb.version, "threads": tb.threads,
                           "attention": "F.scaled_dot_product_attention(is_causal=True)"}
        result["torch"]["final_loss"] = round(tb.losses[-1], 4)
        result["ratio_tokens_per_s_jax_over_torch"] = round(result["jax"]["tokens_per_s"] / result["torch"]["tokens_per_s"], 3)
    else:
        result["torch"] = None
        result["torch_skipped"] = torch_skip
        result["ratio_tokens_per_s_jax_over_torch"] = None
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
        with open(os.path.join(args.out, "bench_train.json"), "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        with open(os.path.join(args.out, "bench_train.md"), "w") as f:
            f.write(markdown(result, " ".join([".venv/bin/python", "experiments/bench_train.py", *(argv or sys.argv[1:])])))
    print(json.dumps(result), flush=True)
    return result


def markdown(r: dict, command: str) -> str:
    j, t = r["jax"], r["torch"]
    c = r["config"]
    rows = [("tokens/s (median)", f"{j['tokens_per_s']:.0f}", f"{t['tokens_per_s']:.0f}" if t else "skipped"),
            ("step time, median (s)", f"{j['step_time_median_s']:.3f}", f"{t['step_time_median_s']:.3f}" if t else "–"),
            ("f32 2048² matmul peak (GFLOP/s)", f"{j['matmul_peak_gflops']:.0f}", f"{t['matmul_peak_gflops']:.0f}" if t else "–"),
            ("MFU (vs. own peak)", f"{j['mfu']:.1%}", f"{t['mfu']:.1%}" if t else "–"),
            ("final loss (random tokens)", f"{j['final_loss']}", f"{t['final_loss']}" if t else "–")]
    out = [f"# bench_train — {r['mode']} mode", "",
           f"- date: {r['date']}", f"- machine: {r['machine']}",
           f"- load average (1/5/15 min): start {r['load_average_start']}, end {r['load_average_end']}",
           f"- command: `{command}`",
           f"- versions: jax {j['version']} (jaxlib {j['jaxlib']})" + (f", torch {t['version']} ({t['threads']} threads)" if t else ""),
           f"- XLA_FLAGS (environment): `{j['xla_flags'] or '(none)'}`",
           f"- model: d_model {c['d_model']}, {c['n_layers']} layers, {c['n_heads']} heads × {c['d_model'] // c['n_heads']}, "
           f"SwiGLU d_ff {c['d_ff']}, vocab {c['vocab_size']}, tied embeddings, seq {c['seq_len']}, batch {c['batch_size']}, "
           f"float32, 1 device; **{r['params']:,} parameters**, {r['flops_per_token'] / 1e6:.2f} MFLOP/token (6N + 12·L·H·hd·T)",
           f"- optimizer: {c['optimizer']}",
           f"- timing: {c['rounds']} alternating rounds × {c['steps_per_round']} timed steps per framework after "
           f"{c['warmup_steps']} warm-up steps (compile excluded; JAX compile {j['compile_s']} s); medians", "",
           "| | fastserve (JAX `make_train_step`) | PyTorch eager |", "|---|---|---|"]
    out += [f"| {a} | {b} | {c_} |" for a, b, c_ in rows]
    ratio = r["ratio_tokens_per_s_jax_over_torch"]
    out += ["", f"**fastserve / PyTorch tokens/s: {ratio}**" if ratio else f"PyTorch baseline: {r.get('torch_skipped')}", ""]
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

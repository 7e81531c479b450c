"""One attention layer's forward + backward on CPU: fastserve's implementations (`model.attention`: xla, blocked,
fused) against PyTorch's `F.scaled_dot_product_attention` on the same shapes, interleaved in one run.

    .venv/bin/python experiments/bench_attention.py            # every row (~3 min on a 2-core host)
    .venv/bin/python experiments/bench_attention.py --quick    # the 256-token decoder row and the encoder row

Rows (float32, gradients of Σ out·g with respect to q, k and v, i.e. what a train step runs):
- decoder: causal self-attention, 8 heads of 64 (experiments/bench_train.py's model), B·T = 2048 tokens at
  T = 256 / 1024 / 2048; PyTorch with `is_causal=True` (its flash kernel for CPU);
- grouped-query: SmolLM2-135M's 9 query heads on 3 KV heads of 64, T = 512, batch 4; PyTorch with `enable_gqa`;
- encoder: MiniLM's 12 heads of 32, batch 16 × 128 tokens, rows padded at random lengths 40-128 (a fine-tuning
  batch), bidirectional; PyTorch with a boolean key mask (fastserve's `xla` and `fused` only: `blocked` is causal).
Each contender is compiled / warmed up first, then the contenders take turns (`--rounds` × `--reps` calls each);
figures are medians in milliseconds and ratios of those medians. The last line printed is one JSON object, also
written to experiments/results/bench_attention.json (bench_attention_quick.json with --quick).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np

from provenance import provenance  # experiments/: the script's own directory is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))
DECODER_ROWS = [(256, 8), (1024, 2), (2048, 1)]   # (T, batch): 2048 tokens each


def fastserve_fn(kind: str, impl: str, q, k, v, g, valid):
    """A jitted fwd + bwd of fastserve's attention; returns a no-argument callable that runs it to completion."""
    import jax
    import jax.numpy as jnp

    from fastserve.kernels.attention import padded_attention
    from fastserve.models import attention_kernels as ak
    from fastserve.models.layers import attention

    if kind == "encoder":
        f = ((lambda q, k, v: attention(q, k, v, causal=False, k_valid=valid)) if impl == "xla"
             else (lambda q, k, v: padded_attention(q, k, v, valid, strict=True)))
    else:
        f = lambda q, k, v: ak.causal_attention(q, k, v, implementation=impl)  # noqa: E731
    step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * g), argnums=(0, 1, 2)))
    args = [jnp.asarray(x) for x in (q, k, v)]
    return lambda: jax.block_until_ready(step(*args))


def torch_fn(kind: str, q, k, v, g, valid):
    """PyTorch SDPA fwd + bwd on the same data ([B, H, T, D] layout, as SDPA takes it)."""
    import torch
    import torch.nn.functional as F

    tq, tk, tv = (torch.tensor(x).transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    tg = torch.tensor(g).reshape(q.shape).transpose(1, 2).contiguous()
    kw = {}
    if kind == "encoder":
        kw["attn_mask"] = torch.tensor(valid)[:, None, None, :]
    else:
        kw["is_causal"] = True
    if q.shape[2] != k.shape[2]:
        kw["enable_gqa"] = True

    def run():
        for t in (tq, tk, tv):
            t.grad = None
        out = F.scaled_dot_product_attention(tq, tk, tv, **kw)
        out.backward(tg)
    return run


def make_row(kind: str, b: int, t: int, h: int, kv: int, d: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, h, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, t, kv, d)).astype(np.float32) for _ in range(2))
    g = rng.standard_normal((b, t, h * d)).astype(np.float32)
    valid = None
    if kind == "encoder":
        lengths = rng.integers(40, t + 1, b)
        valid = np.arange(t)[None, :] < lengths[:, None]
    impls = ("xla", "fused") if kind == "encoder" else ("xla", "blocked", "fused")
    contenders = {f"fastserve ({i})": fastserve_fn(kind, i, q, k, v, g, valid) for i in impls}
    try:
        contenders["PyTorch SDPA"] = torch_fn(kind, q, k, v, g, valid)
    except ImportError as e:   # torch is a benchmark peer, not a dependency
        print(f"PyTorch skipped: {e}", flush=True)
    return {"kind": kind, "batch": b, "seq_len": t, "heads": h, "kv_heads": kv, "head_dim": d,
            "contenders": contenders}


def interleave(contenders: dict, rounds: int, reps: int) -> dict[str, float]:
    times = {n: [] for n in contenders}
    for fn in contenders.values():   # compile / warm up
        fn()
        fn()
    for _ in range(rounds):
        for name, fn in contenders.items():
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {n: round(1e3 * float(np.median(ts)), 2) for n, ts in times.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 5)
    try:
        import torch
        torch.set_num_threads(os.cpu_count() or 1)
        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    import jax

    from fastserve.kernels import build
    t_start = time.time()
    specs = [("decoder", b, t, 8, 8, 64) for t, b in (DECODER_ROWS[:1] if args.quick else DECODER_ROWS)]
    if not args.quick:
        specs.append(("grouped-query", 4, 512, 9, 3, 64))
    specs.append(("encoder", 16, 128, 12, 12, 32))
    rows = []
    for kind, b, t, h, kv, d in specs:
        row = make_row("encoder" if kind == "encoder" else "decoder", b, t, h, kv, d)
        row["kind"] = kind
        ms = interleave(row.pop("contenders"), rounds, args.reps)
        row["ms"] = ms
        fused = ms["fastserve (fused)"]
        row["ratios"] = {f"fused / {n.removeprefix('fastserve ').strip('()')}": round(fused / v, 3)
                         for n, v in ms.items() if n != "fastserve (fused)"}
        print(json.dumps(row), flush=True)
        rows.append(row)

    def ratio(kind, t, other):
        for r in rows:
            if r["kind"] == kind and r["seq_len"] == t:
                return r["ratios"].get(f"fused / {other}")
        return None
    headline = {"decoder T=256 fused / xla time": ratio("decoder", 256, "xla"),
                "fused / PyTorch SDPA time": ratio("decoder", 256, "PyTorch SDPA"),
                "encoder fused / xla": ratio("encoder", 128, "xla"),
                "encoder fused / PyTorch SDPA": ratio("encoder", 128, "PyTorch SDPA")}
    if not args.quick:
        headline["T=2048 fused / blocked"] = ratio("decoder", 2048, "blocked")
    result = {"benchmark": "bench_attention", "mode": "quick" if args.quick else "full",
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), **provenance(),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "kernel_isa": build.status().get("isa"), "jax": jax.__version__, "torch": torch_version,
              "rounds": rounds, "reps": args.reps, "unit": "ms per forward + backward (median)",
              "command": "python experiments/bench_attention.py" + (" --quick" if args.quick else ""),
              "headline": headline, "rows": rows, "wall_s": round(time.time() - t_start, 1),
              "load_average": [round(x, 2) for x in os.getloadavg()]}
    if not args.no_write:
        name = "bench_attention_quick" if args.quick else "bench_attention"
        with open(os.path.join(HERE, "results", f"{name}.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

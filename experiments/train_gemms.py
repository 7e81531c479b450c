"""The float32 matmuls of bench_train's step, one by one: XLA:CPU (what fastserve's step runs) against PyTorch's
MKL `mm` and numpy's OpenBLAS, interleaved in one process, GFLOP/s per shape (median of 15 calls per round, median
of 3 rounds).

    .venv/bin/python experiments/train_gemms.py [--quick]

Why: after the allocator fix (fastserve/host_memory.py) fastserve's train step is still ~8 % behind eager PyTorch,
and a profile puts ~70 % of both steps in matmuls; this shows how much of the gap is the GEMM library's (not a
recorded result: prints its figures, the last line as JSON).
Shapes (2048 tokens of the 23M decoder): forward x·W, the input gradient dy·Wᵀ and the weight gradient dyᵀ·x
(fastserve's `matmul` computes (dyᵀ·x)ᵀ), for the 512 × 512 attention projections, the 512 × 1408 MLP and the tied
8000 × 512 LM head.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from provenance import provenance  # experiments/ is on sys.path; imports fastserve first, as bench_train does

T = 2048
# name, A shape, B shape, form (nn: A·B, nt: A·Bᵀ, tn: Aᵀ·B)
SHAPES = [("x·W 512→512", (T, 512), (512, 512), "nn"), ("x·W 512→1408", (T, 512), (512, 1408), "nn"),
          ("h·W 1408→512", (T, 1408), (1408, 512), "nn"), ("x·Eᵀ LM head", (T, 512), (8000, 512), "nt"),
          ("dy·Wᵀ 1408→512", (T, 1408), (512, 1408), "nt"), ("dyᵀ·x 512×512", (T, 512), (T, 512), "tn"),
          ("dyᵀ·x 1408×512", (T, 1408), (T, 512), "tn"), ("dyᵀ·x 8000×512", (T, 8000), (T, 512), "tn")]


def median_s(f, n: int) -> float:
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one round of 5 calls per library")
    args = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rounds, calls = (1, 5) if args.quick else (3, 15)
    rows = []
    for name, a_shape, b_shape, form in SHAPES:
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal(a_shape, np.float32), rng.standard_normal(b_shape, np.float32)
        op = {"nn": lambda x, y: x @ y, "nt": lambda x, y: x @ y.T, "tn": lambda x, y: x.T @ y}[form]
        m, k = (a_shape[1], a_shape[0]) if form == "tn" else a_shape
        n = b_shape[0] if form == "nt" else b_shape[1]
        flops = 2 * m * n * k
        xla = jax.jit(op)
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        tmm = {"nn": lambda: torch.mm(ta, tb), "nt": lambda: torch.mm(ta, tb.t()), "tn": lambda: torch.mm(ta.t(), tb)}[form]
        libs = {"xla": lambda: jax.block_until_ready(xla(ja, jb)), "torch_mkl": tmm, "numpy_openblas": lambda: op(a, b)}
        times = {lib: [] for lib in libs}
        for _ in range(rounds):
            for lib, f in libs.items():
                time.sleep(0.3)   # the previous library's worker threads stop spinning before this one is timed
                times[lib].append(median_s(f, calls))
        gf = {lib: round(flops / float(np.median(t)) / 1e9, 1) for lib, t in times.items()}
        rows.append({"gemm": name, "m_n_k": [m, n, k], "gflops_per_s": gf,
                     "xla_over_torch": round(gf["xla"] / gf["torch_mkl"], 3)})
        print(f"{name:18s} " + "  ".join(f"{lib} {v:6.1f}" for lib, v in gf.items()) +
              f"  xla/torch {rows[-1]['xla_over_torch']:.2f}", flush=True)
    result = {"bench": "train_gemms", "quick": args.quick, "date": time.strftime("%Y-%m-%d"), **provenance(),
              "jax": jax.__version__, "torch": torch.__version__, "threads": os.cpu_count(), "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

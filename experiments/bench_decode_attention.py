"""The CPU decode-attention kernel (custom call `fastserve_decode_attention`) against XLA's path for the same attention
of a KV-cached step: rows gathered out of the cache, attended over the narrowest decode window holding them (what
the decoder runs with `model.attention: xla`, and on meshes / TPU / GPU), interleaved in one run.

    .venv/bin/python experiments/bench_decode_attention.py           # ~10 s; writes results/bench_decode_attention.json
    .venv/bin/python experiments/bench_decode_attention.py --quick   # ~5 s; writes nothing

Cases (float32; one layer's attention, no projections): the quickstart's heads (8 query heads of 32 over 4 KV heads)
in a cache of 8 rows × 2,112 positions (bench_prefix's chunked-prefill part): one row decoding at position 2,000,
8 rows at 2,000, 8 rows at 100; a prompt's piece of 8 and of 32 tokens in one row ending at position 2,000 (columns
of one row: the kernel's query tiles); and SmolLM2-135M's heads (9 of 64 over 3) in 8 rows × 320 positions
(bench_serving_real's engine): 8 rows at 100 and a 32-token piece at positions 32-63. A piece is what a decode step
carrying prompt tokens holds: columns with the same row id, so XLA's path gathers that row once per column, as the
decoder's does (an extend through XLA would attend to one gathered row instead). Figures: medians in
microseconds, and XLA / kernel. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import numpy as np

from provenance import provenance  # experiments/: the script's own directory is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))
QUICKSTART, SMOLLM = (8, 4, 32, 2112), (9, 3, 64, 320)      # (query heads, KV heads, head dim, cache positions)
CASES = [   # (name, heads, rows, lengths: each query sees positions [0, length) of its row)
    ("1 row at 2000", QUICKSTART, [0], [2001]),
    ("8 rows at 2000", QUICKSTART, list(range(8)), [2001] * 8),
    ("8 rows at 100", QUICKSTART, list(range(8)), [101] * 8),
    ("piece of 8 at 1993-2000", QUICKSTART, [3] * 8, list(range(1994, 2002))),
    ("piece of 32 at 1969-2000", QUICKSTART, [3] * 32, list(range(1970, 2002))),
    ("SmolLM2: 8 rows at 100", SMOLLM, list(range(8)), [101] * 8),
    ("SmolLM2: piece of 32 at 32-63", SMOLLM, [3] * 32, list(range(33, 65))),
]


def contenders(heads, rows, lengths, rng):
    """{"kernel": fn, "xla": fn}, each running the case's attention to completion; and their outputs' largest gap."""
    import jax
    import jax.numpy as jnp

    from fastserve.kernels.attention import decode_attention_kernel
    from fastserve.models.layers import attention
    from fastserve.serve.programs import decode_windows

    h, kv, d, s = heads
    k = jnp.asarray(rng.standard_normal((8, s, kv, d), np.float32))
    v = jnp.asarray(rng.standard_normal((8, s, kv, d), np.float32))
    q = jnp.asarray(rng.standard_normal((len(rows), 1, h, d), np.float32))
    rows, lengths = jnp.asarray(rows, jnp.int32), jnp.asarray(lengths, jnp.int32)
    window = next(w for w in decode_windows(s) if w >= int(lengths.max()))

    def xla(q, k, v, rows, lengths):      # the decoder's gathered path: each query against its row's window
        vk, vv = jnp.take(k, rows, axis=0)[:, :window], jnp.take(v, rows, axis=0)[:, :window]
        k_pos = jnp.broadcast_to(jnp.arange(window, dtype=jnp.int32), (len(rows), window))
        return attention(q, vk, vv, (lengths - 1)[:, None], k_pos)

    fns = {"kernel": jax.jit(decode_attention_kernel), "xla": jax.jit(xla)}
    outs = {name: np.asarray(fn(q, k, v, rows, lengths)).reshape(len(rows), -1) for name, fn in fns.items()}
    gap = float(np.abs(outs["kernel"] - outs["xla"]).max())
    return {name: (lambda fn=fn: fn(q, k, v, rows, lengths).block_until_ready()) for name, fn in fns.items()}, gap


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds; writes nothing")
    args = ap.parse_args()
    from fastserve.kernels import build
    if build.load() is None:
        raise SystemExit(f"the C++ kernels are not available here: {build.status()}")
    rng = np.random.default_rng(0)
    rounds, reps = (5, 5) if args.quick else (15, 10)
    rows = {}
    for name, heads, case_rows, lengths in CASES:
        fns, gap = contenders(heads, case_rows, lengths, rng)
        times = {c: [] for c in fns}
        for _ in range(rounds):          # contenders take turns, so load drifts over both alike
            for c, fn in fns.items():
                for _ in range(reps):
                    t0 = time.perf_counter()
                    fn()
                    times[c].append(time.perf_counter() - t0)
        med = {c: float(np.median(t)) * 1e6 for c, t in times.items()}
        rows[name] = {"kernel_us": round(med["kernel"], 1), "xla_us": round(med["xla"], 1),
                      "xla_over_kernel": round(med["xla"] / med["kernel"], 2), "max_abs_diff": gap}
        print(name, rows[name], flush=True)
    out = {"bench": "decode_attention", "quick": args.quick, "command": "python experiments/bench_decode_attention.py"
           + (" --quick" if args.quick else ""), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
               timespec="seconds"), "machine": f"{platform.machine()}, {os.cpu_count()} cores", **provenance(),
           "load_avg": [round(x, 2) for x in os.getloadavg()], "cases": rows,
           "headline": {f"XLA / kernel, {name}": rows[name]["xla_over_kernel"]
                        for name in ("8 rows at 2000", "piece of 32 at 1969-2000", "SmolLM2: 8 rows at 100")}}
    if not args.quick:
        with open(os.path.join(HERE, "results", "bench_decode_attention.json"), "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

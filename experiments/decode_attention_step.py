"""One serving decode step's attention on the quickstart shape, all 4 layers, as the engine runs it with a long prompt
decoding beside short ones: caches of 8 rows × 2,112 positions per layer (bench_prefix's chunked-prefill engine),
16 MB of other memory read between steps (as the weights would be), so the rows are not hot in cache. The figures
the decode-attention kernel's thread threshold and its long-row path quote (csrc/attention_ffi.cc, attention_item.cc).

    .venv/bin/python experiments/decode_attention_step.py [--steps 300]     # ~15 s

Cases: 8 rows at position 80; one row at 2,000 beside 7 at 80; rows at 2,000 and 1,500 beside 6 at 80. Figures:
median microseconds per step. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from provenance import provenance  # experiments/: the script's own directory is on sys.path

LAYERS, ROWS, POSITIONS, KV_HEADS, HEAD_DIM, HEADS = 4, 8, 2112, 4, 32, 8
CASES = {"8 short": [80] * 8, "1 long + 7 short": [2000] + [80] * 7, "2 long + 6 short": [2000, 1500] + [80] * 6}


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp

    from fastserve.kernels import build
    from fastserve.kernels.attention import decode_attention_kernel
    if build.load() is None:
        raise SystemExit(f"the C++ kernels are not available here: {build.status()}")
    rng = np.random.default_rng(0)
    shape = (ROWS, POSITIONS, KV_HEADS, HEAD_DIM)
    ks = [jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(LAYERS)]
    vs = [jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(LAYERS)]
    q = jnp.asarray(rng.standard_normal((ROWS, 1, HEADS, HEAD_DIM), np.float32))
    rows = jnp.arange(ROWS, dtype=jnp.int32)
    other = np.ones(4 << 20, np.float32)      # 16 MB read between steps

    @jax.jit
    def step(q, ks, vs, rows, lengths):
        out = q
        for k, v in zip(ks, vs):
            out = decode_attention_kernel(out, k, v, rows, lengths).reshape(q.shape)
        return out

    us = {}
    for name, lengths in CASES.items():
        lengths = jnp.asarray(lengths, jnp.int32)
        step(q, ks, vs, rows, lengths).block_until_ready()
        times = []
        for _ in range(args.steps):
            other.sum()
            t0 = time.perf_counter()
            step(q, ks, vs, rows, lengths).block_until_ready()
            times.append(time.perf_counter() - t0)
        us[name] = round(float(np.median(times)) * 1e6, 1)
        print(name, us[name], flush=True)
    out = {"script": "decode_attention_step", "command": "python experiments/decode_attention_step.py", **provenance(),
           "median_us_per_step": us}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

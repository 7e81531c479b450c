"""How fast the int8 kernels stream weights that are not in cache: the batch-1 regime of decoding a model larger
than the cache (docs/compression.md). Times `fastserve_int8_matmul` on MATRICES distinct 576 × 1536 int8 matrices
(141 MB, chained in one jitted program) and `fastserve_int8_matmul_nt` on 5 distinct 49152 × 576 LM-head tables
(141 MB), one thread and all of them (the spinning helpers if FASTSERVE_KERNEL_SPIN_THREADS is set, else XLA's pool
for large products), each beside its W8A8 twin (`_q8`, activations rounded to int8), and prints GB/s of weights
read. `--hot` chains one 576 × 1536 matrix and one 1024 × 576 table instead (in cache: the arithmetic's speed). The kernels' prefetch distances are constants
in fastserve/kernels/csrc/int8_tile.cc (kPrefetchRows, kPrefetchBytes): edit one and rerun this script to compare
(the library rebuilds itself when its source changes).

    python experiments/int8_stream.py [--rows 1] [--hot]     # ~1 min; the last line is JSON
    python experiments/int8_stream.py --gemm                 # prefill-sized W8A8 products (8-128 rows, in cache)
    python experiments/int8_stream.py --packed [--rows 8]    # also W8A8 on weights prepacked as VNNI panels

`--gemm` times the W8A8 kernel on SmolLM2's three product shapes at 8-128 rows, one thread and all, beside what
XLA's path would do there (x rounded to int8 blocks, the kernel dequantized, a float32 dot) and the plain float32
dot of the same shape, and prints GOPS (2·M·K·N per second).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fastserve.kernels import build  # noqa: E402
from fastserve.kernels import int8 as k8  # noqa: E402

MATRICES = 160


def gb_per_s(kernel, tables: list, k: int, rows: int, threads: int, repeats: int) -> float:
    """Weights read per second (GB/s) by `kernel` over every table in turn, median of `repeats` runs."""
    nt = kernel in (k8.int8_matmul_nt_kernel, k8.int8_matmul_nt_q8_kernel)
    if kernel is k8.int8_matmul_packed_kernel:
        n = tables[0].shape[0] * k8.PANEL
    else:
        n = tables[0].shape[0] if nt else tables[0].shape[1]
    scale = jnp.ones((n,), jnp.float32)

    @jax.jit
    def chain(x, tables):
        for q in tables:   # each product's input depends on the last: the tables are read one after another
            x = kernel(x, q, scale, threads=threads)[:, :k] * 1e-3
        return x
    x = jnp.ones((rows, k), jnp.float32)
    chain(x, tables).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        chain(x, tables).block_until_ready()
        times.append(time.perf_counter() - t0)
    return sum(q.size for q in tables) / statistics.median(times) / 1e9


def gemm_figures(repeats: int = 30) -> dict:
    """GOPS of the W8A8 kernel (threads 1 and 0), XLA's W8A8 path and a float32 dot at prefill-sized row counts."""
    rng = np.random.default_rng(0)

    def median_s(f, *args) -> float:
        f(*args).block_until_ready()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f(*args).block_until_ready()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    out = {}
    for k, n in ((576, 1536), (1536, 576), (576, 576)):
        q = jnp.asarray(rng.integers(-127, 128, (k, n), dtype=np.int8))
        scale = jnp.asarray((rng.random(n) + 0.01).astype(np.float32) / 127)
        w = k8.dequantize(q, scale)
        contenders = {f"kernel_threads_{t}": jax.jit(lambda x, t=t: k8.int8_matmul_q8_kernel(x, q, scale, threads=t))
                      for t in (1, 0)}
        contenders["xla_w8a8"] = jax.jit(lambda x: k8.int8_matmul_xla(k8.quantize_activations(x), q, scale))
        contenders["float32_dot"] = jax.jit(lambda x: x @ w)
        for m in (8, 16, 32, 64, 128):
            x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
            row = {name: round(2 * m * k * n / median_s(f, x) / 1e9, 1) for name, f in contenders.items()}
            out[f"{k}x{n}_rows_{m}"] = row
            print(f"{k}x{n} rows {m}: GOPS {row}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1, help="rows of x (1: batch-1 decoding)")
    ap.add_argument("--hot", action="store_true", help="the same matrix / table over and over (in cache)")
    ap.add_argument("--gemm", action="store_true", help="prefill-sized W8A8 products instead (GOPS)")
    ap.add_argument("--packed", action="store_true", help="also the W8A8 kernel on weights stored as its VNNI panels "
                    "(serve.pack_int8)")
    args = ap.parse_args()
    if build.load() is None:
        raise SystemExit(f"the int8 kernel library is not available here: {build.status()}")
    if args.gemm:
        print(json.dumps({"isa": build.status().get("isa"), "gemm_gops": gemm_figures()}))
        return 0
    rng = np.random.default_rng(0)
    if args.hot:
        layers = [jnp.asarray(rng.integers(-127, 128, (576, 1536), dtype=np.int8))] * MATRICES
        heads = [jnp.asarray(rng.integers(-127, 128, (1024, 576), dtype=np.int8))] * MATRICES
    else:
        layers = [jnp.asarray(rng.integers(-127, 128, (576, 1536), dtype=np.int8)) for _ in range(MATRICES)]
        heads = [jnp.asarray(rng.integers(-127, 128, (49152, 576), dtype=np.int8)) for _ in range(5)]
    out = {"rows": args.rows, "hot": args.hot, "isa": build.status().get("isa"),
           "spin_threads": os.environ.get("FASTSERVE_KERNEL_SPIN_THREADS", "0")}
    kernels = {"layers": k8.int8_matmul_kernel, "layers_q8": k8.int8_matmul_q8_kernel,
               "head": k8.int8_matmul_nt_kernel, "head_q8": k8.int8_matmul_nt_q8_kernel}
    packed = {}
    if args.packed:   # the same weights as the W8A8 kernel's VNNI panels (what the serving engine runs)
        kernels.update(layers_q8_packed=k8.int8_matmul_packed_kernel, head_q8_packed=k8.int8_matmul_packed_kernel)
        pack = jax.jit(k8.pack_vnni)
        packed = {"layers_q8_packed": [pack(q) for q in layers], "head_q8_packed": [pack(q.T) for q in heads]}
    for threads in (1, 0):
        for name, kernel in kernels.items():
            tables = packed.get(name) or (heads if name.startswith("head") else layers)
            out[f"{name}_gb_s_threads_{threads}"] = round(gb_per_s(kernel, tables, 576, args.rows, threads,
                                                                   10 if name.startswith("head") else 20), 2)
        print(out, flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

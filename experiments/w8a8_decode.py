"""SmolLM2-135M int8 decode with float activations vs W8A8 (`quantize: {activations: int8}`), with and without the
kernels' spinning helpers (FASTSERVE_KERNEL_SPIN_THREADS, read once per process: each setting is a child process,
the settings alternated over rounds so machine load drifts over all alike). Per child: greedy decode step time at
batch 1 and 8 (int8_decode's timer: median over 16 steps, 5 interleaved rounds of the two models); with
--perplexity, once, the held-out perplexity of dense / int8 / W8A8 (4 batches of 16×128, XLA's path, which rounds
W8A8's activations as the kernel does). The figures of docs/compression.md's W8A8 and spinning-helper paragraphs.

    python experiments/w8a8_decode.py [--spin 0,1] [--rounds 2] [--perplexity]   # ~1.5 min per child; last line JSON
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
SMOLLM = os.path.join(ROOT, "configs", "smollm2_135m.yaml")
SETTINGS = {"int8": {"quantize": {"include": ["layers.*"]}},
            "w8a8": {"quantize": {"include": ["layers.*"], "activations": "int8"}}}
BATCHES, ROUNDS, TOKENS = (1, 8), 5, 16


def child(perplexity: bool) -> dict:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import int8_decode
    from fastserve.config import load_config
    from fastserve.transforms.report import decode_prompt_ids, heldout_batches, measure, transform_loaded
    from fastserve.workdir import load_model

    cfg = load_config(SMOLLM, ["mesh.data=1", "data.seq_len=128", "data.batch_size=16"])
    loaded = load_model(cfg)
    prompt = decode_prompt_ids(loaded.tokenizer)
    out, timers = {}, {}
    if perplexity:
        batches = heldout_batches(cfg, loaded.tokenizer, 4)
        dense = measure(loaded.graphdef, loaded.params, loaded.model_cfg, loaded.mesh, batches, prompt, 0)
        out["perplexity"] = {"dense": round(float(dense["perplexity"]), 4)}
    for name, spec in SETTINGS.items():
        model_cfg, graphdef, params, _ = transform_loaded(loaded, [spec], cfg)
        if perplexity:
            m = measure(graphdef, params, model_cfg, loaded.mesh, batches, prompt, 0)
            out["perplexity"][name] = round(float(m["perplexity"]), 4)
        timers[name] = {b: int8_decode.decode_timer(graphdef, params, prompt, b, TOKENS, loaded.mesh) for b in BATCHES}
    steps = {(n, b): [] for n in SETTINGS for b in BATCHES}
    for _ in range(ROUNDS):
        for name in SETTINGS:
            for b in BATCHES:
                steps[(name, b)].append(timers[name][b]())
    out["step_ms"] = {f"{n} b{b}": round(1e3 * statistics.median(v), 2) for (n, b), v in steps.items()}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spin", default="0,1", help="FASTSERVE_KERNEL_SPIN_THREADS values, one child each per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--perplexity", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.perplexity)))
        return 0
    runs: dict[str, list[dict]] = {s: [] for s in args.spin.split(",")}
    out: dict = {}
    for r in range(args.rounds):
        for spin in runs:
            cmd = [sys.executable, os.path.abspath(__file__), "--child"]
            if args.perplexity and not out.get("perplexity"):
                cmd.append("--perplexity")
            env = {**os.environ, "FASTSERVE_KERNEL_SPIN_THREADS": spin}
            res = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
                             .stdout.strip().splitlines()[-1])
            out.setdefault("perplexity", res.get("perplexity"))
            runs[spin].append(res["step_ms"])
            print(f"round {r + 1} spin {spin}: {res['step_ms']}", flush=True)
    out["step_ms_median"] = {spin: {k: round(statistics.median(run[k] for run in rs), 2) for k in rs[0]}
                             for spin, rs in runs.items()}
    out["runs"] = runs
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

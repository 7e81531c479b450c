"""Decode speed of SmolLM2-135M (imported from its GGUF), in-process and through the exported functions.

    python experiments/bench_decode.py            # batch 1 and 16, prompt 32, 128 new tokens
    python experiments/bench_decode.py --quick    # batch 1 and 4, 32 new tokens (about a minute)

Reports, per batch size and path: time to first token (prefill of the batch + first sample), decode tokens/s
(median step over the generation), and, at batch 1, the memory-bandwidth bound: a decode step must read every
parameter once, so parameter bytes / bandwidth (a large-array read measured in this run) is the floor on its time.
Paths: `inprocess` (jitted prefill/decode steps, greedy sampled on device, one host transfer per step), `exported`
(the jax.export prefill/decode functions loaded by fastserve.load_exported, same loop), and `generate` (the whole
lax.while_loop generation, in-process, tokens/s over the full generation). The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import fastserve
from fastserve.generation import decoding as infer
from fastserve.generation.program import model_program
from fastserve.artifacts.writer import ExportOptions, export_params
from fastserve.workdir import load_model

from provenance import provenance  # experiments/: the script's own directory is on sys.path

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "smollm2_135m.yaml")
PROMPT_LEN = 32
ROUNDS = 3


def measure_bandwidth(n_bytes: int = 1 << 29, repeats: int = 5) -> float:
    """Bytes/s of reading a large float32 array once (a sum), median of `repeats`."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return n_bytes / statistics.median(times)


def run_loop(prefill, decode, prompts, lengths, new_tokens):
    """Greedy loop through (prefill, decode) callables: (ttft seconds, median decode step seconds)."""
    t0 = time.perf_counter()
    logits, cache = prefill(prompts, lengths)
    tok = np.asarray(jnp.argmax(logits, axis=-1).astype(jnp.int32))
    ttft = time.perf_counter() - t0
    steps = []
    pos = lengths.copy()
    for _ in range(new_tokens - 1):
        t = time.perf_counter()
        logits, cache = decode(tok, pos, cache)
        tok = np.asarray(jnp.argmax(logits, axis=-1).astype(jnp.int32))  # the one host transfer per step
        steps.append(time.perf_counter() - t)
        pos = pos + 1
    return ttft, statistics.median(steps)


def markdown(out: dict) -> str:
    """The results as a Markdown table, with the targets checked."""
    lines = [f"# Decode benchmark ({out['date']}, {out['device']}, jax {out['jax']})", "",
             "Command: `python experiments/bench_decode.py`. Model: " + out["model"] + f"; prompt {out['prompt_len']} "
             f"tokens, {out['new_tokens']} new tokens, greedy. Parameter bytes {out['param_bytes'] / 1e6:.0f} MB; "
             f"read bandwidth measured in the run {out['bandwidth_GBps']} GB/s. Load average "
             f"{out['load_avg_start']} → {out['load_avg_end']} (shared 2-core host). Medians over {ROUNDS} "
             "alternating rounds.", "",
             "| batch | path | TTFT (s) | decode step (ms) | decode tokens/s |", "|---|---|---|---|---|"]
    for key, row in out["results"].items():
        for name in ("inprocess", "exported"):
            r = row[name]
            lines.append(f"| {key.split('_')[1]} | {name} | {r['ttft_s']} | {r['step_s'] * 1e3:.2f} | "
                         f"{r['tokens_per_s']} |")
        lines.append(f"| {key.split('_')[1]} | generate (while_loop) | | | {row['generate']['tokens_per_s']} |")
    b1 = out["results"]["batch_1"]
    lines += ["", "## Targets", "",
              f"- Batch-1 decode step {b1['inprocess']['step_s'] * 1e3:.2f} ms vs the bandwidth bound "
              f"{b1['bandwidth_bound_step_s'] * 1e3:.2f} ms: {b1['inprocess_step_over_bound']}× "
              f"(target ≤ 2×: {'met' if b1['inprocess_step_over_bound'] <= 2 else 'not met'}).",
              *(f"- Exported / in-process decode tokens/s at {k.replace('_', ' ')}: {r['exported_vs_inprocess']} "
                f"(target ≥ 0.95: {'met' if r['exported_vs_inprocess'] >= 0.95 else 'not met'})."
                for k, r in out["results"].items())]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    batches = (1, 4) if args.quick else (1, 16)
    new_tokens = 32 if args.quick else 128
    cache_len = PROMPT_LEN + new_tokens
    load_start = os.getloadavg()[0]

    cfg = fastserve.load_config(CONFIG, ["mesh.data=1"])
    loaded = load_model(cfg)
    graphdef, params = loaded.graphdef, loaded.params
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    bandwidth = measure_bandwidth()
    bound_s = param_bytes / bandwidth

    prefill_fn = model_program(graphdef, lambda model, tokens, lengths: infer.prefill(
        model, tokens, lengths, model.init_cache(tokens.shape[0], cache_len)))
    decode_fn = model_program(graphdef, infer.decode, donate_argnums=3)

    export_dir = tempfile.mkdtemp(prefix="fastserve-bench-decode-")
    export_params(loaded.model_cfg, params, loaded.tokenizer, export_dir,
                  ExportOptions(platforms=("cpu",), buckets=(PROMPT_LEN,), max_cache_len=cache_len,
                                functions=("prefill", "decode")))
    exported = fastserve.load_exported(export_dir)

    rng = np.random.default_rng(0)
    results = {}
    for b in batches:
        prompts = rng.integers(3, loaded.model_cfg.vocab_size, (b, PROMPT_LEN)).astype(np.int32)
        lengths = np.full((b,), PROMPT_LEN, np.int32)
        paths = {
            "inprocess": (lambda t, l: prefill_fn(params, t, l), lambda t, p, c: decode_fn(params, t, p, c)),
            "exported": (exported.prefill, exported.decode),
        }
        gen = model_program(graphdef, lambda model, t, l: infer.generate(
            model, t, l, jax.random.key(0), max_new_tokens=new_tokens,
            temperature=jnp.zeros(b), top_k=jnp.zeros(b, jnp.int32), top_p=jnp.ones(b),
            stop_tokens=jnp.array([-1], jnp.int32)))
        for pf, dc in paths.values():
            run_loop(pf, dc, prompts, lengths, 3)                       # compile + warm up
        jax.block_until_ready(gen(params, prompts, lengths))
        # The paths alternate round by round, so a noisy minute on this shared machine hits them alike.
        samples = {name: [] for name in [*paths, "generate"]}
        for _ in range(ROUNDS):
            for name, (pf, dc) in paths.items():
                samples[name].append(run_loop(pf, dc, prompts, lengths, new_tokens))
            t = time.perf_counter()
            jax.block_until_ready(gen(params, prompts, lengths))
            samples["generate"].append(time.perf_counter() - t)
        row = {}
        for name in paths:
            ttft = statistics.median(s[0] for s in samples[name])
            step = statistics.median(s[1] for s in samples[name])
            row[name] = {"ttft_s": round(ttft, 4), "step_s": round(step, 5), "tokens_per_s": round(b / step, 1)}
        gen_s = statistics.median(samples["generate"])
        row["generate"] = {"total_s": round(gen_s, 3), "tokens_per_s": round(b * new_tokens / gen_s, 1)}
        row["exported_vs_inprocess"] = round(row["exported"]["tokens_per_s"] / row["inprocess"]["tokens_per_s"], 3)
        if b == 1:
            row["bandwidth_bound_step_s"] = round(bound_s, 5)
            row["inprocess_step_over_bound"] = round(row["inprocess"]["step_s"] / bound_s, 2)
        results[f"batch_{b}"] = row
        print(f"batch {b}: {json.dumps(row)}", flush=True)

    out = {"bench": "decode", "model": "SmolLM2-135M-Instruct (GGUF Q4_1 → float32)", "quick": args.quick,
           "prompt_len": PROMPT_LEN, "new_tokens": new_tokens, "param_bytes": int(param_bytes),
           "bandwidth_GBps": round(bandwidth / 1e9, 2), "results": results, "jax": jax.__version__,
           "load_avg_start": round(load_start, 2), "load_avg_end": round(os.getloadavg()[0], 2),
           "date": time.strftime("%Y-%m-%d"), **provenance(), "device": str(jax.devices()[0].device_kind)}
    if not args.quick:
        results_dir = os.path.join(os.path.dirname(__file__), "results")
        with open(os.path.join(results_dir, "bench_decode.json"), "w") as f:
            json.dump(out, f, indent=1)
        with open(os.path.join(results_dir, "bench_decode.md"), "w") as f:
            f.write(markdown(out))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

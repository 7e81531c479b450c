"""`bench_lowrank_real.py --int8`: weight-only int8 on SmolLM2-135M-Instruct (issue 14, part 3) — dense / int8
with the tied embedding / LM head kept float32 / int8 per channel (head too) / per group of 64 / whitened low-rank
0.8 / whitened 0.8 + int8 (--quick: the first three): bytes, held-out perplexity and
greedy decode tokens/s at batch 1 and 16, plus llama.cpp on the same model at Q8_0 and Q4_1 (2 threads) when
`llama-cpp-python` is installed.

Decode is timed interleaved: every setting is built and compiled first, then ROUNDS rounds each time every
setting's decode step (median over DECODE_TOKENS greedy steps of a fixed prompt, one host transfer per step as a
serving loop has), so machine load hits all settings alike; a setting's speed-up over dense is the median over
rounds of the within-round ratio. The int8 layers run fastserve's C++ kernel (fastserve.kernels) at decode
(≤ 32 rows) and XLA's dequantize-then-dot for the held-out evaluation (2,048 rows per batch).
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fastserve.generation import decoding as infer
from fastserve.generation.program import model_program
from fastserve.kernels import build as kernels
from fastserve.transforms.report import measure, transform_loaded

ROUNDS = 4
DECODE_TOKENS = 16
BATCHES = (1, 16)
QUICK = {"rounds": 4, "decode_tokens": 8, "batches": (1,)}  # dense and int8 only: ~2-3 min (compiles dominate)
INT8 = {"quantize": {"include": ["layers.*"]}}                         # the tied embedding / LM head too
INT8_HEAD_FLOAT = {"quantize": {"include": ["layers.*"], "head": False}}
INT8_G64 = {"quantize": {"include": ["layers.*"], "group": 64}}
GOAL = {"int8_over_dense_b1_min": 1.5, "int8_over_llama_q8_0_b1_min": 0.8, "perplexity_ratio_max": 1.01}


def settings(whitened: list[dict], quick: bool) -> list[tuple[str, list[dict]]]:
    if quick:
        return [("dense", []), ("int8, head float32", [INT8_HEAD_FLOAT]), ("int8", [INT8])]
    return [("dense", []), ("int8, head float32", [INT8_HEAD_FLOAT]), ("int8", [INT8]),
            ("int8 group 64", [INT8_G64]), ("whitened 0.8", whitened),
            ("whitened 0.8 + int8", whitened + [INT8])]


def decode_timer(graphdef: Any, params: Any, prompt_ids: list[int], batch: int, new_tokens: int, mesh: Any
                 ) -> Callable[[], float]:
    """A compiled, warmed-up greedy decode at `batch` identical rows; calling it returns the median step (s)."""
    prompt = np.asarray([list(prompt_ids)] * batch, np.int32)
    lengths = np.full((batch,), prompt.shape[1], np.int32)
    cache_len = prompt.shape[1] + new_tokens + 1
    prefill = model_program(graphdef, lambda model, tokens, lengths: infer.prefill(
        model, tokens, lengths, model.init_cache(tokens.shape[0], cache_len)))
    decode = model_program(graphdef, infer.decode, donate_argnums=3)

    def run(steps: int = new_tokens) -> float:
        with jax.set_mesh(mesh):
            logits, cache = prefill(params, prompt, lengths)
            tok = np.asarray(jnp.argmax(logits, axis=-1).astype(jnp.int32))
            pos, times = lengths.copy(), []
            for _ in range(steps):
                t = time.perf_counter()
                logits, cache = decode(params, tok, pos, cache)
                tok = np.asarray(jnp.argmax(logits, axis=-1).astype(jnp.int32))
                times.append(time.perf_counter() - t)
                pos = pos + 1
        return statistics.median(times)

    run(3)  # compile + warm up
    return run


def run(cfg: Any, loaded: Any, batches: list, prompt_ids: list[int], whitened: list[dict], quick: bool) -> dict:
    """Rows for every setting (and llama.cpp's when available); see the module docstring."""
    status = kernels.status()
    print(f"int8 kernel: {status}", flush=True)
    rounds, tokens, batch_sizes = ((QUICK["rounds"], QUICK["decode_tokens"], QUICK["batches"]) if quick
                                   else (ROUNDS, DECODE_TOKENS, BATCHES))
    rows, timers = [], {}
    for label, specs in settings(whitened, quick):
        t0 = time.perf_counter()
        if specs:
            model_cfg, graphdef, params, _ = transform_loaded(loaded, specs, cfg)
        else:
            model_cfg, graphdef, params = loaded.model_cfg, loaded.graphdef, loaded.params
        m = measure(graphdef, params, model_cfg, loaded.mesh, batches, prompt_ids, 0)
        timers[label] = {b: decode_timer(graphdef, params, prompt_ids, b, tokens, loaded.mesh) for b in batch_sizes}
        rows.append({"setting": label, "transforms": specs, "parameters": m["parameters"], "bytes": m["bytes"],
                     "perplexity": m["perplexity"], "prepare_s": round(time.perf_counter() - t0, 1)})
        print(f"{label:22} {m['bytes'] / 2**20:7.1f} MiB  ppl {m['perplexity']:.3f}", flush=True)
    steps = {(r["setting"], b): [] for r in rows for b in batch_sizes}
    for i in range(rounds):
        for r in rows:
            for b in batch_sizes:
                steps[(r["setting"], b)].append(timers[r["setting"]][b]())
        print(f"round {i + 1}: " + "  ".join(f"{r['setting']} {1 / steps[(r['setting'], 1)][-1]:.1f}"
                                             for r in rows) + " tok/s (batch 1)", flush=True)
    dense = rows[0]
    for r in rows:
        r["perplexity_ratio"] = r["perplexity"] / dense["perplexity"]
        r["bytes_ratio"] = r["bytes"] / dense["bytes"]
        for b in batch_sizes:
            own, ref = steps[(r["setting"], b)], steps[("dense", b)]
            r[f"decode_b{b}_tokens_per_s"] = b / statistics.median(own)
            r[f"decode_b{b}_over_dense"] = statistics.median(d / s for d, s in zip(ref, own))
            r[f"decode_b{b}_step_s"] = [round(s, 5) for s in own]
    peers = llama_cpp_rows(cfg, prompt_ids, rounds, tokens)
    return {"kernel": status, "rows": rows, "llama_cpp": peers, "goal": goal(rows, peers),
            "decode_tokens": tokens, "rounds": rounds}


def goal(rows: list[dict], peers: dict) -> dict:
    int8 = next(r for r in rows if r["setting"] == "int8")
    out = {**GOAL, "int8_over_dense_b1": int8["decode_b1_over_dense"], "int8_perplexity_ratio": int8["perplexity_ratio"]}
    out["dense_met"] = int8["decode_b1_over_dense"] >= GOAL["int8_over_dense_b1_min"]
    out["perplexity_met"] = int8["perplexity_ratio"] <= GOAL["perplexity_ratio_max"]
    q8 = next((p for p in peers.get("rows", []) if p["quant"] == "Q8_0"), None)
    out["int8_over_llama_q8_0_b1"] = q8 and int8["decode_b1_tokens_per_s"] / q8["decode_b1_tokens_per_s"]
    out["llama_met"] = None if q8 is None else out["int8_over_llama_q8_0_b1"] >= GOAL["int8_over_llama_q8_0_b1_min"]
    return out


def llama_cpp_rows(cfg: Any, prompt_ids: list[int], rounds: int, tokens: int) -> dict:
    """llama.cpp (llama-cpp-python) on the shipped Q4_1 GGUF and its Q8_0 requantization, 2 threads, batch-1
    greedy decode of the same prompt tokens; {"skipped": why} when the package is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed: `pip install llama-cpp-python` builds it from its "
                           "sdist (CPU only; ~50 minutes on 2 loaded cores here); the peer rows need it"}
    from fastserve.data.packages import resolve_path

    q4_1 = resolve_path(cfg.source.path)
    q8_0 = q8_0_gguf(q4_1)
    if q8_0 is None:
        return {"skipped": "llama.cpp could not requantize the GGUF to Q8_0"}
    extra_bufts, note = _llama_extra_buffer_types(q8_0)
    # every Llama() starts from llama_model_default_params(): without the extra buffer types where they fault
    default_params = llama_cpp.llama.llama_cpp.llama_model_default_params

    def plain_buffers() -> Any:
        params = default_params()
        params.use_extra_bufts = False
        return params

    if not extra_bufts:
        llama_cpp.llama.llama_cpp.llama_model_default_params = plain_buffers
    try:
        out = []
        for quant, path in (("Q8_0", q8_0), ("Q4_1", q4_1)):
            llm = llama_cpp.Llama(model_path=path, n_threads=2, n_threads_batch=2, n_ctx=256, verbose=False)
            steps = []
            for _ in range(rounds):
                llm.reset()
                llm.eval(list(prompt_ids))
                times = []
                for _ in range(tokens):
                    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                    t = time.perf_counter()
                    llm.eval([tok])
                    times.append(time.perf_counter() - t)
                steps.append(statistics.median(times))
            out.append({"quant": quant, "bytes": os.path.getsize(path),
                        "decode_b1_tokens_per_s": 1 / statistics.median(steps),
                        "decode_b1_step_s": [round(s, 5) for s in steps]})
    finally:
        llama_cpp.llama.llama_cpp.llama_model_default_params = default_params
    return {"version": llama_cpp.__version__, "threads": 2, "extra_buffer_types": extra_bufts, "note": note,
            "rows": out}


def q8_0_gguf(q4_1: str, quantize_binary: str | None = None) -> str | None:
    """The shipped Q4_1 GGUF requantized to Q8_0 by llama.cpp, cached; None when it fails. Through llama-cpp-python
    when it is installed, else through `quantize_binary` (llama.cpp's `llama-quantize`, built beside llama-server)."""
    from fastserve.data.packages import cache_dir
    q8_0 = str(cache_dir("llama_cpp") / "SmolLM2-135M-Instruct.Q8_0-from-Q4_1.gguf")
    if os.path.exists(q8_0):
        return q8_0
    try:
        import llama_cpp
    except ImportError:
        if not quantize_binary or not os.path.exists(quantize_binary):
            return None
        done = subprocess.run([quantize_binary, "--allow-requantize", q4_1, q8_0, "Q8_0"], capture_output=True)
        return q8_0 if done.returncode == 0 and os.path.exists(q8_0) else None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    if llama_cpp.llama_model_quantize(q4_1.encode(), q8_0.encode(), params) != 0:
        return None
    return q8_0


def _llama_extra_buffer_types(gguf: str) -> tuple[bool, str]:
    """Whether llama.cpp evaluates with its extra CPU buffer types (AMX tiles, repacked weights), probed in a child
    process: where the CPU reports AMX but the machine faults on its tile instructions (seen on a VM here: a general
    protection fault at `ldtilecfg` killed the benchmark), the peer runs without them and the result says so."""
    probe = ("import llama_cpp; llm = llama_cpp.Llama(model_path=%r, n_threads=1, n_ctx=64, verbose=False); "
             "llm.eval([1, 2, 3, 4])" % gguf)
    child = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=300)
    if child.returncode == 0:
        return True, "default buffer types"
    return False, (f"llama.cpp with its extra buffer types died on this machine (exit {child.returncode}; AMX tile "
                   "instructions fault on some VMs): measured with use_extra_bufts=false, which also drops its "
                   "repacked-weight kernels")


def write_markdown(out: dict, path: str) -> None:
    k = out["kernel"]
    lines = ["# int8 decode on SmolLM2-135M: fastserve's CPU kernel vs float32 (and llama.cpp)", "",
             f"`{out['command']}` — commit `{out['commit'][:7]}`{' (dirty)' if out['dirty'] else ''}, {out['date']}, "
             f"{out['machine']}, jax {out['jax']}, {out['wall_s']} s, load average {out['load_avg_start']} → "
             f"{out['load_avg_end']} (shared machine: the ratios, measured interleaved, are the figures to read). "
             f"Kernel: {k.get('isa', 'unavailable')}. Held-out: {out['heldout_tokens']} tokens of the pydoc "
             f"held-out split. Decode: median step of {out['decode_tokens']} greedy steps, median of "
             f"{out['rounds']} interleaved rounds.", "",
             "| setting | bytes | perplexity | × dense | batch 1 tok/s | × dense | batch 16 tok/s | × dense |",
             "|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        b16 = (f"{r['decode_b16_tokens_per_s']:.1f} | {r['decode_b16_over_dense']:.2f}"
               if "decode_b16_tokens_per_s" in r else "- | -")
        lines.append(f"| {r['setting']} | {r['bytes'] / 2**20:.1f} MiB ({r['bytes_ratio']:.2f}×) | "
                     f"{r['perplexity']:.3f} | {r['perplexity_ratio']:.4f} | {r['decode_b1_tokens_per_s']:.1f} | "
                     f"{r['decode_b1_over_dense']:.2f} | {b16} |")
    peers = out["llama_cpp"]
    if "rows" in peers:
        for p in peers["rows"]:
            lines.append(f"| llama.cpp {peers['version']} {p['quant']}, {peers['threads']} threads | "
                         f"{p['bytes'] / 2**20:.1f} MiB | - | - | {p['decode_b1_tokens_per_s']:.1f} | - | - | - |")
        if not peers.get("extra_buffer_types", True):
            lines += ["", f"llama.cpp: {peers['note']}."]
    else:
        lines += ["", f"llama.cpp: skipped — {peers['skipped']}."]
    g = out["goal"]
    yes = lambda ok: "met" if ok else ("not measured" if ok is None else "not met")  # noqa: E731
    lines += ["", f"Goals (issue 14): int8 batch-1 decode ≥ {g['int8_over_dense_b1_min']}× float32 — measured "
              f"{g['int8_over_dense_b1']:.2f}×: {yes(g['dense_met'])}; perplexity within 1 % — "
              f"{g['int8_perplexity_ratio']:.4f}×: {yes(g['perplexity_met'])}; ≥ {g['int8_over_llama_q8_0_b1_min']}× "
              f"llama.cpp Q8_0 — " + (f"{g['int8_over_llama_q8_0_b1']:.2f}×" if g["int8_over_llama_q8_0_b1"]
                                       else "no llama.cpp in this run") + f": {yes(g['llama_met'])}.", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def plot(out: dict, path: str) -> None:
    """Bytes vs perplexity and batch-1 tokens/s vs perplexity, one point per setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for r in out["rows"]:
        for ax, x in zip(axes, (r["bytes"] / 2**20, r["decode_b1_tokens_per_s"])):
            ax.scatter(x, r["perplexity"])
            ax.annotate(r["setting"], (x, r["perplexity"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for p in out["llama_cpp"].get("rows", []):
        axes[1].axvline(p["decode_b1_tokens_per_s"], ls="--", color="grey")
        axes[1].annotate(f"llama.cpp {p['quant']}", (p["decode_b1_tokens_per_s"], axes[1].get_ylim()[1]),
                         fontsize=8, rotation=90, va="top")
    axes[0].set(xlabel="parameter bytes (MiB)", ylabel="held-out perplexity", title="size vs quality")
    axes[1].set(xlabel="batch-1 decode tokens/s", ylabel="held-out perplexity", title="speed vs quality")
    fig.suptitle(f"SmolLM2-135M on {out['machine']} (commit {out['commit'][:7]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)

"""Decode step time per batch width (serve.decode_widths) on SmolLM2-135M, int8 (layers.* quantized) and float32.

    python experiments/bench_decode_widths.py [--repeats 10] [--max-len 320]   # ~5 min on 2 shared cores; writes
                                                    # experiments/results/bench_decode_widths.{json,md}
    python experiments/bench_decode_widths.py --quick   # ~2 min: the time per output token only; writes nothing

Builds the engine as the serving benchmarks do (8 slots, buckets 32/64, max_cache_len 320), then times its compiled
decode programs alone (no scheduling): the running-rows program at widths 1, 2, 4 (the first w slots active, at
position 100), the full-width masked decode over all 8 slots (what every step cost before), and the running-rows
program over all 8 rows (what the row gather costs); the same in the paged layout (int8, the slot layout's bytes as
blocks of 16, every slot holding max_cache_len positions). Rounds of `repeats`
steps alternate between the widths (the order rotating every round, so a slow minute of a shared host hits all of
them); the median step of each width. Also prints the start-up profile's own figures, and (int8) the median time
per output token through the engine at 1 and 3 concurrent requests, widths auto against full width (--tpot-only:
just that, ~2 min). The last line is JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time

import jax
import numpy as np

from fastserve.config import load_config
from fastserve.serve.active_rows import job_arrays
from fastserve.serve.engine import Engine, Request
from fastserve.transforms.report import transform_loaded
from fastserve.workdir import load_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provenance import provenance  # noqa: E402
from serving_workload import slot_layout_bytes  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class _Job:
    """The fields job_arrays reads: a request at position `pos`, greedy."""
    def __init__(self, slot: int, pos: int):
        self._slot, self.tokens, self.output = slot, [1] * pos, [7]
        self.seed, self.top_k, self.temperature, self.top_p = slot, 0, 0.0, 1.0


def time_widths(eng: Engine, repeats: int, rounds: int) -> dict[str, float]:
    """Median step (s) per width, plus "8 rows": the running-rows program over all 8 slots (the gather's cost
    against the masked full-width program, which the engine runs at full width)."""
    slots = eng.slots
    for s in range(slots):       # paged: every slot holds max_cache_len positions of blocks (the widest view)
        eng.pool.grow(s, eng.max_len)

    def rows_full() -> None:
        jobs = [_Job(s, 100) for s in range(slots)]
        toks, eng.pool.cache = eng.programs.decode_rows(eng.pool.cache, np.arange(slots, dtype=np.int32),
                                                        *job_arrays(jobs, slots))
        jax.device_get(toks)

    def width(w: int):
        jobs = [_Job(s, 100) for s in range(w)]

        def run() -> None:
            _, eng.pool.cache = eng.rows.step(eng.pool.cache, jobs)      # includes the tokens' transfer
        return run
    arms = {str(w): width(w) for w in eng.rows.widths}
    arms[f"{slots} rows"] = rows_full
    rows_full()                                                          # compiles
    times: dict[str, list[float]] = {k: [] for k in arms}
    order = list(arms)
    for r in range(rounds):
        for k in order[r % len(order):] + order[:r % len(order)]:
            for _ in range(repeats):
                t0 = time.perf_counter()
                arms[k]()
                times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(t)) for k, t in times.items()}


def time_per_token(model, scfg, rounds: int = 2) -> dict[str, dict[int, float]]:
    """End to end through the engine: the median time per output token of 1 and of 3 concurrent greedy requests
    (40-token prompts, 48 new tokens), decode_widths auto against [] (full width), the arms alternating."""
    engines = {str(w): Engine.from_loaded(model, dataclasses.replace(scfg, decode_widths=w)) for w in ("auto", [])}
    rng = np.random.default_rng(0)
    tpot: dict[str, dict[int, list[float]]] = {k: {1: [], 3: []} for k in engines}
    for _ in range(rounds):
        for n in (1, 3):
            for k, eng in engines.items():
                reqs = [Request(rng.integers(10, 1000, 40).tolist(), max_new_tokens=48) for _ in range(n)]
                eng.generate(reqs, timeout=600)
                tpot[k][n] += [r.tpot for r in reqs]
    return {k: {n: round(float(np.median(t)) * 1e3, 1) for n, t in v.items()} for k, v in tpot.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-len", type=int, default=320)
    ap.add_argument("--no-paged", action="store_true", help="skip the paged layout (16 more compiles)")
    ap.add_argument("--tpot-only", "--quick", action="store_true",
                    help="only the end-to-end time per token (int8); writes nothing")
    args = ap.parse_args()
    t_start, load_start = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
    cfg = load_config("configs/smollm2_135m.yaml", ["mesh.data=1"])
    loaded = load_model(cfg)
    mc, g, p, _ = transform_loaded(loaded, [{"quantize": {"include": ["layers.*"]}}], cfg)
    int8 = dataclasses.replace(loaded, model_cfg=mc, graphdef=g, params=p)
    scfg = dataclasses.replace(cfg.serve, slots=8, buckets=[32, 64], max_cache_len=args.max_len, port=0,
                               decode_widths="auto")
    # paged: the slot layout's bytes (8 x max_cache_len positions) as blocks of 16
    paged = dataclasses.replace(scfg, kv_cache_bytes=slot_layout_bytes(mc, 8, args.max_len), kv_block=16)
    out = {}
    if args.tpot_only:
        print(json.dumps({"int8 tpot_ms": time_per_token(int8, scfg)}))
        return
    arms = [("int8", int8, scfg), ("float32", loaded, scfg), ("int8 paged", int8, paged)]
    for name, model, serve in arms[:2] if args.no_paged else arms:
        t0 = time.perf_counter()
        eng = Engine.from_loaded(model, serve)
        start = time.perf_counter() - t0
        with eng._ctx():
            steps = time_widths(eng, args.repeats, args.rounds)
        prof = eng.profile["decode_width_s"]
        out[name] = dict(step_ms={k: round(s * 1e3, 1) for k, s in steps.items()},
                         profile_ms={w: round(s * 1e3, 1) for w, s in prof.items()}, startup_s=round(start, 1))
        print(name, out[name], flush=True)
        del eng
        jax.clear_caches()
    out["int8 tpot_ms"] = time_per_token(int8, scfg)
    record(out, args, t_start, load_start)
    print(json.dumps(out))


def record(out: dict, args: argparse.Namespace, t_start: float, load_start: list) -> None:
    """Adds provenance and a headline to `out` and writes results/bench_decode_widths.{json,md}."""
    int8 = out["int8"]["step_ms"]
    full = int8.get("8") or int8.get(8)
    out.update(bench="decode_widths", command="python experiments/bench_decode_widths.py", **provenance(),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               machine=f"{platform.machine()}, {os.cpu_count()} cores", load_avg_start=load_start,
               load_avg_end=[round(x, 2) for x in os.getloadavg()], wall_s=round(time.perf_counter() - t_start, 1),
               repeats=args.repeats, rounds=args.rounds, max_len=args.max_len)
    out["headline"] = {f"int8 step, {w} running / all 8 slots": round(v / full, 3)
                       for w, v in int8.items() if str(w) in ("1", "2", "4")}
    with open(os.path.join(RESULTS, "bench_decode_widths.json"), "w") as f:
        json.dump(out, f, indent=1)
    lines = [f"# bench_decode_widths (commit `{out['commit'][:7]}`{' dirty' if out['dirty'] else ''}, "
             f"{out['date'][:10]})", "", f"`{out['command']}`; {out['machine']}; load average {load_start} → "
             f"{out['load_avg_end']}; SmolLM2-135M, 8 slots, max_cache_len {args.max_len}, jobs at position 100; "
             f"median decode step (ms) by running jobs (8: the full-width masked step every step cost before; "
             f"'8 rows': the row program over all 8).", "", "| model | " + " | ".join(str(k) for k in int8) + " |",
             "|---|" + "---|" * len(int8)]
    for name in ("int8", "float32", "int8 paged"):
        if name in out:
            lines.append(f"| {name} | " + " | ".join(str(out[name]["step_ms"].get(k, "")) for k in int8) + " |")
    lines += ["", f"Time per output token through the engine (int8, ms): {json.dumps(out['int8 tpot_ms'])}"]
    with open(os.path.join(RESULTS, "bench_decode_widths.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

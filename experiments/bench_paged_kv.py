"""Paged KV benchmark (issue 16, "Memory-budgeted KV cache"): (a) requests held at once at one fixed KV byte
budget, the slot layout (slots × max_cache_len) against paged KV (serve.kv_cache_bytes) on a mixed-length backlog
(goal >= 2x); (b) the decode step's time, paged against the slot layout at the same batch (the page-table
indirection's overhead on CPU, goal <= 15 %).

    python experiments/bench_paged_kv.py           # ~4 min on 2 shared cores; writes results/bench_paged_kv.{json,md}
    python experiments/bench_paged_kv.py --quick   # ~1 min: a shorter backlog, one batch, fewer repeats; writes nothing

The model has the quickstart's shape (configs/quickstart.yaml: d_model 256, 4 layers, 8/4 heads, vocab 4000) with
random weights (as experiments/bench_serving.py), max_seq_len 512 (4 KiB of k and v per position, all layers);
stop ids are empty, so every request generates exactly its max_tokens.

(a) Budget: what the slot layout's 8 slots × 512 positions hold (16 MiB). Slot layout: 8 slots. Paged: the same
bytes as 256 blocks of 16 positions, 32 slots (a slot no longer reserves 512 positions). Both fcfs, buckets
32..256 (longer prompts: prefill + extend chunks), host_kv_slots 256 (an evicted job's KV goes to host memory).
The full run adds paged KV with 64 slots on the same bytes, more than the blocks hold: there the budget, not
the slots, bounds the requests held (later ones wait; running ones are evicted when the blocks run out).
Workload (seeded): a backlog submitted at once, 90 % short requests (prompts 8-48 tokens, outputs 16-64) and 10 %
long ones (prompts 128-384, outputs up to the rest of max_cache_len, at most 128). Figures: the jobs holding KV
per iteration while requests still wait (mean: the concurrency the budget sustains; the headline ratio), jobs
decoded per decode step (mean over all steps, the drain included), the most jobs holding KV at once, output
tokens/s, evictions, and whether both arms' greedy tokens are equal.

(b) The decode step alone (no scheduling): every slot active at a spread of positions, the slot layout's program
against the paged one over the same batch (8 and 32; quick: 8), every slot holding max_cache_len positions of
blocks; rounds of 10 steps alternate between the arms (the order flipping every round); the median step of each.
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

import numpy as np

from provenance import provenance
from serving_workload import quickstart_model

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_LEN, BUCKETS, BLOCK = 512, [32, 64, 128, 256], 16
SLOT_SLOTS, PAGED_SLOTS, WIDE_SLOTS = 8, 32, 64
SHORT_PROMPT, SHORT_OUT, LONG_PROMPT, LONG_OUT_MAX, LONG_SHARE = (8, 48), (16, 64), (128, 384), 128, 0.1




def engine(model, slots: int, kv_cache_bytes: int = 0, buckets=BUCKETS):
    from fastserve.config import ServeConfig
    from fastserve.serve.engine import Engine
    graphdef, params, model_cfg, mesh = model
    cfg = ServeConfig(slots=slots, buckets=buckets, max_cache_len=MAX_LEN, scheduler="fcfs",
                      kv_cache_bytes=kv_cache_bytes, kv_block=BLOCK, max_queue=1024, max_new_tokens_limit=MAX_LEN)
    return Engine(graphdef, params, model_cfg, cfg, mesh=mesh, stop_ids=[])


def workload(n: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt, max_tokens) of a mixed-length backlog: 90 % short, 10 % long (seeded)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        if rng.random() < LONG_SHARE:
            p = int(rng.integers(LONG_PROMPT[0], LONG_PROMPT[1] + 1))
            m = int(rng.integers(16, min(LONG_OUT_MAX, MAX_LEN - p) + 1))
        else:
            p = int(rng.integers(SHORT_PROMPT[0], SHORT_PROMPT[1] + 1))
            m = int(rng.integers(SHORT_OUT[0], SHORT_OUT[1] + 1))
        out.append((rng.integers(4, 4000, p).tolist(), m))
    return out


def backlog(eng, items) -> tuple[dict[str, Any], list[list[int]]]:
    """Serves `items` submitted at once to the end → figures, every request's tokens."""
    from fastserve.serve.engine import Request
    reqs = [Request(p, max_new_tokens=m) for p, m in items]
    eng.submit_many(reqs)
    most, held, t0 = 0, [], time.perf_counter()
    while eng.pending:
        eng.step()
        holding = sum(j is not None for j in eng._slot_job)
        most = max(most, holding)
        if eng.pending > holding:        # requests still wait: the concurrency the budget sustains
            held.append(holding)
    wall = time.perf_counter() - t0
    st = eng.stats()
    out = {"slots": eng.slots, "decode_steps": st["decode_steps"],
           "jobs_per_decode_step": round(st["decode_slot_steps"] / max(st["decode_steps"], 1), 2),
           "jobs_holding_kv_backlogged": round(float(np.mean(held)), 2), "most_jobs_holding_kv": most,
           "tokens": st["tokens"], "wall_s": round(wall, 2),
           "tokens_per_s": round(st["tokens"] / wall, 1), "preemptions": st["preemptions"], "offloads": st["offloads"],
           "recomputes": st["recomputes"], "kv_bytes": eng.pool.nbytes if eng.pool.paged else
           eng.slots * MAX_LEN * eng.pool.position_bytes}
    if eng.pool.paged:
        out["paged_kv"] = st["paged_kv"]
    return out, [r.output for r in reqs]


def concurrency_part(model, quick: bool, seed: int) -> dict[str, Any]:
    items = workload(48 if quick else 160, seed)
    slot = engine(model, SLOT_SLOTS)
    position_bytes = slot.pool.position_bytes
    budget = SLOT_SLOTS * MAX_LEN * position_bytes
    res_slot, out_slot = backlog(slot, items)
    res_paged, out_paged = backlog(engine(model, PAGED_SLOTS, budget), items)
    out = {"budget_bytes": budget, "position_bytes": position_bytes, "requests": len(items),
           "long_requests": sum(len(p) >= LONG_PROMPT[0] for p, _ in items),
           "slot_layout": res_slot, "paged": res_paged}
    equal = out_slot == out_paged
    if not quick:      # more slots than the blocks hold: the budget binds (jobs wait, running ones are evicted)
        out[f"paged_{WIDE_SLOTS}"], out_wide = backlog(engine(model, WIDE_SLOTS, budget), items)
        equal = equal and out_wide == out_slot
    return {**out,
            "concurrency_ratio": round(res_paged["jobs_holding_kv_backlogged"] /
                                       res_slot["jobs_holding_kv_backlogged"], 2),
            "jobs_per_decode_step_ratio": round(res_paged["jobs_per_decode_step"] / res_slot["jobs_per_decode_step"],
                                                2),
            "tokens_per_s_ratio": round(res_paged["tokens_per_s"] / res_slot["tokens_per_s"], 2),
            "greedy_outputs_equal": equal}


def decode_overhead(model, batch: int, rounds: int, steps: int = 10) -> dict[str, Any]:
    """Median decode step, slot layout vs paged, `batch` slots all active, interleaved rounds."""
    import jax
    slot = engine(model, batch, buckets=[32])
    paged = engine(model, batch, batch * MAX_LEN * slot.pool.position_bytes, buckets=[32])
    for s in range(batch):
        paged.pool.grow(s, MAX_LEN)              # every slot holds a whole row of blocks
    rng = np.random.default_rng(batch)
    ints = np.zeros((6, batch), np.int32)
    ints[0] = rng.integers(4, 4000, batch)
    ints[1] = rng.integers(MAX_LEN // 4, MAX_LEN - 1, batch)   # positions spread over the rows
    ints[4], ints[5] = 0, 1
    floats = np.zeros((2, batch), np.float32)
    floats[1] = 1.0
    times: dict[str, list[float]] = {"slot_layout": [], "paged": []}
    arms = {"slot_layout": slot, "paged": paged}

    def one(eng) -> float:
        t0 = time.perf_counter()
        toks, eng.pool.cache = eng.programs.decode(eng.pool.cache, ints, floats)
        jax.device_get(toks)
        return time.perf_counter() - t0
    for eng in arms.values():
        one(eng)                                  # warm (compiled at start-up already)
    for r in range(rounds):
        for name in (("slot_layout", "paged") if r % 2 == 0 else ("paged", "slot_layout")):
            times[name] += [one(arms[name]) for _ in range(steps)]
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"batch": batch, "steps_per_arm": len(times["paged"]), "slot_layout_step_s": round(med["slot_layout"], 5),
            "paged_step_s": round(med["paged"], 5), "overhead": round(med["paged"] / med["slot_layout"] - 1, 4)}


def write_markdown(out: dict[str, Any], path: str) -> None:
    c = out["concurrency"]
    lines = [f"# bench_paged_kv ({out['date']}, commit {out['commit'][:7]}{' dirty' if out['dirty'] else ''})", "",
             f"`{out['command']}` on {out['machine']} (load average {out['load_avg_start']} → "
             f"{out['load_avg_end']}); {out['model']}.", "",
             f"## (a) Requests held at one KV budget ({c['budget_bytes'] / 2 ** 20:.0f} MiB)", "",
             f"A backlog of {c['requests']} requests ({c['long_requests']} long), fcfs. Greedy tokens equal in every "
             f"arm: {c['greedy_outputs_equal']}.", "",
             "| layout | slots | jobs holding KV while backlogged | jobs per decode step | most holding KV | "
             "tokens/s | decode steps | evictions | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for arm in [a for a in ("slot_layout", "paged", f"paged_{WIDE_SLOTS}") if a in c]:
        r = c[arm]
        lines.append(f"| {arm} | {r['slots']} | {r['jobs_holding_kv_backlogged']} | {r['jobs_per_decode_step']} | "
                     f"{r['most_jobs_holding_kv']} | {r['tokens_per_s']} | {r['decode_steps']} | {r['preemptions']} | "
                     f"{r['wall_s']} |")
    lines += ["", f"Concurrency paged / slot layout: **{c['concurrency_ratio']}×** (goal ≥ 2×); output tokens/s "
              f"{c['tokens_per_s_ratio']}×.", "", "## (b) Decode step, paged vs slot layout", "",
              "| batch | slot layout s | paged s | overhead (goal ≤ 15 %) |", "|---|---|---|---|"]
    for r in out["decode_overhead"]:
        lines.append(f"| {r['batch']} | {r['slot_layout_step_s']} | {r['paged_step_s']} | "
                     f"{100 * r['overhead']:.1f} % |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    t_start, load_start, prov = time.time(), os.getloadavg()[0], provenance()   # the code measured: at the start
    model = quickstart_model(MAX_LEN)
    conc = concurrency_part(model, args.quick, args.seed)
    overhead = [decode_overhead(model, b, 6 if args.quick else 20) for b in ((8,) if args.quick else (8, 32))]
    worst = max(r["overhead"] for r in overhead)
    out = {"bench": "paged_kv", "quick": args.quick, "seed": args.seed,
           "model": f"quickstart shape, random weights, vocab 4000, max_cache_len {MAX_LEN}, stop ids empty",
           "engine": {"buckets": BUCKETS, "kv_block": BLOCK, "scheduler": "fcfs", "slot_layout_slots": SLOT_SLOTS,
                      "paged_slots": PAGED_SLOTS},
           "workload": f"backlog; {100 - int(100 * LONG_SHARE)} % prompts {SHORT_PROMPT[0]}-{SHORT_PROMPT[1]} + "
                       f"outputs {SHORT_OUT[0]}-{SHORT_OUT[1]}, {int(100 * LONG_SHARE)} % prompts {LONG_PROMPT[0]}-"
                       f"{LONG_PROMPT[1]} + outputs 16-{LONG_OUT_MAX}",
           "concurrency": conc, "decode_overhead": overhead,
           "headline": {"requests held while backlogged, paged / slot layout at one budget (goal ≥ 2)":
                        conc["concurrency_ratio"],
                        "decode step overhead, worst batch (goal ≤ 0.15)": worst,
                        "greedy tokens equal": conc["greedy_outputs_equal"]},
           "command": "python experiments/bench_paged_kv.py" + (" --quick" if args.quick else ""),
           "wall_s": round(time.time() - t_start, 1), "load_avg_start": round(load_start, 2),
           "load_avg_end": round(os.getloadavg()[0], 2), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "date": time.strftime("%Y-%m-%d"), **prov}
    if not args.quick:
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        with open(os.path.join(HERE, "results", "bench_paged_kv.json"), "w") as f:
            json.dump(out, f, indent=1)
        write_markdown(out, os.path.join(HERE, "results", "bench_paged_kv.md"))
    print(json.dumps({"bench": "paged_kv", "quick": args.quick, "headline": out["headline"],
                      "concurrency": {k: conc[k] for k in ("concurrency_ratio", "jobs_per_decode_step_ratio",
                                                           "tokens_per_s_ratio")},
                      "decode_overhead": overhead, "wall_s": out["wall_s"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

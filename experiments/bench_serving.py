"""Serving benchmark, vLLM's method: seeded Poisson arrivals at a sweep of request rates, heavy-tailed output lengths,
per-scheduler TTFT / TPOT / E2E (JCT), throughput and goodput; in-process (engine only) and over HTTP (streaming).

    python experiments/bench_serving.py            # full sweep, both modes (~10 min on 2 shared cores); writes
                                                   # experiments/results/bench_serving.{json,md,png}
    python experiments/bench_serving.py --quick    # ~1 min: 2 rates in-process + one HTTP run; writes nothing

The model has the quickstart's shape (configs/quickstart.yaml: d_model 256, 4 layers, 8/4 heads, vocab 4000) with
random weights and max_seq_len 320 so that 256-token outputs fit; stop ids are empty, so every request generates
exactly its max_tokens (vLLM's ignore_eos). Workload (seeded): prompts of 8-48 random token ids; outputs 90 % short
(8-16 tokens) and 10 % long (128-256 tokens); gamma inter-arrival times (shape 1: Poisson) at each rate. The rates
are fractions of the measured capacity: the throughput of continuous batching (fcfs) on a backlog of the same mix
(every request queued at once), from low load to past capacity; `static`'s sweep stops after the first rate it
cannot sustain. Every scheduler sees the same seeded trace at a rate. The first requests of every run are warm-up
(load builds up) and excluded. The last line printed is one JSON object.

In-process mode drives `Engine.step()` synchronously and submits each request at its arrival time (timings on the
engine's clock, arrival = the scheduled time). HTTP mode starts a server process (one Engine + Server per scheduler,
fastserve.serve.server) and streams every request with `stream: true` over its own connection; TTFT / TPOT / E2E
are measured by the client. matplotlib (the plot) is a benchmark-only import. Beside this script: the workload and
its summary (serving_workload.py), `--mode sim` (serving_sim.py), the targets, markdown and plot (serving_report.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

import numpy as np

from serving_client import run_http
from serving_report import plot, render, targets, write_markdown
from serving_sim import simulate_sweep
from provenance import provenance
from serving_workload import (BUCKETS, HIGH_LOAD, LONG, LONG_FRACTION, MAX_LEN, P99_SLO_S, PROMPT_RANGE,
                              REFERENCE_ONLY_AT_HIGH_LOAD, SHORT, SLO_TPOT_S, SLO_TTFT_S, SLOTS, Item, mean_output,
                              quickstart_model, replay, serve_config, summarize_requests, workload)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT = ("mlfq", "gittins", "fcfs", "static", "mlfq4")   # mlfq4: the earlier defaults (high load only; VARIANTS)



# ------------------------------------------------------------------------------------------------ in-process

def run_inprocess(engine, items: list[Item], warmup: int) -> dict[str, Any]:
    before, before_t = dict(engine.counters), dict(engine.timings)
    promotions = getattr(engine.scheduler, "promotions", None)
    reqs, wall = replay(engine, items, warmup)
    out = summarize_requests(reqs[warmup:])
    d = {k: engine.counters[k] - before[k] for k in engine.counters}
    out.update({k: d[k] for k in ("preemptions", "offloads", "restores", "recomputes", "prefills", "decode_steps")})
    # where the run's wall time went (whole run, warm-up included), and the decode batch's mean occupancy
    out["busy_slots_mean"] = round(d["decode_slot_steps"] / max(d["decode_steps"], 1), 2)
    out["time_s"] = {k: round(engine.timings[k] - before_t[k], 2) for k in engine.timings}
    out["time_s"]["wall"] = round(wall, 2)
    if promotions is not None:
        out["promotions"] = engine.scheduler.promotions - promotions
    return out


# ------------------------------------------------------------------------------------------------------ HTTP

def worker(port_file: str, variants: list[str]) -> int:
    """The server process of HTTP mode: one Engine + Server per scheduler on free ports; runs until killed."""
    from fastserve.workdir import LoadedModel
    from fastserve.serve.engine import Engine
    from fastserve.serve.server import Server

    class IdTokenizer:           # prompts are token ids; text is the ids, so every token streams a chunk
        bos_id, eos_id, pad_id, stop_ids, add_bos = -1, -1, 0, [], False

        def encode(self, text: str) -> list[int]:
            return [int(t) for t in text.split()]

        def decode(self, ids) -> str:
            return "".join(f" {i}" for i in ids)

    graphdef, params, model_cfg, mesh = quickstart_model()
    loaded = LoadedModel(model_cfg, graphdef, params, IdTokenizer(), mesh)   # stop ids [-1]: never sampled
    urls = {}
    for name in variants:
        cfg = serve_config(name)
        urls[name] = Server(Engine.from_loaded(loaded, cfg), loaded, cfg, model_name="bench").start().url
    with open(port_file + ".tmp", "w") as f:
        json.dump(urls, f)
    os.replace(port_file + ".tmp", port_file)
    while True:
        time.sleep(3600)


# ----------------------------------------------------------------------------------------------------- sweep

def measure_capacity(engine, n: int, seed: int) -> float:
    """Requests/s that `engine` (fcfs: continuous batching) completes while a backlog of n requests of the mix, all
    queued at once, keeps every slot busy: completions up to the moment the last request starts (the drain after
    it, with slots idling, is not capacity)."""
    from fastserve.serve.engine import Request
    reqs = [Request(it.prompt, max_new_tokens=it.out, temperature=0.0, stop_ids=[]) for it in workload(n, 1e9, seed)]
    engine.generate(reqs)
    t0 = min(r.arrival for r in reqs)
    t_full = max(r.first_token_time for r in reqs)
    done = sum(r.finish_time <= t_full for r in reqs)
    return done / (t_full - t0)


def record_sim(table: dict[str, Any], argv: str) -> None:
    """experiments/results/bench_serving_sim.json: the table, and as headline each scheduler's per-seed fcfs / it
    mean-JCT ratios at the highest simulated load."""
    top = max(float(k.split(" @ ")[1]) for k in table if " @ " in k)
    headline = {f"fcfs / {k.split(' @ ')[0]} mean JCT per seed at {top}x capacity": v["over_fcfs_by_seed"]
                for k, v in table.items() if k.endswith(f" @ {top}") and "over_fcfs_by_seed" in v}
    out = {"bench": "serving_sim", "table": table, "headline": headline,
           "command": f"python experiments/bench_serving.py {argv}", "machine": "virtual clock (serving_sim.py "
           "SIM_PROFILE); no JAX, deterministic", "date": time.strftime("%Y-%m-%d"), **provenance()}
    with open(os.path.join(HERE, "results", "bench_serving_sim.json"), "w") as f:
        json.dump(out, f, indent=1)


def saturated(res: dict[str, Any], rate: float) -> bool:
    """Throughput well under the offered rate and the p99 E2E past the SLO."""
    return res["throughput_req_s"] < 0.8 * rate and res["e2e_p99_s"] > P99_SLO_S


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--mode", choices=["inprocess", "http", "both", "sim"], default="both",
                    help="sim: the scheduler on a virtual clock with a fixed profile (no JAX; see simulate)")
    ap.add_argument("--seeds", type=int, default=5, help="sim: traces per point")
    ap.add_argument("--schedulers", default="", help=f"comma-separated, of {', '.join(DEFAULT)} or name:key=value;...")
    ap.add_argument("--fractions", default="", help="rates as fractions of the measured capacity, comma-separated")
    ap.add_argument("--requests", type=int, default=0, help="measured requests per run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--record", action="store_true", help="sim: write experiments/results/bench_serving_sim.json")
    ap.add_argument("--render", default="", help="only re-render the .md and .png of this recorded JSON")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.render:
        render(args.render)
        return 0
    if args.worker:
        return worker(args.worker, args.schedulers.split(","))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.mode == "sim":
        table = simulate_sweep(args.schedulers.split(",") if args.schedulers else ["mlfq", "fcfs"],
                               [float(f) for f in (args.fractions or "0.85,0.95,1.05,1.2").split(",")],
                               args.requests or 400, args.seeds)
        if args.record:   # the sim is deterministic: a recorded table is reproduced exactly by its command
            record_sim(table, " ".join(sys.argv[1:]))
        print(json.dumps(table))
        return 0
    from fastserve.serve.engine import Engine

    schedulers = args.schedulers.split(",") if args.schedulers else \
        (["mlfq", "fcfs", "static"] if args.quick else list(DEFAULT))
    fractions = [float(f) for f in args.fractions.split(",")] if args.fractions else \
        ([0.25, 0.95] if args.quick else [0.1, 0.25, 0.5, 0.7, 0.85, 0.95, 1.05, 1.2])
    n = args.requests or (40 if args.quick else 250)
    # near and past capacity the queue needs time to build (and mean JCT to mean something): longer traces there
    n_high = args.requests or (40 if args.quick else 400)
    warmup = max(5, n // 10)
    load_start = os.getloadavg()[0]
    t_start = time.time()

    graphdef, params, model_cfg, mesh = quickstart_model()
    engines = {s: Engine(graphdef, params, model_cfg, serve_config(s), mesh=mesh, stop_ids=[]) for s in schedulers}
    prof = next(iter(engines.values())).profile
    levels = {s: e.scheduler.levels for s, e in engines.items() if e.scheduler.name == "mlfq"}
    # the profile's bound (slots always full, no host work), and the capacity the sweep is scaled by: measured
    mean_prefill = float(np.mean(list(prof["prefill_s"].values())))
    profile_bound = SLOTS / (mean_output() * prof["decode_s"] + SLOTS * mean_prefill)
    cap_engine = engines.get("fcfs") or Engine(graphdef, params, model_cfg, serve_config("fcfs"), mesh=mesh,
                                               stop_ids=[])
    capacity = measure_capacity(cap_engine, 60 if args.quick else 150, args.seed + 999)
    rates = [round(f * capacity, 2) for f in fractions]
    print(f"profile: decode step {prof['decode_s'] * 1e3:.1f} ms ({SLOTS} slots), prefill "
          f"{ {b: round(v * 1e3, 1) for b, v in prof['prefill_s'].items()} } ms; profile bound {profile_bound:.1f} "
          f"req/s; measured capacity (fcfs, backlog) {capacity:.1f} req/s; rates {rates}; mlfq levels {levels}",
          file=sys.stderr, flush=True)

    results: dict[str, Any] = {"inprocess": {}, "http": {}}
    if args.mode in ("inprocess", "both"):
        results["inprocess"] = {s: [] for s in schedulers}
        stopped: set[str] = set()
        for k, rate in enumerate(rates):            # rates outside: every scheduler sees the machine in one state
            count = n if args.quick or args.requests else int(np.clip(rate * 15, 60, n))   # >= ~15 s of arrivals
            if fractions[k] >= HIGH_LOAD:
                count = n_high
            items = workload(count + warmup, rate, args.seed + k)
            for s in schedulers:
                if s in stopped or (s in REFERENCE_ONLY_AT_HIGH_LOAD and fractions[k] < HIGH_LOAD):
                    continue
                res = {"rate": rate, **run_inprocess(engines[s], items, warmup)}
                results["inprocess"][s].append(res)
                print(f"inprocess {s:6s} rate {rate:6.2f}: {json.dumps(res)}", file=sys.stderr, flush=True)
                if s == "static" and saturated(res, rate):
                    stopped.add(s)              # past its capacity: higher rates only grow its backlog
    del engines

    if args.mode in ("http", "both"):
        http_fractions = [0.6] if args.quick else [0.5, 0.95]
        # static is left out over HTTP: its in-process sweep already shows it saturated below these rates
        http_schedulers = schedulers[:1] if args.quick else [s for s in schedulers if s in ("mlfq", "fcfs")]
        port_file = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench_serving_{os.getpid()}.json")
        proc = subprocess.Popen([sys.executable, __file__, "--worker", port_file, "--schedulers",
                                 ",".join(http_schedulers)], cwd=ROOT)
        try:
            deadline = time.time() + 300
            while not os.path.exists(port_file):
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("the benchmark server did not start")
                time.sleep(0.2)
            with open(port_file) as f:
                urls = json.load(f)
            for s in http_schedulers:
                results["http"][s] = []
                for k, frac in enumerate(http_fractions):
                    rate = round(frac * capacity, 2)
                    count = n // 2 if args.quick else int(np.clip(rate * 10, 80, n))
                    items = workload(count + warmup, rate, args.seed + 100 + k)
                    res = {"rate": rate, **run_http(urls[s], items, warmup)}
                    results["http"][s].append(res)
                    print(f"http      {s:6s} rate {rate:6.2f}: {json.dumps(res)}", file=sys.stderr, flush=True)
                    if s == "static" and saturated(res, rate):
                        break
        finally:
            proc.terminate()
            proc.wait(30)
            if os.path.exists(port_file):
                os.remove(port_file)

    summary = targets(results["inprocess"], rates, fractions)
    out = {"bench": "serving", "quick": args.quick, "seed": args.seed, "slots": SLOTS, "buckets": BUCKETS,
           "max_cache_len": MAX_LEN, "model": "quickstart shape, random weights, vocab 4000, stop ids empty",
           "workload": {"prompt_tokens": PROMPT_RANGE, "short_output": SHORT, "long_output": LONG,
                        "long_fraction": LONG_FRACTION, "arrivals": "gamma, shape 1 (Poisson)",
                        "measured_per_run": n, "measured_per_run_at_high_load": n_high,
                        "warmup_excluded": warmup},
           "slo": {"goodput_ttft_s": SLO_TTFT_S, "goodput_tpot_s": SLO_TPOT_S, "p99_e2e_s": P99_SLO_S},
           "profile": {"decode_s": prof["decode_s"], "prefill_s": prof["prefill_s"]}, "mlfq_levels": levels,
           "profile_bound_req_s": round(profile_bound, 2), "capacity_req_s": round(capacity, 2),
           "fractions": fractions, "rates": rates, "results": results, "targets": summary,
           "command": "python experiments/bench_serving.py" + (" --quick" if args.quick else ""),
           "wall_s": round(time.time() - t_start, 1), "load_avg_start": round(load_start, 2),
           "load_avg_end": round(os.getloadavg()[0], 2), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "date": time.strftime("%Y-%m-%d"), **provenance()}
    custom = args.fractions or args.requests or args.mode != "both" or args.schedulers
    if not args.quick and not custom:       # only the default full run is recorded
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        with open(os.path.join(HERE, "results", "bench_serving.json"), "w") as f:
            json.dump(out, f, indent=1)
        write_markdown(out, os.path.join(HERE, "results", "bench_serving.md"))
        plot(out, os.path.join(HERE, "results", "bench_serving.png"))
    print(json.dumps({"bench": "serving", "quick": args.quick, "capacity_req_s": out["capacity_req_s"], "rates": rates,
                      "mean_jct_s": {s: [p["e2e_mean_s"] for p in pts] for s, pts in results["inprocess"].items()},
                      "targets": summary, "wall_s": out["wall_s"]}))
    return 0



if __name__ == "__main__":
    sys.exit(main())

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
are measured by the client. matplotlib (the plot) is a benchmark-only import.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT = ("mlfq", "gittins", "fcfs", "static", "mlfq4")   # mlfq4: the earlier defaults (high load only; VARIANTS)
SLOTS = 8
BUCKETS = [32, 64]
MAX_LEN = 320
PROMPT_RANGE = (8, 48)
SHORT, LONG, LONG_FRACTION = (8, 16), (128, 256), 0.1
SLO_TTFT_S, SLO_TPOT_S = 1.0, 0.1           # goodput: requests meeting both
P99_SLO_S = 5.0                             # the p99 E2E latency at which schedulers' sustainable rates are compared


# --------------------------------------------------------------------------------------------- model, workload

def build_model():
    import jax

    from fastserve import parallel
    from fastserve.config import load_config
    from fastserve.core.state import init_params
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"),
                      ["model.vocab_size=4000", f"model.max_seq_len={MAX_LEN}", "mesh.data=1"])
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
    graphdef, params, _ = init_params(cfg.model, mesh, seed=0)
    return graphdef, params, cfg.model, mesh


# Scheduler variants: a name, optionally `name:key=value;key=value` with ServeConfig fields (e.g. mlfq_levels).
# mlfq4 is the configuration that lost to fcfs (4 levels: short jobs sank to the last level with the long ones;
# 16 host KV slots: most evictions dropped the KV and recomputed it); run at high load only, for the record.
VARIANTS = {"mlfq4": "mlfq:mlfq_levels=4;host_kv_slots=16"}
REFERENCE_ONLY_AT_HIGH_LOAD = {"mlfq4"}
HIGH_LOAD = 0.85                            # "high load": offered rate >= this fraction of the measured capacity


def serve_config(variant: str):
    from fastserve.config import ServeConfig
    spec = VARIANTS.get(variant, variant)
    name, _, extra = spec.partition(":")
    kw = {k: type(getattr(ServeConfig, k, 0))(v) for k, v in (kv.split("=") for kv in extra.split(";") if kv)}
    return ServeConfig(slots=SLOTS, buckets=BUCKETS, max_cache_len=MAX_LEN, scheduler=name, max_queue=100_000,
                       max_new_tokens_limit=LONG[1], port=0, **kw)


@dataclasses.dataclass
class Item:
    t: float                # arrival offset (s)
    prompt: list[int]
    out: int                # output tokens


def workload(n: int, rate: float, seed: int, burstiness: float = 1.0) -> list[Item]:
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), n)
    times = np.cumsum(gaps) - gaps[0]
    items = []
    for t in times:
        p = int(rng.integers(PROMPT_RANGE[0], PROMPT_RANGE[1] + 1))
        lo, hi = LONG if rng.random() < LONG_FRACTION else SHORT
        items.append(Item(float(t), rng.integers(4, 4000, p).tolist(), int(rng.integers(lo, hi + 1))))
    return items


def mean_output() -> float:
    return (1 - LONG_FRACTION) * sum(SHORT) / 2 + LONG_FRACTION * sum(LONG) / 2


# --------------------------------------------------------------------------------------------------- metrics

def summarize(recs: list[dict[str, float]], duration: float) -> dict[str, Any]:
    """recs: per measured request {ttft, tpot, e2e, tokens}; vLLM's summary."""
    out: dict[str, Any] = {"completed": len(recs), "duration_s": round(duration, 3)}
    for key in ("ttft", "tpot", "e2e"):
        vals = np.array([r[key] for r in recs if r[key] is not None])
        if len(vals):
            out[f"{key}_mean_s"] = round(float(vals.mean()), 5)
            out[f"{key}_median_s"] = round(float(np.median(vals)), 5)
            out[f"{key}_p99_s"] = round(float(np.percentile(vals, 99)), 5)
    tokens = sum(r["tokens"] for r in recs)
    good = sum(1 for r in recs if r["ttft"] is not None and r["ttft"] <= SLO_TTFT_S
               and (r["tpot"] is None or r["tpot"] <= SLO_TPOT_S))
    out.update(throughput_req_s=round(len(recs) / duration, 3), throughput_tok_s=round(tokens / duration, 1),
               goodput_req_s=round(good / duration, 3), slo_attained=round(good / max(len(recs), 1), 4))
    short = [r["e2e"] for r in recs if r["tokens"] <= SHORT[1]]
    long = [r["e2e"] for r in recs if r["tokens"] >= LONG[0]]
    if short:
        out["e2e_mean_short_s"] = round(float(np.mean(short)), 5)
    if long:
        out["e2e_mean_long_s"] = round(float(np.mean(long)), 5)
    return out


# ------------------------------------------------------------------------------------------------ in-process

def run_inprocess(engine, items: list[Item], warmup: int) -> dict[str, Any]:
    from fastserve.serve.engine import Request
    before, before_t = dict(engine.counters), dict(engine.timings)
    promotions = getattr(engine.scheduler, "promotions", None)
    reqs = [Request(it.prompt, max_new_tokens=it.out, temperature=0.0, stop_ids=[]) for it in items]
    clock = engine.clock
    t0 = clock()
    i = 0
    while i < len(items) or engine.pending:
        now = clock() - t0
        while i < len(items) and items[i].t <= now:
            engine.submit(reqs[i])
            reqs[i].arrival = t0 + items[i].t      # admitted at the next step: the scheduler sees the true arrival
            i += 1
        if not engine.step():
            wait = (items[i].t - (clock() - t0)) if i < len(items) else 0.0
            time.sleep(min(max(wait, 0.0), 0.002))
    measured = reqs[warmup:]
    assert all(r.finish_reason == "length" and len(r.output) == r.max_new_tokens for r in measured)
    recs = [{"ttft": r.ttft, "tpot": r.tpot, "e2e": r.jct, "tokens": len(r.output)} for r in measured]
    duration = max(r.finish_time for r in measured) - min(r.arrival for r in measured)
    out = summarize(recs, duration)
    d = {k: engine.counters[k] - before[k] for k in engine.counters}
    out.update({k: d[k] for k in ("preemptions", "offloads", "restores", "recomputes", "prefills", "decode_steps")})
    # where the run's wall time went (whole run, warm-up included), and the decode batch's mean occupancy
    out["busy_slots_mean"] = round(d["decode_slot_steps"] / max(d["decode_steps"], 1), 2)
    out["time_s"] = {k: round(engine.timings[k] - before_t[k], 2) for k in engine.timings}
    out["time_s"]["wall"] = round(clock() - t0, 2)
    if promotions is not None:
        out["promotions"] = engine.scheduler.promotions - promotions
    return out


# ------------------------------------------------------------------------------------------------------ HTTP

def worker(port_file: str, variants: list[str]) -> int:
    """The server process of HTTP mode: one Engine + Server per scheduler on free ports; runs until killed."""
    from fastserve.inference import LoadedModel
    from fastserve.serve.engine import Engine
    from fastserve.serve.server import Server

    class IdTokenizer:           # prompts are token ids; text is the ids, so every token streams a chunk
        bos_id, eos_id, pad_id, stop_ids, add_bos = -1, -1, 0, [], False

        def encode(self, text: str) -> list[int]:
            return [int(t) for t in text.split()]

        def decode(self, ids) -> str:
            return "".join(f" {i}" for i in ids)

    graphdef, params, model_cfg, mesh = build_model()
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


async def _stream_one(host: str, port: int, it: Item, t0: float) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, t0 + it.t - time.perf_counter()))
    sent = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    body = json.dumps({"model": "bench", "prompt": it.prompt, "max_tokens": it.out, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"HTTP error: {status!r} {await reader.read()!r}")
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    times, tokens, buf, done = [], 0, b"", False
    while not done:
        size = int((await reader.readline()).strip() or b"0", 16)     # chunked transfer encoding
        if size == 0:
            break
        buf += (await reader.readexactly(size + 2))[:-2]
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            data = event[len(b"data: "):]
            if data == b"[DONE]":
                done = True
                break
            msg = json.loads(data)
            if msg.get("choices") and msg["choices"][0]["text"]:
                times.append(time.perf_counter())
            if msg.get("usage"):
                tokens = msg["usage"]["completion_tokens"]
    writer.close()
    end = time.perf_counter()
    return {"ttft": times[0] - sent, "tpot": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None,
            "e2e": end - sent, "tokens": tokens, "sent": sent, "end": end}


def run_http(url: str, items: list[Item], warmup: int) -> dict[str, Any]:
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)

    async def go():
        t0 = time.perf_counter() + 0.05
        return await asyncio.gather(*[_stream_one(host, int(port), it, t0) for it in items])
    recs = asyncio.run(go())[warmup:]
    assert all(r["tokens"] == it.out for r, it in zip(recs, items[warmup:]))
    return summarize(recs, max(r["end"] for r in recs) - min(r["sent"] for r in recs))


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


def saturated(res: dict[str, Any], rate: float) -> bool:
    """Throughput well under the offered rate and the p99 E2E past the SLO."""
    return res["throughput_req_s"] < 0.8 * rate and res["e2e_p99_s"] > P99_SLO_S


def rate_at_p99(points: list[dict[str, Any]], slo: float) -> float | None:
    """The highest throughput (req/s) at which p99 E2E <= slo, interpolated between the sweep's points."""
    pts = sorted(points, key=lambda p: p["rate"])
    best = None
    for a, b in zip([None] + pts, pts):
        if b["e2e_p99_s"] <= slo:
            best = b["throughput_req_s"]
        elif a is not None and a["e2e_p99_s"] <= slo:
            f = (slo - a["e2e_p99_s"]) / (b["e2e_p99_s"] - a["e2e_p99_s"])
            return a["throughput_req_s"] + f * (b["throughput_req_s"] - a["throughput_req_s"])
        else:
            break
    return best


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
        print(json.dumps(simulate_sweep(args.schedulers.split(",") if args.schedulers else ["mlfq", "fcfs"],
                                        [float(f) for f in (args.fractions or "0.85,0.95,1.05,1.2").split(",")],
                                        args.requests or 400, args.seeds)))
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

    graphdef, params, model_cfg, mesh = build_model()
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
           "date": time.strftime("%Y-%m-%d")}
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


def targets(inproc: dict[str, list[dict[str, Any]]], rates: list[float], fractions: list[float]) -> dict[str, Any]:
    """The issue's two targets, from the in-process sweep: (1) continuous batching (fcfs, and mlfq) sustains >= 3x
    the requests/s of static at the same p99 E2E (P99_SLO_S); (2) mlfq's mean JCT is >= 2x lower than fcfs's at
    high load: every swept rate >= HIGH_LOAD x the measured capacity, for each mlfq variant."""
    out: dict[str, Any] = {"p99_e2e_slo_s": P99_SLO_S, "high_load_fraction": HIGH_LOAD}
    at = {s: rate_at_p99(pts, P99_SLO_S) for s, pts in inproc.items() if pts and s not in REFERENCE_ONLY_AT_HIGH_LOAD}
    out["sustainable_req_s_at_p99_e2e"] = {s: (round(v, 3) if v is not None else None) for s, v in at.items()}
    if at.get("static"):
        for s in at:
            if s != "static" and at.get(s):
                out[f"{s}_over_static"] = round(at[s] / at["static"], 2)
        out["continuous_batching_3x_static_met"] = out.get("fcfs_over_static", 0) >= 3.0
    high = {str(r) for r, f in zip(rates, fractions) if f >= HIGH_LOAD - 1e-9}
    out["high_load_rates"] = sorted(high, key=float)
    for m in [s for s in inproc if _vs_fcfs(s)]:
        if not inproc.get("fcfs"):
            break
        fcfs = {p["rate"]: p["e2e_mean_s"] for p in inproc["fcfs"]}
        ratios = {str(p["rate"]): round(fcfs[p["rate"]] / p["e2e_mean_s"], 2) for p in inproc[m] if p["rate"] in fcfs}
        out[f"fcfs_over_{m}_mean_jct_by_rate"] = ratios
        at_high = [ratios[r] for r in ratios if r in high]
        out[f"{m}_2x_lower_mean_jct_at_high_load_met"] = bool(at_high) and all(x >= 2.0 for x in at_high)
    return out


NOTES = """## How to read this

* **Capacity** is measured, not estimated: fcfs (continuous batching) on a backlog of the mix, counting completions
  while every slot is busy. Rates are fractions of it, so "high load" (>= 0.85) means near or past saturation. Each
  run is one seeded trace (different per rate, the same for every scheduler at a rate) on a shared 2-core machine:
  differences of ~10 % between neighbouring points are within the noise.
* **Why mlfq used to lose to fcfs** (the `mlfq4` rows: the earlier defaults, 4 levels and 16 host KV slots).
  (1) With q0 = one decode step and 4 levels, a job reaches the last level after 1 + 2 + 4 = 7 steps of service,
  before a short job (8-16 tokens) finishes. The last level is FCFS by the time a job *entered it* and never demotes,
  so short jobs queued there behind every long job that got there first: worse off than under plain FCFS, plus the
  preemptions. (2) Under MLFQ every arrival is prefilled at once, so the number of started-and-preempted jobs grows
  with the backlog (under fcfs it never exceeds the slots); past 16 parked jobs an eviction dropped the KV and the
  resume recomputed prompt + output (about half of the evictions at high load), which cost throughput and deepened
  the backlog: TPOT rose to ~0.1 s. Offload / upload copies themselves cost little, and nothing recompiled
  (tests/test_engine.py checks that no program compiles after start-up).
* **The fix**: `serve.mlfq_levels: 0` (now the default) picks enough levels that even the longest job the engine
  admits never sinks to the last level (`scheduler.levels_covering`), so jobs stay ordered by attained service and
  short ones finish in the upper levels; `serve.host_kv_slots` defaults to 256 parked jobs in host memory.
* **What still limits mlfq's mean JCT**: short jobs now get about their bare service time at every load (see the
  Verdict), but MLFQ serves long jobs by least attained service, so the long jobs of a busy period share the slots
  the short ones leave and all finish late, well after their fcfs JCT. Continuous batching over 8 slots keeps
  fcfs's head-of-line blocking small until the queue builds (a long job holds one slot of 8), so fcfs's mean JCT
  only grows a few x its bare value within these traces; with 10 % long jobs, their JCT then bounds mlfq's mean.
  The 2x target would need fcfs's queueing delay to dominate, i.e. longer or deeper overload than these traces.
* **Where mlfq's time goes** (each in-process run records `time_s`, `busy_slots_mean`, `restores` and
  `prefills` in the JSON): mlfq's throughput is fcfs's within the noise. Offload + restore copies take 1-3 % of
  the wall time at high load, nothing is recomputed (256 host KV slots), both run the same prefills and the decode
  batch is as full; prefills are ~10 % of the wall time under either, and arrivals are rare enough per step (~0.3)
  that batching the prefills of one iteration would save little. mlfq's lower "sustainable rate" is its p99, i.e.
  the long jobs.
* **A lower bound**: no scheduler beats a job's bare service time (its prefill, then one decode step per token), so
  the mean JCT can't drop below its value at low load (the 0.1 x capacity rows). fcfs's mean JCT at 0.85 x capacity
  is well under twice that, so "2x lower than fcfs" is out of reach there for any scheduler; the target can only be
  met where fcfs's queueing dominates (about >= 1 x capacity, over traces long enough for the queue to build).
  `--mode sim` (the schedulers on a virtual clock with a fixed profile, 5 seeds per point) shows the same without
  the machine's noise.
* **Starvation promotion** (the paper's remedy for the long jobs) does not help mean JCT here: the default
  `starvation_s` of 10 s exceeds every wait, and a threshold of K x the level's quantum (`serve.starvation_quanta`)
  almost never fires (K = 8) or, at K = 2, promotes jobs by the thousand at 1.05 x: the queue degenerates to
  round-robin, with more preemptions, and short and long jobs both get slower. Promotion resets a job's attained
  service, which is the information MLFQ ranks by.
* **gittins**: the Gittins index policy (mean-JCT-optimal for unknown job sizes on one server, near-optimal on k),
  over the distribution of service times of recently finished jobs (learned online; least attained service until
  20 jobs have finished). Where sizes have a decreasing hazard it is LAS, like MLFQ; once a job has outlived the
  short mode, its index rises as it nears the long jobs' sizes, so the long jobs of a busy period run roughly
  oldest-first instead of sharing the slots as MLFQ's geometric levels make them do (least attained service among
  similar-sized long jobs is processor sharing: they all finish late). Nothing about the mix is configured.
* The HTTP rows run the same engines behind the server (streaming client, client-side timings); static is left
  out there (it saturates below those rates in-process).
"""


def _vs_fcfs(s: str) -> bool:
    """The schedulers whose mean JCT the issue's 2x target compares with fcfs's: the MLFQ variants, and Gittins."""
    return s.startswith("mlfq") or s == "gittins"


def verdict(out: dict[str, Any]) -> list[str]:
    """The targets in words, from the recorded numbers."""
    t, inproc = out["targets"], out["results"]["inprocess"]
    sus = t["sustainable_req_s_at_p99_e2e"]
    lines = ["## Verdict", ""]
    if "fcfs_over_static" in t:
        lines.append(f"* Continuous batching vs static, at p99 E2E <= {t['p99_e2e_slo_s']} s: fcfs {sus.get('fcfs')} "
                     f"req/s, mlfq {sus.get('mlfq')}, gittins {sus.get('gittins')}, static {sus.get('static')} -> "
                     f"fcfs / static = "
                     f"{t['fcfs_over_static']}x (target >= 3x: "
                     f"{'met' if t['continuous_batching_3x_static_met'] else 'NOT met'}).")
    for m in [k for k in inproc if _vs_fcfs(k)]:
        key = f"fcfs_over_{m}_mean_jct_by_rate"
        if key not in t:
            continue
        high = {r: x for r, x in t[key].items() if r in t["high_load_rates"]}
        met = t[f"{m}_2x_lower_mean_jct_at_high_load_met"]
        lines.append(f"* fcfs / {m} mean JCT at high load (rate: ratio): "
                     + ", ".join(f"{r}: {x}" for r, x in high.items())
                     + f" (target >= 2x at every high-load rate: {'met' if met else 'NOT met'}).")
    by = {s: {str(p["rate"]): p for p in pts} for s, pts in inproc.items()}
    for name in [s for s in ("mlfq", "gittins") if s in by and "fcfs" in by]:
        for r in t["high_load_rates"]:
            m, f = by[name].get(r), by["fcfs"].get(r)
            if m and f:
                lines.append(f"* {name} vs fcfs at rate {r}: short jobs {name} {m['e2e_mean_short_s']:.3f} s vs fcfs "
                             f"{f['e2e_mean_short_s']:.3f} s; long jobs {name} {m['e2e_mean_long_s']:.3f} s vs fcfs "
                             f"{f['e2e_mean_long_s']:.3f} s")
    return lines + [""]


def write_markdown(out: dict[str, Any], path: str) -> None:
    wl, nan = out["workload"], float("nan")
    lines = [f"# Serving benchmark ({out['date']}, {out['machine']}, load avg {out['load_avg_start']} → "
             f"{out['load_avg_end']})", "",
             f"Command: `{out['command']}` ({out['wall_s']} s). Model: {out['model']}; {out['slots']} slots, buckets "
             f"{out['buckets']}, KV {out['max_cache_len']} positions. Decode step "
             f"{out['profile']['decode_s'] * 1e3:.1f} ms; measured capacity (fcfs on a backlog) "
             f"{out['capacity_req_s']} req/s (the profile's bound: "
             f"{out['profile_bound_req_s']}); rates = {out['fractions']} x capacity; MLFQ levels "
             f"{out['mlfq_levels']}.", "",
             f"Workload: prompts {wl['prompt_tokens']} tokens; outputs 90 % {wl['short_output']}, 10 % "
             f"{wl['long_output']} tokens; Poisson arrivals; up to {wl['measured_per_run']} "
             f"measured requests per run ({wl['measured_per_run_at_high_load']} at rates >= "
             f"{HIGH_LOAD} x capacity) after {wl['warmup_excluded']} warm-up ones; the same seeded trace "
             f"for every scheduler at a rate. Goodput SLO: TTFT ≤ "
             f"{SLO_TTFT_S} s and TPOT ≤ {SLO_TPOT_S * 1e3:.0f} ms. Times in seconds.", ""]
    for mode in ("inprocess", "http"):
        if not out["results"][mode]:
            continue
        lines += [f"## {mode}", "", "| scheduler | rate | req/s | tok/s | goodput | TTFT mean / p50 / p99 | "
                  "TPOT mean / p50 / p99 | E2E mean / p50 / p99 | E2E short / long | preempt |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for s, pts in out["results"][mode].items():
            for p in pts:
                def three(k):
                    return " / ".join(f"{p.get(f'{k}_{q}_s', float('nan')):.3f}" for q in ("mean", "median", "p99"))
                lines.append(f"| {s} | {p['rate']} | {p['throughput_req_s']} | {p['throughput_tok_s']} | "
                             f"{p['goodput_req_s']} | {three('ttft')} | {three('tpot')} | {three('e2e')} | "
                             f"{p.get('e2e_mean_short_s', nan):.3f} / {p.get('e2e_mean_long_s', nan):.3f}"
                             f" | {p.get('preemptions', '-')} |")
        lines.append("")
    lines += verdict(out) + ["## Targets (raw)", "", "```json", json.dumps(out["targets"], indent=1), "```", "", NOTES]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def plot(out: dict[str, Any], path: str) -> None:
    """Left: mean JCT vs rate per scheduler. Right: mean JCT of the short and of the long jobs (mlfq, gittins, fcfs)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.4))
    colors = {"mlfq": "C0", "fcfs": "C1", "static": "C2", "mlfq4": "C3", "gittins": "C4"}
    for s, pts in out["results"]["inprocess"].items():
        label = f"{s} (earlier defaults: 4 levels, 16 host KV slots)" if s == "mlfq4" else s
        rates = [p["rate"] for p in pts]
        ls = "--" if s in REFERENCE_ONLY_AT_HIGH_LOAD else "-"
        ax.plot(rates, [p["e2e_mean_s"] for p in pts], marker="o", label=label, ls=ls, color=colors.get(s))
        if s in ("mlfq", "gittins", "fcfs"):
            bx.plot(rates, [p.get("e2e_mean_short_s") for p in pts], marker="o", color=colors[s], label=f"{s} short")
            bx.plot(rates, [p.get("e2e_mean_long_s") for p in pts], marker="s", ls=":", color=colors[s],
                    label=f"{s} long")
    for a, title in ((ax, f"Mean JCT, heavy-tailed mix ({out['slots']} slots)"),
                     (bx, "Mean JCT of short (8-16 tok) and long (128-256 tok) jobs")):
        a.set_yscale("log")
        a.set_xlabel("request rate (req/s, Poisson)")
        a.set_ylabel("mean JCT (s, log)")
        a.set_title(title, fontsize=10)
        a.axvline(out["capacity_req_s"], color="gray", ls=":", lw=1, label="measured capacity")
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------------------ simulated

# `--mode sim`: the engine's iteration loop replayed on a virtual clock with the real scheduler classes, each
# iteration costing its profiled time (these constants: a typical start-up profile on the 2-core machine). No JAX,
# deterministic: policy comparisons free of the shared machine's noise (then confirm them in-process).
SIM_PROFILE = {"decode_s": 0.010, "prefill_s": {32: 0.007, 64: 0.010}, "move_s": 0.00075}


def simulate(variant: str, items: list[Item], warmup: int, prof: dict[str, Any] = SIM_PROFILE) -> dict[str, Any]:
    from fastserve.serve.scheduler import levels_covering, make_scheduler
    cfg = serve_config(variant)
    q0 = cfg.mlfq_base_quantum_s or prof["decode_s"]
    longest = prof["prefill_s"][BUCKETS[-1]] + min(cfg.max_new_tokens_limit, MAX_LEN) * prof["decode_s"]
    sched = make_scheduler(cfg.scheduler, levels=cfg.mlfq_levels or levels_covering(q0, longest),
                           base_quantum_s=q0, starvation_s=cfg.starvation_s,
                           starvation_quanta=cfg.starvation_quanta, batch_timeout_s=cfg.batch_timeout_s)

    class Job:
        def __init__(self, it: Item):
            self.arrival, self.out, self.done, self.first, self.finish = it.t, it.out, 0, None, None
            self.prefill_time = prof["prefill_s"][next(b for b in BUCKETS if b >= len(it.prompt))]
            self.started = False

    jobs = [Job(it) for it in items]
    resident: set = set()
    now, i, last, counts = 0.0, 0, [], dict(preemptions=0, restores=0)
    while i < len(jobs) or len(sched):
        while i < len(jobs) and jobs[i].arrival <= now:
            sched.add(jobs[i], jobs[i].arrival)
            i += 1
        sel = list(sched.select(now, SLOTS))[:SLOTS]
        counts["preemptions"] += sum(1 for j in last if j.finish is None and j not in sel)
        last = sel
        if not sel:
            now = max(now, jobs[i].arrival) if i < len(jobs) else now
            continue
        need = [j for j in sel if j not in resident]
        spare = SLOTS - len(resident)
        if len(need) > spare:                                   # evict paused jobs, lowest priority first
            paused = sorted((j for j in resident if j not in sel), key=sched.priority, reverse=True)
            for v in paused[:len(need) - spare]:
                resident.discard(v)
                now += prof["move_s"]
        cost, t = {}, now
        for j in need:
            resident.add(j)
            if j.started:
                counts["restores"] += 1
                t += prof["move_s"]
                cost[j] = prof["move_s"]
            else:
                j.started = True
                t += j.prefill_time
                cost[j] = j.prefill_time
                j.done, j.first = 1, t
        dec = [j for j in sel if j not in cost or cost[j] == prof["move_s"]]
        dec = [j for j in dec if j.done < j.out]
        if dec:
            t += prof["decode_s"]
            for j in dec:
                j.done += 1
                cost[j] = cost.get(j, 0.0) + prof["decode_s"]
        for j in sel:
            if j.done >= j.out:
                j.finish = t
                sched.remove(j)
                resident.discard(j)
            else:
                sched.on_iteration(j, cost.get(j, 0.0))
        now = t
    m = jobs[warmup:]
    recs = [{"ttft": j.first - j.arrival, "tpot": None, "e2e": j.finish - j.arrival, "tokens": j.out} for j in m]
    out = summarize(recs, max(j.finish for j in m) - min(j.arrival for j in m))
    t_full = max(j.first for j in jobs)          # as measure_capacity: completions while the backlog lasts
    out.update(counts, promotions=getattr(sched, "promotions", None),
               capacity_req_s=sum(j.finish <= t_full for j in jobs) / max(t_full, 1e-9))
    return out


def simulate_sweep(schedulers: list[str], fractions: list[float], n: int, seeds: int) -> dict[str, Any]:
    """Mean JCT (all / short / long) per scheduler and fraction of the simulated fcfs capacity, averaged over seeds."""
    backlog = workload(150, 1e9, 999)
    for it in backlog:
        it.t = 0.0
    capacity = simulate("fcfs", backlog, 0)["capacity_req_s"]
    table: dict[str, Any] = {"capacity_req_s": round(capacity, 2)}
    for f in fractions:
        for s in schedulers:
            runs = [simulate(s, workload(n + n // 10, f * capacity, seed), n // 10) for seed in range(seeds)]
            table[f"{s} @ {f}"] = {k: round(float(np.mean([r[k] for r in runs])), 3) for k in
                                   ("e2e_mean_s", "e2e_mean_short_s", "e2e_mean_long_s", "e2e_p99_s",
                                    "throughput_req_s", "preemptions", "restores")}
            if runs[0]["promotions"] is not None:
                table[f"{s} @ {f}"]["promotions"] = float(np.mean([r["promotions"] for r in runs]))
            print(f"sim {s:30s} {f:5.2f}: {json.dumps(table[f'{s} @ {f}'])}", file=sys.stderr, flush=True)
    return table


def render(json_path: str) -> None:
    """Re-renders the markdown and the plot from a recorded JSON (no measuring)."""
    with open(json_path) as f:
        out = json.load(f)
    base = os.path.splitext(json_path)[0]
    write_markdown(out, base + ".md")
    plot(out, base + ".png")


if __name__ == "__main__":
    sys.exit(main())

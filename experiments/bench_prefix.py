"""Prefix-caching benchmark: a chat workload where every request starts with the same 300-token system prompt,
served with serve.prefix_cache off and on in one run, interleaved (issue 16's goal: TTFT p50 >= 3x lower and
requests/s at the p99 SLO >= 1.5x higher with the cache); and a second part, chunked prefill: running streams'
time per output token when 10 % of requests carry 2,000-token prompts, whole prompts per iteration vs
serve.prefill_chunk (issue 16's goal: p99 TPOT <= 2x its median).

    python experiments/bench_prefix.py           # ~4 min on 2 cores (241 s at 88d84de); writes results/bench_prefix.{json,md}
    python experiments/bench_prefix.py --quick   # ~3 min: fewer rates and requests; writes nothing
    python experiments/bench_prefix.py --part chunk   # only the chunked-prefill part; writes nothing
    python experiments/bench_prefix.py --part prefix --prefill-chunk 32   # the prefix arms with chunked prefill

The model has the quickstart's shape (configs/quickstart.yaml: d_model 256, 4 layers, 8/4 heads, vocab 4000) with
random weights (as experiments/bench_serving.py), max_seq_len 448; stop ids are empty, so every request generates
exactly its max_tokens. Engine: 8 slots, fcfs (so that only the prefill differs between the arms), buckets
32..384 (a whole prompt fits one bucket prefill when the cache is off), prefix blocks of 16 tokens, the default
store budget. Workload (seeded): a fixed 300-token system prompt, then a distinct user turn of 8-48 random tokens;
outputs 16-64 tokens (uniform); Poisson arrivals. Both arms see the same trace at a rate; the arms' order alternates
from rate to rate; the first 10 % of each run's requests are warm-up and excluded (the cached arm's store carries
over between runs, as a server's would).

Figures: TTFT / TPOT / E2E percentiles and throughput per rate and arm; the capacity of each arm (throughput on a
backlog of the same mix, every slot busy); requests/s at the p99 SLO = the highest swept rate whose p99 TTFT <= 1 s
(an engine that cannot keep up queues, and its TTFT grows past any bound); the ratios on / off.

Chunked-prefill part: the same model at max_seq_len 2112, buckets 32..256, fcfs; 10 % of requests carry a
2,000-token prompt (8 bucket-sized pieces when whole), the rest 8-48 tokens, outputs 16-64, Poisson arrivals at half
the profile's bound; the same trace through serve.prefill_chunk 0 (the whole prompt in the iteration it is admitted)
and 4, 8 or 32 (that many prompt tokens per iteration while streams decode, as extra columns of their decode step:
fastserve/serve/active_rows.py). Figures: per-request TPOT (the mean
gap between a stream's tokens) p99 / median, the same over every gap between two tokens of any stream, the longest
gap, and the long prompts' TTFT. The last line printed is one JSON object.
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
from serving_workload import Item, quickstart_model, replay, summarize_requests

HERE = os.path.dirname(os.path.abspath(__file__))
SLOTS, BUCKETS, MAX_LEN, BLOCK = 8, [32, 64, 128, 256, 384], 448, 16
SYSTEM, USER, OUTPUT = 300, (8, 48), (16, 64)
SLO_P99_TTFT_S = 1.0
RUN_S = 5.0             # seconds of arrivals per run at least (full mode)
LONG_PROMPT, LONG_SHARE, LONG_BUCKETS, LOAD = 2000, 0.1, [32, 64, 128, 256], 0.5
ARMS = [("whole", 0), ("chunk4", 4), ("chunk8", 8), ("chunk32", 32)]     # (arm, serve.prefill_chunk)




def chat_workload(n: int, rate: float, seed: int) -> list[Item]:
    """The shared system prompt (the same for every seed), a distinct user turn, Poisson arrivals at `rate`."""
    system = np.random.default_rng(12345).integers(4, 4000, SYSTEM).tolist()
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, n)
    times = np.cumsum(gaps) - gaps[0]
    return [Item(float(t), system + rng.integers(4, 4000, int(rng.integers(USER[0], USER[1] + 1))).tolist(),
                 int(rng.integers(OUTPUT[0], OUTPUT[1] + 1))) for t in times]


def run(engine, items: list[Item], warmup: int, outputs: list | None = None) -> dict[str, Any]:
    """Replays `items` on the engine (serving_workload.replay); vLLM's summary of the measured.
    `outputs`: every request's greedy tokens are appended to it."""
    before = engine.prefix.stats() if engine.prefix is not None else None
    reqs, _ = replay(engine, items, warmup)
    if outputs is not None:
        outputs.extend(r.output for r in reqs)
    out = summarize_requests(reqs[warmup:])
    if before is not None:
        after = engine.prefix.stats()
        hit, queried = (after[k] - before[k] for k in ("hit_tokens", "queried_tokens"))
        out["prefix_hit_rate"] = round(hit / max(queried, 1), 4)
    return out


def capacity(engine, n: int, seed: int) -> float:
    """Requests/s completed while a backlog of n requests keeps every slot busy (up to the last first token)."""
    from fastserve.serve.engine import Request
    reqs = [Request(it.prompt, max_new_tokens=it.out, temperature=0.0, stop_ids=[])
            for it in chat_workload(n, 1e9, seed)]
    engine.generate(reqs)
    t0, t_full = min(r.arrival for r in reqs), max(r.first_token_time for r in reqs)
    return sum(r.finish_time <= t_full for r in reqs) / (t_full - t0)


def sustainable(points: list[dict[str, Any]]) -> float:
    """The highest swept rate meeting the p99 TTFT SLO (0: none)."""
    ok = [p["rate"] for p in points if p["ttft_p99_s"] <= SLO_P99_TTFT_S]
    return max(ok, default=0.0)


def prefix_part(quick: bool, seed: int, chunk: int = 0) -> dict[str, Any]:
    from fastserve.config import ServeConfig
    from fastserve.serve.engine import Engine
    graphdef, params, model_cfg, mesh = quickstart_model(MAX_LEN)
    engines = {}
    for arm, on in (("off", False), ("on", True)):
        cfg = ServeConfig(slots=SLOTS, buckets=BUCKETS, max_cache_len=MAX_LEN, scheduler="fcfs", max_queue=100_000,
                          max_new_tokens_limit=OUTPUT[1], prefix_cache=on, prefix_cache_block=BLOCK, port=0,
                          prefill_chunk=chunk)
        t0 = time.perf_counter()
        engines[arm] = Engine(graphdef, params, model_cfg, cfg, mesh=mesh, stop_ids=[])
        print(f"engine {arm}: started in {time.perf_counter() - t0:.1f} s; profile {engines[arm].profile}",
              file=sys.stderr, flush=True)
    caps = {arm: capacity(engines[arm], 40 if quick else 80, seed + 999) for arm in ("off", "on")}
    # swept until both arms miss the SLO (an arm past it is not run again): the cached arm must be able to fail too,
    # or its rate at the SLO is only the sweep's end
    fractions = [0.5, 1.2] if quick else [0.5, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0]
    rates = [round(f * caps["off"], 2) for f in fractions]
    print(f"capacity (backlog) req/s: {caps}; rates {rates}", file=sys.stderr, flush=True)
    n = 40 if quick else 50
    # full mode: at least RUN_S seconds of arrivals per run, so that an overloaded arm's queue (and TTFT) has time to
    # grow past the SLO (50 requests at twice an arm's capacity arrive in under 2 s)
    per_rate = {rate: n if quick else max(n, round(rate * RUN_S)) for rate in rates}
    results: dict[str, list] = {"off": [], "on": []}
    failed: set[str] = set()        # an arm past the SLO at a rate is not run at higher ones (it only queues more)
    same = compared = 0             # requests whose greedy tokens both arms produced, and how many were equal
    for k, rate in enumerate(rates):
        warmup = max(4, per_rate[rate] // 10)
        items = chat_workload(per_rate[rate] + warmup, rate, seed + k)
        tokens: dict[str, list] = {}
        for arm in (("off", "on") if k % 2 == 0 else ("on", "off")):
            if arm in failed:
                continue
            tokens[arm] = []
            res = {"rate": rate, **run(engines[arm], items, warmup, tokens[arm])}
            results[arm].append(res)
            print(f"{arm:3s} rate {rate:6.2f}: {json.dumps(res)}", file=sys.stderr, flush=True)
            if res["ttft_p99_s"] > SLO_P99_TTFT_S:
                failed.add(arm)
        if len(tokens) == 2:
            compared += len(items)
            same += sum(a == b for a, b in zip(tokens["off"], tokens["on"]))
        if len(failed) == 2:
            break
    ttft_ratio = [round(a["ttft_median_s"] / b["ttft_median_s"], 2) for a, b in zip(results["off"], results["on"])]
    slo = {arm: sustainable(results[arm]) for arm in results}
    return {"capacity_req_s": {k: round(v, 2) for k, v in caps.items()},
            "capacity_ratio_on_over_off": round(caps["on"] / caps["off"], 2), "fractions_of_off_capacity": fractions,
            "rates": rates, "results": results, "ttft_p50_off_over_on_by_rate": ttft_ratio,
            "req_s_at_p99_slo": slo, "greedy_outputs_equal_on_off": f"{same} of {compared} requests",
            "req_s_at_p99_slo_ratio": round(slo["on"] / slo["off"], 2) if slo["off"] else None,
            "profile_off": engines["off"].profile, "profile_on": engines["on"].profile,
            "prefix_cache": engines["on"].stats()["prefix_cache"], "measured_per_run": per_rate,
            "warmup_excluded": "a tenth of each run (at least 4)"}


def long_workload(n: int, rate: float, seed: int) -> list[Item]:
    """10 % of requests carry a LONG_PROMPT-token prompt, the rest 8-48 tokens; outputs 16-64; Poisson arrivals."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, n)
    times = np.cumsum(gaps) - gaps[0]
    long = set(rng.choice(n, max(1, round(LONG_SHARE * n)), replace=False).tolist())
    return [Item(float(t), rng.integers(4, 4000, LONG_PROMPT if i in long else
                                        int(rng.integers(USER[0], USER[1] + 1))).tolist(),
                 int(rng.integers(OUTPUT[0], OUTPUT[1] + 1))) for i, t in enumerate(times)]


def stalls(engine, items: list[Item], warmup: int) -> dict[str, Any]:
    """`run`'s summary plus the streams' token gaps: per-request TPOT (the mean gap) p99 / median, and over every
    gap between two output tokens of any stream."""
    from fastserve.serve.engine import Request
    reqs = [Request(it.prompt, max_new_tokens=it.out, temperature=0.0, stop_ids=[]) for it in items]
    clock, t0, i = engine.clock, engine.clock(), 0
    while i < len(items) or engine.pending:
        while i < len(items) and items[i].t <= clock() - t0:
            engine.submit(reqs[i])
            reqs[i].arrival = t0 + items[i].t
            i += 1
        if not engine.step():
            time.sleep(min(max((items[i].t - (clock() - t0)) if i < len(items) else 0.0, 0.0), 0.002))
    measured = reqs[warmup:]
    tpot = np.array([r.tpot for r in measured if r.tpot is not None])
    gaps = np.concatenate([np.diff(r.token_times) for r in measured])
    ttft_long = [r.ttft for r in measured if len(r.tokens) == LONG_PROMPT]
    ttft_short = [r.ttft for r in measured if len(r.tokens) != LONG_PROMPT]   # behind long prompts' pieces too
    # the short-prompt streams alone, and the long ones' (each of their steps reads 2,000 cached positions a layer);
    # the goal's ratio is over all streams
    short = np.array([r.tpot for r in measured if r.tpot is not None and len(r.tokens) != LONG_PROMPT])
    long_tpot = [r.tpot for r in measured if r.tpot is not None and len(r.tokens) == LONG_PROMPT]
    return {"requests": len(measured), "long_prompts": len(ttft_long),
            "tpot_median_s": round(float(np.median(tpot)), 5), "tpot_p99_s": round(float(np.percentile(tpot, 99)), 5),
            "tpot_p99_over_median": round(float(np.percentile(tpot, 99) / np.median(tpot)), 2),
            "gap_median_s": round(float(np.median(gaps)), 5), "gap_p99_s": round(float(np.percentile(gaps, 99)), 5),
            "gap_max_s": round(float(gaps.max()), 4),
            "gap_p99_over_median": round(float(np.percentile(gaps, 99) / np.median(gaps)), 2),
            "ttft_long_median_s": round(float(np.median(ttft_long)), 4) if ttft_long else None,
            "ttft_short_median_s": round(float(np.median(ttft_short)), 4),
            "ttft_short_p99_s": round(float(np.percentile(ttft_short, 99)), 4),
            "short_tpot_median_s": round(float(np.median(short)), 5),
            "short_tpot_p99_over_median": round(float(np.percentile(short, 99) / np.median(short)), 2),
            "long_tpot_median_s": round(float(np.median(long_tpot)), 5) if long_tpot else None,
            "e2e_mean_s": round(float(np.mean([r.jct for r in measured])), 4)}


def chunk_part(quick: bool, seed: int) -> dict[str, Any]:
    """Running streams' TPOT with 10 % of requests carrying 2,000-token prompts: whole prompts in one iteration
    (serve.prefill_chunk 0, as before) vs chunked prefill (each chunk size), one after another on one trace."""
    from fastserve.config import ServeConfig
    from fastserve.serve.engine import Engine
    max_len = LONG_PROMPT + OUTPUT[1] + 48
    graphdef, params, model_cfg, mesh = quickstart_model(max_len)
    engines = {}
    for arm, chunk in ARMS:
        cfg = ServeConfig(slots=SLOTS, buckets=LONG_BUCKETS, max_cache_len=max_len, scheduler="fcfs",
                          max_queue=100_000, max_new_tokens_limit=OUTPUT[1], prefill_chunk=chunk, port=0)
        engines[arm] = Engine(graphdef, params, model_cfg, cfg, mesh=mesh, stop_ids=[])
    prof = engines["whole"].profile
    # the rate: a fraction of the profile's bound (slots always full): mean work per request = its share of long
    # prefills + its decode steps shared by the slots
    long_s = prof["prefill_s"][LONG_BUCKETS[-1]] + (LONG_PROMPT // LONG_BUCKETS[-1] - 1) * prof["extend_s"]
    per_request = LONG_SHARE * long_s + (1 - LONG_SHARE) * prof["prefill_s"][LONG_BUCKETS[0]] + \
        np.mean(OUTPUT) * prof["decode_s"] / SLOTS
    rate = round(LOAD / per_request, 2)
    n = 30 if quick else 200     # 20 long prompts: a p99 over 80 requests was their slowest one or two
    warmup = max(3, n // 10)
    items = long_workload(n + warmup, rate, seed + 77)
    out: dict[str, Any] = {"rate": rate, "load_of_profile_bound": LOAD, "max_cache_len": max_len,
                           "buckets": LONG_BUCKETS, "profile_decode_s": prof["decode_s"], "long_prefill_s": long_s}
    for arm in (list(engines) if seed % 2 == 0 else list(reversed(engines))):
        out[arm] = stalls(engines[arm], items, warmup)
        print(f"{arm}: {json.dumps(out[arm])}", file=sys.stderr, flush=True)
    return out


def write_markdown(out: dict[str, Any], path: str) -> None:
    p = out["prefix"]
    g = out["headline"]
    lines = [f"# bench_prefix: prefix caching on a shared 300-token system prompt ({out['date']}, commit "
             f"`{out['commit'][:7]}`{' dirty' if out['dirty'] else ''})", "",
             f"Command: `{out['command']}`; {out['machine']}; load average {out['load_avg_start']} at the start, "
             f"{out['load_avg_end']} at the end; wall {out['wall_s']} s.", "",
             f"Workload: {out['workload']}.", "",
             "| figure | value | goal |", "|---|---|---|",
             f"| TTFT p50 off / on (lowest rate) | {g['TTFT p50 off / on (lowest rate)']} | ≥ 3 |",
             f"| req/s at the p99 SLO (TTFT ≤ {SLO_P99_TTFT_S} s) on / off | {g['req/s at p99 SLO on / off']} "
             "| ≥ 1.5 |",
             f"| capacity (backlog) on / off | {p['capacity_ratio_on_over_off']} | |", "",
             f"Capacity (backlog, req/s): {p['capacity_req_s']}; req/s at the p99 SLO: {p['req_s_at_p99_slo']}; "
             f"greedy tokens equal with the cache on and off: {p.get('greedy_outputs_equal_on_off', 'not checked')}. "
             f"Prefix store: {p['prefix_cache']}.", "",
             "| rate | arm | TTFT p50 | TTFT p99 | TPOT p50 | E2E p99 | req/s | hit rate |",
             "|---|---|---|---|---|---|---|---|"]
    for k in range(max(len(v) for v in p["results"].values())):
        for arm in ("off", "on"):
            if k >= len(p["results"][arm]):
                continue
            r = p["results"][arm][k]
            lines.append(f"| {r['rate']} | {arm} | {r['ttft_median_s']:.4f} | {r['ttft_p99_s']:.4f} | "
                         f"{r.get('tpot_median_s', 0):.4f} | {r['e2e_p99_s']:.3f} | {r['throughput_req_s']} | "
                         f"{r.get('prefix_hit_rate', '')} |")
    c = out.get("chunked_prefill")
    if c:
        lines += ["", f"## Chunked prefill: 10 % of requests with {LONG_PROMPT}-token prompts", "",
                  f"Rate {c['rate']} req/s ({c['load_of_profile_bound']} of the profile's bound), max_cache_len "
                  f"{c['max_cache_len']}, buckets {c['buckets']}, fcfs; decode step {c['profile_decode_s']:.4f} s, "
                  f"a whole long prefill {c['long_prefill_s']:.3f} s (profile).", "",
                  "| prefill | TPOT p50 | TPOT p99 | p99 / p50 (goal ≤ 2) | gap p50 | gap p99 | gap p99 / p50 | "
                  "longest gap | long-prompt TTFT p50 | mean E2E | short streams: TPOT p99 / p50 | long streams: "
                  "TPOT p50 | short prompts: TTFT p50 / p99 |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for arm, *_ in ARMS:
            r = c[arm]
            lines.append(f"| {arm} | {r['tpot_median_s']:.4f} | {r['tpot_p99_s']:.4f} | {r['tpot_p99_over_median']} | "
                         f"{r['gap_median_s']:.4f} | {r['gap_p99_s']:.4f} | {r['gap_p99_over_median']} | "
                         f"{r['gap_max_s']} | {r['ttft_long_median_s']} | {r['e2e_mean_s']} | "
                         f"{r.get('short_tpot_p99_over_median', '')} | {r.get('long_tpot_median_s', '')} | "
                         f"{r.get('ttft_short_median_s', '')} / {r.get('ttft_short_p99_s', '')} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--part", choices=["both", "prefix", "chunk"], default="both",
                    help="prefix: the prefix cache only; chunk: the chunked-prefill measurement only (writes nothing)")
    ap.add_argument("--prefill-chunk", type=int, default=0,
                    help="serve.prefill_chunk of both prefix-cache arms (default 0: whole prefills, as recorded)")
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    t_start, load_start, prov = time.time(), os.getloadavg()[0], provenance()   # the code measured: at the start
    prefix = prefix_part(args.quick, args.seed, args.prefill_chunk) if args.part in ("both", "prefix") else None
    chunk = chunk_part(args.quick, args.seed) if args.part in ("both", "chunk") else None
    if prefix is None:
        print(json.dumps({"bench": "prefix", "quick": args.quick, "chunk": chunk}))
        return 0
    lowest = prefix["ttft_p50_off_over_on_by_rate"][0]
    out = {"bench": "prefix", "quick": args.quick, "seed": args.seed,
           "model": "quickstart shape, random weights, vocab 4000, stop ids empty",
           "engine": {"slots": SLOTS, "buckets": BUCKETS, "max_cache_len": MAX_LEN, "scheduler": "fcfs",
                      "prefix_cache_block": BLOCK},
           "workload": f"{SYSTEM}-token shared system prompt + {USER[0]}-{USER[1]} distinct tokens, outputs "
                       f"{OUTPUT[0]}-{OUTPUT[1]} tokens, Poisson arrivals",
           "slo": {"p99_ttft_s": SLO_P99_TTFT_S},
           "prefix": prefix, "chunked_prefill": chunk,
           "headline": {"TTFT p50 off / on (lowest rate)": lowest,
                        "req/s at p99 SLO on / off": prefix["req_s_at_p99_slo_ratio"],
                        "goals met (3x, 1.5x)": bool(lowest >= 3 and (prefix["req_s_at_p99_slo_ratio"] or 0) >= 1.5),
                        **({f"TPOT p99 / p50, {arm} prefill": chunk[arm]["tpot_p99_over_median"]
                            for arm, *_ in ARMS} if chunk else {})},
           "command": "python experiments/bench_prefix.py" + (" --quick" if args.quick else ""),
           "wall_s": round(time.time() - t_start, 1), "load_avg_start": round(load_start, 2),
           "load_avg_end": round(os.getloadavg()[0], 2), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "date": time.strftime("%Y-%m-%d"), **prov}
    if not args.quick and args.part == "both":
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        with open(os.path.join(HERE, "results", "bench_prefix.json"), "w") as f:
            json.dump(out, f, indent=1)
        write_markdown(out, os.path.join(HERE, "results", "bench_prefix.md"))
    print(json.dumps({"bench": "prefix", "quick": args.quick, "headline": out["headline"],
                      "capacity_req_s": prefix["capacity_req_s"], "req_s_at_p99_slo": prefix["req_s_at_p99_slo"],
                      "ttft_p50_off_over_on_by_rate": prefix["ttft_p50_off_over_on_by_rate"],
                      "greedy_outputs_equal_on_off": prefix["greedy_outputs_equal_on_off"], "wall_s": out["wall_s"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

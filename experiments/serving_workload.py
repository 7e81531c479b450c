"""The serving benchmark's workload (experiments/bench_serving.py): engine shape, scheduler variants, the seeded
heavy-tailed trace, and vLLM's summary of per-request timings (TTFT / TPOT / E2E, throughput, goodput)."""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

SLOTS = 8
BUCKETS = [32, 64]
MAX_LEN = 320
PROMPT_RANGE = (8, 48)
SHORT, LONG, LONG_FRACTION = (8, 16), (128, 256), 0.1
SLO_TTFT_S, SLO_TPOT_S = 1.0, 0.1           # goodput: requests meeting both
P99_SLO_S = 5.0                             # the p99 E2E latency at which schedulers' sustainable rates are compared

# Scheduler variants: a name, optionally `name:key=value;key=value` with ServeConfig fields (e.g. mlfq_levels).
# mlfq4 is the configuration that lost to fcfs (4 levels: short jobs sank to the last level with the long ones;
# 16 host KV slots: most evictions dropped the KV and recomputed it); run at high load only, for the record.
VARIANTS = {"mlfq4": "mlfq:mlfq_levels=4;host_kv_slots=16"}
REFERENCE_ONLY_AT_HIGH_LOAD = {"mlfq4"}
HIGH_LOAD = 0.85                            # "high load": offered rate >= this fraction of the measured capacity


def quickstart_model(max_len: int = MAX_LEN):
    """The serving benchmarks' model: configs/quickstart.yaml's shape (vocab 4000) with random weights and room for
    max_len positions, on one device → (graphdef, params, model_cfg, mesh)."""
    import os

    import jax

    from fastserve import parallel
    from fastserve.config import load_config
    from fastserve.core.state import init_params
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", "quickstart.yaml"),
                      ["model.vocab_size=4000", f"model.max_seq_len={max_len}", "mesh.data=1"])
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
    graphdef, params, _ = init_params(cfg.model, mesh, seed=0)
    return graphdef, params, cfg.model, mesh


def slot_layout_bytes(model_cfg: Any, slots: int, max_len: int) -> int:
    """Bytes of the slot layout's KV cache for a decoder: slots × max_len positions of float32 k and v, every
    layer (what a paged pool of the same bytes is given, to compare the two layouts on one budget)."""
    kv_heads = model_cfg.n_kv_heads or model_cfg.n_heads
    head_dim = getattr(model_cfg, "head_dim", 0) or model_cfg.d_model // model_cfg.n_heads
    return slots * max_len * model_cfg.n_layers * 2 * kv_heads * head_dim * 4


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


def replay(engine, items: list[Item], warmup: int) -> tuple[list[Any], float]:
    """Submits each item to `engine` at its arrival time and steps the engine synchronously until every request
    has finished: (the requests, the run's wall seconds). A request's arrival is its scheduled time (it is admitted
    at the next step: the scheduler sees the true arrival). Every measured request (after `warmup`) must have run
    to its max_tokens: stop ids are empty, so each generates exactly its output length."""
    from fastserve.serve.engine import Request
    reqs = [Request(it.prompt, max_new_tokens=it.out, temperature=0.0, stop_ids=[]) for it in items]
    clock = engine.clock
    t0 = clock()
    i = 0
    while i < len(items) or engine.pending:
        now = clock() - t0
        while i < len(items) and items[i].t <= now:
            engine.submit(reqs[i])
            reqs[i].arrival = t0 + items[i].t
            i += 1
        if not engine.step():
            wait = (items[i].t - (clock() - t0)) if i < len(items) else 0.0
            time.sleep(min(max(wait, 0.0), 0.002))
    assert all(r.finish_reason == "length" and len(r.output) == r.max_new_tokens for r in reqs[warmup:])
    return reqs, clock() - t0


def summarize_requests(measured: list[Any]) -> dict[str, Any]:
    """`summarize` of finished engine requests: TTFT / TPOT / E2E from each, over the span they covered."""
    recs = [{"ttft": r.ttft, "tpot": r.tpot, "e2e": r.jct, "tokens": len(r.output)} for r in measured]
    return summarize(recs, max(r.finish_time for r in measured) - min(r.arrival for r in measured))

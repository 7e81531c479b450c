"""Where a serving decode step's time goes: SmolLM2-135M int8 (W8A8 by default) in the engine as bench_serving_real
builds it (8 slots of 320 positions, buckets 32 / 64), decoding `--rows` requests steadily, traced by `jax.profiler`.

    flock /tmp/bench.lock .venv/bin/python experiments/profile_decode.py [--rows 1,4,8] [--activations int8|float32]
                                                                        [--attention auto|xla]   # ~1.5 min per width

Per width: the median wall time of an engine step (Python scheduling, dispatch, the compiled step, the token
transfer) over a few seconds of steady decoding, then a traced stretch of steps whose XLA CPU runtime events are
summed per kind (a thunk's name without its numeric suffix: `ffi_call` = fastserve's custom calls — the int8
products and the decode-attention kernel —, `transpose_copy_fusion`, `ynn_fusion` = XLA's small dots, ...) and
per step. Also prints the engine's start-up profile (prefill seconds per bucket, decode seconds per width).
`--attention xla` runs the decoder's cached attention on XLA's gather-and-attend path (what every decode step did
before the decode-attention kernel). The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from provenance import provenance  # noqa: E402

SMOLLM = os.path.join(os.path.dirname(HERE), "configs", "smollm2_135m.yaml")


def engine_for(activations: str, attention: str):
    from fastserve.config import load_config
    from fastserve.serve.engine import Engine
    from fastserve.transforms.report import transform_loaded
    from fastserve.workdir import load_model
    cfg = load_config(SMOLLM, ["mesh.data=1", f"model.attention={attention}"])
    loaded = load_model(cfg)
    serve = dataclasses.replace(cfg.serve, slots=8, buckets=[32, 64], max_cache_len=320, max_queue=1000,
                                max_new_tokens_limit=280, port=0)
    model_cfg, graphdef, params, _ = transform_loaded(
        loaded, [{"quantize": {"include": ["layers.*"], "activations": activations}}], cfg)
    return Engine.from_loaded(dataclasses.replace(loaded, model_cfg=model_cfg, graphdef=graphdef, params=params), serve)


def thunk_ms_per_step(trace_dir: str, steps: int, top: int) -> dict[str, float]:
    """XLA CPU runtime events of the trace, summed per name without its numeric suffix, in ms per step."""
    path = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
    totals: collections.Counter = collections.Counter()
    for event in json.load(gzip.open(path))["traceEvents"]:
        if event.get("ph") == "X" and not event["name"].startswith("$"):   # "$file:line": Python frames
            totals[re.sub(r"\.\d+$", "", event["name"])] += event.get("dur", 0)
    return {name: round(us / steps / 1e3, 2) for name, us in totals.most_common(top)}


def profile_width(engine, rows: int, seconds: float, traced: int, top: int) -> dict:
    import jax

    from fastserve.serve.engine import Request
    # 30-token prompts generating up to 280 tokens (the cache's 320 positions): still running when the trace ends
    reqs = [Request(tokens=list(range(10, 40)), max_new_tokens=280, stop_ids=[]) for _ in range(rows)]
    for r in reqs:
        engine.submit(r)
    for _ in range(5):             # the prefills, and the first steps
        engine.step()
    times, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(traced):
                engine.step()
        thunks = thunk_ms_per_step(trace_dir, traced, top)
    for r in reqs:
        engine.cancel(r)
    engine.run_until_done(30)
    return {"rows": rows, "step_ms_median": round(statistics.median(times) * 1e3, 2), "steps_timed": len(times),
            "traced_ms_per_step": thunks}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,4,8", help="running requests per profile, comma-separated")
    ap.add_argument("--activations", default="int8", choices=["int8", "float32"])
    ap.add_argument("--attention", default="auto", choices=["auto", "xla"])
    ap.add_argument("--seconds", type=float, default=3.0, help="steady decoding timed per width (the requests must "
                    "outlast it and the traced steps: ~15 ms per one-row step)")
    ap.add_argument("--traced", type=int, default=20, help="steps traced per width")
    ap.add_argument("--top", type=int, default=12, help="thunk kinds printed per width")
    args = ap.parse_args()
    engine = engine_for(args.activations, args.attention)
    startup = {"prefill_ms": {b: round(s * 1e3, 1) for b, s in engine.profile["prefill_s"].items()},
               "decode_width_ms": {w: round(s * 1e3, 1) for w, s in engine.profile["decode_width_s"].items()}}
    print("start-up profile", startup, flush=True)
    widths = []
    for rows in (int(r) for r in args.rows.split(",")):
        widths.append(profile_width(engine, rows, args.seconds, args.traced, args.top))
        print(json.dumps(widths[-1]), flush=True)
    out = {"bench": "profile_decode", "command": "python experiments/profile_decode.py " + " ".join(sys.argv[1:]),
           "activations": args.activations, "attention": args.attention, **provenance(), "startup": startup,
           "widths": widths}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Page faults and kernel time of one CPU training step, with and without fastserve's host allocator settings
(fastserve/host_memory.py). Run it twice and compare; each run is its own process, as the settings must be:

    .venv/bin/python experiments/step_faults.py [--model decoder|minilm] [--steps 8]
    FASTSERVE_MALLOC=system .venv/bin/python experiments/step_faults.py [--model decoder|minilm]

decoder: bench_train's 23M decoder on its fixed batch (seq 256 × batch 8); minilm: bench_finetune's MiniLM
sentiment step (configs/sentiment_minilm.yaml; needs the reviews data), its first 16 batches untimed so that every
padded length is compiled. Prints per step: median wall time, kernel (sys) and user CPU time, minor page faults;
the last line as JSON. Not a recorded result: the two runs' ratio is the figure (docs/running.md quotes it).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from itertools import islice

from provenance import provenance  # experiments/: imports fastserve first, so its allocator settings apply


def decoder_step():
    """bench_train's step, compiled and warmed up; returns a callable running one step."""
    from bench_train import JaxBench

    bench = JaxBench()
    bench.run(2)
    return lambda: bench.run(1)


def minilm_step(steps: int):
    """bench_finetune's MiniLM step after 16 untimed batches (every padded length compiled)."""
    from bench_finetune import MINILM, FastserveClassifier

    from fastserve.config import load_config

    clf = FastserveClassifier(load_config(MINILM))
    batches = list(islice(clf.data.train, 16 + steps))
    for b in batches[:16]:
        clf.step(b)
    rest = iter(batches[16:])
    return lambda: clf.step(next(rest))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("decoder", "minilm"), default="decoder")
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args(argv)
    step = decoder_step() if args.model == "decoder" else minilm_step(args.steps)
    before, times = resource.getrusage(resource.RUSAGE_SELF), []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    after, n = resource.getrusage(resource.RUSAGE_SELF), args.steps
    result = {"bench": "step_faults", "model": args.model, **provenance(), "steps": n,
              "step_s_median": round(statistics.median(times), 4),
              "sys_s_per_step": round((after.ru_stime - before.ru_stime) / n, 4),
              "user_s_per_step": round((after.ru_utime - before.ru_utime) / n, 4),
              "minor_faults_per_step": (after.ru_minflt - before.ru_minflt) // n}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

"""`python experiments/bench_serving.py --mode sim`: the serving engine's iteration loop on a virtual clock."""
from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np

from serving_workload import BUCKETS, MAX_LEN, SLOTS, Item, serve_config, summarize, workload


# `--mode sim`: the engine's iteration loop replayed on a virtual clock with the real scheduler classes, each
# iteration costing its profiled time (these constants: a typical start-up profile on the 2-core machine). No JAX,
# deterministic: policy comparisons free of the shared machine's noise (then confirm them in-process).
SIM_PROFILE = {"decode_s": 0.010, "prefill_s": {32: 0.007, 64: 0.010}, "move_s": 0.00075}


ORACLE = "srpt-oracle"


def oracle_srpt():
    """Shortest remaining output first, preemptive, knowing every job's output length (which no server does): the
    reference any scheduler's mean JCT is held against (SRPT minimizes mean response time on one server; on a batch
    of slots it is a near-bound, not an exact one)."""
    from fastserve.serve.scheduler import Scheduler

    class OracleSRPT(Scheduler):
        name = ORACLE

        def priority(self, job: Any) -> tuple:
            return (job.out - job.done, *self._fcfs_key(job))

        def select(self, now: float, slots: int) -> list[Any]:
            return sorted(self._order, key=self.priority)[:max(slots, 0)]
    return OracleSRPT()


def simulate(variant: str, items: list[Item], warmup: int, prof: dict[str, Any] = SIM_PROFILE) -> dict[str, Any]:
    from fastserve.serve.scheduler import levels_covering, make_scheduler
    if variant == ORACLE:
        sched = oracle_srpt()
    else:
        cfg = serve_config(variant)
        q0 = cfg.mlfq_base_quantum_s or prof["decode_s"]
        longest = prof["prefill_s"][BUCKETS[-1]] + min(cfg.max_new_tokens_limit, MAX_LEN) * prof["decode_s"]
        sched = make_scheduler(cfg.scheduler, levels=cfg.mlfq_levels or levels_covering(q0, longest),
                               base_quantum_s=q0, starvation_s=cfg.starvation_s,
                               starvation_quanta=cfg.starvation_quanta, batch_timeout_s=cfg.batch_timeout_s,
                               size_quantile=cfg.mlfq_size_quantile)

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
    """Mean JCT (all / short / long) per scheduler and fraction of the simulated fcfs capacity, averaged over seeds,
    and per seed (`e2e_mean_by_seed`); with fcfs in the list, each other scheduler's fcfs / it mean-JCT ratio per
    seed (`over_fcfs_by_seed`: the scheduler goal is judged per seed). `srpt-oracle` (knows every output length)
    shows how much any scheduler could gain on the same traces."""
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
            table[f"{s} @ {f}"]["e2e_mean_by_seed"] = [round(r["e2e_mean_s"], 3) for r in runs]
            if runs[0]["promotions"] is not None:
                table[f"{s} @ {f}"]["promotions"] = float(np.mean([r["promotions"] for r in runs]))
            print(f"sim {s:30s} {f:5.2f}: {json.dumps(table[f'{s} @ {f}'])}", file=sys.stderr, flush=True)
        fcfs = table.get(f"fcfs @ {f}")
        for s in schedulers:
            if fcfs and s != "fcfs":
                row = table[f"{s} @ {f}"]
                row["over_fcfs_by_seed"] = [round(a / b, 2) for a, b in zip(fcfs["e2e_mean_by_seed"],
                                                                            row["e2e_mean_by_seed"])]
    return table

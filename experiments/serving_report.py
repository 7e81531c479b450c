"""The serving benchmark's report (experiments/bench_serving.py, and `--render`): the targets computed from the
in-process sweep, the markdown with its verdict and notes, and the matplotlib plot (a benchmark-only import)."""
from __future__ import annotations

import json
import os
from typing import Any

from serving_workload import HIGH_LOAD, P99_SLO_S, REFERENCE_ONLY_AT_HIGH_LOAD, SLO_TPOT_S, SLO_TTFT_S


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
  `--mode sim` (the schedulers on a virtual clock with a fixed profile, 5 seeds per point; run it to check, its
  output is not recorded here) showed the same without the machine's noise.
* **Starvation promotion** (the paper's remedy for the long jobs; exploratory in-process runs, not recorded here)
  did not help mean JCT: the default
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


def render(json_path: str) -> None:
    """Re-renders the markdown and the plot from a recorded JSON (no measuring)."""
    with open(json_path) as f:
        out = json.load(f)
    base = os.path.splitext(json_path)[0]
    write_markdown(out, base + ".md")
    plot(out, base + ".png")

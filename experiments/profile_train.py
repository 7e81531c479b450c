"""Where the time of fastserve's train step goes: a `jax.profiler` trace joined with the optimized HLO.

    flock /tmp/bench.lock .venv/bin/python experiments/profile_train.py [--steps 3] [--top 25] [--json FILE]

Builds the same model and step as experiments/bench_train.py, dumps the optimized HLO of the compiled step
(`--xla_dump_to`, a temporary folder), traces a few steps and reads the per-thunk events of XLA's CPU runtime
(each fusion / dot / copy is one event). Each thunk is labelled from the HLO: its kind (matmul if the fusion holds
a `dot`, with its FLOPs) and the innermost source line of fastserve/optax it came from (the HLO's stack frames),
forward or backward (`transpose(jvp(...))` in the op name). The table sums thunk time per label.

Times are wall time: XLA's CPU runtime may run two independent thunks at once on the 2 cores, so each thunk is
charged its share of the intervals it overlaps (`wall_shares`); what the thunks leave of the step is host overhead
and idle time.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import glob
import json
import os
import re
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

# Source files whose lines name a thunk; the innermost such frame wins (optax internals are grouped by file).
INTERESTING = ("fastserve/models/", "fastserve/tasks/__init__.py", "fastserve/core/steps.py", "optax/")


def parse_hlo(path: str) -> dict[str, dict]:
    """name → {kind, flops, label, bwd} for every instruction of the ENTRY computation of an optimized HLO dump."""
    text = open(path).read()
    lines = text.splitlines()
    files, funcs, locs, frames = {}, {}, {}, {}
    section = None
    for line in lines:
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        if line.startswith(("ENTRY", "%", "HloModule")) or not line.strip():
            section = None if line.startswith(("ENTRY", "%")) else section
            continue
        if section == "FileNames":
            i, name = line.split(" ", 1)
            files[int(i)] = name.strip('"')
        elif section == "FunctionNames":
            i, name = line.split(" ", 1)
            funcs[int(i)] = name.strip('"')
        elif section == "FileLocations":
            m = re.match(r"(\d+) \{file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", line)
            if m:
                locs[int(m[1])] = (files[int(m[2])], funcs[int(m[3])], int(m[4]))
        elif section == "StackFrames":
            m = re.match(r"(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)", line)
            if m:
                frames[int(m[1])] = (int(m[2]), int(m[3]))

    def source(frame_id: int | None) -> str:
        seen = set()
        while frame_id and frame_id in frames and frame_id not in seen:
            seen.add(frame_id)
            loc, parent = frames[frame_id]
            path_, func, lineno = locs.get(loc, ("?", "?", 0))
            if any(k in path_ for k in INTERESTING):
                if "optax/" in path_:
                    return "optax " + path_.split("optax/", 1)[1]
                return f"{path_.split('fastserve/', 1)[-1]}:{lineno} {func.split('.')[-1]}"
            frame_id = parent if parent != frame_id else None
        return "(other)"

    # Fused computations: their dots (FLOPs) and, as a fallback label, their root's stack frame.
    comps: dict[str, dict] = {}
    dot_flops: dict[str, float] = {}  # per dot instruction, for dots left unfused in ENTRY
    cur = None
    shapes: dict[str, list[int]] = {}
    for line in lines:
        m = re.match(r"^%(\S+) \(.*\) -> .* \{$", line)
        if m:
            cur = comps.setdefault(m[1], {"flops": 0.0, "frame": None, "dot": False})
            shapes = {}
            for pname, pshape in re.findall(r"([\w.\-]+): [a-z0-9]+\[([0-9,]*)\]", line.split("->")[0]):
                shapes[pname] = [int(x) for x in pshape.split(",") if x]
            continue
        if line.startswith("ENTRY"):
            cur = comps.setdefault("__entry__", {"flops": 0.0, "frame": None, "dot": False})
            shapes = {}
        if cur is None:
            continue
        im = re.match(r"^\s+(ROOT )?%(\S+) = [a-z0-9]+\[([0-9,]*)\]\S* (\S+?)\((.*)", line)
        if not im:
            continue
        out = [int(x) for x in im[3].split(",") if x]
        shapes[im[2]] = out
        sf = re.search(r"stack_frame_id=(\d+)", line)
        if im[1] and sf:
            cur["frame"] = int(sf[1])
        if im[4] == "dot":
            cur["dot"] = True
            lhs = re.match(r"%(\S+?)[,)]", im[5])
            cd = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", line)
            k = 1
            if lhs and cd and lhs[1] in shapes:
                for d in cd[1].split(","):
                    k *= shapes[lhs[1]][int(d)]
            n_out = 1
            for d in out:
                n_out *= d
            cur["flops"] += 2.0 * n_out * k
            dot_flops[im[2]] = 2.0 * n_out * k
            if sf:
                cur["frame"] = int(sf[1])

    info = {}
    entry = text[text.index("\nENTRY"):]
    for line in entry.splitlines()[1:]:
        im = re.match(r"^\s+(ROOT )?%(\S+) = (?:\(.*?\)|\S+) (\S+?)\(", line)
        if not im:
            continue
        name, op = im[2], im[3]
        calls = re.search(r"calls=%(\S+?)[,\s]", line)
        comp = comps.get(calls[1]) if calls else None
        sf = re.search(r"stack_frame_id=(\d+)", line)
        frame = (comp or {}).get("frame") or (int(sf[1]) if sf else None)
        opname = re.search(r'op_name="([^"]*)"', line)
        bwd = bool(opname and "transpose(" in opname[1])
        is_dot = op == "dot" or bool(comp and comp["dot"])
        kind = "matmul" if is_dot else ("copy/transpose" if "copy" in name or op in ("copy", "transpose") else
                                        "fusion" if op == "fusion" else op)
        flops = dot_flops.get(name, 0.0) if op == "dot" else (comp or {}).get("flops", 0.0)
        info[name] = {"kind": kind, "flops": flops, "label": source(frame), "bwd": bwd}
    return info


def wall_shares(events: list[tuple[float, float, str]], steps: int) -> dict[str, float]:
    """ms of *wall* time per step for each thunk: while k thunks run at once, each is charged 1/k of that time.

    XLA's CPU runtime runs independent thunks concurrently on its 2 worker threads, and each matmul also spreads
    over the intra-op pool, so a thunk's own duration overstates what it costs the step; this sweep does not.
    """
    points = sorted([(s, 1, n) for s, _, n in events] + [(e, -1, n) for _, e, n in events])
    active: collections.Counter = collections.Counter()
    out: dict[str, float] = collections.Counter()
    last = None
    for t, delta, name in points:
        if last is not None and active:
            k = sum(active.values())
            for n, c in active.items():
                out[n] += (t - last) * c / k / 1e6 / steps
        active[name] += delta
        if not active[name]:
            del active[name]
        last = t
    return out


def profile_torch(steps: int, top: int) -> dict:
    """The PyTorch baseline's own per-op times (torch.profiler, CPU self time), for the side-by-side."""
    import time

    from torch.profiler import ProfilerActivity, profile
    sys.path.insert(0, HERE)
    from bench_train import build_torch_bench

    tb = build_torch_bench()
    tb.run(3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        tb.run(steps)
        step_ms = 1e3 * (time.perf_counter() - t) / steps
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    out = [{"op": e.key, "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 1), "calls_per_step": e.count // steps}
           for e in rows]
    print(f"torch step (profiled, mean of {steps}): {step_ms:.0f} ms")
    for r in out:
        print(f"{r['self_ms_per_step']:8.1f} ms  x{r['calls_per_step']:<4d} {r['op']}")
    return {"step_ms": round(step_ms, 1), "by_op": out}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="traced steps (after 3 warm-up steps)")
    ap.add_argument("--top", type=int, default=25, help="rows of the per-source table")
    ap.add_argument("--torch", action="store_true", help="also profile the PyTorch baseline (torch.profiler)")
    ap.add_argument("--scanned", action="store_true",
                    help="profile the scanned layers (the default step); the profiler cannot see inside the "
                         "lax.scan's while loop, so by default the layers are unrolled (model.scan_layers: false)")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "profile_train.json"),
                    help="write the breakdown here as JSON (bench_train.md includes it); '' for none")
    args = ap.parse_args(argv)
    dump = tempfile.mkdtemp(prefix="fastserve_hlo_")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_dump_to={dump} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*(lambda|train_step).*")
    import jax
    sys.path.insert(0, HERE)
    from bench_train import JaxBench

    jb = JaxBench(scan_layers=None if args.scanned else False)
    jb.run(3)
    trace_dir = tempfile.mkdtemp(prefix="fastserve_trace_")
    with jax.profiler.trace(trace_dir):
        wall = jb.run(args.steps)
    hlo = sorted(glob.glob(os.path.join(dump, "*train_step*cpu_after_optimizations.txt")), key=os.path.getsize)[-1]
    info = parse_hlo(hlo)
    xplane = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    pd = jax.profiler.ProfileData.from_file(xplane)
    events = [(ev.start_ns, ev.start_ns + ev.duration_ns, ev.name) for plane in pd.planes for line in plane.lines
              for ev in line.events if ev.name in info]
    per_thunk = wall_shares(events, args.steps)
    total = sum(per_thunk.values())
    step_ms = 1e3 * sorted(wall)[len(wall) // 2]

    def table(key):
        t, fl = collections.Counter(), collections.Counter()
        for name, ms in per_thunk.items():
            k = key(info[name])
            t[k] += ms
            fl[k] += info[name]["flops"]
        return [{"what": k, "ms_per_step": round(ms, 1), "share": round(ms / total, 3),
                 "gflops_per_s": round(fl[k] / ms / 1e6, 1) if fl[k] else None} for k, ms in t.most_common()]

    by_kind = table(lambda i: f"{i['kind']} {'bwd' if i['bwd'] else 'fwd'}")
    by_source = table(lambda i: f"{i['kind']:>14} {'bwd' if i['bwd'] else 'fwd'} {i['label']}")
    top = sorted(per_thunk.items(), key=lambda kv: -kv[1])[:args.top]
    print(f"step (wall, median of {args.steps} traced): {step_ms:.0f} ms; covered by thunks: {total:.0f} ms/step; "
          f"HLO: {hlo}")
    print("\n== by kind ==")
    for r in by_kind:
        print(f"{r['ms_per_step']:8.1f} ms {r['share']:6.1%}  {r['gflops_per_s'] or '':>7}  {r['what']}")
    print(f"\n== by source (top {args.top}) ==")
    for r in by_source[:args.top]:
        print(f"{r['ms_per_step']:8.1f} ms {r['share']:6.1%}  {r['gflops_per_s'] or '':>7}  {r['what']}")
    print(f"\n== top {args.top} thunks ==")
    for name, ms in top:
        i = info[name]
        gf = f"{i['flops'] / ms / 1e6:.0f} GFLOP/s" if i["flops"] else ""
        print(f"{ms:8.1f} ms  {name:28s} {i['kind']:>14} {'bwd' if i['bwd'] else 'fwd'} {i['label']}  {gf}")
    result = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "step_ms": round(step_ms, 1), "scan_layers": jb.cfg.scan_layers, "thunk_ms_per_step": round(total, 1), "by_kind": by_kind,
              "by_source": by_source[:args.top], "xla_flags": os.environ["XLA_FLAGS"].split(" --xla_dump_to")[0]}
    if args.torch:
        result["torch"] = profile_torch(args.steps, args.top)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return result


if __name__ == "__main__":
    main()

"""Serving a real model against llama.cpp's server (issue 16): SmolLM2-135M-Instruct served by fastserve (float32 and
weight-only int8) and by llama.cpp's OpenAI-compatible `llama-server` (parallel slots, continuous batching, 2
threads) on the same GGUF, the same seeded trace, through the same streaming HTTP client.

    python experiments/bench_serving_real.py [--llama-server PATH]   # full sweep (~25 min on 2 cores); writes
                                                                     # experiments/results/bench_serving_real.{json,md}
    python experiments/bench_serving_real.py --quick                 # ~2 min: one rate, few requests; writes nothing
    ... --kernel-spin-threads 1                                      # the int8 kernels' spinning helper on

The trace is bench_serving's (serving_workload.workload: Poisson arrivals, prompts of 8-48 random token ids, outputs
90 % 8-16 and 10 % 128-256 tokens), sent as token-id prompts with `ignore_eos: true` and greedy decoding, so every
request generates exactly its output length on both servers. Each rate of the sweep runs every contender on the
identical trace, contenders alternating within the rate (so machine load drifts over all of them alike). fastserve
serves from one process (configs/smollm2_135m.yaml's model, 8 slots, its MLFQ scheduler, buckets [32, 64]); int8 is
the `quantize` transform (the C++ kernel at decode); "int8 w8a8" the transforms of configs/serve_smollm2_w8a8.yaml
(`activations: int8`: activations rounded to int8 per block of 32 and integer products, as llama.cpp's Q8_0 dot; the
weights stored as the VNNI kernel's panels at start-up, serve.pack_int8); "int8 w8a8 chunked" also that file's
`serve.prefill_chunk` (new prompts written in the running streams' decode steps), so it measures what that config
serves, on the benchmark's slots, buckets and cache; "int8 paged" holds the same KV bytes as block-paged KV
(`serve.kv_cache_bytes`), whose decode attends over the blocks the running jobs hold rather than every slot's whole
cache. llama.cpp serves the Q8_0 requantization of the shipped GGUF
(int8_decode.py makes it) with `-np 8` slots (of 512 positions, the least it takes; fastserve's hold 320); where
its extra CPU buffer types (AMX tiles, repacked weights) fault on this VM it runs with `--no-repack`, and the
result says so.

llama-server is not on PyPI: `llama-cpp-python` ships only the library. Build it from that package's sdist (its
vendored llama.cpp), e.g. `pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`, untar, then
`cmake -S vendor/llama.cpp -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF
&& cmake --build build --target llama-server llama-quantize -j2` (~15 min here) and pass
`--llama-server build/bin/llama-server` (or set LLAMA_SERVER); its `llama-quantize` makes the Q8_0 GGUF when
llama-cpp-python is not installed. Without the server the peer rows are skipped with that message.

Figures per contender and rate: TTFT / TPOT / E2E percentiles, mean JCT, throughput and goodput (TTFT ≤ 1 s and
TPOT ≤ 0.1 s, serving_workload's SLO); over the sweep: requests/s at the p99 E2E SLO (P99_SLO_S, interpolated).
Goal: fastserve's goodput ≥ llama.cpp server's at the same SLO. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from provenance import provenance  # noqa: E402
from serving_report import rate_at_p99  # noqa: E402
from serving_client import run_http  # noqa: E402
from serving_workload import P99_SLO_S, SLO_TPOT_S, SLO_TTFT_S, slot_layout_bytes, workload  # noqa: E402

SMOLLM = os.path.join(ROOT, "configs", "smollm2_135m.yaml")
# what a user serves fast (W8A8 at load, prefill chunks): the W8A8 arms take its transforms, "chunked" its chunk
SERVED = os.path.join(ROOT, "configs", "serve_smollm2_w8a8.yaml")
RESULTS = os.path.join(HERE, "results")
SLOTS, BUCKETS, MAX_LEN = 8, [32, 64], 320
# req/s offered (mean output 30 tokens); 8 and 10 since a66e306: at 6 both fastserve W8A8 and llama.cpp met the
# SLO on every request, so the best goodput was the trace's own rate, not either server's capacity
# 12 since the chunked contender (llama.cpp was not saturated at 10); 16 and 20 since the VNNI panels (at 12 both
# servers met the SLO on every request, so the best goodput there was the trace's, not a server's)
RATES = (1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0)
QUICK_RATES = (1.0,)
REQUESTS, QUICK_REQUESTS, WARMUP = 48, 16, 4
SEED = 0


# ---------------------------------------------------------------------------------------------- the servers

def fastserve_worker(port_file: str, variants: list[str]) -> int:
    """The fastserve server process: one Engine + Server per variant ("float32", "int8") on free ports."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import dataclasses

    from fastserve.config import ServeConfig, load_config
    from fastserve.serve.engine import Engine
    from fastserve.serve.server import Server
    from fastserve.transforms.report import transform_loaded
    from fastserve.workdir import load_model

    cfg = load_config(SMOLLM, ["mesh.data=1"])
    served = load_config(SERVED)           # the W8A8 arms' transforms, the chunked arm's prefill_chunk
    loaded = load_model(cfg)
    scfg = dataclasses.replace(cfg.serve, slots=SLOTS, buckets=BUCKETS, max_cache_len=MAX_LEN, max_queue=100_000,
                               max_new_tokens_limit=256, port=0)
    urls, quantized = {}, {}
    for name in variants:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r} (choose from {', '.join(VARIANTS)})")
        variant, vcfg = loaded, scfg
        if name.startswith("int8"):
            activations = "int8" if "w8a8" in name else "float32"
            if activations not in quantized:
                specs = served.transforms if activations == "int8" else \
                    [{"quantize": {"include": ["layers.*"], "activations": activations}}]
                model_cfg, graphdef, params, _ = transform_loaded(loaded, specs, cfg)
                quantized[activations] = dataclasses.replace(loaded, model_cfg=model_cfg, graphdef=graphdef,
                                                             params=params)
            variant = quantized[activations]
        if name.endswith("paged"):   # the same bytes as the slot layout, in blocks: attention over held blocks only
            vcfg = dataclasses.replace(scfg, kv_cache_bytes=slot_layout_bytes(loaded.model_cfg, SLOTS, MAX_LEN))
        if name.endswith("chunked"):   # new prompts ride in the running rows' decode steps, a chunk a step
            vcfg = dataclasses.replace(scfg, prefill_chunk=served.serve.prefill_chunk)
        urls[name] = Server(Engine.from_loaded(variant, vcfg), variant, vcfg, model_name="bench").start().url
    with open(port_file + ".tmp", "w") as f:
        json.dump(urls, f)
    os.replace(port_file + ".tmp", port_file)
    while True:
        time.sleep(3600)


VARIANTS = ("float32", "int8", "int8 w8a8", "int8 w8a8 chunked", "int8 paged")


def start_fastserve(variants: list[str], spin_threads: str) -> tuple[subprocess.Popen, dict[str, str]]:
    port_file = tempfile.mktemp(prefix="bench_serving_real.", suffix=".json")
    env = {**os.environ, "FASTSERVE_KERNEL_SPIN_THREADS": spin_threads}
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", port_file, *variants],
                            stdout=subprocess.DEVNULL, start_new_session=True, env=env)
    deadline = time.time() + 900                  # loading the GGUF + compiling every bucket of two engines
    while not os.path.exists(port_file):
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"the fastserve server process did not start (exit {proc.poll()})")
        time.sleep(1)
    with open(port_file) as f:
        urls = json.load(f)
    os.unlink(port_file)
    return proc, urls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llama(binary: str, gguf: str, no_repack: bool) -> tuple[subprocess.Popen, str]:
    """llama-server on the GGUF, SLOTS parallel slots of MAX_LEN positions, continuous batching, 2 threads."""
    port = free_port()
    cmd = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-t", "2", "-tb", "2",
           "-np", str(SLOTS), "-c", str(SLOTS * max(MAX_LEN, 512)), "-cb", "--no-webui", "-ngl", "0"]
    if no_repack:
        cmd.append("--no-repack")
    # its log goes to a file: a pipe nobody reads fills up and blocks the server mid-run
    log = tempfile.NamedTemporaryFile(prefix="llama-server.", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            with open(log.name, errors="replace") as f:
                raise RuntimeError(f"llama-server exited with {proc.returncode}: {f.read()[-2000:]!r}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
            if asyncio.run(_health(port)):
                return proc, url
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("llama-server did not become healthy in 120 s")


async def _health(port: int) -> bool:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    await writer.drain()
    status = await reader.readline()
    writer.close()
    return b" 200 " in status


def llama_peer(binary: str | None, gguf: str) -> tuple[subprocess.Popen | None, str | None, dict[str, Any]]:
    """(process, url, info) of llama-server; (None, None, {"skipped": why}) without a binary or when it fails.
    Its default buffer types first; when they crash on the first request (AMX faults on some VMs), --no-repack."""
    if not binary:
        return None, None, {"skipped": "no llama-server binary (pass --llama-server or set LLAMA_SERVER; the module "
                                       "docstring says how to build it from llama-cpp-python's sdist)"}
    note = "default buffer types"
    for no_repack in (False, True):
        proc = None
        try:
            proc, url = start_llama(binary, gguf, no_repack)
            run_http(url, workload(2, 1e9, 99), 0)          # two short requests: does it evaluate?
            return proc, url, {"binary": binary, "gguf": os.path.basename(gguf), "no_repack": no_repack, "note": note}
        except Exception as e:   # noqa: BLE001 - the peer is optional; the reason is recorded
            note = (f"llama-server with its extra buffer types failed here ({str(e)[:200]}); measured with "
                    f"--no-repack (no AMX / repacked-weight kernels)")
            stop(proc)
    return None, None, {"skipped": note}


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ----------------------------------------------------------------------------------------------------- sweep

def sweep(urls: dict[str, str], rates: tuple[float, ...], n: int) -> dict[str, list[dict[str, Any]]]:
    """Every contender on the same trace at each rate, contenders in turn within a rate."""
    points: dict[str, list[dict[str, Any]]] = {name: [] for name in urls}
    for rate in rates:
        items = workload(n, rate, SEED)
        for name, url in urls.items():
            res = {"rate": rate, **run_http(url, items, WARMUP)}
            points[name].append(res)
            print(f"rate {rate:4.1f}  {name:9}  TTFT p50 {res['ttft_median_s']:.3f} p99 {res['ttft_p99_s']:.3f}  "
                  f"TPOT p50 {res['tpot_median_s']:.4f}  mean JCT {res['e2e_mean_s']:.2f}  "
                  f"goodput {res['goodput_req_s']:.2f} req/s", flush=True)
    return points


def headline(points: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    at_slo = {name: rate_at_p99(pts, P99_SLO_S) for name, pts in points.items()}
    best_goodput = {name: max(p["goodput_req_s"] for p in pts) for name, pts in points.items()}
    for name in points:
        out[f"{name}: req/s at p99 E2E ≤ {P99_SLO_S:g} s"] = at_slo[name] and round(at_slo[name], 3)
        out[f"{name}: best goodput (req/s)"] = round(best_goodput[name], 3)
    if "llama.cpp" in points:
        for name in VARIANTS:
            if name in points and best_goodput["llama.cpp"] > 0:
                out[f"{name} / llama.cpp best goodput"] = round(best_goodput[name] / best_goodput["llama.cpp"], 3)
                if at_slo[name] and at_slo["llama.cpp"]:
                    out[f"{name} / llama.cpp req/s at p99 SLO"] = round(at_slo[name] / at_slo["llama.cpp"], 3)
    return out


def write_markdown(out: dict[str, Any], path: str) -> None:
    lines = [f"# bench_serving_real: SmolLM2-135M served by fastserve and llama.cpp's server "
             f"(commit `{out['commit'][:7]}`{' dirty' if out['dirty'] else ''}, {out['date'][:10]})", "",
             f"`{out['command']}`; {out['machine']}; load average {out['load_avg_start']} → {out['load_avg_end']}; "
             f"wall {out['wall_s']} s.", "",
             f"Workload: bench_serving's trace (seed {SEED}, {out['requests']} requests per rate, the first {WARMUP} "
             f"excluded), token-id prompts of 8-48 tokens, outputs 90 % 8-16 / 10 % 128-256 tokens, greedy with "
             f"ignore_eos; {SLOTS} slots of {MAX_LEN} positions on every server; goodput: TTFT ≤ {SLO_TTFT_S:g} s and "
             f"TPOT ≤ {SLO_TPOT_S:g} s. llama.cpp: {json.dumps(out['llama_cpp'])}.", "",
             "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in out["headline"].items()]
    lines += ["", "| rate | server | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | mean JCT | E2E p99 | req/s | "
                  "goodput |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, pts in out["points"].items():
        for p in pts:
            lines.append(f"| {p['rate']} | {name} | {p['ttft_median_s']:.3f} | {p['ttft_p99_s']:.3f} | "
                         f"{p['tpot_median_s']:.4f} | {p['tpot_p99_s']:.4f} | {p['e2e_mean_s']:.2f} | "
                         f"{p['e2e_p99_s']:.2f} | {p['throughput_req_s']:.2f} | {p['goodput_req_s']:.2f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one rate, few requests; writes nothing")
    ap.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER") or shutil.which("llama-server"),
                    help="the llama-server binary (default: $LLAMA_SERVER, else on PATH)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"fastserve contenders ({', '.join(VARIANTS)})")
    ap.add_argument("--kernel-spin-threads", default=os.environ.get("FASTSERVE_KERNEL_SPIN_THREADS", "0"),
                    help="the fastserve server's FASTSERVE_KERNEL_SPIN_THREADS (int8 kernels' spinning helpers; "
                         "default 0, as fastserve's)")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return fastserve_worker(args.worker[0], args.worker[1:])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    t_start, load_start = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
    from fastserve.config import load_config
    from fastserve.data.packages import resolve_path
    import int8_decode

    cfg = load_config(SMOLLM, ["mesh.data=1"])
    quantize = os.path.join(os.path.dirname(args.llama_server), "llama-quantize") if args.llama_server else None
    gguf = int8_decode.q8_0_gguf(resolve_path(cfg.source.path), quantize) if args.llama_server else None
    fs_proc, urls = start_fastserve(args.variants.split(","), args.kernel_spin_threads)
    llama_proc, llama_url, llama_info = llama_peer(args.llama_server if gguf else None, gguf or "")
    try:
        if llama_url:
            urls["llama.cpp"] = llama_url
        print(f"servers: {urls}; llama.cpp: {llama_info}", flush=True)
        n = QUICK_REQUESTS if args.quick else REQUESTS
        points = sweep(urls, QUICK_RATES if args.quick else RATES, n)
    finally:
        stop(fs_proc)
        stop(llama_proc)
    out = {"bench": "serving_real", "quick": args.quick, "model": "SmolLM2-135M-Instruct",
           "command": "python experiments/bench_serving_real.py" + (" --quick" if args.quick else "") +
                      (f" --kernel-spin-threads {args.kernel_spin_threads}" if args.kernel_spin_threads != "0" else ""),
           "kernel_spin_threads": args.kernel_spin_threads,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", **provenance(),
           "load_avg_start": load_start, "load_avg_end": [round(x, 2) for x in os.getloadavg()],
           "wall_s": round(time.perf_counter() - t_start, 1), "requests": n, "slots": SLOTS, "max_len": MAX_LEN,
           "buckets": BUCKETS, "p99_slo_s": P99_SLO_S, "llama_cpp": llama_info, "points": points,
           "headline": headline(points)}
    if not args.quick:
        with open(os.path.join(RESULTS, "bench_serving_real.json"), "w") as f:
            json.dump(out, f, indent=1)
        write_markdown(out, os.path.join(RESULTS, "bench_serving_real.md"))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

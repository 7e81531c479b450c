"""Multi-host training on one machine: 2 JAX processes on localhost CPU train in lockstep and match a 1-process run.

Each process has 2 CPU devices, so the mesh data=2 × fsdp=2 spans 4 global devices over 2 processes: batches and
FSDP-sharded weights both cross the process boundary (gloo collectives). The workers (tests/multihost_worker.py) run
the unmodified `fastserve.core.trainer.train` and report every step's loss, their slice of the first batches and their
tokenizer's hash. A 1-process run with 4 local devices and the same config (same global batch, same mesh) runs
alongside as the reference.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "multihost_worker.py"
TIMEOUT_S = 240          # per run, all processes together; a hung peer is killed, never waited on forever
INIT_TIMEOUT_S = 60      # jax.distributed: a process whose peer never shows up aborts after this

# Floats without exponents: PyYAML reads `1e9` as a string; this config does not lean on config.py to coerce it.
CONFIG = [
    "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64",
    "tokenizer.vocab_size=512",  # the pydoc corpus has 348 distinct characters: 300 pieces are too few
    "data.seq_len=32", "data.batch_size=4",
    "train.steps=6", "train.eval_every=3", "train.eval_batches=2", "train.task.samples=0",
    "checkpoint.every=3", "log.every=1", "log.progress=false", "log.tensorboard=false",
    "log.peak_flops=1000000000.0",
    "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=1",
]

# The 1-process reference reduces gradients and losses over the same 4 devices, but XLA's in-process all-reduce and
# gloo's cross-process one add the 4 partial sums in different orders: float32 results differ by a few ulps
# (observed: <= 5e-7 absolute on losses ~6.2, i.e. ~1e-7 relative, after 6 AdamW steps). 1e-5 relative leaves 100x
# headroom for that yet is far below what a wrong global batch does: a different batch moves the step-1 loss by
# ~1e-2, and the batch contents themselves are compared exactly below.
REFERENCE_RTOL = 1e-5
# Processes of one run read the same replicated scalars: observed bitwise equal; allow a last-ulp wobble only.
LOCKSTEP_RTOL = 1e-6


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, log: Path, local_devices: int, overrides: list[str]) -> tuple[subprocess.Popen, object]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("XLA_FLAGS", None)  # a forced host device count would fight --local-devices
    f = open(log, "w")
    cmd = [sys.executable, str(WORKER), "--out", str(out), "--local-devices", str(local_devices), *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT), f


def _wait_all(procs: list[tuple[str, subprocess.Popen, object, Path]], timeout: float) -> dict[str, int]:
    """Waits for every process under one deadline. At the deadline, or as soon as one process fails (its peer would
    otherwise sit in a collective until JAX's own timeout), the survivors are killed: nothing can hang the suite."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            codes = [p.poll() for _, p, _, _ in procs]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.2)
    finally:
        for _, p, f, _ in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            f.close()
    return {name: p.returncode for name, p, _, _ in procs}

def _tail(path: Path, n: int = 40) -> str:
    lines = [l for l in path.read_text(errors="replace").splitlines() if "spmd_partitioner" not in l]
    return "\n".join(lines[-n:])


@pytest.mark.multihost
def test_two_processes_train_in_lockstep_and_match_one_process(tmp_path):
    port = _free_port()
    shared = tmp_path / "shared"  # ONE work dir for both processes, as on a shared filesystem
    procs = []
    for i in range(2):
        overrides = [*CONFIG, f"train.workdir={shared}", "distributed.enabled=true",
                     f"distributed.coordinator=127.0.0.1:{port}", "distributed.num_processes=2",
                     f"distributed.process_id={i}", f"distributed.timeout_s={INIT_TIMEOUT_S}"]
        out, log = tmp_path / f"proc{i}.json", tmp_path / f"proc{i}.log"
        p, f = _launch(out, log, 2, overrides)
        procs.append((f"proc{i}", p, f, log))
    # The reference runs at the same time (the 2-process run spends much of its time waiting on its peer).
    p, f = _launch(tmp_path / "single.json", tmp_path / "single.log", 4,
                   [*CONFIG, f"train.workdir={tmp_path / 'single'}"])
    procs.append(("single", p, f, tmp_path / "single.log"))

    rcs = _wait_all(procs, TIMEOUT_S)
    logs = "\n".join(f"----- {name} (rc {rcs[name]}) -----\n{_tail(log)}" for name, _, _, log in procs)
    assert all(rc == 0 for rc in rcs.values()), (
        f"a process failed, or was killed (rc -9) because a peer failed or at the {TIMEOUT_S}s deadline\n{logs}")

    r0, r1, ref = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("proc0", "proc1", "single"))

    # The job really was 2 processes × 2 devices, and the reference 1 × 4.
    for i, r in enumerate((r0, r1)):
        assert (r["process_index"], r["process_count"], r["local_devices"], r["global_devices"]) == (i, 2, 2, 4)
    assert (ref["process_count"], ref["local_devices"]) == (1, 4)

    # Every process trained its own tokenizer from the same corpus: all three must be the same model, and the cached
    # file in the shared work dir (both processes wrote it) must be that model too.
    assert r0["vocab_sha256"] == r1["vocab_sha256"] == ref["vocab_sha256"]
    assert r0["tokenizer_sha256"] == r1["tokenizer_sha256"] == ref["tokenizer_sha256"]  # one machine: same bytes
    assert hashlib.sha256((shared / "tokenizer.model").read_bytes()).hexdigest() == r0["tokenizer_sha256"]
    assert r0["train_rows"] == r1["train_rows"] == ref["train_rows"]
    assert r0["eval_batches"] == r1["eval_batches"] == ref["eval_batches"] == 2

    # Per-host batch slicing: process 0's rows then process 1's rows ARE the 1-process global batch, in order.
    assert len(r0["batches"]) == len(r1["batches"]) == len(ref["batches"]) >= 2
    for b0, b1, g in zip(r0["batches"], r1["batches"], ref["batches"]):
        for key in ("inputs", "targets"):
            local0, local1, full = (np.asarray(b[key]) for b in (b0, b1, g))
            assert local0.shape == local1.shape == (2, 32) and full.shape == (4, 32)
            np.testing.assert_array_equal(np.concatenate([local0, local1]), full)
        assert not np.array_equal(b0["inputs"], b1["inputs"])  # the two hosts hold different halves

    # Lockstep: both processes ran every step and saw the same losses, final metrics and held-out loss.
    assert r0["step"] == r1["step"] == ref["step"] == 6
    assert len(r0["losses"]) == len(r1["losses"]) == len(ref["losses"]) == 6
    assert all(math.isfinite(x) for x in r0["losses"])
    np.testing.assert_allclose(r0["losses"], r1["losses"], rtol=LOCKSTEP_RTOL, atol=0)
    for key in ("loss", "grad_norm", "learning_rate"):
        assert math.isclose(r0["train"][key], r1["train"][key], rel_tol=LOCKSTEP_RTOL), key
    assert r0["eval"] and r1["eval"]
    for key in ("loss", "accuracy"):
        assert math.isclose(r0["eval"][key], r1["eval"][key], rel_tol=LOCKSTEP_RTOL), key

    # Same numbers as the 1-process run of the same config and global batch.
    np.testing.assert_allclose(r0["losses"], ref["losses"], rtol=REFERENCE_RTOL, atol=0)
    for key in ("loss", "grad_norm"):
        assert math.isclose(r0["train"][key], ref["train"][key], rel_tol=REFERENCE_RTOL), key
    assert math.isclose(r0["eval"]["loss"], ref["eval"]["loss"], rel_tol=REFERENCE_RTOL)
    assert math.isclose(r0["eval"]["accuracy"], ref["eval"]["accuracy"], rel_tol=REFERENCE_RTOL)
    # ... and training did something: the loss went down over 6 steps.
    assert r0["losses"][-1] < r0["losses"][0]

    # Shared work dir: process 0 alone wrote the metrics (6 train + 3 eval records: the untrained baseline at 0, matching the losses it reported);
    # both processes wrote their shards into the same orbax checkpoints (one ocdbt.process_<i> each), which committed.
    records = [json.loads(l) for l in (shared / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if r["split"] == "eval"] == [0, 3, 6]
    np.testing.assert_allclose([r["loss"] for r in records if r["split"] == "train"], r0["losses"], rtol=1e-7)
    ckpts = shared / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["3", "6"]
    for step in ("3", "6"):
        assert (ckpts / step / "commit_success.txt").is_file() or (ckpts / step / "_CHECKPOINT_METADATA").is_file()
        state = ckpts / step / "state"
        assert (state / "ocdbt.process_0").is_dir() and (state / "ocdbt.process_1").is_dir(), sorted(state.iterdir())

"""Faults a long run meets: corrupt or truncated checkpoints, a full disk, kill -9 mid-save, SIGTERM during
evaluation, a NaN score, and a work dir trained on a mesh this machine does not have."""
import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest
from conftest import TINY

from fastserve import parallel
from fastserve.config import load_config
from fastserve.core import evaluator
from fastserve.core.checkpoint import CheckpointCorrupt, CheckpointError, Checkpointer
from fastserve.core.trainer import train

RUN = ["train.steps=4", "checkpoint.every=2", "checkpoint.max_to_keep=2", "train.eval_every=100",
       "train.eval_batches=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny work dir with checkpoints at steps 2 and 4 (trained once; tests corrupt copies of it)."""
    workdir = tmp_path_factory.mktemp("reliability") / "run"
    train(load_config(None, [*TINY, *RUN, f"train.workdir={workdir}"]))
    return workdir


def copy_of(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def flip_middle(path, n=64, at=0.5):
    """Inverts `n` bytes in the middle (or at fraction `at`) of a file (bit rot, a bad sector); returns the original
    bytes to undo it."""
    with open(path, "r+b") as f:
        original = f.read()
        start = max(0, int(len(original) * at) - n // 2)
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in original[start:start + n]))
    return original


def abstract_state(workdir):
    from fastserve.core.setup import prepare_state
    from fastserve.core.state import abstract_train_state
    cfg = load_config(os.path.join(workdir, "config.yaml"), [])
    setup = prepare_state(cfg, restore=False)
    setup.checkpointer.close()
    return abstract_train_state(setup.state, setup.shardings)


def evaluate_args(workdir, *extra):
    return [sys.executable, "-m", "fastserve.evaluate", *TINY, "train.eval_batches=2", f"train.workdir={workdir}",
            *extra]


def test_flipped_bytes_are_caught_or_harmless(trained, tmp_path, caplog):
    """Every file of the newest checkpoint in turn gets 64 bytes inverted: the restore either falls back to step 2
    with a warning naming step 4, or returns exactly the saved arrays. Never silently different values."""
    workdir = copy_of(trained, tmp_path)
    ckpt_dir = str(workdir / "checkpoints")
    abstract = abstract_state(workdir)
    with Checkpointer(ckpt_dir) as ckpt:
        saved = {s: ckpt.restore(s, abstract)[0] for s in (2, 4)}
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(os.path.join(ckpt_dir, "4"))
                   for name in names)
    assert any("ocdbt" in f for f in files) and len(files) > 10, files
    outcomes = {}
    for path in files:
        original = flip_middle(path)
        caplog.clear()
        with caplog.at_level("WARNING", logger="fastserve"), Checkpointer(ckpt_dir) as ckpt:
            step, state, _ = ckpt.restore_latest(abstract)
        with open(path, "wb") as f:
            f.write(original)
        rel = os.path.relpath(path, ckpt_dir)
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(saved[step]), jax.tree.leaves(state)))
        assert same, f"{rel}: step {step} restored with values that differ from the saved ones"
        if step == 2:
            assert "checkpoint step 4" in caplog.text and "unreadable" in caplog.text, rel
        outcomes[rel] = "checksum" if "differs from the checksum" in caplog.text else step
    # The array data files: only the checksums catch a flip there (orbax itself reads the changed values).
    assert "checksum" in outcomes.values(), outcomes


def test_checkpoint_without_checksums_still_loads(trained, tmp_path, caplog):
    """A checkpoint saved before checksums existed restores, unverified, with a debug line."""
    workdir = copy_of(trained, tmp_path)
    shutil.rmtree(workdir / "checkpoints" / "4" / "checksums")
    with caplog.at_level("DEBUG", logger="fastserve"), Checkpointer(str(workdir / "checkpoints")) as ckpt:
        step, _, extra = ckpt.restore_latest(abstract_state(workdir))
    assert step == 4 and "data" in extra
    assert "step 4" in caplog.text and "has no checksums" in caplog.text


def test_evaluate_falls_back_past_a_corrupt_step(trained, tmp_path, caplog):
    """Parameter bytes flipped in the newest step: evaluation scores the step before, with a warning."""
    workdir = copy_of(trained, tmp_path)
    params = abstract_state(workdir)["params"]
    data_files = sorted((workdir / "checkpoints" / "4" / "state").rglob("d/*"), key=lambda p: -p.stat().st_size)
    with Checkpointer(str(workdir / "checkpoints")) as ckpt:  # find bytes of a parameter (files mix in optimizer state)
        for path, at in ((path, at) for path in data_files for at in (0.5, 0.25, 0.75, 0.1, 0.9)):
            original = flip_middle(path, at=at)
            try:
                ckpt.restore_params(4, params)
            except CheckpointCorrupt:  # orbax read it without complaint; only the checksums tell
                break
            except Exception:  # an ocdbt b-tree node: tensorstore checks those itself
                pass
            path.write_bytes(original)
        else:
            pytest.fail("no data file of step 4 holds parameter bytes orbax reads without complaint")
    cfg = load_config(None, [*TINY, "train.eval_batches=2", f"train.workdir={workdir}"])
    with caplog.at_level("WARNING", logger="fastserve"):
        result = evaluator.evaluate(cfg)
    assert result["step"] == 2 and math.isfinite(result["loss"]), result
    assert "checkpoint step 4" in caplog.text and "differs from the checksum" in caplog.text


def test_nonfinite_loss_fails_evaluate(trained, tmp_path, capsys):
    workdir = copy_of(trained, tmp_path)
    abstract = abstract_state(workdir)
    with Checkpointer(str(workdir / "checkpoints"), async_save=False) as ckpt:
        state, extra = ckpt.restore(4, abstract)
        state["params"] = jax.tree.map(lambda x: x * np.nan, state["params"])
        ckpt.save(5, state, extra)
    assert evaluator.main([*TINY, "train.eval_batches=2", f"train.workdir={workdir}"]) == 1
    err = capsys.readouterr().err
    assert "loss is nan" in err and "checkpoint step 5" in err, err


def test_truncated_checkpoint_gives_one_warning_and_no_asyncio_noise(trained, tmp_path):
    """Orbax's abandoned asyncio work used to print 12-60 tracebacks around the fallback warning."""
    workdir = copy_of(trained, tmp_path)
    state_dir = workdir / "checkpoints" / "4" / "state"
    for path in [state_dir / "manifest.ocdbt", *(state_dir / "array_metadatas").iterdir()]:
        os.truncate(path, 7)
    proc = subprocess.run(evaluate_args(workdir), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 2
    assert proc.stderr.count("checkpoint step 4") == 1, proc.stderr
    for noise in ("Event loop is closed", "was never retrieved", "Traceback", "Exception ignored", "never awaited"):
        assert noise not in proc.stderr, proc.stderr


def test_full_disk_keeps_the_previous_checkpoint(tiny_config, monkeypatch):
    from orbax.checkpoint._src.handlers.json_checkpoint_handler import JsonCheckpointHandler
    write = JsonCheckpointHandler._save_fn

    async def full_at_step_4(self, item, directory):  # runs in orbax's background commit thread
        if os.path.basename(os.path.dirname(str(directory))).startswith("4"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await write(self, item, directory)

    monkeypatch.setattr(JsonCheckpointHandler, "_save_fn", full_at_step_4)
    cfg = tiny_config("train.steps=6", "checkpoint.every=2", "train.eval_every=100", "train.eval_batches=1")
    ckpt_dir = os.path.join(cfg.train.workdir, "checkpoints")
    with pytest.raises(CheckpointError, match=r"step 4 failed: no space left on the disk holding .*checkpoints") as e:
        train(cfg)
    assert "step 2) is intact" in str(e.value)
    monkeypatch.undo()
    with Checkpointer(ckpt_dir) as ckpt:
        assert ckpt.all_steps() == [2]
        assert ckpt.restore_latest(abstract_state(cfg.train.workdir))[0] == 2


def test_kill_9_mid_save_then_resume(tmp_path):
    """SIGKILL while async saves are in flight (one every step): the same command resumes from the newest complete
    step, recomputes exactly the losses the killed run logged after it, and finishes."""
    args = [sys.executable, "-m", "fastserve.train", *TINY, "train.steps=14", "checkpoint.every=1",
            "train.eval_every=100", "train.eval_batches=1", f"train.workdir={tmp_path}"]
    ckpt_dir = tmp_path / "checkpoints"
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and not (ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())):
        time.sleep(0.05)
    time.sleep(0.3)
    proc.kill()
    proc.wait(timeout=30)
    with Checkpointer(str(ckpt_dir)) as ckpt:
        complete = ckpt.all_steps()
    assert complete and complete[-1] < 14, complete
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming at step {complete[-1]}" in resumed.stdout
    with Checkpointer(str(ckpt_dir)) as ckpt:
        assert ckpt.latest_step() == 14
    losses = {}
    for line in open(tmp_path / "metrics.jsonl"):
        r = json.loads(line)
        if r["split"] == "train":
            losses.setdefault(r["step"], []).append(r["loss"])
    assert sorted(losses) == list(range(1, 15))
    for step, seen in losses.items():  # a step logged by both runs has one loss
        assert max(seen) - min(seen) <= 1e-6 * abs(seen[0]), (step, seen)


def test_sigterm_stops_evaluate_promptly(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    ckpt_dir = workdir / "checkpoints"
    before = {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in ckpt_dir.rglob("*")}
    env = dict(os.environ, FASTSERVE_LOG_LEVEL="DEBUG")
    # batch 1, every held-out row: evaluation still runs when the signal comes
    proc = subprocess.Popen(evaluate_args(workdir, "data.batch_size=1", "train.eval_batches=0"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    for line in proc.stderr:
        if "restored step 4" in line or time.time() > deadline:
            break
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert time.time() - sent < 15
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, out, err)
    assert "terminated (SIGTERM)" in err and "Traceback" not in err, err
    assert out == ""
    assert {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in ckpt_dir.rglob("*")} == before


def test_mesh_fits():
    def mesh(data, fsdp, tensor):
        return types.SimpleNamespace(data=data, fsdp=fsdp, tensor=tensor)
    assert parallel.mesh_fits(mesh(2, 2, 2), 8) and not parallel.mesh_fits(mesh(2, 2, 2), 1)
    assert parallel.mesh_fits(mesh(1, 1, 1), 8) and parallel.mesh_fits(mesh(-1, 2, 1), 4)
    assert not parallel.mesh_fits(mesh(-1, 2, 1), 3)


EIGHT_DEVICE_TRAIN = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 8)
sys.path.insert(0, sys.argv[1])
from conftest import TINY
from fastserve.config import load_config
from fastserve.core.trainer import train
cfg = load_config(None, [*TINY, *sys.argv[3:], f"train.workdir={sys.argv[2]}"])
print(json.dumps(train(cfg)["eval"]))
"""


def test_work_dir_from_8_devices_loads_on_1(tmp_path, caplog):
    """Trained on a 2x2x2 mesh of 8 (simulated) devices; evaluated and compressed here, on 1 device."""
    workdir = tmp_path / "run"
    mesh8 = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    proc = subprocess.run([sys.executable, "-c", EIGHT_DEVICE_TRAIN, os.path.dirname(__file__), str(workdir),
                           "train.steps=3", "checkpoint.every=3", "train.eval_every=100", "train.eval_batches=2",
                           *mesh8], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in proc.stdout, proc.stdout
    on_8 = json.loads(proc.stdout.strip().splitlines()[-1])
    assert jax.device_count() == 1
    cfg = load_config(str(workdir / "config.yaml"), [])  # the saved config: its mesh wants 8 devices
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (2, 2, 2)
    with caplog.at_level("INFO", logger="fastserve.parallel"):
        result = evaluator.evaluate(cfg)
    assert "does not fit the 1 device(s) here: running on 1 device" in caplog.text
    assert result["step"] == 3
    assert result["loss"] == pytest.approx(on_8["loss"], abs=1e-5, rel=1e-5)

    from fastserve.transforms.report import compress
    out = tmp_path / "small"
    src = load_config(str(workdir / "config.yaml"), [f"source.path={workdir}", "source.kind=checkpoint",
                                                     'transforms=[{lowrank: {include: "layers.*.mlp.*", rank: 4}}]'])
    compress(src, str(out), heldout=False, decode_tokens=0)
    written = load_config(str(out / "config.yaml"), [])
    assert (written.mesh.data, written.mesh.fsdp, written.mesh.tensor) == (1, 1, 1)

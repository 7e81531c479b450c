"""Training end to end on a tiny config: loss falls, resume equals an uninterrupted run, failures keep checkpoints."""
import json
import math
import dataclasses
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fastserve.core.checkpoint import Checkpointer
from fastserve.core.trainer import TrainingDiverged, train


def train_losses(workdir, split="train"):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if r["split"] == split}


def test_loss_falls_on_a_tiny_config(tiny_config):
    cfg = tiny_config("train.steps=40", "train.eval_every=20", "checkpoint.every=20", "optimizer.warmup_steps=5")
    results = train(cfg)
    losses = train_losses(cfg.train.workdir)
    first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (38, 39, 40)])
    assert first > math.log(400) - 0.5            # starts near chance
    assert last < first - 1.0, (first, last)       # and falls clearly
    assert results["eval"]["loss"] < first - 0.8
    held_out = train_losses(cfg.train.workdir, "eval")
    assert sorted(held_out) == [0, 20, 40]          # the untrained baseline, then every eval_every
    assert held_out[40] < held_out[0] - 1.0 and held_out[20] < held_out[0] - 1.0
    assert Checkpointer(os.path.join(cfg.train.workdir, "checkpoints")).all_steps() == [20, 40]


def test_resume_equals_uninterrupted_run(tiny_config, tmp_path):
    common = ["train.steps=10", "train.eval_every=100", "checkpoint.every=3", "train.grad_accum=2"]
    full = tiny_config(*common, f"train.workdir={tmp_path / 'full'}")
    train(full)
    parts = tiny_config(*common, f"train.workdir={tmp_path / 'parts'}", "train.run_steps=4")
    first = train(parts)
    assert first["stopped_early"] and first["step"] == 4
    second = train(parts)   # the same command again resumes at step 4 ...
    assert second["step"] == 8
    train(parts)            # ... and at 8, to the end
    expected, got = train_losses(full.train.workdir), train_losses(parts.train.workdir)
    assert sorted(got) == list(range(1, 11))
    for step in range(1, 11):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), step


def test_nan_stops_and_keeps_the_last_good_checkpoint(tiny_config):
    cfg = tiny_config("train.steps=30", "checkpoint.every=1", "optimizer.learning_rate=1e12",
                      "optimizer.warmup_steps=0", "optimizer.clip_norm=0", "optimizer.name=sgd", "optimizer.momentum=0")
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        train(cfg)
    ckpt = Checkpointer(os.path.join(cfg.train.workdir, "checkpoints"))
    steps = ckpt.all_steps()
    assert steps, "the steps before the NaN were saved"
    import jax
    from fastserve.core.setup import prepare_state
    cfg = trained_config(cfg)
    setup = prepare_state(cfg)
    assert setup.start_step == steps[-1]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(setup.state["params"]))


def trained_config(cfg):
    """The config as the trainer completed it (vocab_size from the work dir's tokenizer)."""
    from fastserve.data import Tokenizer
    from fastserve.data.dataset import fill_model_config
    vocab = Tokenizer.from_file(os.path.join(cfg.train.workdir, "tokenizer.model")).vocab_size
    return dataclasses.replace(cfg, model=fill_model_config(cfg.model, {"vocab_size": vocab}))


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tiny_config, caplog):
    cfg = tiny_config("train.steps=4", "checkpoint.every=2", "train.eval_every=100")
    train(cfg)
    ckpt_dir = os.path.join(cfg.train.workdir, "checkpoints")
    assert Checkpointer(ckpt_dir).all_steps() == [2, 4]
    # Corrupt every data file of step 4 (truncation, as a killed copy would leave it).
    for root, _, files in os.walk(os.path.join(ckpt_dir, "4")):
        for name in files:
            if not name.startswith("_CHECKPOINT_METADATA"):
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(7)
    from fastserve.core.setup import prepare_state
    cfg = trained_config(cfg)
    with caplog.at_level("WARNING"):
        setup = prepare_state(cfg)
    assert setup.start_step == 2
    assert "step 4" in caplog.text and "unreadable" in caplog.text


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    """A real process gets SIGTERM mid-run: it saves a checkpoint, says so and exits 0."""
    from conftest import TINY
    args = [sys.executable, "-m", "fastserve.train", *TINY, "train.steps=100000", "train.eval_every=100000",
            "checkpoint.every=100000", f"train.workdir={tmp_path}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    metrics = tmp_path / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > 0):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stop requested: saved step" in out
    saved = Checkpointer(str(tmp_path / "checkpoints")).all_steps()
    assert len(saved) == 1 and saved[0] >= 1


def test_a_trained_work_dir_never_gets_its_tokenizer_silently_retrained(tiny_config, capsys):
    from fastserve.core.trainer import main
    cfg = tiny_config("train.steps=2", "checkpoint.every=2", "train.eval_every=100")
    train(cfg)
    tok = os.path.join(cfg.train.workdir, "tokenizer.model")
    before = open(tok, "rb").read()
    args = [f"{k}={v}" for k, v in [("train.workdir", cfg.train.workdir), ("model.d_model", 64),
                                    ("model.n_layers", 2), ("model.n_heads", 4), ("model.n_kv_heads", 2),
                                    ("model.d_ff", 128), ("model.max_seq_len", 64), ("data.seq_len", 32),
                                    ("data.batch_size", 8), ("log.progress", "false"), ("mesh.data", 1),
                                    ("train.steps", 4), ("tokenizer.vocab_size", 300)]]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "vocab_size 400 → 300" in err and "new train.workdir" in err, err
    assert open(tok, "rb").read() == before


def test_a_config_change_on_resume_is_reported_as_such(tiny_config):
    """Resuming a work dir with another model shape names the mismatch; it is not 'unreadable', and nothing falls
    back to an older step or starts over."""
    from fastserve.core.checkpoint import CheckpointMismatch
    from fastserve.core.setup import prepare_state
    cfg = tiny_config("train.steps=4", "checkpoint.every=2", "train.eval_every=100")
    train(cfg)
    changed = trained_config(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_ff=96)))
    # (scanned layers, the default: the stacked kernels [layers, 64, d_ff]; not mistaken for a layout change)
    with pytest.raises(CheckpointMismatch, match=r"step 4 .* different model config \(params\.layers\.mlp\..*"
                                                 r"has shape \[2, 64, 128\] there, \[2, 64, 96\] in this config"):
        prepare_state(changed)
    untied = trained_config(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tie_embeddings=False)))
    with pytest.raises(CheckpointMismatch, match=r"not saved: params\.lm_head\.kernel"):
        prepare_state(untied)
    assert Checkpointer(os.path.join(cfg.train.workdir, "checkpoints")).all_steps() == [2, 4]


def test_a_run_given_tokenizer_path_loads_with_that_tokenizer(tiny_config, tmp_path):
    from conftest import TINY
    from fastserve.config import load_config
    from fastserve.workdir import load_model

    first = tiny_config("train.steps=2", "train.eval_every=2", "checkpoint.every=2")
    train(first)
    vocab = os.path.join(first.train.workdir, "tokenizer.model")
    second = load_config(None, [*TINY, f"train.workdir={tmp_path / 'second'}", f"tokenizer.path={vocab}",
                                "train.steps=2", "train.eval_every=2", "checkpoint.every=2"])
    train(second)
    assert not os.path.exists(os.path.join(second.train.workdir, "tokenizer.model"))  # read where it lies
    loaded = load_model(load_config(None, [f"source.path={second.train.workdir}", "mesh.data=1"]))
    assert loaded.tokenizer is not None and loaded.tokenizer.encode("the class") == \
        load_model(load_config(None, [f"source.path={first.train.workdir}", "mesh.data=1"])).tokenizer.encode("the class")

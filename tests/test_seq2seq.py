"""The seq2seq family, task and synthetic-pairs data: trains through the CLI, is causal and mask-respecting, computes
the same loss on 1 device and on a 2×2×2 mesh, and rejects bad config values by key."""
import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from fastserve import cli, parallel
from fastserve.config import ConfigError, load_config
from fastserve.data.synthetic_pairs import BOS_ID, EOS_ID, PAD_ID, heldout_batches, make_pairs, token_map
from fastserve.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "seq2seq_synthetic.yaml")
# Small and quick, on top of the recipe. Dropout on: the 1-device / mesh comparison then also covers the masks.
SMALL = ["model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.n_encoder_layers=1",
         "model.n_decoder_layers=1", "model.dropout=0.1", "data.vocab_size=16", "data.max_len=6",
         "data.train_examples=1024", "data.eval_examples=64", "data.batch_size=32", "train.steps=80",
         "optimizer.learning_rate=1e-2", "optimizer.warmup_steps=5", "log.every=1", "log.progress=false",
         "log.tensorboard=false", "log.peak_flops=1e9", "checkpoint.every=1000", "train.task.samples=2"]
MESH_STEPS = 3


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _train_cmd(workdir, *extra):
    return [sys.executable, "-m", "fastserve.train", "--config", RECIPE, *SMALL, f"train.workdir={workdir}", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two CLI runs at once: the full small run on 1 device, and its first steps on 8 simulated devices (2×2×2)."""
    one, mesh = str(tmp_path_factory.mktemp("s2s_one")), str(tmp_path_factory.mktemp("s2s_mesh"))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    env8 = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    procs = {
        "one": subprocess.Popen(_train_cmd(one, "train.eval_every=80"), cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT),
        # same data, schedule and seeds; stops (saving) after MESH_STEPS steps; no held-out set to evaluate
        "mesh": subprocess.Popen(_train_cmd(mesh, f"train.run_steps={MESH_STEPS}", "data.eval_examples=0",
                                            "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"),
                                 cwd=ROOT, env=env8, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT),
    }
    out = {}
    for name, proc in procs.items():
        text, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name} run failed:\n{text[-4000:]}"
        out[name] = {"stdout": text, "records": _records(one if name == "one" else mesh)}
    return out


def test_trains_through_the_cli(runs):
    recs = runs["one"]["records"]
    train = {r["step"]: r["loss"] for r in recs if r["split"] == "train"}
    evals = {r["step"]: r for r in recs if r["split"] == "eval"}
    assert sorted(evals) == [0, 80]
    chance = 1 / (16 - 3)                                         # 13 content tokens (+ EOS)
    assert evals[0]["loss"] > math.log(16) - 0.5                  # untrained: about uniform over the vocabulary
    first, last = np.mean([train[s] for s in (1, 2, 3)]), np.mean([train[s] for s in (78, 79, 80)])
    assert last < 0.5 * first, (first, last)                      # the training loss falls clearly
    assert evals[80]["loss"] < 0.5 * evals[0]["loss"], (evals[0], evals[80])
    assert evals[80]["accuracy"] > 3 * chance, evals[80]          # held-out token accuracy well above chance
    assert evals[80]["perplexity"] == pytest.approx(math.exp(evals[80]["loss"]), rel=1e-6)  # no label smoothing
    # greedy decoding (no teacher forcing) of the first held-out batch, after training: mostly exactly right
    found = re.search(r"greedy decoding of 32 held-out sources: exact match ([0-9.]+)", runs["one"]["stdout"])
    assert found and float(found.group(1)) > 0.5, runs["one"]["stdout"][-2000:]


def test_same_loss_on_one_device_and_on_a_2x2x2_mesh(runs):
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in runs["mesh"]["stdout"]
    assert f"train.run_steps reached: saved step {MESH_STEPS}" in runs["mesh"]["stdout"]
    one = [r["loss"] for r in runs["one"]["records"] if r["split"] == "train"][:MESH_STEPS]
    mesh = [r["loss"] for r in runs["mesh"]["records"] if r["split"] == "train"]
    assert len(mesh) == MESH_STEPS
    assert one[0] > one[-1]                                       # the steps really trained
    assert mesh == pytest.approx(one, rel=1e-5)


# ------------------------------------------------------------------------------------- in-process model checks

@pytest.fixture(scope="module")
def model():
    """A jitted forward `f(src, tgt_in, src_mask) -> logits` of a small random model (eval mode: dropout off)."""
    cfg = load_config(None, ["model.name=seq2seq", "model.vocab_size=16", "model.d_model=32", "model.n_heads=2",
                             "model.d_ff=64", "model.n_encoder_layers=2", "model.n_decoder_layers=2",
                             "model.init_std=0.3", "model.dropout=0.1"])
    graphdef, variables = nnx.split(build_model(cfg.model, nnx.Rngs(0)))
    fwd = jax.jit(lambda v, src, tgt, mask: nnx.merge(graphdef, v)(src, tgt, src_mask=mask))
    return lambda src, tgt, src_mask: np.asarray(fwd(variables, src, tgt, src_mask))


def _inputs(b=3, s=7, t=6, seed=0):
    rng = np.random.default_rng(seed)
    src = rng.integers(3, 16, (b, s)).astype(np.int32)
    lengths = np.array([s, 4, 2])[:b]
    src_mask = np.arange(s)[None, :] < lengths[:, None]
    src = np.where(src_mask, src, PAD_ID)
    tgt_in = rng.integers(3, 16, (b, t)).astype(np.int32)
    tgt_in[:, 0] = BOS_ID
    return src, src_mask, tgt_in


def test_every_parameter_names_rule_axes():
    from fastserve.core.state import abstract_model
    cfg = load_config(None, ["model.name=seq2seq", "model.vocab_size=16", "model.d_model=32", "model.n_heads=2",
                             "model.tie_embeddings=false"])
    _, _, logical = abstract_model(cfg.model)                     # raises if a parameter names no axes
    used = {n for axes in jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, tuple)) for n in axes}
    assert used <= {name for name, _ in parallel.LOGICAL_RULES}


def test_decoder_is_causal(model):
    src, src_mask, tgt_in = _inputs()
    base = model(src, tgt_in, src_mask=src_mask)
    changed = tgt_in.copy()
    changed[:, 4:] = (changed[:, 4:] + 5) % 13 + 3                # different later target tokens
    out = model(src, changed, src_mask=src_mask)
    np.testing.assert_allclose(out[:, :4], base[:, :4], rtol=0, atol=1e-6)   # earlier positions: unchanged
    assert np.abs(out[:, 4:] - base[:, 4:]).max() > 1e-3                     # later ones do depend on them


def test_source_padding_is_invisible(model):
    src, src_mask, tgt_in = _inputs()
    base = model(src, tgt_in, src_mask=src_mask)
    # 5 more padding columns holding arbitrary (non-pad) tokens, and garbage in the existing padding: masked out
    extra = np.random.default_rng(1).integers(3, 16, (3, 5)).astype(np.int32)
    garbage = np.where(src_mask, src, (src + 7) % 13 + 3)
    longer_src = np.concatenate([garbage, extra], axis=1)
    longer_mask = np.concatenate([src_mask, np.zeros((3, 5), bool)], axis=1)
    out = model(longer_src, tgt_in, src_mask=longer_mask)
    np.testing.assert_allclose(out, base, rtol=1e-5, atol=1e-5)
    # while a real source token does matter
    other = src.copy()
    other[:, 0] = (other[:, 0] + 4) % 13 + 3
    assert np.abs(model(other, tgt_in, src_mask=src_mask) - base).max() > 1e-3


# ------------------------------------------------------------------------------------------- task, data, config

def test_task_counts_only_real_target_tokens():
    from fastserve.tasks.seq2seq import Seq2SeqTask, Seq2SeqTaskConfig
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 8)).astype(np.float32)
    batch = {"src": np.zeros((3, 2), np.int32), "src_mask": np.ones((3, 2), bool), "tgt_in": np.zeros((3, 4), np.int32),
             "tgt_out": np.argmax(logits, -1).astype(np.int32),              # every prediction right ...
             "tgt_weights": np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], np.float32),
             "weights": np.array([1, 1, 0], np.float32)}                      # ... the third example is padding
    batch["tgt_out"][1, 3] = (batch["tgt_out"][1, 3] + 1) % 8                 # wrong, but on a padding token
    def model(src, tgt_in, *, src_mask, rngs):
        return logits
    task = Seq2SeqTask()
    loss_sum, sums = task.loss(model, batch, None, {})
    sums = {k: float(v) for k, v in sums.items()}
    assert sums["weight"] == 5 and sums["correct"] == 5 and sums["exact"] == 2 and sums["sequences"] == 2
    logits[2] += 100.0 * rng.normal(size=(4, 8)).astype(np.float32)          # the padding example changes nothing
    logits[0, 3] += 100.0
    again, _ = task.loss(model, batch, None, {})
    assert float(again) == pytest.approx(float(loss_sum), rel=1e-6)
    smoothed, s2 = Seq2SeqTask(Seq2SeqTaskConfig(label_smoothing=0.1)).loss(model, batch, None, {})
    assert float(smoothed) > float(loss_sum) and float(s2["nll_sum"]) == pytest.approx(float(loss_sum), rel=1e-6)
    report = task.summarize(sums)
    assert report["accuracy"] == 1.0 and report["exact_match"] == 1.0
    assert report["perplexity"] == pytest.approx(math.exp(sums["loss_sum"] / 5))
    assert task.units(batch) == 5



def test_synthetic_pairs_layout():
    cfg = load_config(None, ["data.source=synthetic_pairs", "data.vocab_size=16", "data.max_len=6",
                             "data.batch_size=8"]).data
    ex = make_pairs(cfg, 20, split=1)
    assert ex["src"].shape == (20, 7) and ex["src"].dtype == np.int32
    again = make_pairs(cfg, 20, split=1)
    assert all(np.array_equal(ex[k], again[k]) for k in ex)       # deterministic
    mapping = token_map(cfg)
    for i in range(20):
        n = int(ex["src_mask"][i].sum())                          # content + EOS
        content = ex["src"][i, :n - 1]
        assert ex["src"][i, n - 1] == EOS_ID and (ex["src"][i, n:] == PAD_ID).all() and (content >= 3).all()
        np.testing.assert_array_equal(ex["tgt_out"][i, :n], [*mapping[content], EOS_ID])
        np.testing.assert_array_equal(ex["tgt_in"][i, :n], [BOS_ID, *mapping[content]])
        np.testing.assert_array_equal(ex["tgt_weights"][i], np.arange(7) < n)
    batches = heldout_batches(ex, 8)                              # 20 → 3 batches of 8, the last with 4 padding
    assert len(batches) == 3
    last = batches[-1]
    np.testing.assert_array_equal(last["weights"], [1, 1, 1, 1, 0, 0, 0, 0])
    assert (last["tgt_weights"][4:] == 0).all() and not last["src_mask"][4:].any()
    assert (last["tgt_weights"][:4].sum(axis=1) > 0).all()


@pytest.mark.parametrize("override, key", [
    ("model.n_heads=3", "model.n_heads"),                         # d_model 64 not divisible by 3
    ("model.dropout=1.5", "model.dropout"),
    ("model.n_decoder_layers=0", "model.n_decoder_layers"),
    ("data.max_len=2", "data.max_len"),                           # below data.min_len=3
    ("train.task.label_smoothing=1.0", "train.task.label_smoothing"),
])
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        load_config(RECIPE, [override])


def test_cli_config_error_exits_2_naming_the_key(capsys):
    with pytest.raises(SystemExit) as e:
        cli.load_or_exit(RECIPE, ["model.dropout=-0.1"])
    assert e.value.code == 2
    assert "config error: model.dropout: must be in [0, 1), got -0.1" in capsys.readouterr().err

"""The CNN / ResNet image family (batch norm, dropout) on synthetic textures: it trains through the CLI, its batch-norm
statistics are real checkpointed model state used in evaluation, dropout follows the mode and the RNG, resuming
equals an uninterrupted run, a 2×2×2 mesh computes the same losses as one device, and bad values name their key."""
import json
import os
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from fastserve import parallel
from fastserve.config import load_config
from fastserve.core.setup import prepare_state
from fastserve.core.state import abstract_model, abstract_model_split, merge_trees
from fastserve.core.steps import make_loss_fn
from fastserve.core.trainer import main as train_main, train
from fastserve.data.images import class_textures, make_examples
from fastserve.models import build_model
from fastserve.models.cnn import KERNEL_AXES
from fastserve.tasks.classify import Classification

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "cnn_synthetic.yaml")
# The recipe, smaller: 100 steps on 1024 images (the recipe: 300 on 4096); every step's loss logged.
SMALL = ["data.train_examples=1024", "data.eval_examples=256", "train.steps=100", "train.eval_every=100",
         "optimizer.warmup_steps=5", "checkpoint.every=1000", "log.every=1", "log.progress=false",
         "log.tensorboard=false"]


def records(workdir, split):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if r["split"] == split}


def run_cli(workdir, *overrides, env=None):
    out = subprocess.run([sys.executable, "-m", "fastserve.train", "--config", RECIPE, *SMALL,
                          f"train.workdir={workdir}", *overrides], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted 100-step run, through `python -m fastserve.train` (its work dir)."""
    workdir = str(tmp_path_factory.mktemp("cnn") / "full")
    run_cli(workdir)
    return workdir


def tiny_model_config(*overrides):
    return load_config(None, ["model.name=cnn", "model.image_size=8", "model.channels=1", "model.num_classes=4",
                              "model.widths=[8,16]", "model.blocks=[1,1]", *overrides]).model


def images(n, size=8, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((n, size, size, 1), np.float32))


@partial(jax.jit, static_argnames=("graphdef", "mode"))
def forward(graphdef, variables, x, key=None, mode="eval"):
    """Logits of `x` in train or eval mode, with dropout key `key` (None: no RNG), compiled (eager is much slower)."""
    model = nnx.merge(graphdef, variables)
    getattr(model, mode)()
    return model(x, rngs=None if key is None else nnx.Rngs(dropout=key))


def split_model(model_cfg):
    graphdef, variables = nnx.split(build_model(model_cfg, nnx.Rngs(0)))
    return graphdef, nnx.to_pure_dict(variables)


def test_trains_through_the_cli_above_chance(full_run):
    train_loss = {s: r["loss"] for s, r in records(full_run, "train").items()}
    held_out = records(full_run, "eval")
    assert sorted(train_loss) == list(range(1, 101)) and sorted(held_out) == [0, 100]
    first, last = np.mean([train_loss[s] for s in range(1, 6)]), np.mean([train_loss[s] for s in range(91, 101)])
    assert first > np.log(10) - 0.2 and last < first - 1.0, (first, last)     # starts at chance, falls
    assert held_out[0]["accuracy"] < 0.3                                       # 10 classes: chance is 0.1
    assert held_out[100]["accuracy"] > 0.6, held_out[100]                      # measured 0.89
    assert held_out[100]["loss"] < held_out[0]["loss"] - 1.0


def test_batch_norm_statistics_are_checkpointed_model_state_and_eval_uses_them(full_run):
    cfg = load_config(os.path.join(full_run, "config.yaml"))      # as the run saved it (model fields filled in)
    fresh, trained = prepare_state(cfg, restore=False), prepare_state(cfg)
    fresh.checkpointer.close()
    trained.checkpointer.close()
    assert trained.start_step == 100
    # every running mean and variance changed from its initial value (0 and 1) during training; each norm's
    # statistics moved clearly (a mean may stay near 0: the stem's zero-mean images through a bias-free conv)
    stats = jax.tree_util.tree_flatten_with_path(trained.state["model_state"])[0]
    initial = jax.tree.leaves(fresh.state["model_state"])
    assert len(stats) == 2 * 6  # stem, 2 per block, 1 projection: a mean and a var each
    moved: dict[str, float] = {}
    for (path, x), x0 in zip(stats, initial):
        x, x0 = np.asarray(x), np.asarray(x0)
        assert np.all(np.isfinite(x)) and not np.array_equal(x, x0), jax.tree_util.keystr(path)
        norm = jax.tree_util.keystr(path[:-1])
        moved[norm] = max(moved.get(norm, 0.0), float(np.max(np.abs(x - x0))))
    assert min(moved.values()) > 0.1, moved

    held_out = make_examples(cfg.data, class_textures(cfg.data), 32, split=1)["inputs"]
    a = jnp.asarray(held_out[:16])
    b = jnp.asarray(np.concatenate([held_out[:1], held_out[16:31]]))            # example 0 among other examples

    variables = merge_trees(trained.state["params"], trained.state["model_state"])
    eval_a, eval_b = (forward(trained.graphdef, variables, x) for x in (a, b))
    np.testing.assert_allclose(eval_a[0], eval_b[0], rtol=1e-5, atol=1e-5)  # eval: no dependence on the batch ...
    initial_stats = merge_trees(trained.state["params"], fresh.state["model_state"])
    assert np.max(np.abs(forward(trained.graphdef, initial_stats, a)[0] - eval_a[0])) > 1e-2  # ... running stats
    key = jax.random.key(0)                                                     # the same dropout mask for both
    train_a, train_b = (forward(trained.graphdef, variables, x, key, mode="train") for x in (a, b))
    assert np.max(np.abs(train_a[0] - train_b[0])) > 1e-3                     # train: batch statistics


def test_dropout_is_on_in_training_off_in_eval_and_follows_the_rng():
    graphdef, variables = split_model(tiny_model_config("model.dropout=0.5"))
    x = images(8)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    eval_out = forward(graphdef, variables, x)
    for key in (k1, k2):
        np.testing.assert_array_equal(forward(graphdef, variables, x, key), eval_out)  # eval: the key is ignored
    one, two = (forward(graphdef, variables, x, key, mode="train") for key in (k1, k2))
    assert np.max(np.abs(one - two)) > 1e-3                                     # train: the key draws the mask
    np.testing.assert_array_equal(forward(graphdef, variables, x, k1, mode="train"), one)
    with pytest.raises(ValueError, match="no `rngs`"):
        forward(graphdef, variables, x, mode="train")                           # train mode without RNG: refused

    # Through the core's train-mode loss: the step's dropout key changes the loss (and only dropout uses it);
    # the returned model state is the updated batch-norm statistics.
    batch = {"inputs": x, "labels": jnp.arange(8) % 4, "weights": jnp.ones(8)}
    for rate, differs in ((0.5, True), (0.0, False)):
        model_cfg = tiny_model_config(f"model.dropout={rate}")
        graphdef, params, model_state = nnx.split(build_model(model_cfg, nnx.Rngs(0)), nnx.Param, ...)
        params, model_state = nnx.to_pure_dict(params), nnx.to_pure_dict(model_state)
        loss_fn = jax.jit(make_loss_fn(graphdef, Classification()))
        (loss1, (_, new_state)), (loss2, _) = (loss_fn(params, model_state, batch, jax.random.key(k), {}) for k in (1, 2))
        assert (abs(float(loss1) - float(loss2)) > 1e-4) == differs, (rate, loss1, loss2)
        moved = [float(jnp.max(jnp.abs(n - o))) for n, o in zip(jax.tree.leaves(new_state), jax.tree.leaves(model_state))]
        assert min(moved) > 0


@pytest.mark.parametrize("residual", [True, False])
def test_plain_and_residual_networks_give_logits_per_image(residual):
    cfg = tiny_model_config(f"model.residual={str(residual).lower()}", "model.blocks=[2,1]")
    graphdef, variables = split_model(cfg)
    out = jax.eval_shape(lambda v, x: forward(graphdef, v, x), variables, jnp.zeros((2, 8, 8, 1)))
    assert out.shape == (2, 4) and out.dtype == jnp.float32
    # stem + 3 blocks (+ 1 projection where the width changes) convs, each followed by its batch norm
    convs = 1 + 3 * (2 if residual else 1) + (1 if residual else 0)
    assert len(jax.tree.leaves(abstract_model_split(cfg)[3])) == 2 * convs
    assert cfg.flops_per_example() > 0


def test_wrong_image_shape_is_refused_with_the_config_keys():
    graphdef, variables = split_model(tiny_model_config())
    with pytest.raises(ValueError, match=r"model.channels=1.*got shape \(2, 8, 8, 3\)"):
        jax.eval_shape(lambda v, x: forward(graphdef, v, x), variables, jnp.zeros((2, 8, 8, 3)))


def test_resume_equals_an_uninterrupted_run(full_run, tmp_path):
    """Two invocations of 50 steps (train.run_steps) vs the 100-step run: the same loss at every step, with dropout
    and batch norm on (dropout keys and data order from the checkpointed step, RNG and iterator position)."""
    cfg = load_config(RECIPE, [*SMALL, f"train.workdir={tmp_path / 'parts'}", "train.run_steps=50"])
    assert cfg.model.dropout > 0 and not os.path.exists(cfg.train.workdir)
    first = train(cfg)
    assert first["stopped_early"] and first["step"] == 50
    second = train(cfg)
    assert second["step"] == 100 and not second["stopped_early"]
    expected, got = records(full_run, "train"), records(cfg.train.workdir, "train")
    assert sorted(got) == list(range(1, 101))
    for step in range(1, 101):
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-6, abs=1e-7), step
    assert second["eval"]["loss"] == pytest.approx(records(full_run, "eval")[100]["loss"], rel=1e-6)


def test_same_losses_on_one_device_and_on_a_2x2x2_mesh(full_run, tmp_path):
    """4 steps (and the untrained held-out loss) on 8 simulated devices, data=2 × fsdp=2 × tensor=2, equal the
    1-device run's. Batch norm reduces its statistics over the global batch, so they match too."""
    flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    workdir = str(tmp_path / "mesh")
    stdout = run_cli(workdir, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.run_steps=4",
                     env={"XLA_FLAGS": flags})
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in stdout
    one, mesh = records(full_run, "train"), records(workdir, "train")
    assert sorted(mesh) == [1, 2, 3, 4]
    assert one[1]["loss"] > one[4]["loss"]  # the steps really trained
    assert [mesh[s]["loss"] for s in range(1, 5)] == pytest.approx([one[s]["loss"] for s in range(1, 5)], rel=1e-5)
    assert records(workdir, "eval")[0]["loss"] == pytest.approx(records(full_run, "eval")[0]["loss"], rel=1e-5)


def test_every_cnn_axis_is_in_the_rules_table():
    names = [name for name, _ in parallel.LOGICAL_RULES]
    assert len(names) == len(set(names))
    _, _, logical = abstract_model(tiny_model_config())
    used = {n for axes in jax.tree.leaves(logical, is_leaf=lambda n: isinstance(n, tuple)) for n in axes}
    assert used - {None} <= set(names), used - set(names)
    assert parallel.logical_to_spec(KERNEL_AXES) == P(None, None, "fsdp", "tensor")
    # batch-norm statistics are model state, not parameters (no optimizer, no gradient)
    _, params, _, state, _ = abstract_model_split(tiny_model_config())
    assert "mean" in state["stem_norm"] and "mean" not in params["stem_norm"]


@pytest.mark.parametrize("override, message", [
    ("model.dropout=-0.1", "model.dropout: must be in [0, 1), got -0.1"),
    ("model.blocks=[1]", "model.blocks: needs one entry per stage"),
    ("model.widths=[16,0]", "model.widths: every entry must be positive, got 0"),
    ("data.max_shift=-1", "data.max_shift: must be >= 0, got -1"),
])
def test_bad_values_are_config_errors_naming_the_key(override, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--config", RECIPE, override])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"config error: {message}")

"""Optimizers and schedules from config: each optimizer trains, schedules have the promised shape."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fastserve import parallel
from fastserve.config import ConfigError, load_config
from fastserve.core.optim import OPTIMIZERS, make_optimizer, make_schedule
from fastserve.core.state import create_train_state
from fastserve.core.steps import make_train_step, split_micro_batches
from fastserve.tasks import make_task


def test_warmup_then_cosine_and_linear_decay():
    cfg = load_config(None, ["optimizer.learning_rate=1.0", "optimizer.warmup_steps=10", "optimizer.min_lr_ratio=0.1"]).optimizer
    cosine = make_schedule(cfg, total_steps=110)
    assert float(cosine(0)) == 0.0 and float(cosine(5)) == pytest.approx(0.5)
    assert float(cosine(10)) == pytest.approx(1.0)
    assert float(cosine(60)) == pytest.approx(0.55, abs=1e-3)      # halfway down the cosine: (1 + 0.1) / 2
    assert float(cosine(110)) == pytest.approx(0.1)
    linear = make_schedule(load_config(None, ["optimizer.learning_rate=1.0", "optimizer.warmup_steps=10",
                                              "optimizer.schedule=linear"]).optimizer, 110)
    assert float(linear(60)) == pytest.approx(0.55) and float(linear(110)) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="optimizer.schedule: unknown schedule 'cosin'; did you mean 'cosine'"):
        load_config(None, ["optimizer.schedule=cosin"])
    with pytest.raises(ValueError, match="unknown optimizer.schedule 'cosin'"):  # built from code, not a config
        make_schedule(dataclasses.replace(load_config(None).optimizer, schedule="cosin"), 10)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_lowers_the_loss(name):
    lr = {"sgd": 0.5, "adafactor": 0.05}.get(name, 1e-2)
    cfg = load_config(None, ["model.vocab_size=64", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
                             "model.d_ff=64", f"optimizer.name={name}", f"optimizer.learning_rate={lr}",
                             "optimizer.warmup_steps=0", "optimizer.schedule=constant", "mesh.data=1"])
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
    tx, schedule = make_optimizer(cfg.optimizer, 10)
    graphdef, state, shardings = create_train_state(cfg.model, tx, mesh, seed=0)
    step = make_train_step(graphdef, make_task("lm"), tx, schedule, shardings, mesh)
    tokens = np.random.default_rng(0).integers(0, 64, (4, 17)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((4, 16), np.float32)}
    losses = []
    for _ in range(6):
        state, m = step(state, parallel.host_to_global(split_micro_batches(batch, 1), mesh, leading=1), {})
        losses.append(float(m["loss_sum"] / m["weight"]))
    assert losses[-1] < losses[0] - 0.05, losses


def test_unknown_optimizer_is_named():
    with pytest.raises(ConfigError, match="optimizer.name: unknown optimizer 'adamx'.*adamw"):
        load_config(None, ["optimizer.name=adamx"])
    with pytest.raises(ValueError, match="unknown optimizer.name 'adamx'.*adamw"):  # built from code
        make_optimizer(dataclasses.replace(load_config(None).optimizer, name="adamx"), 10)


def test_adafactor_is_optax_adafactor_with_weight_decay_scaled_by_the_learning_rate():
    cfg = dataclasses.replace(load_config(None).optimizer, name="adafactor", learning_rate=1e-3, warmup_steps=0,
                              schedule="constant", clip_norm=0.0)
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(256, 192)), jnp.float32), "b": jnp.ones((192,), jnp.float32)}
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    ours, _ = make_optimizer(dataclasses.replace(cfg, weight_decay=0.0), 10)
    reference = optax.adafactor(1e-3)
    state_a, state_b = ours.init(params), reference.init(params)
    for _ in range(3):
        upd_a, state_a = ours.update(grads, state_a, params)
        upd_b, state_b = reference.update(grads, state_b, params)
        for a, b in zip(jax.tree.leaves(upd_a), jax.tree.leaves(upd_b)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    # decay: with a zero gradient a matrix moves by -lr × weight_decay × param (AdamW's convention), a vector not at all
    decayed, _ = make_optimizer(dataclasses.replace(cfg, weight_decay=0.1), 10)
    zero = jax.tree.map(jnp.zeros_like, params)
    upd, _ = decayed.update(zero, decayed.init(params), params)
    np.testing.assert_allclose(upd["w"], -1e-3 * 0.1 * params["w"], rtol=1e-6)
    np.testing.assert_array_equal(upd["b"], 0.0)

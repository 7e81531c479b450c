"""The optimizer of a scanned decoder (stacked block weights [L, ...]) is the per-layer model's optimizer: it runs per
layer on the stacked leaves (fastserve.core.optim.per_layer), so scanned and per-layer runs reach the same weights
and optimizer state, and that state converts between the layouts when a run resumes with the other one."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fastserve.config import load_config
from fastserve.core.optim import OPTIMIZERS, make_optimizer
from fastserve.models.decoder import DecoderConfig
from fastserve.models.layer_stack import layer_axes, stack_layers, unstack_layers

# d_model and d_ff >= 128: adafactor factors a kernel's second moment only when two of its dims reach 128
SHAPE = dict(vocab_size=64, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=32)
# without per_layer these mix the layers: adafactor's per-tensor RMS statistics, and the matrices-only weight-decay
# mask of adamw / lion, which takes a stacked norm scale [L, d] for a matrix. adam and sgd are elementwise.
MIXES_LAYERS = {"adafactor", "adamw", "lion"}


def _close(a, b, rtol=1e-5, atol=1e-7):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


def _steps(tx, params, grads, state=None):
    """`tx.init` (unless a state is given), then one update per step of `grads` (leaves [steps, ...]); to be traced."""
    def step(carry, g):
        params, state = carry
        updates, state = tx.update(g, state, params)
        return (optax.apply_updates(params, updates), state), None
    (params, state), _ = jax.lax.scan(step, (params, tx.init(params) if state is None else state), grads)
    return params, state


def _over_steps(per_step):
    return jax.tree.map(lambda *g: np.stack(g), *per_step)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_scanned_optimizer_is_the_per_layer_one(name):
    cfg = dataclasses.replace(load_config(None, [f"optimizer.name={name}", "optimizer.weight_decay=0.1",
                                                 "optimizer.momentum=0.9", "optimizer.warmup_steps=0"]).optimizer,
                              learning_rate=0.05 if name == "adafactor" else 1e-2)
    per_layer_cfg = DecoderConfig(**SHAPE, scan_layers=False)
    # the per-layer decoder's parameter tree, filled without tracing its init (a compile per op is seconds here);
    # weights and gradients of a different scale per tensor, so that statistics of a stack differ from each layer's
    rng = np.random.default_rng(1)
    random = lambda x: (rng.standard_normal(x.shape) * 3.0 ** rng.integers(-2, 3)).astype(np.float32)  # noqa: E731
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: per_layer_cfg.build(nnx.Rngs(0))), nnx.Param))
    params = jax.tree.map(lambda x: 0.05 * random(x), abstract)
    grads = [jax.tree.map(random, abstract) for _ in range(3)]

    txs = [make_optimizer(cfg, 10, per_layer_cfg)[0], make_optimizer(cfg, 10, DecoderConfig(**SHAPE))[0],
           make_optimizer(cfg, 10)[0]]   # per-layer; scanned (per_layer); the same chain on the stacked leaves whole
    stacked_params, stacked_grads = stack_layers(params), _over_steps([stack_layers(g) for g in grads])
    (ref_params, ref_state), (got_params, got_state), (plain_params, _) = jax.device_get(jax.jit(lambda: (
        _steps(txs[0], params, _over_steps(grads)), _steps(txs[1], stacked_params, stacked_grads),
        _steps(txs[2], stacked_params, stacked_grads)))())   # one program: one compile
    assert 0 in jax.tree.leaves(layer_axes(got_state))                       # the moments really are stacked
    _close(unstack_layers(got_params), ref_params)
    # the state is the per-layer state, stacked: a checkpoint converts as the params do (core/setup.py on resume)
    assert jax.tree.structure(got_state) == jax.tree.structure(stack_layers(ref_state))
    _close(unstack_layers(got_state), ref_state)
    _close(got_state, stack_layers(ref_state))

    # without per_layer: equal only where the optimizer is elementwise
    gap = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(unstack_layers(plain_params)),
                                                            jax.tree.leaves(ref_params)))
    if name in MIXES_LAYERS:
        assert gap > 1e-4, gap
    else:
        assert gap < 1e-6, gap


def test_training_steps_a_scanned_adafactor_run_per_layer_and_resumes_it_per_layer(tmp_path):
    """The trainer's set-up (core/setup.py) builds the per-layer optimizer for a scanned model, and its adafactor
    state, saved stacked, resumes per-layer (factored row / column moments unstacked with the weights). Gradients
    themselves are equal in both layouts (tests/test_scan_layers.py); random ones stand in for them here."""
    from fastserve.core.setup import prepare_state
    from fastserve.models.layer_stack import per_layer_config
    shape = [f"model.{k}={v}" for k, v in SHAPE.items()]
    base = [*shape, "mesh.data=1", "checkpoint.async_save=false", "optimizer.name=adafactor",
            "optimizer.learning_rate=0.05", "optimizer.warmup_steps=0", f"train.workdir={tmp_path}"]
    cfg = load_config(None, [*base, "model.scan_layers=true"])
    setup = prepare_state(cfg)
    rng = np.random.default_rng(2)
    grads = [jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), setup.state["params"])
             for _ in range(2)]
    per_layer_tx, _ = make_optimizer(cfg.optimizer, cfg.train.steps, per_layer_config(cfg.model))
    (params, opt_state), (ref_params, ref_state) = jax.device_get(jax.jit(lambda state: (
        _steps(setup.tx, state["params"], _over_steps(grads), state["opt_state"]),
        _steps(per_layer_tx, unstack_layers(state["params"]), _over_steps(map(unstack_layers, grads)))))(setup.state))
    _close(unstack_layers(params), ref_params)
    setup.checkpointer.save(2, {**setup.state, "step": jnp.int32(2), "params": params, "opt_state": opt_state},
                            {"data": {"epoch": 0, "index": 2}})
    setup.checkpointer.close()

    resumed = prepare_state(load_config(None, [*base, "model.scan_layers=false"]))
    resumed.checkpointer.close()
    assert resumed.start_step == 2 and 0 in resumed.state["params"]["layers"]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state["opt_state"]),
                 jax.device_get(unstack_layers(opt_state)))
    _close(jax.device_get(resumed.state["opt_state"]), ref_state)


def test_a_transform_that_mixes_leaves_fails_instead_of_mixing_layers():
    from fastserve.core.optim import per_layer
    params = {"embed": np.ones((4, 3), np.float32), "layers": {"mlp": {"kernel": np.ones((2, 3, 3), np.float32)}}}
    tx = per_layer(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1)))   # a norm over every leaf
    with pytest.raises(ValueError, match="out_axes"):
        tx.update(params, tx.init(params), params)

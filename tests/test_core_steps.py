"""The one core's train step on 1 device: gradient accumulation equals one large batch, remat changes nothing,
bfloat16 compute trains with float32 parameters, and the CPU matmul's custom backward equals plain autodiff.
(Adafactor on a 2-axis mesh is checked in the 8-device subprocess: tests/sharding_check.py, test_sharding.py.)"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fastserve import parallel
from fastserve.config import load_config
from fastserve.core.optim import make_optimizer
from fastserve.core.state import create_train_state, merge_trees
from fastserve.core.steps import make_loss_fn, make_train_step, split_micro_batches
from fastserve.models.layers import matmul
from fastserve.tasks import make_task

VOCAB = 64
SMALL = ["model.vocab_size=64", "model.d_model=32", "model.n_layers=1", "model.n_heads=4", "model.n_kv_heads=2",
         "model.d_ff=64", "model.max_seq_len=32", "data.seq_len=16", "model.tie_embeddings=false", "mesh.data=1",
         "optimizer.warmup_steps=0", "optimizer.schedule=constant"]


def make_run(*overrides):
    cfg = load_config(None, [*SMALL, *overrides])
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
    tx, schedule = make_optimizer(cfg.optimizer, 100)
    graphdef, state, shardings = create_train_state(cfg.model, tx, mesh, seed=0)
    return cfg, mesh, tx, schedule, graphdef, state, shardings


def lm_batch(b=8, t=16, seed=0, pattern=False):
    rng = np.random.default_rng(seed)
    if pattern:   # learnable: each row counts up by a row-specific stride
        start, stride = rng.integers(0, VOCAB, (b, 1)), rng.integers(1, 4, (b, 1))
        tokens = ((start + stride * np.arange(t + 1)) % VOCAB).astype(np.int32)
    else:
        tokens = rng.integers(0, VOCAB, (b, t + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((b, t), np.float32)}


def f64(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(tree))


# ------------------------------------------------------------------------------------- gradient accumulation

def test_gradient_accumulation_equals_one_step_over_the_whole_batch():
    """SGD (update = -lr·g, so params expose the gradient itself) on a batch whose rows count unequal tokens:
    k=1 and k=2 micro-batches give the params of one plain-autodiff step on the mean loss over every token."""
    lr = 1.0
    cfg, mesh, tx, schedule, graphdef, state, shardings = make_run(
        "optimizer.name=sgd", f"optimizer.learning_rate={lr}", "optimizer.clip_norm=0")
    batch = lm_batch()
    # unequal tokens per micro-batch: the first half of the rows (micro-batch 0 at k=2) keeps only 4 of 16
    batch["weights"][:4, 4:] = 0.0
    n_tokens = float(batch["weights"].sum())
    params0 = f64(state["params"])

    # reference, independent of the step: the gradient of the token-mean cross-entropy over all 8 rows
    def mean_loss(params):
        logits, _ = nnx.merge(graphdef, params)(jnp.asarray(batch["inputs"]))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(batch["targets"]))
        return jnp.sum(ce * batch["weights"]) / n_tokens
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(mean_loss))(state["params"])
    want = jax.tree.map(lambda p, g: p - lr * g, params0, f64(ref_grads))
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(f64(ref_grads))) > 1e-3  # a real gradient

    step = make_train_step(graphdef, make_task("lm"), tx, schedule, shardings, mesh)
    results = {}
    for k in (1, 2):
        fresh = jax.tree.map(jnp.copy, state)   # the step donates its state
        new, metrics = step(fresh, split_micro_batches(batch, k), {})
        results[k] = (f64(new["params"]), jax.device_get(metrics))
        assert int(new["step"]) == 1

    for k, (params, metrics) in results.items():
        assert float(metrics["weight"]) == n_tokens
        assert float(metrics["loss_sum"]) / n_tokens == pytest.approx(float(ref_loss), rel=1e-5), k
        flat_got = jax.tree_util.tree_leaves_with_path(params)
        for (path, got), w in zip(flat_got, jax.tree.leaves(want)):
            np.testing.assert_allclose(got, w, atol=1e-5, rtol=0, err_msg=f"k={k} {jax.tree_util.keystr(path)}")
    (p1, m1), (p2, m2) = results[1], results[2]
    for key in ("loss_sum", "weight", "correct", "grad_norm"):
        assert float(m2[key]) == pytest.approx(float(m1[key]), rel=1e-5), key
    assert float(m1["grad_norm"]) == pytest.approx(float(optax.global_norm(ref_grads)), rel=1e-5)


def test_micro_batch_split_refuses_an_uneven_batch():
    with pytest.raises(ValueError, match="batch of 8 does not divide into train.grad_accum=3"):
        split_micro_batches(lm_batch(), 3)


# ------------------------------------------------------------------------------------------------- remat

def test_remat_gives_the_same_loss_and_gradients():
    batch = lm_batch(b=4)
    task = make_task("lm")
    out = {}
    for remat in (False, True):
        cfg, mesh, tx, schedule, graphdef, state, _ = make_run(f"model.remat={str(remat).lower()}")
        loss_grad = jax.value_and_grad(make_loss_fn(graphdef, task), has_aux=True)
        args = (state["params"], state["model_state"], batch, jax.random.key(0), {})
        # remat must really be in the program (else this test compares a model with itself)
        jaxpr = str(jax.make_jaxpr(loss_grad)(*args))
        assert bool(re.search(r"\b(remat\w*|checkpoint)\[", jaxpr)) == remat
        (loss, (sums, _)), grads = jax.jit(loss_grad)(*args)
        out[remat] = (f64(state["params"]), float(loss), f64(grads))
    (p0, l0, g0), (p1, l1, g1) = out[False], out[True]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)))  # same init
    assert l1 == pytest.approx(l0, rel=1e-5)
    assert jax.tree.structure(g0) == jax.tree.structure(g1)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------------------------- bfloat16

def test_bfloat16_compute_trains_with_float32_params():
    cfg, mesh, tx, schedule, graphdef, state, shardings = make_run("model.dtype=bfloat16", "optimizer.learning_rate=1e-2")
    batch = lm_batch(pattern=True)
    # the compute really is bfloat16 (activations), the parameters float32
    model = nnx.merge(graphdef, merge_trees(state["params"], state["model_state"]))
    assert model.embed(jnp.asarray(batch["inputs"])).dtype == jnp.bfloat16
    assert model.block(0).mlp.gate(jnp.ones((1, 32), jnp.bfloat16)).dtype == jnp.bfloat16
    step = make_train_step(graphdef, make_task("lm"), tx, schedule, shardings, mesh)
    losses = []
    for _ in range(20):
        state, m = step(state, split_micro_batches(batch, 1), {})
        losses.append(float(m["loss_sum"] / m["weight"]))
    assert all(np.isfinite(losses)), losses
    assert losses[0] == pytest.approx(np.log(VOCAB), rel=0.1)        # starts near chance
    assert losses[-1] < 0.25 * losses[0], losses                      # and learns the counting pattern (≈ 4.2 → 0.3)
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(state["opt_state"]) if jnp.ndim(x)} == {jnp.dtype(jnp.float32)}


# --------------------------------------------------------------------------------------- custom matmul VJP

SHAPES = [((8,), 5), ((6, 8), 3), ((2, 5, 8), 6), ((1, 1, 16), 16), ((2, 3, 4, 8), 7)]


@jax.jit
def _both_vjps(cases):
    """For each (x, w, dy): (y, x̄, w̄) of the custom matmul and of plain jnp.dot, and the gradients of a scalar
    loss through each — all in one program (one compile for every case)."""
    out = []
    for x, w, dy in cases:
        y, vjp = jax.vjp(matmul, x, w)
        y_ref, vjp_ref = jax.vjp(jnp.dot, x, w)
        loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)) * dy)
        out.append({"y": (y, y_ref), "vjp": (vjp(dy), vjp_ref(dy)),
                    "grad": (jax.grad(loss(matmul), (0, 1))(x, w), jax.grad(loss(jnp.dot), (0, 1))(x, w))})
    return out


def test_custom_matmul_vjp_equals_autodiff_of_dot():
    rng = np.random.default_rng(0)
    cases, names = [], []
    for dtype in (np.float32, jnp.bfloat16):
        for x_shape, n_out in SHAPES:
            x, w = rng.standard_normal(x_shape), rng.standard_normal((x_shape[-1], n_out))
            dy = rng.standard_normal(x_shape[:-1] + (n_out,))
            cases.append(tuple(jnp.asarray(a, dtype) for a in (x, w, dy)))
            names.append(f"x{x_shape} w{w.shape} {jnp.dtype(dtype).name}")
    results = _both_vjps(cases)
    for name, (x, w, _), r in zip(names, cases, results):
        tol = 1e-5 if x.dtype == jnp.float32 else 2e-2
        np.testing.assert_allclose(*(np.asarray(a, np.float32) for a in r["y"]), rtol=tol, atol=tol, err_msg=name)
        for kind in ("vjp", "grad"):
            got, want = r[kind]
            for i, (g, ref, primal) in enumerate(zip(got, want, (x, w))):
                # both cotangents: the primal's shape and dtype (bfloat16 stays bfloat16), autodiff's values
                assert g.shape == ref.shape == primal.shape and g.dtype == ref.dtype == primal.dtype, (name, kind, i)
                np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(ref, np.float32), rtol=tol,
                                           atol=tol * max(1.0, float(np.abs(np.asarray(ref, np.float32)).max())),
                                           err_msg=f"{name} {kind} {'xw'[i]}̄")

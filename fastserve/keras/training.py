"""What `Sequential.fit` adds to the core's train step: Keras's class weights, a learning rate that callbacks set
between epochs without recompiling, and the export of `predict` as a `forward` artifact."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax


# ----------------------------------------------------------------------------------------- learning rate

def with_lr_multiplier(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` followed by a scale held in the optimizer state (1.0 at the start): setting it changes the learning
    rate of the compiled step (the state is an argument, never a constant), and it is saved with the state."""
    return optax.chain(tx, optax.inject_hyperparams(optax.scale)(step_size=1.0))


def lr_multiplier(opt_state: Any) -> float:
    return float(jax.device_get(opt_state[-1].hyperparams["step_size"]))


def set_lr_multiplier(opt_state: Any, value: float) -> Any:
    """`opt_state` with the multiplier replaced (same dtype and sharding)."""
    last = opt_state[-1]
    old = last.hyperparams["step_size"]
    new = jax.device_put(jnp.asarray(value, old.dtype), old.sharding)
    return (*opt_state[:-1], last._replace(hyperparams={**last.hyperparams, "step_size": new}))


# ------------------------------------------------------------------------------------------- class weights

def class_weight_vector(class_weight: Mapping[int, float], y: np.ndarray, n_outputs: int) -> np.ndarray:
    """Per-example weights [N] from Keras's `class_weight` {class index: weight}: the class is the label id
    (sparse labels), the argmax of a one-hot row, or 0/1 for a binary target. Classes missing from the mapping
    weigh 1, as in Keras."""
    if not isinstance(class_weight, Mapping) or not class_weight:
        raise ValueError(f"class_weight must be a non-empty dict {{class index: weight}}, got {class_weight!r}")
    for k, w in class_weight.items():
        if not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"class_weight keys must be class indices (ints >= 0), got {k!r}")
        if not np.isfinite(w) or w < 0:
            raise ValueError(f"class_weight[{k}] must be a finite weight >= 0, got {w!r}")
    if y.ndim >= 2 and y.shape[-1] > 1:
        ids = np.argmax(y.reshape(len(y), -1, y.shape[-1])[:, 0], axis=-1)   # one-hot rows
    else:
        ids = np.rint(y.reshape(len(y), -1)[:, 0]).astype(np.int64)          # ids, or a 0/1 target
    top = max(int(ids.max()) + 1 if len(ids) else 0, n_outputs if n_outputs > 1 else 2)
    big = [k for k in class_weight if k >= top]
    if big:
        raise ValueError(f"class_weight names class {big[0]}, but the labels have classes 0..{top - 1}")
    table = np.ones(top, np.float32)
    for k, w in class_weight.items():
        table[int(k)] = w
    return table[ids]


# ------------------------------------------------------------------------------------------------ export

def export_predict(model: Any, out_dir: str, batch_sizes: tuple[int, ...] = ()) -> dict[str, Any]:
    """Writes `model.predict` as a `forward` export (StableHLO + weights + manifest) that
    `fastserve.load_exported(out_dir)` runs without the model code; its outputs are `predict`'s (the final
    activation applied). `batch_sizes`: fixed batch variants (empty: one symbolic batch). Returns the manifest."""
    from fastserve.artifacts.options import ExportOptions
    from fastserve.artifacts.writer import export_params

    cfg = dataclasses.replace(model.config, activate_outputs=True)
    variables = jax.device_get(model._variables())
    return export_params(cfg, variables, None, out_dir, ExportOptions(batch_sizes=tuple(batch_sizes)),
                         source={"kind": "keras", "name": model.name})


# ---------------------------------------------------------------------------------------- whole epochs

RESIDENT_BYTES = 1 << 30   # training arrays up to this size stay on the devices for a whole fit


def make_epoch_runner(train_step: Any, state_shardings: Any, mesh: Any) -> Any:
    """A jitted (state, x, y, order [S, B], weights [S, B], sample_weights [S, B] | None) → (state, summed
    metrics) that runs S steps of the core's `train_step` in one `lax.scan` over device-resident x, y (replicated;
    each step's rows are gathered on the devices and constrained to the batch sharding, so a mesh still runs data
    parallel). One dispatch per epoch instead of a host→device copy and a dispatch per step."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from fastserve import parallel

    rep = parallel.replicated(mesh)
    batch_axis = parallel.logical_to_spec(("batch",))[0]

    def constrain(a):
        return jax.lax.with_sharding_constraint(a[None], NamedSharding(mesh, P(None, batch_axis)))

    def run(state, x, y, order, weights, sample_weights):
        def body(state, step):
            rows, w, sw = step
            batch = {"inputs": x[rows], "labels": y[rows], "weights": w}
            if sample_weights is not None:
                batch["sample_weights"] = sw
            state, metrics = train_step(state, jax.tree.map(constrain, batch), {})
            return state, {k: v for k, v in metrics.items() if k not in ("grad_norm", "learning_rate")}
        steps = (order, weights, weights if sample_weights is None else sample_weights)
        state, per_step = jax.lax.scan(body, state, steps)
        return state, jax.tree.map(lambda v: v.sum(axis=0), per_step)

    return jax.jit(run, in_shardings=(state_shardings, rep, rep, rep, rep, rep), out_shardings=(state_shardings, rep),
                   donate_argnums=0)


def epoch_plan(order: np.ndarray, batch: int, pad_to: int, sample_weights: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(rows [S, pad_to], weights [S, pad_to], sample weights [S, pad_to] | None) for one epoch in `order`: batches
    of `batch` examples, each padded to `pad_to` rows of weight 0 (the last one holds the remainder)."""
    steps = -(-len(order) // batch)
    rows = np.zeros((steps, pad_to), np.int32)
    weights = np.zeros((steps, pad_to), np.float32)
    for s in range(steps):
        chunk = order[s * batch:(s + 1) * batch]
        rows[s, :len(chunk)] = chunk
        weights[s, :len(chunk)] = 1.0
    sw = None if sample_weights is None else sample_weights[rows] * weights
    return rows, weights, sw

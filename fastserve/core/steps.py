"""The one core: jitted, sharded train and eval steps for any task and any model family.

One signature for every task: `train_step(state, batch, task_state) -> (state, metrics)` and
`eval_step(variables, batch, task_state) -> metric sums`; `task_state` is a pytree (`{}` for most tasks; a
distillation teacher's weights) passed as a jit argument, never baked in as constants.

The train step takes its batch as [grad_accum, micro_batch, ...]: micro-batches run in a `lax.scan`; gradients
and metric sums accumulate and the model state (batch-norm statistics) threads through them in order; the update
uses the gradient of the mean loss over every counted unit of the whole batch, so accumulation equals one large
batch up to rounding. The model runs in train mode with dropout streams derived from (state.rng, step,
micro-batch), so a resumed run draws the same masks; the eval step runs it in eval mode without RNG.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fastserve import parallel
from fastserve.core.state import TrainState, merge_trees
from fastserve.tasks.base import Task


def _tree_add(a: Any, b: Any) -> Any:
    return jax.tree.map(jnp.add, a, b)


def make_loss_fn(graphdef: nnx.GraphDef, task: Task) -> Callable[..., Any]:
    """(params, model_state, batch, rng, task_state) → (loss sum, (metric sums, new model_state)), in train mode."""

    def loss_fn(params, model_state, batch, rng, task_state):
        model = nnx.merge(graphdef, merge_trees(params, model_state))
        model.train()
        loss_sum, sums = task.loss(model, batch, nnx.Rngs(dropout=rng), task_state)
        new_model_state = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))) if model_state else model_state
        return loss_sum, (sums, new_model_state)

    return loss_fn


def make_train_step(graphdef: nnx.GraphDef, task: Task, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    state_shardings: Any, mesh: Mesh, task_state_shardings: Any = None
                    ) -> Callable[..., tuple[TrainState, dict]]:
    """(state, batch[accum, micro, ...], task_state) → (new state, metrics). The state is donated; no gradient
    flows to task_state."""
    grad_fn = jax.value_and_grad(make_loss_fn(graphdef, task), has_aux=True)

    def train_step(state, batch, task_state):
        params = state["params"]
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        micro = jax.tree.map(lambda x: x[0], batch)
        (_, (sums, model_state)), grads = grad_fn(params, state["model_state"], micro, jax.random.fold_in(rng, 0),
                                                  task_state)
        n_micro = jax.tree.leaves(batch)[0].shape[0]
        if n_micro > 1:
            def accumulate(carry, xs):
                grads, sums, model_state = carry
                mb, i = xs
                (_, (s, model_state)), g = grad_fn(params, model_state, mb, jax.random.fold_in(rng, i), task_state)
                return (_tree_add(grads, g), _tree_add(sums, s), model_state), None
            rest = jax.tree.map(lambda x: x[1:], batch)
            (grads, sums, model_state), _ = jax.lax.scan(accumulate, (grads, sums, model_state),
                                                         (rest, jnp.arange(1, n_micro)))
        weight = jnp.maximum(sums["weight"], 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                     "model_state": model_state, "opt_state": opt_state, "rng": state["rng"]}
        metrics = dict(sums, grad_norm=optax.global_norm(grads), learning_rate=schedule(state["step"]))
        return new_state, metrics

    batch_sharding = NamedSharding(mesh, P(None, parallel.logical_to_spec(("batch",))[0]))
    task_shardings = task_state_shardings if task_state_shardings is not None else {}
    return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding, task_shardings),
                   out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=0)


def make_eval_step(graphdef: nnx.GraphDef, task: Task, variable_shardings: Any, mesh: Mesh,
                   task_state_shardings: Any = None) -> Callable[..., dict]:
    """(variables, batch[B, ...], task_state) → metric sums for that batch, the model in eval mode.
    `variables` is params ∪ model state (`merge_trees(state["params"], state["model_state"])`)."""

    def eval_step(variables, batch, task_state):
        model = nnx.merge(graphdef, variables)
        model.eval()
        _, sums = task.loss(model, batch, None, task_state)
        return sums

    task_shardings = task_state_shardings if task_state_shardings is not None else {}
    return jax.jit(eval_step, in_shardings=(variable_shardings, parallel.batch_sharding(mesh, 1), task_shardings),
                   out_shardings=parallel.replicated(mesh))


def split_micro_batches(batch: dict, grad_accum: int) -> dict:
    """Host-side reshape [B, ...] → [grad_accum, B / grad_accum, ...]."""
    def split(x):
        if x.shape[0] % grad_accum:
            raise ValueError(f"the per-host batch of {x.shape[0]} does not divide into train.grad_accum={grad_accum} micro-batches")
        return x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])
    return {k: split(v) for k, v in batch.items()}

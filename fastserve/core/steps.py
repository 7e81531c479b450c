"""The one core: jitted, sharded train and eval steps for any task.

A step is a pure function of (state, batch). The train step takes its batch as [grad_accum, micro_batch, ...]:
micro-batches run in a `lax.scan`, gradients and metric sums accumulate, and the update uses the gradient of the
mean loss over every counted token of the whole batch (so accumulation equals one large batch, up to rounding).

A task that needs extra inputs (distillation: the teacher's params) gets them as `task_state`: pass its shardings
as `task_state_shardings` and the compiled step takes it as a third argument, `(state, batch, task_state)`, so the
pytree is a jit argument (sharded, not baked into the program as constants) and reaches `task.loss(..., task_state)`.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fastserve import parallel
from fastserve.core.state import TrainState
from fastserve.tasks import Task


def _tree_add(a: Any, b: Any) -> Any:
    return jax.tree.map(jnp.add, a, b)


def _task_loss(task: Task, graphdef: nnx.GraphDef, params: Any, batch: dict, rng: Any, task_state: Any) -> Any:
    model = nnx.merge(graphdef, params)
    if task_state is None:  # tasks without extra inputs keep their 3-argument `loss`
        return task.loss(model, batch, rng)
    return task.loss(model, batch, rng, task_state)


def make_train_step(graphdef: nnx.GraphDef, task: Task, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    state_shardings: Any, mesh: Mesh, task_state_shardings: Any = None
                    ) -> Callable[..., tuple[TrainState, dict]]:
    """(state, batch[accum, micro, ...]) → (new state, metrics). The state is donated.

    With `task_state_shardings`: (state, batch, task_state) → (new state, metrics); no gradient flows to task_state.
    """

    def loss_fn(params, batch, rng, task_state):
        return _task_loss(task, graphdef, params, batch, rng, task_state)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, batch, task_state=None):
        params = state["params"]
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        micro = jax.tree.map(lambda x: x[0], batch)
        (_, sums), grads = grad_fn(params, micro, jax.random.fold_in(rng, 0), task_state)
        n_micro = jax.tree.leaves(batch)[0].shape[0]
        if n_micro > 1:
            def accumulate(carry, xs):
                mb, i = xs
                (_, s), g = grad_fn(params, mb, jax.random.fold_in(rng, i), task_state)
                return (_tree_add(carry[0], g), _tree_add(carry[1], s)), None
            rest = jax.tree.map(lambda x: x[1:], batch)
            (grads, sums), _ = jax.lax.scan(accumulate, (grads, sums), (rest, jnp.arange(1, n_micro)))
        weight = jnp.maximum(sums["weight"], 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state, "rng": state["rng"]}
        metrics = dict(sums, grad_norm=optax.global_norm(grads), learning_rate=schedule(state["step"]))
        return new_state, metrics

    batch_sharding = NamedSharding(mesh, P(None, parallel.logical_to_spec(("batch",))[0]))
    out_shardings = (state_shardings, parallel.replicated(mesh))
    if task_state_shardings is None:
        return jax.jit(lambda state, batch: train_step(state, batch), in_shardings=(state_shardings, batch_sharding),
                       out_shardings=out_shardings, donate_argnums=0)
    return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding, task_state_shardings),
                   out_shardings=out_shardings, donate_argnums=0)


def make_eval_step(graphdef: nnx.GraphDef, task: Task, param_shardings: Any, mesh: Mesh,
                   task_state_shardings: Any = None) -> Callable[..., dict]:
    """(params, batch[B, ...]) → metric sums for that batch; (params, batch, task_state) with `task_state_shardings`."""

    def eval_step(params, batch, task_state=None):
        _, sums = _task_loss(task, graphdef, params, batch, None, task_state)
        return sums

    in_shardings = (param_shardings, parallel.batch_sharding(mesh, 1))
    if task_state_shardings is None:
        return jax.jit(lambda params, batch: eval_step(params, batch), in_shardings=in_shardings,
                       out_shardings=parallel.replicated(mesh))
    return jax.jit(eval_step, in_shardings=(*in_shardings, task_state_shardings),
                   out_shardings=parallel.replicated(mesh))


def split_micro_batches(batch: dict, grad_accum: int) -> dict:
    """Host-side reshape [B, ...] → [grad_accum, B / grad_accum, ...]."""
    def split(x):
        if x.shape[0] % grad_accum:
            raise ValueError(f"the per-host batch of {x.shape[0]} does not divide into train.grad_accum={grad_accum} micro-batches")
        return x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])
    return {k: split(v) for k, v in batch.items()}

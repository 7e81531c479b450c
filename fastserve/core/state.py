"""The train state — a plain dict pytree {step, params, opt_state, rng} — created directly in its shardings.

Parameters are kept as a *pure* nested dict of arrays (`nnx.to_pure_dict`): checkpoints, parameter transforms,
importers and exports all address weights by path; `nnx.merge(graphdef, params)` rebuilds the module inside a step.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from fastserve import parallel
from fastserve.models import build_model

TrainState = dict[str, Any]


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def abstract_model(model_cfg: Any) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, abstract params, logical axes) without allocating any weight."""
    model = nnx.eval_shape(lambda: build_model(model_cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    logical = jax.tree.map(lambda v: v.get_metadata().get("out_sharding"), state, is_leaf=_is_variable)
    params, logical = nnx.to_pure_dict(state), nnx.to_pure_dict(logical)
    missing = [jax.tree_util.keystr(p) for p, a in jax.tree_util.tree_flatten_with_path(logical, is_leaf=lambda n: n is None or isinstance(n, tuple))[0] if a is None]
    if missing:
        raise ValueError(f"parameters without logical axes (every parameter must name them): {missing}")
    return graphdef, params, logical


def init_params(model_cfg: Any, mesh: Mesh, seed: int) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, params placed on the mesh, param shardings): each device initializes only its own shard."""
    graphdef, abstract, logical = abstract_model(model_cfg)
    shardings = parallel.tree_shardings(mesh, abstract, logical)

    def init():
        return nnx.to_pure_dict(nnx.state(build_model(model_cfg, nnx.Rngs(seed))))

    with jax.set_mesh(mesh):
        params = jax.jit(init, out_shardings=shardings)()
    return graphdef, params, shardings


def opt_state_shardings(tx: optax.GradientTransformation, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Optimizer moments shard like their parameters; scalars (counters) and factored statistics whose shape
    differs from the parameter's (adafactor's row/column moments, a vector per matrix) are replicated."""
    abstract = jax.eval_shape(tx.init, params)
    rep = parallel.replicated(mesh)
    return optax.tree_map_params(tx, lambda leaf, p, s: s if leaf.shape == p.shape else rep, abstract, params,
                                 param_shardings, transform_non_params=lambda _: rep)


def create_train_state(model_cfg: Any, tx: optax.GradientTransformation, mesh: Mesh, seed: int) -> tuple[nnx.GraphDef, TrainState, Any]:
    """(graphdef, state, state shardings) for a fresh run."""
    int8_layers = [path for path, spec in getattr(model_cfg, "compressed", {}).items() if spec.get("kind") == "int8"]
    if int8_layers:
        raise ValueError(f"model.compressed has int8 layers ({', '.join(sorted(int8_layers)[:4])}"
                         f"{', ...' if len(int8_layers) > 4 else ''}): quantized models are inference-only; train or "
                         "fine-tune before quantizing (low-rank layers train)")
    graphdef, params, p_shard = init_params(model_cfg, mesh, seed)
    shardings = {"step": parallel.replicated(mesh), "params": p_shard,
                 "opt_state": opt_state_shardings(tx, params, p_shard, mesh), "rng": parallel.replicated(mesh)}

    def init(params):
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
                "rng": jax.random.key_data(jax.random.key(seed + 1))}

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)(params)
    return graphdef, state, shardings


def abstract_train_state(state: TrainState, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings: what a checkpoint is restored into (any mesh)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def count_params(params: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))

"""The train state — a plain dict pytree {step, params, model_state, opt_state, rng} — created in its shardings.

A model's variables are kept as *pure* nested dicts of arrays (`nnx.to_pure_dict`): checkpoints, parameter
transforms, importers and exports all address weights by path. They split in two:
- `params` (`nnx.Param`): differentiated and updated by the optimizer; every one names its logical axes;
- `model_state` (everything else, e.g. batch-norm statistics `nnx.BatchStat`): updated by the forward pass in
  train mode, carried beside the params, sharded (replicated where it names no axes) and checkpointed.
Inference needs both and no distinction: `variables` is their union, and `nnx.merge(graphdef, variables)` rebuilds
the module (in eval mode: `build_model` returns it so).
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


def _axes(state: nnx.State, require: bool) -> dict:
    """Pure dict of each variable's logical axes; without axes: replicated (None per dim), or an error if `require`."""
    def axes(v):
        names = v.get_metadata().get("out_sharding")
        if names is None:
            if require:
                return None
            return (None,) * jnp.ndim(v.get_value())
        return tuple(names)
    logical = nnx.to_pure_dict(jax.tree.map(axes, state, is_leaf=_is_variable))
    if require:
        flat = jax.tree_util.tree_flatten_with_path(logical, is_leaf=lambda n: n is None or isinstance(n, tuple))[0]
        missing = [jax.tree_util.keystr(p) for p, a in flat if a is None]
        if missing:
            raise ValueError(f"parameters without logical axes (every parameter must name them): {missing}")
    return logical


def abstract_model_split(model_cfg: Any) -> tuple[nnx.GraphDef, dict, dict, dict, dict]:
    """(graphdef, abstract params, their logical axes, abstract model_state, its logical axes); nothing allocated."""
    model = nnx.eval_shape(lambda: build_model(model_cfg, nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return (graphdef, nnx.to_pure_dict(params), _axes(params, require=True),
            nnx.to_pure_dict(rest), _axes(rest, require=False))


def merge_trees(a: dict, b: dict) -> dict:
    """The union of two nested dicts with disjoint leaves (params ∪ model_state = a model's variables)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_trees(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def split_like(tree: dict, like: dict) -> tuple[dict, dict]:
    """(the part of `tree` with the paths of `like`, the rest): undoes `merge_trees`."""
    inside, rest = {}, {}
    for k, v in tree.items():
        if k in like and isinstance(v, dict) and isinstance(like[k], dict):
            a, b = split_like(v, like[k])
            if a:
                inside[k] = a
            if b:
                rest[k] = b
        elif k in like:
            inside[k] = v
        else:
            rest[k] = v
    return inside, rest


def abstract_model(model_cfg: Any) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, abstract variables, their logical axes) — params and model state together, for inference."""
    graphdef, params, p_axes, state, s_axes = abstract_model_split(model_cfg)
    return graphdef, merge_trees(params, state), merge_trees(p_axes, s_axes)


def init_params(model_cfg: Any, mesh: Mesh, seed: int) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, variables placed on the mesh, their shardings): each device initializes only its own shard."""
    graphdef, abstract, logical = abstract_model(model_cfg)
    shardings = parallel.tree_shardings(mesh, abstract, logical)

    def init():
        return nnx.to_pure_dict(nnx.state(build_model(model_cfg, nnx.Rngs(seed))))

    with jax.set_mesh(mesh):
        variables = jax.jit(init, out_shardings=shardings)()
    return graphdef, variables, shardings


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
    graphdef, abstract_params, _, _, _ = abstract_model_split(model_cfg)
    _, variables, v_shard = init_params(model_cfg, mesh, seed)
    params, model_state = split_like(variables, abstract_params)
    p_shard, s_shard = split_like(v_shard, abstract_params)
    shardings = {"step": parallel.replicated(mesh), "params": p_shard, "model_state": s_shard,
                 "opt_state": opt_state_shardings(tx, params, p_shard, mesh), "rng": parallel.replicated(mesh)}

    def init(params, model_state):
        return {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": model_state,
                "opt_state": tx.init(params), "rng": jax.random.key_data(jax.random.key(seed + 1))}

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)(params, model_state)
    return graphdef, state, shardings


def abstract_train_state(state: TrainState, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings: what a checkpoint is restored into (any mesh)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def count_params(params: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))

"""Scanned ↔ per-layer weights of the decoder's blocks: one conversion, used wherever weights cross a layout.

A scanned decoder (`model.scan_layers`) holds its blocks as one block whose every parameter has a leading `layers`
axis: `layers.mlp.up.kernel` [L, d, f]. A per-layer decoder holds `layers.0.mlp.up.kernel` … `layers.{L-1}…` [d, f].
Training uses the stacked layout (one traced block, `lax.scan` over depth: compile time flat in depth); tools that
address single layers (transforms by dotted path, importers, the KV-cached inference loop, export, serving) use the
per-layer one. These functions convert either way:

- `stack_layers` / `unstack_layers`: any pytree of nested dicts, lists and tuples (a train state with its optimizer
  moments, a params dict); every dict under the key `layers` is converted, so Adam's `mu` / `nu` follow the params.
- `stack_flat` / `unstack_flat`: flat {dotted path: array} dicts (train.init_from matches weights that way).
- `layer_axes` / `layer_slice`: which leaves are stacked, as vmap axes: the optimizer runs per layer on them
  (fastserve/core/optim.py), so a scanned run trains exactly like a per-layer one.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _int_keys(node: Any) -> bool:
    return isinstance(node, dict) and bool(node) and all(isinstance(k, int) for k in node)


def _stack(per_layer: dict) -> Any:
    n = len(per_layer)
    if sorted(per_layer) != list(range(n)):
        raise ValueError(f"layers: expected keys 0..{n - 1}, got {sorted(per_layer)}")
    blocks = [per_layer[i] for i in range(n)]
    leaves = jax.tree.leaves(blocks)
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
        stack = _stack_abstract
    elif all(isinstance(x, np.ndarray) for x in leaves):
        stack = np.stack
    else:
        stack = jnp.stack
    try:
        return jax.tree.map(lambda *xs: stack(xs), *blocks)
    except ValueError as e:  # another structure per layer: a compressed layer (low rank, int8) cannot be stacked
        raise ValueError(f"layers cannot be stacked: the blocks differ in structure ({e}); compressed models stay "
                         "per-layer (model.scan_layers has no effect on them)") from None


def _unstack(stacked: dict) -> dict:
    leaves = jax.tree.leaves(stacked)
    if not leaves:
        return {}
    n = leaves[0].shape[0]
    return {i: jax.tree.map(lambda x: _slice_abstract(x) if isinstance(x, jax.ShapeDtypeStruct) else x[i], stacked)
            for i in range(n)}


def _stack_abstract(xs: tuple[jax.ShapeDtypeStruct, ...]) -> jax.ShapeDtypeStruct:
    """The stacked array of `xs` as a ShapeDtypeStruct; a NamedSharding gains an unsharded leading axis."""
    sharding = xs[0].sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(None, *sharding.spec))
    return jax.ShapeDtypeStruct((len(xs), *xs[0].shape), xs[0].dtype, sharding=sharding)


def _slice_abstract(x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    sharding = x.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)


def _map_layers(tree: Any, at_layers: Any, elsewhere: Any = lambda leaf: leaf) -> Any:
    """`tree` rebuilt with every non-empty dict under the key `layers` replaced by `at_layers(that dict)` and every
    other leaf by `elsewhere(leaf)`. Dicts, lists, tuples and namedtuples (optax states) are walked, so a train state
    with its optimizer moments is converted as a whole. This walk is the one rule of where the layers are."""
    if isinstance(tree, dict):
        return {k: at_layers(v) if k == "layers" and isinstance(v, dict) and v else _map_layers(v, at_layers, elsewhere)
                for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):      # optax states are namedtuples
        return type(tree)(*(_map_layers(v, at_layers, elsewhere) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_layers(v, at_layers, elsewhere) for v in tree)
    return elsewhere(tree)


def stack_layers(tree: Any) -> Any:
    """Per-layer `layers: {0: block, 1: block, …}` → stacked `layers: block` (leaves gain a leading [L] axis)."""
    return _map_layers(tree, lambda layers: _stack(layers) if _int_keys(layers) else layers)


def unstack_layers(tree: Any) -> Any:
    """Stacked `layers: block` (leaves [L, …]) → per-layer `layers: {0: block, …}`."""
    return _map_layers(tree, lambda layers: layers if _int_keys(layers) else _unstack(layers))


def layer_axes(tree: Any) -> Any:
    """`tree` with 0 at every leaf of a stacked `layers` subtree (its leading axis is the layer) and None elsewhere:
    the `in_axes` / `out_axes` that `jax.vmap` takes to run a per-layer function on each layer's slice. Only meaningful
    for a tree of a scanned decoder (other models may name a dict of their own `layers`: model_cfg.scanned decides)."""
    return _map_layers(tree, lambda layers: None if _int_keys(layers) else jax.tree.map(lambda _: 0, layers),
                       elsewhere=lambda _: None)


def layer_slice(tree: Any) -> Any:
    """`tree` as ShapeDtypeStructs the way one layer sees it: leaves of a stacked `layers` subtree lose their leading
    axis, the rest keep their shape (what a function vmapped with `layer_axes` is traced with)."""
    def abstract(x, drop):
        return jax.ShapeDtypeStruct(jnp.shape(x)[drop:], x.dtype)
    return _map_layers(tree, lambda layers: jax.tree.map(lambda x: abstract(x, 0 if _int_keys(layers) else 1), layers),
                       elsewhere=lambda x: None if x is None else abstract(x, 0))


_PER_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def stack_flat(flat: dict[str, Any]) -> dict[str, Any]:
    """{'layers.3.mlp.up.kernel': [d, f], …} → {'layers.mlp.up.kernel': [L, d, f], …}. A path present in only
    some layers (or with shapes that differ between layers) is left per-layer."""
    out, groups = {}, {}
    for path, x in flat.items():
        m = _PER_LAYER.match(path)
        if m:
            groups.setdefault(m.group(2), {})[int(m.group(1))] = (path, x)
        else:
            out[path] = x
    for rest, by_index in groups.items():
        n = max(by_index) + 1
        shapes = {tuple(np.shape(x)) for _, x in by_index.values()}
        if len(by_index) == n and len(shapes) == 1:
            out[f"layers.{rest}"] = np.stack([np.asarray(by_index[i][1]) for i in range(n)])
        else:
            out.update(dict(by_index.values()))
    return out


def unstack_flat(flat: dict[str, Any]) -> dict[str, Any]:
    """{'layers.mlp.up.kernel': [L, d, f]} → {'layers.0.mlp.up.kernel': [d, f], …}; other paths as they are."""
    out = {}
    for path, x in flat.items():
        parts = path.split(".")
        if parts[0] == "layers" and len(parts) > 1 and not parts[1].isdigit():
            rest = ".".join(parts[1:])
            out.update({f"layers.{i}.{rest}": x[i] for i in range(np.shape(x)[0])})
        else:
            out[path] = x
    return out


def per_layer_config(model_cfg: Any) -> Any:
    """`model_cfg` with `scan_layers` off (unchanged for a config without the field, or with it off)."""
    if getattr(model_cfg, "scan_layers", False):
        return dataclasses.replace(model_cfg, scan_layers=False)
    return model_cfg


def other_layout(model_cfg: Any) -> Any:
    """`model_cfg` with the other layer layout (scan_layers flipped), or None when it has no choice of layout (another
    family, or compressed layers, which are always per-layer): a checkpoint saved with one layout loads into the
    other's config through it."""
    if not hasattr(model_cfg, "scan_layers") or getattr(model_cfg, "compressed", None):
        return None
    return dataclasses.replace(model_cfg, scan_layers=not model_cfg.scan_layers)


def as_per_layer(model_cfg: Any, params: Any) -> tuple[Any, Any]:
    """(config, params) of the per-layer model, whichever layout `params` has: stacked blocks are unstacked and
    `scan_layers` turned off (parameter transforms address single layers by path — `layers.3.mlp.up` — and exports
    lay out one KV cache per layer); a model without a choice of layout is returned unchanged."""
    if other_layout(model_cfg) is None:
        return model_cfg, params
    layers = params.get("layers") if isinstance(params, dict) else None
    stacked = isinstance(layers, dict) and bool(layers) and not _int_keys(layers)
    return per_layer_config(model_cfg), unstack_layers(params) if stacked else params   # per-layer: the same object

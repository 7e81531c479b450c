"""`train.init_from`: start a fresh run from another model's weights — a fastserve work dir, a Hugging Face BERT (or
Llama) directory, a GGUF file, or a `package:NAME/PATH` inside an installed package.

Every parameter of the new model whose path and shape match one of the source's is loaded; the rest (a new head,
say) keep their fresh initialization. One exception to "same shape": a learned position table with fewer rows than
the source's takes the source's first rows (fine-tuning at 128 positions from a 512-position BERT). A source that
matches nothing is an error naming both sides' paths: loading nothing silently is never what was meant.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)


@dataclass
class InitReport:
    source: str
    loaded: list[str]              # paths taken from the source (as is or, for position tables, their first rows)
    fresh: list[str]               # paths that keep their initialization
    truncated: list[str]           # position tables cut to the model's rows

    def line(self) -> str:
        """The start-up line: how many were loaded, which are fresh."""
        fresh = ", ".join(self.fresh[:8]) + (f", … ({len(self.fresh)} in all)" if len(self.fresh) > 8 else "")
        cut = f"; first rows of {', '.join(self.truncated)}" if self.truncated else ""
        return (f"init_from {self.source}: loaded {len(self.loaded)} of {len(self.loaded) + len(self.fresh)} "
                f"parameters{cut}; fresh: {fresh or 'none'}")


def _flat(tree: Any) -> dict[str, Any]:
    return {jax.tree_util.keystr(p, simple=True, separator="."): x
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def source_params(path: str) -> dict[str, np.ndarray]:
    """Every parameter of the model at `path`, flat by dotted path, on the host."""
    from fastserve.workdir import hf_model_type, resolve_path

    resolved = resolve_path(path)
    if not os.path.exists(resolved):
        raise FileNotFoundError(f"train.init_from: {resolved} does not exist")
    if os.path.isfile(os.path.join(resolved, "config.yaml")) or os.path.basename(
            os.path.normpath(resolved)) == "checkpoints":
        from fastserve.config import config_from_dict
        from fastserve.workdir import load_model
        cfg = config_from_dict({"source": {"kind": "checkpoint", "path": resolved}})
        loaded = load_model(cfg)
        return {k: np.asarray(v) for k, v in _flat(jax.device_get(loaded.params)).items()}
    from fastserve import interop
    if resolved.endswith(".gguf"):
        return _flat(interop.load_gguf(resolved).params)
    model_type = hf_model_type(resolved)
    if model_type == "bert":
        return _flat(interop.read_hf_bert(resolved)[1])   # every tensor: a BertModel's pooler too
    if model_type:
        return _flat(interop.load_hf_llama(resolved).params)
    raise ValueError(f"train.init_from: {resolved} is not a fastserve work dir (no config.yaml), a Hugging Face "
                     "directory (no config.json) or a .gguf file")


def match(target: dict[str, Any], source: dict[str, np.ndarray], name: str) -> tuple[dict[str, np.ndarray],
                                                                                       InitReport]:
    """(the source arrays for the target paths they fit, the report); ValueError when nothing fits."""
    chosen: dict[str, np.ndarray] = {}
    truncated = []
    for path, want in target.items():
        have = source.get(path)
        if have is None or have.ndim != len(want.shape):
            continue
        if tuple(have.shape) == tuple(want.shape):
            chosen[path] = have
        elif (path.endswith("position.embedding") and have.shape[1:] == tuple(want.shape[1:])
              and have.shape[0] > want.shape[0]):
            chosen[path] = have[:want.shape[0]]
            truncated.append(path)
    report = InitReport(name, sorted(chosen), sorted(set(target) - set(chosen)), truncated)
    if not chosen:
        shapes = {p: tuple(target[p].shape) for p in list(target)[:4]}
        theirs = {p: tuple(source[p].shape) for p in list(source)[:4]}
        raise ValueError(f"train.init_from {name}: no parameter matches the model in path and shape (the model has "
                         f"e.g. {shapes}; the source {theirs}): is it a model of the same family and size?")
    return chosen, report


def init_params_from(params: Any, shardings: Any, path: str) -> tuple[Any, InitReport]:
    """`params` (a train state's, placed with `shardings`) with the matching ones replaced by `path`'s."""
    flat_target = _flat(params)
    chosen, report = match(flat_target, _in_layout_of(flat_target, source_params(path)), path)
    flat_shardings = _flat(shardings)

    def replace(p, x):
        key = jax.tree_util.keystr(p, simple=True, separator=".")
        if key not in chosen:
            return x
        return jax.device_put(np.asarray(chosen[key], dtype=x.dtype), flat_shardings[key])
    return jax.tree_util.tree_map_with_path(replace, params), report


def _in_layout_of(target: dict[str, Any], source: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`source` with its decoder blocks in the target's layout: stacked (`layers.mlp.up.kernel` [L, …], a model with
    `scan_layers`) or per-layer (`layers.3.mlp.up.kernel`); sources come either way (work dirs load per-layer)."""
    from fastserve.models.layer_stack import stack_flat, unstack_flat

    def stacked(flat):
        return any(p.startswith("layers.") and not p.split(".")[1].isdigit() for p in flat)

    def per_layer(flat):
        return any(p.startswith("layers.") and p.split(".")[1].isdigit() for p in flat)
    if stacked(target) and per_layer(source):
        return stack_flat(source)
    if per_layer(target) and stacked(source):
        return unstack_flat(source)
    return source

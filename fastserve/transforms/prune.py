"""Magnitude pruning of dense Linear kernels: unstructured (per layer, to an exact target sparsity) or 2:4.

- `unstructured`: in each selected kernel the round(sparsity · size) smallest-magnitude weights become 0.
- `2:4`: in every group of 4 consecutive weights along the input dimension (rows i..i+3 of one output column
  of the (in, out) kernel) the 2 smallest-magnitude weights become 0 — the layout sparse tensor cores accelerate.

Storage stays DENSE: the zeros are stored like any weight, so nothing gets smaller or faster without a sparse
kernel, and fine-tuning afterwards would refill the zeros (there is no mask). The config does not change.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from fastserve.models.layer_stack import as_per_layer
from fastserve.transforms.common import (TransformError, check_params, describe, get_node, rel_error, replace_node,
                                         select, to_host)

OPTIONS = ("sparsity", "pattern", "include", "exclude")
PATTERNS = ("unstructured", "2:4")
STORAGE = "dense (zeros stored; no size or speed gain without a sparse kernel)"


def magnitude_prune(w: np.ndarray, sparsity: float) -> np.ndarray:
    """Zeros exactly round(sparsity · w.size) entries, the smallest in magnitude (ties: the earlier index)."""
    k = int(round(sparsity * w.size))
    flat = w.reshape(-1).copy()
    flat[np.argsort(np.abs(flat), kind="stable")[:k]] = 0
    return flat.reshape(w.shape)


def prune_2_4(w: np.ndarray) -> np.ndarray:
    """2:4 along axis 0 (the input dimension of an (in, out) kernel): the 2 largest of each 4 survive."""
    m, n = w.shape
    groups = w.reshape(m // 4, 4, n)
    order = np.argsort(np.abs(groups), axis=1, kind="stable")      # ascending magnitude within each group
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, order[:, 2:], True, axis=1)
    return np.where(keep, groups, 0).reshape(m, n).astype(w.dtype)


def prune(model_cfg: Any, params: dict, *, sparsity: float | None = None, pattern: str = "unstructured",
          include: Any = "*", exclude: Any = None) -> tuple[Any, dict, list[dict]]:
    """Magnitude-prunes the selected dense kernels. Pure: (the same cfg, new params, report)."""
    if pattern not in PATTERNS:
        raise TransformError(f"prune.pattern: expected one of {', '.join(PATTERNS)}, got {pattern!r}")
    if pattern == "2:4":
        if sparsity not in (None, 0.5):
            raise TransformError(f"prune.sparsity: 2:4 pruning is 50% sparse by definition, got {sparsity!r}")
        sparsity = 0.5
    elif isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not (0.0 <= sparsity < 1.0):
        raise TransformError(f"prune.sparsity: expected a fraction in [0, 1), got {sparsity!r}")
    model_cfg, params = as_per_layer(model_cfg, params)   # scanned weights unstacked: paths name one layer
    abstract, layers = describe(model_cfg)
    check_params(abstract, params, "prune (input)")
    new_params, report = params, []
    for path in select(layers, include, exclude, "prune"):
        if layers[path] != "dense":
            report.append({"layer": path, "action": f"skipped: {layers[path]} (only dense kernels are pruned)"})
            continue
        node = get_node(params, path)
        kernel = node["kernel"]
        w = to_host(kernel)
        m, n = w.shape
        if pattern == "2:4":
            if m % 4:
                raise TransformError(f"prune: 2:4 needs the input dimension of '{path}' to divide by 4, got {m}")
            pruned = prune_2_4(w)
        else:
            pruned = magnitude_prune(w, float(sparsity))
        new_params = replace_node(new_params, path, {**node, "kernel": jnp.asarray(pruned, kernel.dtype)})
        zeros = int(np.sum(pruned == 0))
        report.append({"layer": path, "action": f"pruned {pattern}", "shape": [m, n], "target_sparsity": sparsity,
                       "sparsity": zeros / w.size, "zeros": zeros, "rel_error": rel_error(w, pruned),
                       "storage": STORAGE})
    return model_cfg, new_params, report

"""Checking what `fit` / `evaluate` / `predict` are given against the model and its loss: a clear error before any
work (wrong input shape, class ids given to a one-hot loss, labels out of range, a custom loss of the wrong shape)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fastserve import layers as L
from fastserve.data.arrays import as_inputs, as_labels
from fastserve.tasks.keras_loss import canonical_loss


def check_data(model: Any, x: Any, y: Any, what: str = "x") -> tuple[np.ndarray, np.ndarray | None]:
    """x, y as the steps take them; a clear error, before any work, when they do not fit the model or the loss."""
    x = as_inputs(x)
    if model._input_shape is None and model._specs:
        L.plan(x.shape[1:], model._specs)
        model._input_shape = tuple(x.shape[1:])
    want = model._require_input_shape()
    if tuple(x.shape[1:]) != want:
        first = model._plan()[0]
        raise ValueError(f"{what}: the model takes inputs of shape {(None, *want)} (its first layer "
                         f"'{first.name}' was built for input_shape={want}), got an array of shape {x.shape}")
    if y is None:
        return x, None
    y = as_labels(y)
    if len(y) != len(x):
        raise ValueError(f"{what}: {len(x)} inputs but {len(y)} labels")
    c = model._require_compiled("fit")
    out = model._plan()[-1].output_shape
    loss, n_out = canonical_loss(c.task_cfg.loss), out[-1]
    got = tuple(y.shape[1:])
    if loss == "categorical_crossentropy":
        if got != out:
            hint = (f"; these look like class ids: use loss='sparse_categorical_crossentropy' or one-hot them to "
                    f"{(len(y), *out)}" if got in (out[:-1], (*out[:-1], 1)) else "")
            raise ValueError(f"labels of shape {y.shape} do not match the model's output {(None, *out)} for "
                             f"categorical_crossentropy (one-hot rows of {n_out}){hint}")
    elif loss == "sparse_categorical_crossentropy":
        if got not in (out[:-1], (*out[:-1], 1)):
            hint = "; these look one-hot: use loss='categorical_crossentropy'" if got == out else ""
            raise ValueError(f"labels of shape {y.shape} do not match the model's output {(None, *out)} for "
                             f"sparse_categorical_crossentropy (class ids of shape {(None, *out[:-1])}){hint}")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"sparse_categorical_crossentropy takes integer class ids, got {y.dtype} labels")
        if len(y) and (y.min() < 0 or y.max() >= n_out):
            raise ValueError(f"labels range over [{y.min()}, {y.max()}] but the model outputs {n_out} classes "
                             f"(ids 0..{n_out - 1})")
    elif loss in ("binary_crossentropy", "mse", "mae"):
        if got != out and not (out == (1,) and got == ()):
            raise ValueError(f"labels of shape {y.shape} do not match the model's output {(None, *out)} for {loss}")
    else:  # a custom callable: it must give one loss per example
        probe = jax.eval_shape(c.loss_fn, jax.ShapeDtypeStruct((2, *got), y.dtype),
                               jax.ShapeDtypeStruct((2, *out), jnp.float32))
        if not probe.shape or probe.shape[0] != 2:
            raise ValueError(f"the custom loss returns shape {probe.shape} for a batch of 2: it must return one "
                             "value per example ([batch] or [batch, ...])")
    return x, y

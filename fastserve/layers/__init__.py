"""Keras-style layer specs for `fastserve.models.Sequential` and the `sequential` model family (`fs.layers.Dense`, ...).

Plain dataclasses, no JAX: a spec says what a layer is (`Dense(128, activation="relu")`), infers its output shape
from its input shape (per example, without the batch axis) and counts its parameters; the NNX module it becomes is
built by `fastserve.models.sequential`. In a YAML config a layer is a one-key mapping `{dense: {units: 128,
activation: relu}}` (or a bare name for a layer without options: `flatten`); `to_dict` / `layer_from_dict` convert.
Keras class names are accepted as keys too (`Dense`, `MaxPooling2D`).

The specs live by family: base.py (Layer, activations), core.py (dense, conv, pooling, normalization, embedding,
shape), recurrent.py (SimpleRNN, LSTM, GRU, Bidirectional, GlobalAveragePooling1D); here are the registry, the YAML
form and the shape planner.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from fastserve.checks import near
from fastserve.layers.base import ACTIVATIONS, Layer, LayerError, Shape
from fastserve.layers.core import (Activation, AvgPool2D, BatchNormalization, Conv2D, Dense, Dropout, Embedding,
                                   Flatten, GlobalAveragePooling2D, LayerNormalization, MaxPool2D, Reshape)
from fastserve.layers.recurrent import GRU, LSTM, Bidirectional, GlobalAveragePooling1D, SimpleRNN, _Recurrent


# Layers through which a sequence mask reaches the next layer (the time axis survives them, step for step); the rest
# drop it (a recurrent layer with return_sequences=False and GlobalAveragePooling1D consume it).
def passes_mask(spec: "Layer") -> bool:
    if isinstance(spec, (_Recurrent, Bidirectional)):
        return spec.return_sequences
    return isinstance(spec, (Dense, Dropout, Activation, BatchNormalization, LayerNormalization))


def takes_sequence_mask(spec: "Layer") -> bool:
    return isinstance(spec, (_Recurrent, Bidirectional, GlobalAveragePooling1D))


@dataclass
class Input:
    """`model.add(fs.layers.Input(shape=(784,)))`: sets the model's input shape (not a layer)."""
    shape: tuple[int, ...]


LAYERS: dict[str, type[Layer]] = {c.kind: c for c in (
    Dense, Conv2D, MaxPool2D, AvgPool2D, GlobalAveragePooling2D, Flatten, Dropout, BatchNormalization,
    LayerNormalization, Embedding, Activation, Reshape, SimpleRNN, LSTM, GRU, Bidirectional, GlobalAveragePooling1D)}
# Keras spellings (class names, case-insensitive, underscores ignored) → kind
_ALIASES = {k.replace("_", ""): k for k in LAYERS} | {
    c.keras_name.lower(): c.kind for c in LAYERS.values()} | {"maxpool2d": "max_pool2d", "avgpool2d": "avg_pool2d",
                                                             "averagepooling2d": "avg_pool2d", "conv2d": "conv2d"}

# Keras's aliases for the same classes
MaxPooling2D = MaxPool2D
AveragePooling2D = AvgPool2D


def layer_from_dict(entry: Any) -> Layer:
    """A spec from its YAML form: `{dense: {units: 128}}`, `{dropout: 0.2}` (one positional option), or `flatten`."""
    if isinstance(entry, Layer):
        return entry
    if isinstance(entry, str):
        key, opts = entry, {}
    elif isinstance(entry, dict) and len(entry) == 1:
        (key, opts), = entry.items()
    else:
        raise LayerError(f"expected a one-key mapping like {{dense: {{units: 64}}}} or a layer name, got {entry!r}")
    kind = _ALIASES.get(str(key).replace("_", "").lower())
    if kind is None:
        raise LayerError(f"unknown layer {key!r}{near(str(key), list(LAYERS))} (choose from {', '.join(LAYERS)})")
    cls = LAYERS[kind]
    if opts is None:
        opts = {}
    if not isinstance(opts, dict):  # `{dropout: 0.2}`, `{dense: 64}`: the first option
        first = [f.name for f in dataclasses.fields(cls) if f.name not in ("name", "input_shape")][0]
        opts = {first: opts}
    valid = [f.name for f in dataclasses.fields(cls)]
    for k in opts:
        if k not in valid:
            raise LayerError(f"{kind}: unknown option {k!r}{near(str(k), valid)} (valid: {', '.join(valid)})")
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()})
    except TypeError as e:
        raise LayerError(f"{kind}: {e}") from None


@dataclass
class Planned:
    """One layer of a model: its spec, name and shapes, and its parameter counts."""
    spec: Layer
    name: str
    input_shape: Shape
    output_shape: Shape
    trainable: int
    non_trainable: int


def plan(input_shape: Sequence[int], specs: Sequence[Layer]) -> list[Planned]:
    """Names every layer (Keras style: dense, dense_1, ...) and infers its output shape from `input_shape`; a
    LayerError names the layer (its position, name and input shape) that cannot take its input."""
    shape = tuple(input_shape)
    if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise LayerError(f"the model's input_shape must be positive ints (per example, no batch axis), got "
                         f"{list(input_shape)}")
    out, used = [], {}
    for i, spec in enumerate(specs):
        base = spec.name or spec.kind
        count = used.get(base, 0)
        used[base] = count + 1
        name = spec.name or (base if count == 0 else f"{base}_{count}")
        if spec.name and count:
            raise LayerError(f"layer {i} ({spec.keras_name}): the name {spec.name!r} is used twice")
        if isinstance(spec, Embedding) and i > 0:
            raise LayerError(f"layer {i} '{name}' (Embedding): only the first layer may be an Embedding")
        try:
            new = spec.output_shape(shape)
            trainable, fixed = spec.params(shape)
        except LayerError as e:
            raise LayerError(f"layer {i} '{name}' ({spec.keras_name}) cannot take input of shape {shape}: {e}") from None
        out.append(Planned(spec, name, shape, tuple(new), trainable, fixed))
        shape = tuple(new)
    return out


__all__ = ["ACTIVATIONS", "Activation", "AvgPool2D", "AveragePooling2D", "BatchNormalization", "Bidirectional",
           "Conv2D", "Dense", "Dropout", "Embedding", "Flatten", "GRU", "GlobalAveragePooling1D",
           "GlobalAveragePooling2D", "Input", "LAYERS", "LSTM", "Layer", "LayerError", "LayerNormalization",
           "MaxPool2D", "MaxPooling2D", "Reshape", "SimpleRNN", "layer_from_dict", "plan"]

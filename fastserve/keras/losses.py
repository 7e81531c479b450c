"""Keras-style loss objects for `compile(loss=...)` when a loss needs an option (`from_logits`); a name
(`"categorical_crossentropy"`) means the same with `from_logits=False`. The math is in fastserve.tasks.keras_loss."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Loss:
    from_logits: bool = False
    name = ""


@dataclass
class CategoricalCrossentropy(Loss):
    name = "categorical_crossentropy"


@dataclass
class SparseCategoricalCrossentropy(Loss):
    name = "sparse_categorical_crossentropy"


@dataclass
class BinaryCrossentropy(Loss):
    name = "binary_crossentropy"


@dataclass
class MeanSquaredError(Loss):
    name = "mse"


@dataclass
class MeanAbsoluteError(Loss):
    name = "mae"

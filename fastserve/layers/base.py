"""The base of `fastserve.layers`: the Layer spec class, its error type, Keras's activation names and the shape
helpers the specs share."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

from fastserve.checks import near

Shape = tuple[int, ...]

# Activations by Keras name (the functions are in fastserve.models.sequential). `None` / "linear": identity.
ACTIVATIONS = ("linear", "relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "silu", "swish", "tanh", "sigmoid",
               "hard_sigmoid", "softmax", "log_softmax", "softplus", "softsign", "exponential", "mish")


class LayerError(ValueError):
    """A layer that cannot take its input (wrong rank, too small), or a bad option; the message names the layer."""


def check_activation(name: str | None) -> str:
    name = "linear" if name is None else name
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise LayerError(f"unknown activation {name!r}{near(str(name), ACTIVATIONS)} (choose from "
                         f"{', '.join(ACTIVATIONS)})")
    return name


def _pair(v: int | Sequence[int], what: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(i, int) and i > 0 for i in t):
        raise LayerError(f"{what} must be a positive int or a pair of them, got {v!r}")
    return t


def _spatial(size: int, window: int, stride: int, padding: str) -> int:
    return -(-size // stride) if padding == "same" else (size - window) // stride + 1


@dataclass
class Layer:
    """Base of every spec. `name`: the layer's name (default: Keras style, `dense`, `dense_1`, ...); `input_shape`:
    the per-example input shape, given on the first layer only."""
    name: str = field(default="", kw_only=True)
    input_shape: tuple[int, ...] | None = field(default=None, kw_only=True)

    kind = ""            # the YAML key, e.g. "dense"
    keras_name = ""      # the Keras class name shown by summary(), e.g. "Dense"

    def __post_init__(self):
        if self.input_shape is not None:
            shape = (self.input_shape,) if isinstance(self.input_shape, int) else tuple(self.input_shape)
            if not all(isinstance(d, int) and d > 0 for d in shape):
                raise LayerError(f"{self.keras_name}: input_shape must be positive ints (no batch axis), got "
                                 f"{self.input_shape!r}")
            self.input_shape = shape
        self.validate()

    def validate(self) -> None:
        """Option checks that need no input shape (raise LayerError)."""

    def output_shape(self, shape: Shape) -> Shape:
        return shape

    def params(self, shape: Shape) -> tuple[int, int]:
        """(trainable, non-trainable) parameter counts for input `shape`."""
        return 0, 0

    def flops(self, shape: Shape) -> float:
        """Forward FLOPs per example (matmuls / convolutions only)."""
        return 0.0

    @property
    def activation_name(self) -> str:
        return check_activation(getattr(self, "activation", None))

    def to_dict(self) -> dict[str, Any]:
        """`{kind: {non-default options}}` (the YAML form); `input_shape` lives on the model, not the layer."""
        opts = {}
        for f in dataclasses.fields(self):
            if f.name == "input_shape":
                continue
            v = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else dataclasses.MISSING
            if v != default:
                opts[f.name] = list(v) if isinstance(v, tuple) else v
        return {self.kind: opts}

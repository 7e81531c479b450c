"""Keras-style layer specs for `fastserve.models.Sequential` and the `sequential` model family (`fs.layers.Dense`, ...).

Plain dataclasses, no JAX: a spec says what a layer is (`Dense(128, activation="relu")`), infers its output shape
from its input shape (per example, without the batch axis) and counts its parameters; the NNX module it becomes is
built by `fastserve.models.sequential`. In a YAML config a layer is a one-key mapping `{dense: {units: 128,
activation: relu}}` (or a bare name for a layer without options: `flatten`); `to_dict` / `layer_from_dict` convert.
Keras class names are accepted as keys too (`Dense`, `MaxPooling2D`).
"""
from __future__ import annotations

import dataclasses
import math
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


@dataclass
class Dense(Layer):
    units: int
    activation: str | None = None
    use_bias: bool = True
    kind = "dense"
    keras_name = "Dense"

    def validate(self):
        if not isinstance(self.units, int) or self.units <= 0:
            raise LayerError(f"Dense: units must be a positive int, got {self.units!r}")
        check_activation(self.activation)

    def output_shape(self, shape):
        if len(shape) < 1:
            raise LayerError("takes inputs with at least one axis (features)")
        return (*shape[:-1], self.units)

    def params(self, shape):
        return shape[-1] * self.units + (self.units if self.use_bias else 0), 0

    def flops(self, shape):
        return 2.0 * math.prod(shape) * self.units


@dataclass
class Conv2D(Layer):
    filters: int
    kernel_size: int | tuple[int, int] = 3
    strides: int | tuple[int, int] = 1
    padding: str = "valid"
    activation: str | None = None
    use_bias: bool = True
    kind = "conv2d"
    keras_name = "Conv2D"

    def validate(self):
        if not isinstance(self.filters, int) or self.filters <= 0:
            raise LayerError(f"Conv2D: filters must be a positive int, got {self.filters!r}")
        _pair(self.kernel_size, "Conv2D: kernel_size")
        _pair(self.strides, "Conv2D: strides")
        if self.padding not in ("same", "valid"):
            raise LayerError(f"Conv2D: padding must be 'same' or 'valid', got {self.padding!r}")
        check_activation(self.activation)

    def output_shape(self, shape):
        if len(shape) != 3:
            raise LayerError(f"takes images (height, width, channels), got per-example shape {shape}")
        (kh, kw), (sh, sw) = _pair(self.kernel_size, "kernel_size"), _pair(self.strides, "strides")
        h, w = _spatial(shape[0], kh, sh, self.padding), _spatial(shape[1], kw, sw, self.padding)
        if h < 1 or w < 1:
            raise LayerError(f"a {kh}×{kw} kernel with padding='valid' does not fit a {shape[0]}×{shape[1]} input")
        return h, w, self.filters

    def params(self, shape):
        kh, kw = _pair(self.kernel_size, "kernel_size")
        return kh * kw * shape[2] * self.filters + (self.filters if self.use_bias else 0), 0

    def flops(self, shape):
        kh, kw = _pair(self.kernel_size, "kernel_size")
        h, w, _ = self.output_shape(shape)
        return 2.0 * h * w * kh * kw * shape[2] * self.filters


@dataclass
class _Pool2D(Layer):
    pool_size: int | tuple[int, int] = 2
    strides: int | tuple[int, int] | None = None     # None: pool_size
    padding: str = "valid"

    def validate(self):
        _pair(self.pool_size, f"{self.keras_name}: pool_size")
        if self.strides is not None:
            _pair(self.strides, f"{self.keras_name}: strides")
        if self.padding not in ("same", "valid"):
            raise LayerError(f"{self.keras_name}: padding must be 'same' or 'valid', got {self.padding!r}")

    def window(self) -> tuple[tuple[int, int], tuple[int, int]]:
        pool = _pair(self.pool_size, "pool_size")
        return pool, pool if self.strides is None else _pair(self.strides, "strides")

    def output_shape(self, shape):
        if len(shape) != 3:
            raise LayerError(f"takes images (height, width, channels), got per-example shape {shape}")
        (ph, pw), (sh, sw) = self.window()
        h, w = _spatial(shape[0], ph, sh, self.padding), _spatial(shape[1], pw, sw, self.padding)
        if h < 1 or w < 1:
            raise LayerError(f"a {ph}×{pw} pool with padding='valid' does not fit a {shape[0]}×{shape[1]} input")
        return h, w, shape[2]


@dataclass
class MaxPool2D(_Pool2D):
    kind = "max_pool2d"
    keras_name = "MaxPooling2D"


@dataclass
class AvgPool2D(_Pool2D):
    kind = "avg_pool2d"
    keras_name = "AveragePooling2D"


@dataclass
class GlobalAveragePooling2D(Layer):
    kind = "global_average_pooling2d"
    keras_name = "GlobalAveragePooling2D"

    def output_shape(self, shape):
        if len(shape) != 3:
            raise LayerError(f"takes images (height, width, channels), got per-example shape {shape}")
        return (shape[2],)


@dataclass
class Flatten(Layer):
    kind = "flatten"
    keras_name = "Flatten"

    def output_shape(self, shape):
        return (math.prod(shape),)


@dataclass
class Dropout(Layer):
    rate: float = 0.5
    kind = "dropout"
    keras_name = "Dropout"

    def validate(self):
        if not 0 <= self.rate < 1:
            raise LayerError(f"Dropout: rate must be in [0, 1), got {self.rate!r}")


@dataclass
class BatchNormalization(Layer):
    """Normalizes the last axis. Keras's convention: running = momentum · running + (1 − momentum) · batch."""
    momentum: float = 0.99
    epsilon: float = 1e-3
    kind = "batch_normalization"
    keras_name = "BatchNormalization"

    def validate(self):
        if not 0 <= self.momentum <= 1 or not self.epsilon > 0:
            raise LayerError(f"BatchNormalization: need 0 <= momentum <= 1 and epsilon > 0, got {self.momentum}, "
                             f"{self.epsilon}")

    def params(self, shape):
        return 2 * shape[-1], 2 * shape[-1]     # scale, bias; running mean, variance (as Keras counts them)


@dataclass
class LayerNormalization(Layer):
    epsilon: float = 1e-3
    kind = "layer_normalization"
    keras_name = "LayerNormalization"

    def validate(self):
        if not self.epsilon > 0:
            raise LayerError(f"LayerNormalization: epsilon must be positive, got {self.epsilon}")

    def params(self, shape):
        return 2 * shape[-1], 0


@dataclass
class Embedding(Layer):
    """Integer ids (any shape) → vectors; must be the first layer (the model's inputs are then int32).
    `mask_zero=True`: id 0 is padding — the model derives a mask (ids != 0) that the recurrent layers (and
    GlobalAveragePooling1D) after it receive, so padded steps count for nothing."""
    input_dim: int
    output_dim: int
    mask_zero: bool = False
    kind = "embedding"
    keras_name = "Embedding"

    def validate(self):
        for n in ("input_dim", "output_dim"):
            if not isinstance(getattr(self, n), int) or getattr(self, n) <= 0:
                raise LayerError(f"Embedding: {n} must be a positive int, got {getattr(self, n)!r}")

    def output_shape(self, shape):
        return (*shape, self.output_dim)

    def params(self, shape):
        return self.input_dim * self.output_dim, 0


@dataclass
class Activation(Layer):
    activation: str = "linear"
    kind = "activation"
    keras_name = "Activation"

    def validate(self):
        check_activation(self.activation)


@dataclass
class Reshape(Layer):
    target_shape: tuple[int, ...] = ()
    kind = "reshape"
    keras_name = "Reshape"

    def validate(self):
        self.target_shape = tuple(self.target_shape)
        if sum(d == -1 for d in self.target_shape) > 1 or any(d == 0 or d < -1 for d in self.target_shape):
            raise LayerError(f"Reshape: target_shape needs positive sizes and at most one -1, got {self.target_shape}")

    def output_shape(self, shape):
        n, known = math.prod(shape), math.prod(d for d in self.target_shape if d != -1)
        if -1 in self.target_shape:
            if n % known:
                raise LayerError(f"cannot reshape {shape} ({n} values) to {self.target_shape}")
            return tuple(n // known if d == -1 else d for d in self.target_shape)
        if known != n:
            raise LayerError(f"cannot reshape {shape} ({n} values) to {self.target_shape} ({known} values)")
        return self.target_shape


# Activations a recurrent cell takes (fastserve.models.recurrent.ACTIVATIONS)
RNN_ACTIVATIONS = ("tanh", "sigmoid", "hard_sigmoid", "relu", "linear")


@dataclass
class _Recurrent(Layer):
    """SimpleRNN / LSTM / GRU over [T, F] inputs → [T, H] (return_sequences) or [H] (the last valid step's state).
    `activation` is the cell's (applied inside it, not after the layer). With a mask (from `Embedding(mask_zero=True)`)
    padded steps leave the state unchanged; return_sequences=True passes the mask on, False consumes it."""
    units: int
    activation: str | None = "tanh"
    use_bias: bool = True
    return_sequences: bool = False
    go_backwards: bool = False
    dropout: float = 0.0
    recurrent_dropout: float = 0.0
    gates = 1

    def validate(self):
        if not isinstance(self.units, int) or isinstance(self.units, bool) or self.units <= 0:
            raise LayerError(f"{self.keras_name}: units must be a positive int, got {self.units!r}")
        for n in ("activation", "recurrent_activation"):
            if hasattr(self, n) and (getattr(self, n) or "linear") not in RNN_ACTIVATIONS:
                raise LayerError(f"{self.keras_name}: unknown {n} {getattr(self, n)!r} (choose from "
                                 f"{', '.join(RNN_ACTIVATIONS)})")
        for n in ("dropout", "recurrent_dropout"):
            if not 0 <= getattr(self, n) < 1:
                raise LayerError(f"{self.keras_name}: {n} must be in [0, 1), got {getattr(self, n)!r}")

    @property
    def activation_name(self) -> str:
        return "linear"      # the cell applies its activation itself

    @property
    def cell_activation(self) -> str:
        return self.activation or "linear"

    def output_shape(self, shape):
        if len(shape) != 2:
            raise LayerError(f"takes sequences (timesteps, features), got per-example shape {shape}")
        return (shape[0], self.units) if self.return_sequences else (self.units,)

    def params(self, shape):
        f, h, g = shape[-1], self.units, self.gates
        return g * (f * h + h * h) + self._bias_size(), 0

    def _bias_size(self) -> int:
        return self.gates * self.units if self.use_bias else 0

    def flops(self, shape):
        return 2.0 * shape[0] * (shape[-1] + self.units) * self.gates * self.units


@dataclass
class SimpleRNN(_Recurrent):
    kind = "simple_rnn"
    keras_name = "SimpleRNN"


@dataclass
class LSTM(_Recurrent):
    recurrent_activation: str = "sigmoid"
    unit_forget_bias: bool = True
    gates = 4
    kind = "lstm"
    keras_name = "LSTM"


@dataclass
class GRU(_Recurrent):
    recurrent_activation: str = "sigmoid"
    reset_after: bool = True
    gates = 3
    kind = "gru"
    keras_name = "GRU"

    def _bias_size(self):
        return (2 if self.reset_after else 1) * 3 * self.units if self.use_bias else 0


@dataclass
class Bidirectional(Layer):
    """A recurrent layer run forwards and (a twin) backwards, outputs merged by `merge_mode` ("concat" | "sum" |
    "mul" | "ave"). YAML: `{bidirectional: {layer: {lstm: {units: 16}}, merge_mode: concat}}`."""
    layer: Any = None
    merge_mode: str = "concat"
    kind = "bidirectional"
    keras_name = "Bidirectional"

    def validate(self):
        if isinstance(self.layer, (dict, str)):
            self.layer = layer_from_dict(self.layer)
        if not isinstance(self.layer, _Recurrent):
            raise LayerError(f"Bidirectional: layer must be a SimpleRNN, LSTM or GRU, got {self.layer!r}")
        if self.merge_mode not in ("concat", "sum", "mul", "ave"):
            raise LayerError(f"Bidirectional: merge_mode must be one of concat, sum, mul, ave, got "
                             f"{self.merge_mode!r}")

    @property
    def return_sequences(self) -> bool:
        return self.layer.return_sequences

    def output_shape(self, shape):
        out = self.layer.output_shape(shape)
        return (*out[:-1], 2 * out[-1]) if self.merge_mode == "concat" else out

    def params(self, shape):
        t, f = self.layer.params(shape)
        return 2 * t, 2 * f

    def flops(self, shape):
        return 2 * self.layer.flops(shape)

    def to_dict(self):
        opts = {"layer": self.layer.to_dict()}
        if self.merge_mode != "concat":
            opts["merge_mode"] = self.merge_mode
        if self.name:
            opts["name"] = self.name
        return {self.kind: opts}


@dataclass
class GlobalAveragePooling1D(Layer):
    """[T, F] → [F]: the mean over time, over the valid steps only when a mask arrives (Keras's masked mean)."""
    kind = "global_average_pooling1d"
    keras_name = "GlobalAveragePooling1D"

    def output_shape(self, shape):
        if len(shape) != 2:
            raise LayerError(f"takes sequences (timesteps, features), got per-example shape {shape}")
        return (shape[1],)


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

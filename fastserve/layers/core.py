"""`fastserve.layers`' feed-forward and convolutional specs: Dense, Conv2D, pooling, Flatten, Dropout, the
normalizations, Embedding, Activation and Reshape."""
from __future__ import annotations

import math
from dataclasses import dataclass

from fastserve.layers.base import Layer, LayerError, _pair, _spatial, check_activation


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

"""`model.name: sequential` — a stack of Keras-style layers (fastserve.layers) as one NNX module.

YAML: `model: {name: sequential, input_shape: [784], layers: [{dense: {units: 128, activation: relu}}, ...,
{dense: {units: 10, activation: softmax}}]}`. Shapes are inferred layer by layer from `input_shape` when the config
loads; a layer that cannot take its input fails there, naming it.

inputs [B, *input_shape] → the last layer's output *before its activation* (float32): for a final softmax / sigmoid
these are the logits, which is what the `classify` task and the `keras_loss` task's cross-entropies want (stable);
`final_activation` names the activation left out and `outputs()` applies it (what Keras's `predict` returns).

Every parameter names its logical axes: dense kernels (`dense_in`, `dense_out`), conv kernels like the cnn family's
(None, None, `conv_in`, `conv_out`), norm scales `norm`, embedding tables (`vocab`, `embed`). Train mode: dropout on
(from the `dropout` stream of the `rngs` passed to `__call__`), batch norm on batch statistics, over the examples
`mask` marks valid (padding rows of a last partial batch do not count); eval mode: running statistics.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fastserve import layers as L
from fastserve.models.cnn import KERNEL_AXES, NORM_AXES
from fastserve.models.layers import dtype_of, matmul

DENSE_AXES = ("dense_in", "dense_out")

ACTIVATION_FNS = {
    "linear": lambda x: x,
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.2),      # Keras's default negative slope
    "elu": jax.nn.elu,
    "selu": jax.nn.selu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),    # Keras's default
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "hard_sigmoid": jax.nn.hard_sigmoid,
    "softmax": lambda x: jax.nn.softmax(x, axis=-1),
    "log_softmax": lambda x: jax.nn.log_softmax(x, axis=-1),
    "softplus": jax.nn.softplus,
    "softsign": jax.nn.soft_sign,
    "exponential": jnp.exp,
    "mish": jax.nn.mish,
}
assert set(ACTIVATION_FNS) == set(L.ACTIVATIONS)


def activate(name: str, x: jax.Array) -> jax.Array:
    return ACTIVATION_FNS[name](x)


@dataclass
class SequentialConfig:
    """`model.name: sequential` — a Keras-style layer stack (registered in fastserve.registry)."""
    name: str = "sequential"
    input_shape: list[int] = field(default_factory=list)   # per example, without the batch axis
    layers: list[Any] = field(default_factory=list)         # [{dense: {units: 128, activation: relu}}, flatten, ...]
    dtype: str = "float32"
    param_dtype: str = "float32"

    def checks(self):
        from fastserve.models.layers import check_dtypes

        yield from check_dtypes(self)
        if not self.layers:
            yield "layers", "needs at least one layer, e.g. [{dense: {units: 10}}]"
            return
        specs = []
        for i, entry in enumerate(self.layers):
            try:
                specs.append(L.layer_from_dict(entry))
            except L.LayerError as e:
                yield f"layers[{i}]", str(e)
                return
        try:
            L.plan(self.input_shape, specs)
        except L.LayerError as e:
            yield "layers" if self.input_shape else "input_shape", str(e)

    def specs(self) -> list[L.Layer]:
        return [L.layer_from_dict(e) for e in self.layers]

    def plan(self) -> list[L.Planned]:
        return L.plan(self.input_shape, self.specs())

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.plan()[-1].output_shape

    @property
    def input_dtype(self):
        return jnp.int32 if isinstance(self.specs()[0], L.Embedding) else jnp.float32

    def build(self, rngs: nnx.Rngs) -> "SequentialNet":
        return SequentialNet(self, rngs=rngs)

    def flops_per_example(self) -> float:
        """Training FLOPs (forward + backward ≈ 3 × forward) per example: matmuls and convolutions."""
        return 3.0 * sum(p.spec.flops(p.input_shape) for p in self.plan())

    def forward_inputs(self, batch) -> dict[str, jax.ShapeDtypeStruct]:
        """What a `forward` export takes (it returns the pre-final-activation outputs, see the module docstring)."""
        return {"inputs": jax.ShapeDtypeStruct((batch, *self.input_shape), self.input_dtype)}


# ------------------------------------------------------------------------------------------------ layers

class DenseLayer(nnx.Module):
    def __init__(self, spec: L.Dense, d_in: int, cfg: SequentialConfig, rngs: nnx.Rngs):
        pd = dtype_of(cfg.param_dtype)
        init = nnx.initializers.glorot_uniform()      # Keras's default, biases zero
        self.kernel = nnx.Param(init(rngs.params(), (d_in, spec.units), pd), out_sharding=DENSE_AXES)
        self.bias = nnx.Param(jnp.zeros((spec.units,), pd), out_sharding=DENSE_AXES[1:]) if spec.use_bias else None
        self.dtype = dtype_of(cfg.dtype)

    def __call__(self, x, **_):
        dot = matmul if jax.default_backend() == "cpu" else jnp.dot   # as fastserve.models.layers.Linear
        y = dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class ConvLayer(nnx.Module):
    def __init__(self, spec: L.Conv2D, c_in: int, cfg: SequentialConfig, rngs: nnx.Rngs):
        self.conv = nnx.Conv(c_in, spec.filters, L._pair(spec.kernel_size, "kernel_size"),
                             strides=L._pair(spec.strides, "strides"), padding=spec.padding.upper(),
                             use_bias=spec.use_bias, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype),
                             kernel_init=nnx.initializers.glorot_uniform(),
                             kernel_metadata={"out_sharding": KERNEL_AXES},
                             bias_metadata={"out_sharding": KERNEL_AXES[-1:]}, rngs=rngs)

    def __call__(self, x, **_):
        return self.conv(x)


class PoolLayer(nnx.Module):
    def __init__(self, spec: L._Pool2D):
        self.window, self.strides = spec.window()
        self.padding, self.max = spec.padding.upper(), isinstance(spec, L.MaxPool2D)

    def __call__(self, x, **_):
        if self.max:
            return nnx.max_pool(x, self.window, strides=self.strides, padding=self.padding)
        return nnx.avg_pool(x, self.window, strides=self.strides, padding=self.padding, count_include_pad=False)


class BatchNormLayer(nnx.Module):
    def __init__(self, spec: L.BatchNormalization, c: int, cfg: SequentialConfig, rngs: nnx.Rngs):
        self.norm = nnx.BatchNorm(c, momentum=spec.momentum, epsilon=spec.epsilon, dtype=dtype_of(cfg.dtype),
                                  param_dtype=dtype_of(cfg.param_dtype), scale_metadata={"out_sharding": NORM_AXES},
                                  bias_metadata={"out_sharding": NORM_AXES}, rngs=rngs)

    def __call__(self, x, mask=None, **_):
        if mask is not None:  # per-example validity [B] → broadcast over the other axes (statistics skip padding)
            mask = jnp.broadcast_to(mask.reshape(mask.shape[0], *([1] * (x.ndim - 1))), x.shape)
        return self.norm(x, mask=mask)


class LayerNormLayer(nnx.Module):
    def __init__(self, spec: L.LayerNormalization, c: int, cfg: SequentialConfig, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(c, epsilon=spec.epsilon, dtype=dtype_of(cfg.dtype),
                                  param_dtype=dtype_of(cfg.param_dtype), scale_metadata={"out_sharding": NORM_AXES},
                                  bias_metadata={"out_sharding": NORM_AXES}, rngs=rngs)

    def __call__(self, x, **_):
        return self.norm(x)


class EmbeddingLayer(nnx.Module):
    def __init__(self, spec: L.Embedding, cfg: SequentialConfig, rngs: nnx.Rngs):
        init = nnx.initializers.uniform(0.1)          # Keras: uniform(-0.05, 0.05)
        table = init(rngs.params(), (spec.input_dim, spec.output_dim), dtype_of(cfg.param_dtype)) - 0.05
        self.embedding = nnx.Param(table, out_sharding=("vocab", "embed"))
        self.dtype = dtype_of(cfg.dtype)

    def __call__(self, x, **_):
        return jnp.take(self.embedding[...], x.astype(jnp.int32), axis=0).astype(self.dtype)


class DropoutLayer(nnx.Module):
    def __init__(self, spec: L.Dropout):
        self.dropout = nnx.Dropout(spec.rate)        # no rngs here: the train step passes them to __call__

    def __call__(self, x, rngs=None, **_):
        return self.dropout(x, rngs=rngs)


class ShapeLayer(nnx.Module):
    """Flatten, Reshape, GlobalAveragePooling2D, Activation: no variables."""

    def __init__(self, spec: L.Layer, out_shape: tuple[int, ...]):
        self.kind, self.out_shape = spec.kind, tuple(out_shape)

    def __call__(self, x, **_):
        if self.kind == "global_average_pooling2d":
            return jnp.mean(x, axis=(1, 2))
        if self.kind in ("flatten", "reshape"):
            return x.reshape(x.shape[0], *self.out_shape)
        return x                                      # Activation: applied by the model after the layer


def _build_layer(p: L.Planned, cfg: SequentialConfig, rngs: nnx.Rngs) -> nnx.Module:
    s, shape = p.spec, p.input_shape
    if isinstance(s, L.Dense):
        return DenseLayer(s, shape[-1], cfg, rngs)
    if isinstance(s, L.Conv2D):
        return ConvLayer(s, shape[-1], cfg, rngs)
    if isinstance(s, L._Pool2D):
        return PoolLayer(s)
    if isinstance(s, L.BatchNormalization):
        return BatchNormLayer(s, shape[-1], cfg, rngs)
    if isinstance(s, L.LayerNormalization):
        return LayerNormLayer(s, shape[-1], cfg, rngs)
    if isinstance(s, L.Embedding):
        return EmbeddingLayer(s, cfg, rngs)
    if isinstance(s, L.Dropout):
        return DropoutLayer(s)
    return ShapeLayer(s, p.output_shape)


class SequentialNet(nnx.Module):
    """inputs [B, *input_shape] → the last layer's pre-activation outputs [B, *output_shape] (float32)."""

    accepts_example_mask = True   # `mask` [B]: which examples batch norm counts (the keras_loss task passes it)

    def __init__(self, cfg: SequentialConfig, *, rngs: nnx.Rngs):
        planned = cfg.plan()
        self.input_shape = tuple(cfg.input_shape)
        self.int_inputs = isinstance(planned[0].spec, L.Embedding)
        self.names = tuple(p.name for p in planned)
        self.activations = tuple(p.spec.activation_name for p in planned)
        self.final_activation = self.activations[-1]
        self.layers = nnx.Dict({p.name: _build_layer(p, cfg, rngs) for p in planned})

    def __call__(self, inputs: jax.Array, *, rngs: nnx.Rngs | None = None, mask: jax.Array | None = None) -> jax.Array:
        if tuple(inputs.shape[1:]) != self.input_shape:
            raise ValueError(f"the sequential model (input_shape={list(self.input_shape)}) takes inputs "
                             f"[batch, {', '.join(map(str, self.input_shape))}], got shape {tuple(inputs.shape)}")
        x = inputs.astype(jnp.int32) if self.int_inputs else inputs.astype(jnp.float32)
        last = len(self.names) - 1
        for i, (name, act) in enumerate(zip(self.names, self.activations)):
            x = self.layers[name](x, rngs=rngs, mask=mask)
            if i < last:
                x = activate(act, x)
        return x.astype(jnp.float32)

    def outputs(self, inputs: jax.Array, **kw) -> jax.Array:
        """What Keras's model(x) / predict returns: the final activation applied."""
        return activate(self.final_activation, self(inputs, **kw))

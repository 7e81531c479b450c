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

Recurrent layers (SimpleRNN, LSTM, GRU, Bidirectional) are fastserve.models.recurrent's modules, their parameters
named as Keras's (`cell.kernel`, `cell.recurrent_kernel`, `cell.bias`; `forward_layer`, `backward_layer`).
Sequence masking as Keras's: after `Embedding(mask_zero=True)` a mask [B, T] (ids != 0) goes to the recurrent layers
and GlobalAveragePooling1D (padded steps leave a state unchanged and are left out of the mean), passes through the
layers that keep the time axis (Dense, Dropout, Activation, normalizations, return_sequences=True recurrent layers)
and is consumed by the others — so trailing padding changes no prediction.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fastserve import layers as L
from fastserve.layers.base import _pair
from fastserve.layers.core import _Pool2D
from fastserve.layers.recurrent import _Recurrent
from fastserve.models import recurrent
from fastserve.models.cnn import KERNEL_AXES, NORM_AXES
from fastserve.models.dropout import Dropout
from fastserve.models.layers import dtype_of, matmul, pool2d

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
    # true: __call__ applies the final activation too (probabilities: what a Keras predict export returns)
    activate_outputs: bool = False
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
        """What a `forward` export takes (it returns the pre-final-activation outputs unless `activate_outputs`)."""
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
        self.conv = nnx.Conv(c_in, spec.filters, _pair(spec.kernel_size, "kernel_size"),
                             strides=_pair(spec.strides, "strides"), padding=spec.padding.upper(),
                             use_bias=spec.use_bias, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype),
                             kernel_init=nnx.initializers.glorot_uniform(),
                             kernel_metadata={"out_sharding": KERNEL_AXES},
                             bias_metadata={"out_sharding": KERNEL_AXES[-1:]}, rngs=rngs)

    def __call__(self, x, **_):
        return self.conv(x)


class PoolLayer(nnx.Module):
    def __init__(self, spec: _Pool2D):
        self.window, self.strides = spec.window()
        self.padding, self.max = spec.padding.upper(), isinstance(spec, L.MaxPool2D)

    def __call__(self, x, **_):
        return pool2d(x, self.window, self.strides, self.padding, "max" if self.max else "avg")


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
        self.dropout = Dropout(spec.rate)        # no rngs here: the train step passes them to __call__

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


class GlobalAveragePooling1DLayer(nnx.Module):
    """[B, T, F] → [B, F]: the mean over the steps the sequence mask marks valid (all steps without one)."""

    def __call__(self, x, mask=None, **_):
        if mask is None:
            return jnp.mean(x, axis=1)
        m = mask.astype(x.dtype)[..., None]
        return jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1)


_RNN_MODULES = {L.SimpleRNN: recurrent.SimpleRNN, L.LSTM: recurrent.LSTM, L.GRU: recurrent.GRU}


def _build_recurrent(s: _Recurrent, d_in: int, cfg: SequentialConfig, rngs: nnx.Rngs) -> recurrent.RNN:
    cell = {"activation": s.cell_activation, "use_bias": s.use_bias}
    if isinstance(s, L.LSTM):
        cell |= {"recurrent_activation": s.recurrent_activation, "unit_forget_bias": s.unit_forget_bias}
    if isinstance(s, L.GRU):
        cell |= {"recurrent_activation": s.recurrent_activation, "reset_after": s.reset_after}
    return _RNN_MODULES[type(s)](d_in, s.units, rngs=rngs, return_sequences=s.return_sequences,
                                 go_backwards=s.go_backwards, dropout=s.dropout, recurrent_dropout=s.recurrent_dropout,
                                 dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype), **cell)


def _build_layer(p: L.Planned, cfg: SequentialConfig, rngs: nnx.Rngs) -> nnx.Module:
    s, shape = p.spec, p.input_shape
    if isinstance(s, _Recurrent):      # fastserve.models.recurrent's modules, called with the sequence mask
        return _build_recurrent(s, shape[-1], cfg, rngs)
    if isinstance(s, L.Bidirectional):
        return recurrent.Bidirectional(_build_recurrent(s.layer, shape[-1], cfg, rngs), s.merge_mode, rngs=rngs)
    if isinstance(s, L.GlobalAveragePooling1D):
        return GlobalAveragePooling1DLayer()
    if isinstance(s, L.Dense):
        return DenseLayer(s, shape[-1], cfg, rngs)
    if isinstance(s, L.Conv2D):
        return ConvLayer(s, shape[-1], cfg, rngs)
    if isinstance(s, _Pool2D):
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
        if cfg.activate_outputs:   # __call__ returns activated outputs: nothing is left for a loss to fold in
            self.activations, self.final_activation = (*self.activations[:-1], "linear"), "linear"
            self.output_activation = planned[-1].spec.activation_name
        else:
            self.output_activation = "linear"
        # sequence masking (Keras): Embedding(mask_zero=True) makes a mask [B, T] (ids != 0); the layers that take
        # it get it in place of the example mask, it survives the layers that keep the time axis step for step
        # (L.passes_mask) and is dropped by the others (a recurrent layer with return_sequences=False consumes it)
        self.mask_zero = self.int_inputs and planned[0].spec.mask_zero
        self.takes_seq_mask = tuple(L.takes_sequence_mask(p.spec) for p in planned)
        self.passes_mask = tuple(L.passes_mask(p.spec) for p in planned)
        self.layers = nnx.Dict({p.name: _build_layer(p, cfg, rngs) for p in planned})

    def __call__(self, inputs: jax.Array, *, rngs: nnx.Rngs | None = None, mask: jax.Array | None = None) -> jax.Array:
        if tuple(inputs.shape[1:]) != self.input_shape:
            raise ValueError(f"the sequential model (input_shape={list(self.input_shape)}) takes inputs "
                             f"[batch, {', '.join(map(str, self.input_shape))}], got shape {tuple(inputs.shape)}")
        x = inputs.astype(jnp.int32) if self.int_inputs else inputs.astype(jnp.float32)
        last = len(self.names) - 1
        seq_mask = x != 0 if self.mask_zero else None       # [B, *input_shape]: after the embedding, per step
        for i, (name, act) in enumerate(zip(self.names, self.activations)):
            if self.takes_seq_mask[i]:
                x = self.layers[name](x, rngs=rngs, mask=seq_mask)   # return_sequences: padded steps give 0
            else:
                x = self.layers[name](x, rngs=rngs, mask=mask)
            if i > 0 and not self.passes_mask[i]:
                seq_mask = None
            if i < last:
                x = activate(act, x)
        return activate(self.output_activation, x).astype(jnp.float32)

    def outputs(self, inputs: jax.Array, **kw) -> jax.Array:
        """What Keras's model(x) / predict returns: the final activation applied."""
        return activate(self.final_activation, self(inputs, **kw))

"""Recurrent layers — SimpleRNN, LSTM, GRU and Bidirectional — with Keras' equations, gate layouts and masking.

Each layer runs its cell over time with one `jax.lax.scan` (one compiled loop whatever T is). The input-side matmul
(x @ kernel, + the input bias) is done for all T steps at once before the scan; only h @ recurrent_kernel runs
inside it. The recurrent state is carried in float32 (an LSTM's cell state accumulates), the matmuls run in `dtype`.

    layer = LSTM(in_features, units, rngs=nnx.Rngs(0), return_sequences=True)
    y = layer(x, mask, rngs=rngs)       # x [B, T, F], mask [B, T] bool (true on real steps) or None
                                        # → y [B, T, H] (return_sequences) or [B, H] (the last valid step's state)

Masking (Keras semantics): at a masked step the state is carried through unchanged and the output is zeros. So
padded steps neither update the state nor contribute, whatever they hold, and with `return_sequences=False` the
result is the state after the last *valid* step (a fully masked row gives the initial state, zeros). (Padded
inputs may hold anything in a forward pass, NaN included; when training keep them finite: the kernel's gradient
multiplies every step's input by its — zero — cotangent, and NaN · 0 is NaN.)
`go_backwards=True` processes the time axis in reverse and — as in Keras — returns the output sequence in that
reversed order. Since masked steps are identities, reversing the whole T axis of a right-padded row is the same as
reversing its valid part only: the padding is skipped before the first valid step is seen.

Parameters, named and laid out as Keras (so Keras weights load by name, with no reordering; H = units, F = inputs):

    SimpleRNN  cell.kernel [F, H]    cell.recurrent_kernel [H, H]    cell.bias [H]
               h = act(x·W + h₋₁·U + b)
    LSTM       cell.kernel [F, 4H]   cell.recurrent_kernel [H, 4H]   cell.bias [4H]      gates i, f, c, o
               z = x·W + h₋₁·U + b;  i = σ(z_i)  f = σ(z_f)  c = f·c₋₁ + i·act(z_c)  o = σ(z_o)  h = o·act(c)
               (unit_forget_bias: the f quarter of the bias starts at 1)
    GRU        cell.kernel [F, 3H]   cell.recurrent_kernel [H, 3H]   gates z, r, h
               reset_after=True  (Keras 3 default, cuDNN-compatible): cell.bias [2, 3H] (row 0 input, row 1 recurrent)
                   xz|xr|xh = x·W + b[0];  rz|rr|rh = h₋₁·U + b[1]
                   z = σ(xz + rz)  r = σ(xr + rr)  ĥ = act(xh + r·rh)  h = z·h₋₁ + (1 − z)·ĥ
               reset_after=False: cell.bias [3H];  xz|xr|xh = x·W + b
                   z = σ(xz + h₋₁·U_z)  r = σ(xr + h₋₁·U_r)  ĥ = act(xh + (r·h₋₁)·U_h)  h = z·h₋₁ + (1 − z)·ĥ
    (σ = recurrent_activation, default sigmoid; act = activation, default tanh.) Bidirectional holds
    `forward_layer` and `backward_layer` (Keras' names). Initializers are Keras': glorot-uniform kernels,
    orthogonal recurrent kernels, zero biases.

Dropout (Keras 3): `dropout` on the inputs and `recurrent_dropout` on h₋₁ where it enters the recurrent matmul,
each with one mask per sequence (the same for every step; drawn from the `dropout` stream of the `rngs` passed to
`__call__`; on only in train mode). Keras 3 multiplies the dropped h₋₁ into the GRU update h = z·h₋₁ + … as well;
here the carried state itself is never dropped (Gal & Ghahramani's variational RNN) — inference is identical.

A pure definition: no I/O, no training logic, no sharding decisions (only logical axis names, see parallel.py).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from fastserve.models.dropout import Dropout
from fastserve.models.layers import constrain

# Logical axes (fastserve.parallel.LOGICAL_RULES). The input kernel's feature axis is `embed` (→ fsdp): it is used
# once per call, outside the time loop, so FSDP's gather happens once. The fused gate axis (G·H: 4H for LSTM, 3H for
# GRU) is `rnn_gates` and the recurrent kernel's input axis `rnn_hidden`, both replicated: every step splits the
# gate axis into its gates (a tensor-sharded fused axis that is then split rematerializes, like a fused QKV), and
# every step needs the whole hidden vector, so sharding either would put a collective inside each scan iteration.
KERNEL_AXES = ("embed", "rnn_gates")
RECURRENT_AXES = ("rnn_hidden", "rnn_gates")
BIAS_AXES = ("rnn_gates",)
GRU_BIAS_AXES = (None, "rnn_gates")   # reset_after: [2, 3H], row 0 input bias, row 1 recurrent bias

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "hard_sigmoid": jax.nn.hard_sigmoid,   # Keras 3's: relu6(x + 3) / 6
    "relu": jax.nn.relu,
    "linear": lambda x: x,
}
MERGE_MODES = ("concat", "sum", "mul", "ave", None)


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{name}' (choose from {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def _params(rngs: nnx.Rngs, in_features: int, units: int, gates: int, param_dtype: Any):
    kernel = nnx.initializers.glorot_uniform()(rngs.params(), (in_features, gates * units), param_dtype)
    recurrent = nnx.initializers.orthogonal()(rngs.params(), (units, gates * units), param_dtype)
    return nnx.Param(kernel, out_sharding=KERNEL_AXES), nnx.Param(recurrent, out_sharding=RECURRENT_AXES)


def _dot(x: jax.Array, w: jax.Array, dtype: Any) -> jax.Array:
    return jnp.dot(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


# ------------------------------------------------------------------------------------------------- cells
# A cell computes one step. `project(x)` is the input side for all steps at once ([B, T, F] → [B, T, G·H], float32);
# `step(state, xw_t, h_mask)` maps a state (a tuple of [B, H] float32 arrays, h first) and one step's projection to
# the new state; `h_mask` ([B, H] or None) is the recurrent-dropout mask applied to h₋₁ in the recurrent matmul.

class SimpleRNNCell(nnx.Module):
    n_states = 1
    gates = 1

    def __init__(self, in_features: int, units: int, *, rngs: nnx.Rngs, activation: str = "tanh",
                 use_bias: bool = True, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        self.kernel, self.recurrent_kernel = _params(rngs, in_features, units, 1, param_dtype)
        self.bias = nnx.Param(jnp.zeros((units,), param_dtype), out_sharding=BIAS_AXES) if use_bias else None
        self.units, self.activation, self.dtype = units, activation, dtype

    def project(self, x: jax.Array) -> jax.Array:
        xw = _dot(x, self.kernel[...], self.dtype)
        return xw if self.bias is None else xw + self.bias[...].astype(jnp.float32)

    def step(self, state, xw, h_mask=None):
        (h,) = state
        hr = h if h_mask is None else h * h_mask
        return (activation_fn(self.activation)(xw + _dot(hr, self.recurrent_kernel[...], self.dtype)),)


class LSTMCell(nnx.Module):
    n_states = 2      # (h, c)
    gates = 4         # i, f, c, o

    def __init__(self, in_features: int, units: int, *, rngs: nnx.Rngs, activation: str = "tanh",
                 recurrent_activation: str = "sigmoid", use_bias: bool = True, unit_forget_bias: bool = True,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        self.kernel, self.recurrent_kernel = _params(rngs, in_features, units, 4, param_dtype)
        if use_bias:
            bias = jnp.zeros((4 * units,), param_dtype)
            if unit_forget_bias:
                bias = bias.at[units:2 * units].set(1)
            self.bias = nnx.Param(bias, out_sharding=BIAS_AXES)
        else:
            self.bias = None
        self.units, self.activation, self.recurrent_activation, self.dtype = (units, activation,
                                                                             recurrent_activation, dtype)

    def project(self, x: jax.Array) -> jax.Array:
        xw = _dot(x, self.kernel[...], self.dtype)
        return xw if self.bias is None else xw + self.bias[...].astype(jnp.float32)

    def step(self, state, xw, h_mask=None):
        h, c = state
        hr = h if h_mask is None else h * h_mask
        z = xw + _dot(hr, self.recurrent_kernel[...], self.dtype)
        zi, zf, zc, zo = jnp.split(z, 4, axis=-1)
        sig, act = activation_fn(self.recurrent_activation), activation_fn(self.activation)
        c = sig(zf) * c + sig(zi) * act(zc)
        return sig(zo) * act(c), c


class GRUCell(nnx.Module):
    n_states = 1
    gates = 3         # z, r, h

    def __init__(self, in_features: int, units: int, *, rngs: nnx.Rngs, activation: str = "tanh",
                 recurrent_activation: str = "sigmoid", use_bias: bool = True, reset_after: bool = True,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        self.kernel, self.recurrent_kernel = _params(rngs, in_features, units, 3, param_dtype)
        if not use_bias:
            self.bias = None
        elif reset_after:
            self.bias = nnx.Param(jnp.zeros((2, 3 * units), param_dtype), out_sharding=GRU_BIAS_AXES)
        else:
            self.bias = nnx.Param(jnp.zeros((3 * units,), param_dtype), out_sharding=BIAS_AXES)
        self.units, self.activation, self.recurrent_activation = units, activation, recurrent_activation
        self.reset_after, self.dtype = reset_after, dtype

    def project(self, x: jax.Array) -> jax.Array:
        xw = _dot(x, self.kernel[...], self.dtype)
        if self.bias is None:
            return xw
        b = self.bias[...].astype(jnp.float32)
        return xw + (b[0] if self.reset_after else b)

    def step(self, state, xw, h_mask=None):
        (h,) = state
        hr = h if h_mask is None else h * h_mask
        u = self.recurrent_kernel[...]
        sig, act = activation_fn(self.recurrent_activation), activation_fn(self.activation)
        xz, xr, xh = jnp.split(xw, 3, axis=-1)
        if self.reset_after:
            rec = _dot(hr, u, self.dtype)
            if self.bias is not None:
                rec = rec + self.bias[...][1].astype(jnp.float32)
            rz, rr, rh = jnp.split(rec, 3, axis=-1)
            z, r = sig(xz + rz), sig(xr + rr)
            hh = act(xh + r * rh)
        else:
            n = self.units
            rz, rr = jnp.split(_dot(hr, u[:, :2 * n], self.dtype), 2, axis=-1)
            z, r = sig(xz + rz), sig(xr + rr)
            hh = act(xh + _dot(r * hr, u[:, 2 * n:], self.dtype))
        return (z * h + (1 - z) * hh,)


# ------------------------------------------------------------------------------------------------ layers

class RNN(nnx.Module):
    """A cell run over time (the base of SimpleRNN, LSTM, GRU; build those).

    __call__(x [B, T, F], mask [B, T] | None = None, *, initial_state=None, rngs=None):
      → [B, T, H] if return_sequences else [B, H]; with return_state, (output, h) — (output, h, c) for LSTM — where
      the states are the ones after the last valid step. `initial_state`: [B, H] (LSTM: (h, c)); default zeros.
    """
    cell_type: type = None

    def __init__(self, in_features: int, units: int, *, rngs: nnx.Rngs, return_sequences: bool = False,
                 return_state: bool = False, go_backwards: bool = False, dropout: float = 0.0,
                 recurrent_dropout: float = 0.0, unroll: int = 1, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, **cell_kwargs):
        for name, rate in (("dropout", dropout), ("recurrent_dropout", recurrent_dropout)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {rate}")
        self.cell = self.cell_type(in_features, units, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                   **cell_kwargs)
        self.dropout = Dropout(dropout, broadcast_dims=(1,))     # one mask per sequence, shared by the steps
        self.recurrent_dropout = Dropout(recurrent_dropout)       # drawn as a [B, H] mask, once per call
        self.in_features, self.units = in_features, units
        self.return_sequences, self.return_state, self.go_backwards = return_sequences, return_state, go_backwards
        self.unroll, self.dtype, self.param_dtype = unroll, dtype, param_dtype
        self.cell_kwargs = tuple(sorted(cell_kwargs.items()))

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments (less rngs): `type(layer)(**layer.get_config(), rngs=...)` builds a twin."""
        return dict(in_features=self.in_features, units=self.units, return_sequences=self.return_sequences,
                    return_state=self.return_state, go_backwards=self.go_backwards, dropout=self.dropout.rate,
                    recurrent_dropout=self.recurrent_dropout.rate, unroll=self.unroll, dtype=self.dtype,
                    param_dtype=self.param_dtype, **dict(self.cell_kwargs))

    @property
    def output_features(self) -> int:
        return self.units

    def __call__(self, x: jax.Array, mask: jax.Array | None = None, *, initial_state: Any = None,
                 rngs: nnx.Rngs | None = None):
        b, t, _ = x.shape
        x = self.dropout(x, rngs=rngs)
        xw = constrain(self.cell.project(x), ("batch", None, None))              # [B, T, G·H] float32
        h_mask = None
        if self.recurrent_dropout.rate > 0 and not self.recurrent_dropout.deterministic:
            h_mask = self.recurrent_dropout(jnp.ones((b, self.units), jnp.float32), rngs=rngs)
        if initial_state is None:
            state = tuple(jnp.zeros((b, self.units), jnp.float32) for _ in range(self.cell.n_states))
        else:
            init = (initial_state,) if hasattr(initial_state, "ndim") else tuple(initial_state)
            if len(init) != self.cell.n_states:
                raise ValueError(f"initial_state: expected {self.cell.n_states} array(s) [B, {self.units}], "
                                 f"got {len(init)}")
            state = tuple(s.astype(jnp.float32) for s in init)

        xs = jnp.swapaxes(xw, 0, 1)                                               # time-major [T, B, G·H]
        ms = None if mask is None else jnp.swapaxes(mask.astype(bool), 0, 1)      # [T, B]
        if self.go_backwards:
            xs = jnp.flip(xs, 0)
            ms = None if ms is None else jnp.flip(ms, 0)

        def body(state, inputs):
            xw_t, m_t = inputs
            new = self.cell.step(state, xw_t, h_mask)
            if m_t is not None:   # a masked step: the state goes through unchanged, the output is zeros
                keep = m_t[:, None]
                new = tuple(jnp.where(keep, n, s) for n, s in zip(new, state))
                return new, jnp.where(keep, new[0], 0)
            return new, new[0]

        state, ys = jax.lax.scan(body, state, (xs, ms), unroll=self.unroll)
        out = jnp.swapaxes(ys, 0, 1).astype(self.dtype) if self.return_sequences else state[0].astype(self.dtype)
        if self.return_state:
            return (out, *(s.astype(self.dtype) for s in state))
        return out


class SimpleRNN(RNN):
    """Fully connected RNN, Keras' SimpleRNN. Cell arguments: activation="tanh", use_bias=True."""
    cell_type = SimpleRNNCell


class LSTM(RNN):
    """Keras' LSTM. Cell arguments: activation="tanh", recurrent_activation="sigmoid", use_bias=True,
    unit_forget_bias=True."""
    cell_type = LSTMCell


class GRU(RNN):
    """Keras' GRU. Cell arguments: activation="tanh", recurrent_activation="sigmoid", use_bias=True,
    reset_after=True (Keras 3's default)."""
    cell_type = GRUCell


class Bidirectional(nnx.Module):
    """Keras' Bidirectional: `forward_layer` (the given layer) and `backward_layer` (a fresh twin with go_backwards
    flipped, or the one given), their outputs merged by `merge_mode` ("concat" | "sum" | "mul" | "ave", or None: a
    (forward, backward) pair).

    The backward layer runs on each row's reversed *valid* part (masked steps are identities, so padding is skipped)
    and, with return_sequences, its output is flipped back: position t of both halves describes step t, and padded
    positions are zeros. Without return_sequences the backward half is its state after the row's first step.
    __call__(x [B, T, F], mask [B, T] | None = None, *, rngs=None) → [B, T, 2H] / [B, 2H] for "concat", H otherwise.
    `return_state` layers are not supported here.
    """

    def __init__(self, layer: RNN, merge_mode: str | None = "concat", *, rngs: nnx.Rngs,
                 backward_layer: RNN | None = None):
        if merge_mode not in MERGE_MODES:
            raise ValueError(f"merge_mode: expected one of {MERGE_MODES}, got {merge_mode!r}")
        if backward_layer is None:
            backward_layer = type(layer)(**dict(layer.get_config(), go_backwards=not layer.go_backwards), rngs=rngs)
        if layer.return_state or backward_layer.return_state:
            raise ValueError("Bidirectional does not support return_state layers")
        if layer.return_sequences != backward_layer.return_sequences:
            raise ValueError("forward and backward layers must agree on return_sequences")
        if layer.go_backwards == backward_layer.go_backwards:
            raise ValueError("the backward layer must have the opposite go_backwards of the forward layer")
        self.forward_layer, self.backward_layer = layer, backward_layer
        self.merge_mode = merge_mode
        self.return_sequences = layer.return_sequences

    @property
    def output_features(self) -> int:
        n = self.forward_layer.units
        return n + self.backward_layer.units if self.merge_mode == "concat" else n

    def __call__(self, x: jax.Array, mask: jax.Array | None = None, *, rngs: nnx.Rngs | None = None):
        outs = []
        for layer in (self.forward_layer, self.backward_layer):
            y = layer(x, mask, rngs=rngs)
            if layer.go_backwards and self.return_sequences:
                y = jnp.flip(y, 1)        # back into input order: position t is step t
            outs.append(y)
        fw, bw = outs
        if self.merge_mode == "concat":
            return jnp.concatenate([fw, bw], axis=-1)
        if self.merge_mode == "sum":
            return fw + bw
        if self.merge_mode == "mul":
            return fw * bw
        if self.merge_mode == "ave":
            return (fw + bw) / 2
        return fw, bw

"""`fastserve.layers`' sequence specs: SimpleRNN, LSTM, GRU (the cells are fastserve.models.recurrent's),
Bidirectional and GlobalAveragePooling1D."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastserve.layers.base import Layer, LayerError


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
            from fastserve.layers import layer_from_dict   # the registry knows every family
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

"""The Keras-style face: `Sequential` (add, summary, compile, fit, evaluate, predict, save), `load_model`,
`callbacks`, `losses`, `optimizers`; layer specs are `fastserve.layers`. Also reachable as `fs.models.Sequential`
and `fs.models.load_model`. Everything runs on fastserve's core (see fastserve/keras/model.py)."""
from __future__ import annotations

from fastserve.keras import callbacks, losses, optimizers
from fastserve.keras.model import ModelSummary, Sequential, load_model

__all__ = ["ModelSummary", "Sequential", "callbacks", "load_model", "losses", "optimizers"]

"""Keras-style dataset loaders for the Sequential face: `fs.datasets.fashion_mnist.load_data()` and
`fs.datasets.digits.load_data()` return `(x_train, y_train), (x_test, y_test)` as NumPy arrays (uint8 images,
integer labels), read from installed packages (fastserve/data/vision.py), never downloaded."""
from __future__ import annotations

from fastserve.datasets import digits, fashion_mnist

__all__ = ["digits", "fashion_mnist"]

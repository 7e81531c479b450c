"""`fs.datasets.fashion_mnist.load_data()`: Keras's `keras.datasets.fashion_mnist.load_data()` from the Debian
package dataset-fashion-mnist."""
from __future__ import annotations

import numpy as np

from fastserve.data.vision import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_fashion_mnist

CLASS_NAMES = FASHION_MNIST_CLASSES


def load_data(path: str = FASHION_MNIST_DIR) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """`(x_train [60000, 28, 28] uint8, y_train [60000] uint8), (x_test [10000, 28, 28], y_test [10000])`, as Keras
    returns them; `fastserve.data.MissingPackage` names the Debian package when it is not installed."""
    splits = load_fashion_mnist(path)
    return tuple((x, y.astype(np.uint8)) for x, y in (splits["train"], splits["test"]))

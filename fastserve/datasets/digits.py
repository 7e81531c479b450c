"""`fs.datasets.digits.load_data()`: scikit-learn's 8×8 digits split as the `digits` data source splits them."""
from __future__ import annotations

import numpy as np

from fastserve.data.vision import digits_splits


def load_data(test_examples: int = 360) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """`(x_train [N, 8, 8] uint8 (values 0..16), y_train [N]), (x_test [test_examples, 8, 8], y_test)`: the
    fixed permutation of the `digits` data source, its last `test_examples` as the test split."""
    splits = digits_splits(test_examples)
    return splits["train"], splits["test"]

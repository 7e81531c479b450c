"""Real image data: `data.source: fashion_mnist` (Debian dataset-fashion-mnist) and `data.source: digits`
(scikit-learn's 8×8 digits), as NHWC batches {inputs [B, H, W, 1] float32, labels [B] int32, weights [B]} for the
`classify` task; images go on the `batch` logical axis like every batch, so data parallelism comes from the mesh.

Splits. Fashion-MNIST: the 60,000 training images minus a validation split — the LAST `validation_examples` of the
training file (Keras's `validation_split` rule: the tail is held out, never trained on) — and the 10,000 test
images. Digits (1,797 images, no official split): a fixed permutation (seed 0, independent of `data.seed` and
`train.seed`) puts the last `test_examples` in the test split and the `validation_examples` before them in the
validation split. `eval_split` picks what the trainer and `python -m fastserve.evaluate` score: `validation`
(model selection) or `test` (the number a recipe reports).

Normalization: `standardize` (the training split's pixel mean and std: zero mean, unit variance), `unit` ([0, 1])
or `none` (raw pixel values). Augmentation (training batches only; fastserve/data/augment.py): `crop_padding`
pixels of random crop with zero padding, `flip` horizontal flips; deterministic per `train.seed` and resumable.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastserve.checks import at_least, positive
from fastserve.data.augment import AugmentedImageBatches
from fastserve.data.dataset import Dataset, padded_eval_batches
from fastserve.data.packages import debian_path, pypi_module

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
NORMALIZATIONS = ("standardize", "unit", "none")
EVAL_SPLITS = ("validation", "test")


@dataclass
class _ImageSourceFields:
    validation_examples: int = 5000  # held out from the tail of the training images (never trained on)
    eval_split: str = "validation"   # what the held-out metrics score: validation | test
    normalize: str = "standardize"   # standardize (train mean / std) | unit ([0, 1]) | none
    crop_padding: int = 0            # augmentation: random crop after this much zero padding (0: off)
    flip: bool = False               # augmentation: random horizontal flips
    batch_size: int = 128            # global batch
    train_examples: int = 0          # use only the first N training images (0: all): quick runs and tests
    shuffle: bool = True

    def _checks(self):
        yield from positive(self, "batch_size")
        yield from at_least(self, 0, "validation_examples", "crop_padding", "train_examples")
        if self.eval_split not in EVAL_SPLITS:
            yield "eval_split", f"must be one of {', '.join(EVAL_SPLITS)}, got {self.eval_split!r}"
        if self.normalize not in NORMALIZATIONS:
            yield "normalize", f"must be one of {', '.join(NORMALIZATIONS)}, got {self.normalize!r}"
        if self.eval_split == "validation" and self.validation_examples == 0:
            yield "validation_examples", "is 0, so there is no validation split for eval_split: validation"

    def _dataset(self, cfg: Any, splits: dict[str, tuple[np.ndarray, np.ndarray]], scale: float, what: str) -> Dataset:
        """Train / held-out batches from {"train", "test"} (images [N, H, W] uint8-range, labels [N])."""
        import jax

        x, y = splits["train"]
        n_val = self.validation_examples
        if n_val >= len(x):
            raise ValueError(f"data.validation_examples={n_val} leaves no training images of the {len(x)} in {what}")
        split_at = len(x) - n_val
        held = {"validation": (x[split_at:], y[split_at:]), "test": splits["test"]}[self.eval_split]
        x, y = x[:split_at], y[:split_at]
        if self.train_examples:
            x, y = x[:self.train_examples], y[:self.train_examples]
        normalize = make_normalizer(self.normalize, x, scale)
        pi, pc = jax.process_index(), jax.process_count()
        train = AugmentedImageBatches({"inputs": x[..., None], "labels": y}, self.batch_size, cfg.train.seed,
                                      self.shuffle, pi, pc, normalize, self.crop_padding, self.flip)
        eval_batches = padded_eval_batches({"inputs": normalize(held[0][..., None]), "labels": held[1]},
                                           self.batch_size, pi, pc) if len(held[0]) else []
        if cfg.train.eval_batches > 0:
            eval_batches = eval_batches[:cfg.train.eval_batches]
        side = x.shape[1]
        aug = [f"crop ±{self.crop_padding}"] * bool(self.crop_padding) + ["flip"] * self.flip
        return Dataset(train, eval_batches, len(x), len(held[0]),
                       f"{what}: {len(x)} train / {len(held[0])} {self.eval_split} images {side}×{side}×1, 10 classes"
                       + (f", augmented ({', '.join(aug)})" if aug else ""),
                       model_fields={"image_size": side, "channels": 1, "num_classes": 10})


def make_normalizer(kind: str, train_images: np.ndarray, scale: float):
    """images (any numeric dtype) → float32, by `kind`; `standardize` uses the training images' mean and std."""
    if kind == "none":
        return lambda im: im.astype(np.float32)
    if kind == "unit":
        return lambda im: im.astype(np.float32) / np.float32(scale)
    sample = train_images[:20000].astype(np.float64) / scale
    mean, std = np.float32(sample.mean()), np.float32(max(sample.std(), 1e-6))
    return lambda im: (im.astype(np.float32) / np.float32(scale) - mean) / std


@dataclass
class FashionMNISTConfig(_ImageSourceFields):
    source: str = "fashion_mnist"
    path: str = FASHION_MNIST_DIR    # where the Debian package puts the *-ubyte.gz files

    def checks(self):
        yield from self._checks()
        if self.validation_examples >= 60000:
            yield "validation_examples", f"must be below the 60000 training images, got {self.validation_examples}"

    def prepare(self) -> str:
        splits = load_fashion_mnist(self.path)
        return (f"fashion_mnist: {len(splits['train'][0])} train / {len(splits['test'][0])} test images 28×28 in "
                f"{self.path} (Debian {FASHION_MNIST_PACKAGE})")

    def load(self, cfg: Any) -> Dataset:
        return self._dataset(cfg, load_fashion_mnist(self.path), 255.0, "Fashion-MNIST")


@dataclass
class DigitsConfig(_ImageSourceFields):
    source: str = "digits"
    validation_examples: int = 180
    test_examples: int = 360         # the tail of the fixed permutation
    batch_size: int = 64

    def checks(self):
        yield from self._checks()
        yield from positive(self, "test_examples")
        if self.validation_examples + self.test_examples >= 1797:
            yield "test_examples", (f"validation_examples + test_examples = "
                                    f"{self.validation_examples + self.test_examples} leaves none of the 1797 digits "
                                    "for training")

    def prepare(self) -> str:
        x, _ = _digits_arrays()
        return f"digits: {len(x)} images 8×8 from scikit-learn (sklearn.datasets.load_digits)"

    def load(self, cfg: Any) -> Dataset:
        return self._dataset(cfg, digits_splits(self.test_examples), 16.0, "digits")


def digits_splits(test_examples: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train", "test"}: the 1,797 digits in a fixed order (seed 0), the last `test_examples` as the test split."""
    x, y = _digits_arrays()
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    cut = len(x) - test_examples
    return {"train": (x[:cut], y[:cut]), "test": (x[cut:], y[cut:])}


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    datasets = pypi_module("sklearn.datasets", "scikit-learn", "data.source: digits")
    d = datasets.load_digits()
    return d.images.astype(np.uint8), d.target.astype(np.int32)   # pixel values 0..16


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: magic 0x0000 08 NDIM, big-endian int32 dims, then uint8 data), gzipped."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\0\0" or raw[2] != 8:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} ({int(np.prod(dims))} bytes), the file holds {data.size}")
    return data.reshape(dims)


def load_fashion_mnist(directory: str = FASHION_MNIST_DIR) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (images [60000, 28, 28] uint8, labels [60000] int32), "test": (... 10000 ...)} from the Debian
    package's files; MissingPackage naming it when they are absent."""
    root = debian_path(directory, FASHION_MNIST_PACKAGE, "data.source: fashion_mnist")
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(debian_path(root / f"{prefix}-images-idx3-ubyte.gz", FASHION_MNIST_PACKAGE,
                                      "data.source: fashion_mnist"))
        labels = read_idx(debian_path(root / f"{prefix}-labels-idx1-ubyte.gz", FASHION_MNIST_PACKAGE,
                                      "data.source: fashion_mnist"))
        if len(images) != len(labels):
            raise ValueError(f"{root}: {len(images)} {split} images but {len(labels)} labels")
        out[split] = (images, labels.astype(np.int32))
    return out

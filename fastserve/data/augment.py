"""Image augmentation in the data pipeline: random crop with zero padding and horizontal flip, on NHWC batches.

Deterministic and resumable: the draws of a batch are a function of (seed, epoch, batch index) only, made for the
whole global batch and sliced per process, so a resumed run, or one on another number of hosts, sees the same
augmented images as an uninterrupted single-host one.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from fastserve.data.dataset import ExampleBatches


def random_crop(images: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    """Each image zero-padded by `pad` pixels on every side, then cropped back to its size at a random offset
    (a random translation by up to `pad` pixels, Keras / torchvision's RandomCrop(size, padding))."""
    if pad <= 0:
        return images
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy, dx = rng.integers(0, 2 * pad + 1, size=(2, n))
    rows = dy[:, None] + np.arange(h)[None, :]
    cols = dx[:, None] + np.arange(w)[None, :]
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def random_flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image mirrored left-right with probability 1/2."""
    flip = rng.random(len(images)) < 0.5
    return np.where(flip[:, None, None, None], images[:, :, ::-1], images)


class AugmentedImageBatches(ExampleBatches):
    """Training batches {inputs [B, H, W, C] float32, labels [B] int32, weights [B]} from stored images (uint8 or
    float), augmented (`crop_padding` pixels of random crop, `flip`) before `normalize` turns them into floats."""

    def __init__(self, examples: dict[str, np.ndarray], global_batch: int, seed: int, shuffle: bool,
                 process_index: int, process_count: int, normalize: Callable[[np.ndarray], np.ndarray],
                 crop_padding: int = 0, flip: bool = False):
        super().__init__(examples, global_batch, seed, shuffle, 0, 1, what="images")  # the global batch, sliced below
        self._normalize, self._crop_padding, self._flip = normalize, crop_padding, flip
        self._slice = slice(process_index * global_batch // process_count,
                            (process_index + 1) * global_batch // process_count)
        if global_batch % process_count:
            raise ValueError(f"global_batch {global_batch} is not divisible by process_count {process_count}")

    def __next__(self) -> dict[str, Any]:
        epoch, index = self._epoch, self._index
        batch = super().__next__()
        images = batch["inputs"]
        if self._crop_padding or self._flip:
            rng = np.random.default_rng([self._seed, epoch, index, 7])
            images = random_crop(images, self._crop_padding, rng)
            if self._flip:
                images = random_flip(images, rng)
        n = len(batch["labels"])
        out = {"inputs": self._normalize(images), "labels": batch["labels"], "weights": np.ones(n, np.float32)}
        return {k: v[self._slice] for k, v in out.items()}

"""`data.source: synthetic_images` — seeded, learnable image classes for tests and recipes of image models (no
download).

Each class is a texture: a fixed sum of `components` plane-wave gratings per channel (integer frequencies, random
orientation and phase; unit standard deviation), drawn from `data.seed`. An example of class c is that texture,
circularly shifted by up to `max_shift` pixels, scaled by a contrast in [0.5, 1.5], plus Gaussian pixel noise of
std `noise`. Batches are {inputs [B, S, S, C] float32 (NHWC), labels [B] int32, weights [B] float32}.

The problem (textures and examples) depends on `data.seed` only; the training order follows `train.seed`. Held-out
examples come from their own random stream, so the training examples do not change with `eval_examples`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fastserve.checks import at_least, positive
from fastserve.data.dataset import Dataset, ExampleBatches, padded_eval_batches


@dataclass
class SyntheticImagesConfig:
    source: str = "synthetic_images"
    image_size: int = 16           # square images of this side
    channels: int = 1
    num_classes: int = 10
    train_examples: int = 2048
    eval_examples: int = 512       # 0: no held-out evaluation
    noise: float = 1.0             # pixel noise std (the class textures have std 1)
    max_shift: int = 3             # random circular translation, in pixels, along each axis
    components: int = 3            # gratings summed into each class texture
    batch_size: int = 32           # global batch
    seed: int = 0                  # the data's own seed: the same images whatever train.seed is
    shuffle: bool = True

    def checks(self):
        yield from positive(self, "image_size", "channels", "train_examples", "batch_size", "components")
        if self.num_classes < 2:
            yield "num_classes", f"must be at least 2, got {self.num_classes}"
        yield from at_least(self, 0, "eval_examples", "noise", "max_shift", "seed")
        if self.image_size < 4:
            yield "image_size", f"must be at least 4 (textures need room for a few periods), got {self.image_size}"
        if self.train_examples < self.batch_size:
            yield "train_examples", f"fewer than one batch of {self.batch_size}, got {self.train_examples}"

    def load(self, cfg: Any) -> Dataset:
        import jax

        pi, pc = jax.process_index(), jax.process_count()
        textures = class_textures(self)
        train = make_examples(self, textures, self.train_examples, split=0)
        held_out = make_examples(self, textures, self.eval_examples, split=1)
        batches = ImageBatches(train, self.batch_size, cfg.train.seed, self.shuffle, pi, pc, what="images")
        eval_batches = padded_eval_batches(held_out, self.batch_size, pi, pc) if self.eval_examples else []
        if cfg.train.eval_batches > 0:
            eval_batches = eval_batches[:cfg.train.eval_batches]
        s, c = self.image_size, self.channels
        return Dataset(batches, eval_batches, self.train_examples, self.eval_examples,
                       f"{self.train_examples} train / {self.eval_examples} held-out synthetic {s}×{s}×{c} images, "
                       f"{self.num_classes} classes",
                       model_fields={"image_size": s, "channels": c, "num_classes": self.num_classes})


class ImageBatches(ExampleBatches):
    """Training batches {inputs, labels, weights (ones)}."""

    def make_batch(self, examples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**examples, "weights": np.ones(len(examples["labels"]), np.float32)}


def class_textures(cfg: SyntheticImagesConfig) -> np.ndarray:
    """[num_classes, S, S, C] float32: per class and channel, a sum of gratings with integer frequencies (so a
    circular shift only changes their phases), normalized to mean 0 and std 1."""
    rng = np.random.default_rng([cfg.seed, 2])
    s = cfg.image_size
    y, x = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    top = max(1, s // 4)  # frequencies up to a quarter of the side: at least 4 pixels per period
    out = np.zeros((cfg.num_classes, s, s, cfg.channels), np.float64)
    for c in range(cfg.num_classes):
        for ch in range(cfg.channels):
            for _ in range(cfg.components):
                fy, fx = rng.integers(-top, top + 1, size=2)
                if fy == 0 and fx == 0:
                    fx = 1
                phase = rng.uniform(0, 2 * np.pi)
                out[c, :, :, ch] += rng.uniform(0.5, 1.0) * np.cos(2 * np.pi * (fy * y + fx * x) / s + phase)
            plane = out[c, :, :, ch]
            out[c, :, :, ch] = (plane - plane.mean()) / max(plane.std(), 1e-6)
    return out.astype(np.float32)


def make_examples(cfg: SyntheticImagesConfig, textures: np.ndarray, n: int, split: int) -> dict[str, np.ndarray]:
    """n examples {inputs [n, S, S, C] float32, labels [n] int32} from the split's own random stream."""
    rng = np.random.default_rng([cfg.seed, split])
    labels = rng.integers(0, cfg.num_classes, size=n).astype(np.int32)
    shifts = rng.integers(-cfg.max_shift, cfg.max_shift + 1, size=(n, 2))
    contrast = rng.uniform(0.5, 1.5, size=n).astype(np.float32)
    noise = rng.standard_normal((n, cfg.image_size, cfg.image_size, cfg.channels), dtype=np.float32) * cfg.noise
    images = np.empty_like(noise)
    for i in range(n):
        images[i] = np.roll(textures[labels[i]], tuple(shifts[i]), axis=(0, 1)) * contrast[i]
    return {"inputs": images + noise, "labels": labels}

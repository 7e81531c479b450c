"""Convolutional image classifier: a plain CNN or a ResNet-style network of basic blocks, with batch norm and dropout.

images [B, H, W, C] (NHWC, float) → logits [B, num_classes] (float32), called as `model(images, rngs=rngs)` by the
`classify` task. Layout: a stem (conv-BN-ReLU) at `widths[0]`; then one stage per entry of `widths` with `blocks[i]`
blocks each, every stage after the first opening with a 2×2 max pool; global average pooling; dropout; a dense
head. A block is conv-BN-ReLU (`residual: false`) or a basic residual block (`residual: true`: two conv-BN, an
identity shortcut, or a 1×1 conv-BN projection where the width changes, then ReLU).

Train mode (`model.train()`): batch norm normalizes with the statistics of the batch (of the whole micro-batch
across devices: on a mesh they are reduced over the data-parallel shards, so the result does not depend on the
device count; with `train.grad_accum` > 1, per micro-batch) and updates its running statistics — model state
(`nnx.BatchStat`), carried and checkpointed beside the parameters; dropout is on and draws from the `dropout`
stream of the `rngs` passed to `__call__`. Eval mode (`model.eval()`, what
`build_model` returns): running statistics and no dropout, so an example's logits do not depend on the rest of its
batch. The model holds no RNG: its `Dropout` (models/dropout.py) is built without one.

A pure definition: no I/O, no sharding decisions (only logical axis names, mapped in fastserve/parallel.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
import jax
import jax.numpy as jnp
from flax import nnx

from fastserve.models.dropout import Dropout
from fastserve.models.layers import Linear, constrain, dtype_of, pool2d

# Logical axes (fastserve.parallel.LOGICAL_RULES). A conv kernel is [kh, kw, in, out]: the spatial taps are tiny and
# never split; input channels are `conv_in` (→ fsdp: FSDP shards every weight's model dimension, as `embed` does);
# output channels are `conv_out` (→ tensor: splitting a conv by output channel is its column-parallel split, like
# `mlp`). Channel counts that the mesh axis does not divide (an RGB or grey input: 3 or 1) are simply replicated.
KERNEL_AXES = (None, None, "conv_in", "conv_out")
# Batch-norm scale / bias are a few floats per channel: replicated, like every norm scale.
NORM_AXES = ("norm",)
# Activations between blocks: split over the batch only (the "residual stream" convention of the decoder).
ACTIVATION_AXES = ("batch", None, None, None)


@dataclass
class CNNConfig:
    """`model.name: cnn` — a CNN / ResNet image classifier (registered in fastserve.registry)."""
    name: str = "cnn"
    image_size: int = 0            # square images of this side; 0: take it from the data
    channels: int = 0              # input channels (1 grey, 3 RGB); 0: take it from the data
    num_classes: int = 0           # 0: take it from the data
    widths: list[int] = field(default_factory=lambda: [16, 32])  # channels of each stage
    blocks: list[int] = field(default_factory=lambda: [1, 1])    # blocks in each stage (one entry per width)
    residual: bool = True          # basic residual blocks (ResNet) instead of single conv-BN-ReLU blocks
    kernel_size: int = 3
    dropout: float = 0.1           # on the pooled features, before the head
    bn_momentum: float = 0.9       # running statistics: new = momentum · old + (1 − momentum) · batch
    bn_eps: float = 1e-5
    head_init_std: float = 0.01
    dtype: str = "float32"         # compute dtype: float32 | bfloat16 (logits are returned in float32)
    param_dtype: str = "float32"

    def checks(self):
        from fastserve.checks import at_least, fraction, positive, positive_list
        from fastserve.models.layers import check_dtypes

        yield from at_least(self, 0, "image_size", "channels", "num_classes", zero="from the data")
        if self.num_classes == 1:
            yield "num_classes", "a classifier needs at least 2 classes (0: from the data)"
        if not self.widths:
            yield "widths", "needs at least one stage width"
        yield from positive_list(self, "widths")
        if len(self.blocks) != len(self.widths):
            yield "blocks", (f"needs one entry per stage: {len(self.widths)} widths {self.widths} but "
                             f"{len(self.blocks)} block counts {self.blocks}")
        yield from positive_list(self, "blocks")
        yield from positive(self, "kernel_size", "bn_eps", "head_init_std")
        yield from fraction(self, "dropout")
        yield from fraction(self, "bn_momentum", closed=True)
        yield from check_dtypes(self)
        pools = len(self.widths) - 1
        if self.image_size and self.image_size < 2 ** pools:
            yield "image_size", (f"{self.image_size} is too small for {len(self.widths)} stages ({pools} 2×2 max "
                                 f"pools need at least {2 ** pools} pixels)")

    def build(self, rngs: nnx.Rngs) -> "CNN":
        return CNN(self, rngs=rngs)

    def flops_per_example(self) -> float:
        """Training FLOPs (forward + backward ≈ 3 × forward) per image: convolutions and the head."""
        return 3.0 * forward_flops(self)

    def forward_inputs(self, batch) -> dict[str, jax.ShapeDtypeStruct]:
        """What a `forward` export takes: NHWC float32 images."""
        return {"inputs": jax.ShapeDtypeStruct((batch, self.image_size, self.image_size, self.channels), jnp.float32)}


def check_images(images: jax.Array, family: str, image_size: int, channels: int) -> None:
    """NHWC images of the configured channels (and side, when set), else an error naming both shapes."""
    if images.ndim != 4 or images.shape[-1] != channels or (
            image_size and images.shape[1:3] != (image_size, image_size)):
        want = f"[batch, {image_size or 'H'}, {image_size or 'W'}, {channels}]"
        raise ValueError(f"the {family} model (model.image_size={image_size}, model.channels={channels}) "
                         f"takes NHWC images {want}, got shape {tuple(images.shape)}")


def forward_flops(cfg: CNNConfig) -> float:
    """Multiply-adds × 2 of the convolutions and the head for one image (norms, pools and ReLUs not counted)."""
    side, k2 = cfg.image_size, cfg.kernel_size ** 2
    flops = 2.0 * side * side * k2 * cfg.channels * cfg.widths[0]          # stem
    c_in = cfg.widths[0]
    for i, (width, n) in enumerate(zip(cfg.widths, cfg.blocks)):
        if i > 0:
            side //= 2
        for _ in range(n):
            pixels = side * side
            if cfg.residual:
                flops += 2.0 * pixels * k2 * (c_in * width + width * width)
                if c_in != width:
                    flops += 2.0 * pixels * c_in * width                   # 1×1 projection shortcut
            else:
                flops += 2.0 * pixels * k2 * c_in * width
            c_in = width
    return flops + 2.0 * c_in * cfg.num_classes


def _conv(cfg: CNNConfig, c_in: int, c_out: int, kernel: int, rngs: nnx.Rngs) -> nnx.Conv:
    # no bias: the batch norm after every conv has its own
    return nnx.Conv(c_in, c_out, (kernel, kernel), padding="SAME", use_bias=False, dtype=dtype_of(cfg.dtype),
                    param_dtype=dtype_of(cfg.param_dtype), kernel_init=nnx.initializers.he_normal(),
                    kernel_metadata={"out_sharding": KERNEL_AXES}, rngs=rngs)


def _norm(cfg: CNNConfig, c: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(c, momentum=cfg.bn_momentum, epsilon=cfg.bn_eps, dtype=dtype_of(cfg.dtype),
                         param_dtype=dtype_of(cfg.param_dtype), scale_metadata={"out_sharding": NORM_AXES},
                         bias_metadata={"out_sharding": NORM_AXES}, rngs=rngs)


class ConvBlock(nnx.Module):
    """conv-BN-ReLU (`residual: false`)."""

    def __init__(self, cfg: CNNConfig, c_in: int, c_out: int, *, rngs: nnx.Rngs):
        self.conv = _conv(cfg, c_in, c_out, cfg.kernel_size, rngs)
        self.norm = _norm(cfg, c_out, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.norm(self.conv(x)))


class BasicBlock(nnx.Module):
    """ResNet basic block: relu(BN(conv(relu(BN(conv(x))))) + shortcut(x)); a 1×1 conv-BN shortcut where the width
    changes, the identity otherwise."""

    def __init__(self, cfg: CNNConfig, c_in: int, c_out: int, *, rngs: nnx.Rngs):
        self.conv1 = _conv(cfg, c_in, c_out, cfg.kernel_size, rngs)
        self.norm1 = _norm(cfg, c_out, rngs)
        self.conv2 = _conv(cfg, c_out, c_out, cfg.kernel_size, rngs)
        self.norm2 = _norm(cfg, c_out, rngs)
        if c_in != c_out:
            self.proj = _conv(cfg, c_in, c_out, 1, rngs)
            self.proj_norm = _norm(cfg, c_out, rngs)
        else:
            self.proj = self.proj_norm = None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        shortcut = x if self.proj is None else self.proj_norm(self.proj(x))
        return jax.nn.relu(h + shortcut)


class CNN(nnx.Module):
    """images [B, H, W, C] → logits [B, num_classes] (float32)."""

    def __init__(self, cfg: CNNConfig, *, rngs: nnx.Rngs):
        for n in ("channels", "num_classes"):
            if getattr(cfg, n) <= 0:
                raise ValueError(f"model.{n} must be set (the trainer fills it from the data)")
        self.image_size, self.channels, self.dtype = cfg.image_size, cfg.channels, dtype_of(cfg.dtype)
        self.stem = _conv(cfg, cfg.channels, cfg.widths[0], cfg.kernel_size, rngs)
        self.stem_norm = _norm(cfg, cfg.widths[0], rngs)
        block = BasicBlock if cfg.residual else ConvBlock
        stages, c_in = [], cfg.widths[0]
        for width, n in zip(cfg.widths, cfg.blocks):
            blocks = []
            for _ in range(n):
                blocks.append(block(cfg, c_in, width, rngs=rngs))
                c_in = width
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.dropout = Dropout(cfg.dropout)  # no rngs here: the train step passes them to __call__
        self.head = Linear(c_in, cfg.num_classes, ("conv_out", "classes"), use_bias=True, rngs=rngs,
                           dtype=self.dtype, param_dtype=dtype_of(cfg.param_dtype), init_std=cfg.head_init_std)

    def __call__(self, images: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        check_images(images, "cnn", self.image_size, self.channels)
        x = constrain(images.astype(self.dtype), ACTIVATION_AXES)
        x = jax.nn.relu(self.stem_norm(self.stem(x)))
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = pool2d(x, (2, 2), (2, 2))
            for block in stage:
                x = constrain(block(x), ACTIVATION_AXES)
        features = jnp.mean(x, axis=(1, 2))                                   # global average pool → [B, C]
        features = self.dropout(features, rngs=rngs)
        return self.head(features).astype(jnp.float32)

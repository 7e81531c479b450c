"""`model.name: resnet` — ResNet v1.5 image classifier, depths 18 / 34 (basic blocks) and 50 (bottleneck blocks).

images [B, H, W, C] (NHWC, float) → logits [B, num_classes] (float32), called as `model(images, rngs=rngs)` by the
`classify` task. Layout (He et al. 2016, "v1.5" as in torchvision / MLPerf: a bottleneck's stride sits on its 3×3
conv, not its first 1×1): a stem, four stages of `width · 2^i` channels (× 4 after a bottleneck) with [2, 2, 2, 2]
(18), [3, 4, 6, 3] (34, 50) blocks, every stage after the first halving the resolution in its first block; global
average pooling; a dense head. A block's shortcut is the identity, or a 1×1 conv (strided) + BN where the shape
changes. Stems: `imagenet` (7×7 conv stride 2 + 3×3 max pool stride 2: 224² → 56²), `small` (one 3×3 conv,
stride 1, no pool: for 28×28 / 32×32 images, as CIFAR ResNets do) or `small_pool` (that conv, then a 3×3/2 max pool:
the stages run at half the resolution, a quarter of the FLOPs — what a 2-core CPU affords for 28×28 images).
`zero_init_residual` starts every block's last BN scale at 0, so each residual branch starts as the identity (Goyal
et al. 2017).

Batch norm is the cnn family's (fastserve/models/cnn.py): batch statistics in train mode (reduced over the whole
batch on a mesh), running statistics (`nnx.BatchStat`, model state carried and checkpointed beside the params) in
eval mode. A pure definition: logical axis names only (the rules are fastserve/parallel.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from fastserve.models.cnn import ACTIVATION_AXES, KERNEL_AXES, NORM_AXES, check_images
from fastserve.models.layers import Linear, constrain, dtype_of

STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}
BOTTLENECK_DEPTHS = (50,)
EXPANSION = 4                       # a bottleneck block's output channels / its inner width
STEMS = ("imagenet", "small", "small_pool")
STEM_REDUCTION = {"imagenet": 4, "small": 1, "small_pool": 2}


@dataclass
class ResNetConfig:
    """`model.name: resnet` — ResNet v1.5 (registered in fastserve.registry)."""
    name: str = "resnet"
    depth: int = 18                # 18 | 34 (basic blocks) | 50 (bottleneck blocks)
    width: int = 64                # channels of the first stage (64 in the paper; narrower for small CPUs)
    stem: str = "imagenet"         # imagenet (7×7/2 conv + 3×3/2 max pool) | small (3×3/1 conv: 28² / 32² images)
                                   # | small_pool (3×3/1 conv + 3×3/2 max pool: the stages run at half resolution)
    image_size: int = 0            # square images of this side; 0: take it from the data
    channels: int = 0              # input channels; 0: take it from the data
    num_classes: int = 0           # 0: take it from the data
    zero_init_residual: bool = True
    bn_momentum: float = 0.9       # running statistics: new = momentum · old + (1 − momentum) · batch
    bn_eps: float = 1e-5
    head_init_std: float = 0.01
    dtype: str = "float32"         # compute dtype: float32 | bfloat16 (logits are returned in float32)
    param_dtype: str = "float32"

    def checks(self):
        from fastserve.checks import at_least, fraction, positive
        from fastserve.models.layers import check_dtypes

        if self.depth not in STAGE_BLOCKS:
            yield "depth", f"must be one of {', '.join(map(str, STAGE_BLOCKS))}, got {self.depth}"
        if self.stem not in STEMS:
            yield "stem", f"must be one of {', '.join(STEMS)}, got {self.stem!r}"
        yield from positive(self, "width", "bn_eps", "head_init_std")
        yield from at_least(self, 0, "image_size", "channels", "num_classes", zero="from the data")
        if self.num_classes == 1:
            yield "num_classes", "a classifier needs at least 2 classes (0: from the data)"
        yield from fraction(self, "bn_momentum", closed=True)
        yield from check_dtypes(self)
        if self.image_size and self.image_size < self.reduction():
            yield "image_size", (f"{self.image_size} is smaller than the network's total stride {self.reduction()} "
                                 f"(stem {self.stem!r}: use stem: small for small images)")

    def reduction(self) -> int:
        """How much the network shrinks each side: 8 from the stages, × 4 (imagenet) or × 2 (small_pool) from
        the stem."""
        return 8 * STEM_REDUCTION.get(self.stem, 1)

    def build(self, rngs: nnx.Rngs) -> "ResNet":
        return ResNet(self, rngs=rngs)

    def flops_per_example(self) -> float:
        """Training FLOPs (forward + backward ≈ 3 × forward) per image."""
        return 3.0 * forward_flops(self)

    def forward_inputs(self, batch) -> dict[str, jax.ShapeDtypeStruct]:
        """What a `forward` export takes: NHWC float32 images."""
        return {"inputs": jax.ShapeDtypeStruct((batch, self.image_size, self.image_size, self.channels), jnp.float32)}


def _out(side: int, stride: int) -> int:
    return -(-side // stride)   # SAME padding


def forward_flops(cfg: ResNetConfig) -> float:
    """2 × multiply-adds of the convolutions and the head for one image (norms, pools, ReLUs not counted)."""
    side, flops = cfg.image_size, 0.0
    if cfg.stem == "imagenet":
        side = _out(side, 2)
        flops += 2.0 * side * side * 49 * cfg.channels * cfg.width
        side = _out(side, 2)
    else:
        flops += 2.0 * side * side * 9 * cfg.channels * cfg.width
        side = _out(side, STEM_REDUCTION[cfg.stem])
    c_in, bottleneck = cfg.width, cfg.depth in BOTTLENECK_DEPTHS
    for i, n in enumerate(STAGE_BLOCKS[cfg.depth]):
        inner = cfg.width * 2 ** i
        c_out = inner * EXPANSION if bottleneck else inner
        for j in range(n):
            stride = 2 if (i > 0 and j == 0) else 1
            out_side = _out(side, stride)
            px_in, px_out = side * side, out_side * out_side
            if bottleneck:
                flops += 2.0 * (px_in * c_in * inner + px_out * 9 * inner * inner + px_out * inner * c_out)
            else:
                flops += 2.0 * px_out * 9 * (c_in * inner + inner * inner)
            if stride != 1 or c_in != c_out:
                flops += 2.0 * px_out * c_in * c_out
            c_in, side = c_out, out_side
    return flops + 2.0 * c_in * cfg.num_classes


def _conv(cfg: ResNetConfig, c_in: int, c_out: int, kernel: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
    # no bias: the batch norm after every conv has its own; He-normal (fan-out in the paper, fan-in here as Keras)
    return nnx.Conv(c_in, c_out, (kernel, kernel), strides=(stride, stride), padding="SAME", use_bias=False,
                    dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype),
                    kernel_init=nnx.initializers.he_normal(), kernel_metadata={"out_sharding": KERNEL_AXES}, rngs=rngs)


def _norm(cfg: ResNetConfig, c: int, rngs: nnx.Rngs, zero: bool = False) -> nnx.BatchNorm:
    return nnx.BatchNorm(c, momentum=cfg.bn_momentum, epsilon=cfg.bn_eps, dtype=dtype_of(cfg.dtype),
                         param_dtype=dtype_of(cfg.param_dtype),
                         scale_init=nnx.initializers.zeros if zero else nnx.initializers.ones,
                         scale_metadata={"out_sharding": NORM_AXES}, bias_metadata={"out_sharding": NORM_AXES},
                         rngs=rngs)


class Shortcut(nnx.Module):
    """1×1 conv (strided) + BN: where a block changes the resolution or the channel count."""

    def __init__(self, cfg: ResNetConfig, c_in: int, c_out: int, stride: int, *, rngs: nnx.Rngs):
        self.conv = _conv(cfg, c_in, c_out, 1, stride, rngs)
        self.norm = _norm(cfg, c_out, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.conv(x))


class BasicBlock(nnx.Module):
    """relu(BN(conv3×3(relu(BN(conv3×3/stride(x))))) + shortcut(x)) — ResNet-18 / 34."""

    def __init__(self, cfg: ResNetConfig, c_in: int, width: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1 = _conv(cfg, c_in, width, 3, stride, rngs)
        self.norm1 = _norm(cfg, width, rngs)
        self.conv2 = _conv(cfg, width, width, 3, 1, rngs)
        self.norm2 = _norm(cfg, width, rngs, zero=cfg.zero_init_residual)
        self.shortcut = Shortcut(cfg, c_in, width, stride, rngs=rngs) if stride != 1 or c_in != width else None
        self.out_channels = width

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return jax.nn.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class Bottleneck(nnx.Module):
    """relu(BN(conv1×1(relu(BN(conv3×3/stride(relu(BN(conv1×1(x))))))) + shortcut(x)) — ResNet-50, v1.5 (the
    stride on the 3×3 conv); output channels 4 × `width`."""

    def __init__(self, cfg: ResNetConfig, c_in: int, width: int, stride: int, *, rngs: nnx.Rngs):
        c_out = width * EXPANSION
        self.conv1 = _conv(cfg, c_in, width, 1, 1, rngs)
        self.norm1 = _norm(cfg, width, rngs)
        self.conv2 = _conv(cfg, width, width, 3, stride, rngs)
        self.norm2 = _norm(cfg, width, rngs)
        self.conv3 = _conv(cfg, width, c_out, 1, 1, rngs)
        self.norm3 = _norm(cfg, c_out, rngs, zero=cfg.zero_init_residual)
        self.shortcut = Shortcut(cfg, c_in, c_out, stride, rngs=rngs) if stride != 1 or c_in != c_out else None
        self.out_channels = c_out

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.norm1(self.conv1(x)))
        h = jax.nn.relu(self.norm2(self.conv2(h)))
        h = self.norm3(self.conv3(h))
        return jax.nn.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nnx.Module):
    """images [B, H, W, C] → logits [B, num_classes] (float32)."""

    def __init__(self, cfg: ResNetConfig, *, rngs: nnx.Rngs):
        for n in ("channels", "num_classes"):
            if getattr(cfg, n) <= 0:
                raise ValueError(f"model.{n} must be set (the trainer fills it from the data)")
        self.image_size, self.channels, self.dtype = cfg.image_size, cfg.channels, dtype_of(cfg.dtype)
        self.imagenet_stem = cfg.stem == "imagenet"
        self.stem_pool = cfg.stem in ("imagenet", "small_pool")   # these stems end in a 3×3/2 max pool
        self.stem = _conv(cfg, cfg.channels, cfg.width, 7 if self.imagenet_stem else 3, 2 if self.imagenet_stem else 1,
                          rngs)
        self.stem_norm = _norm(cfg, cfg.width, rngs)
        block = Bottleneck if cfg.depth in BOTTLENECK_DEPTHS else BasicBlock
        blocks, c_in = [], cfg.width
        for i, n in enumerate(STAGE_BLOCKS[cfg.depth]):
            for j in range(n):
                blocks.append(block(cfg, c_in, cfg.width * 2 ** i, 2 if (i > 0 and j == 0) else 1, rngs=rngs))
                c_in = blocks[-1].out_channels
        self.blocks = nnx.List(blocks)
        self.head = Linear(c_in, cfg.num_classes, ("conv_out", "classes"), use_bias=True, rngs=rngs,
                           dtype=self.dtype, param_dtype=dtype_of(cfg.param_dtype), init_std=cfg.head_init_std)

    def __call__(self, images: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        check_images(images, "resnet", self.image_size, self.channels)
        x = constrain(images.astype(self.dtype), ACTIVATION_AXES)
        x = jax.nn.relu(self.stem_norm(self.stem(x)))
        if self.stem_pool:
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for block in self.blocks:
            x = constrain(block(x), ACTIVATION_AXES)
        features = jnp.mean(x, axis=(1, 2))                                   # global average pool → [B, C]
        return self.head(features).astype(jnp.float32)

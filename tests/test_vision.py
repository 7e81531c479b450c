"""Real image data and ResNet v1.5: the fashion_mnist and digits sources (shapes, labels, splits, normalization,
`prepare` naming the package), augmentation that is deterministic and resumable, ResNet parameter counts equal to
the reference architecture's, the v1.5 stride placement, logical axes, and batch norm (batch statistics in train,
checkpointed running statistics in eval)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fastserve import parallel
from fastserve.config import load_config
from fastserve.core.state import abstract_model_split, merge_trees
from fastserve.data.augment import random_crop, random_flip
from fastserve.data.packages import MissingPackage
from fastserve.data.vision import FASHION_MNIST_DIR, load_fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source(*overrides):
    cfg = load_config(None, ["train.task=classify", "model.name=resnet", *overrides])
    return cfg, cfg.data.load(cfg)


@pytest.fixture(scope="module")
def fashion():
    try:
        return load_fashion_mnist()
    except MissingPackage as e:
        pytest.skip(str(e))


def test_fashion_mnist_batches_splits_and_normalization(fashion):
    cfg, data = source("data.source=fashion_mnist", "data.train_examples=2048", "data.batch_size=64")
    batch = next(data.train)
    assert batch["inputs"].shape == (64, 28, 28, 1) and batch["inputs"].dtype == np.float32
    assert batch["labels"].dtype == np.int32 and set(np.unique(batch["labels"])) <= set(range(10))
    assert abs(float(batch["inputs"].mean())) < 0.3 and 0.7 < float(batch["inputs"].std()) < 1.3   # standardized
    assert (data.train_rows, data.eval_rows) == (2048, 5000)
    assert data.model_fields == {"image_size": 28, "channels": 1, "num_classes": 10}
    # the validation split is the tail of the training file, never in the training examples
    np.testing.assert_array_equal(data.eval[0]["labels"], fashion["train"][1][55000:55064])
    assert data.train._n == 2048
    _, test = source("data.source=fashion_mnist", "data.train_examples=2048", "data.eval_split=test",
                     "data.normalize=unit", "data.batch_size=100")
    assert test.eval_rows == 10000 and len(test.eval) == 100
    np.testing.assert_array_equal(test.eval[0]["labels"], fashion["test"][1][:100])
    np.testing.assert_allclose(test.eval[0]["inputs"][..., 0], fashion["test"][0][:100] / 255.0, rtol=1e-6)


def test_digits_splits_are_fixed_and_disjoint():
    _, data = source("data.source=digits", "data.normalize=unit", "data.batch_size=32")
    assert (data.train_rows, data.eval_rows) == (1797 - 360 - 180, 180)
    batch = next(data.train)
    assert batch["inputs"].shape == (32, 8, 8, 1) and 0 <= batch["inputs"].min() and batch["inputs"].max() <= 1
    _, again = source("data.source=digits", "data.normalize=unit", "data.batch_size=32", "train.seed=5")
    np.testing.assert_array_equal(data.eval[0]["inputs"], again.eval[0]["inputs"])   # splits ignore train.seed


def test_prepare_names_the_debian_package_when_missing(capsys):
    from fastserve.data.__main__ import main

    assert main(["prepare", "fashion_mnist", "path=/nonexistent/fashion"]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
    if os.path.isdir(FASHION_MNIST_DIR):
        assert main(["prepare", "fashion_mnist"]) == 0
        assert "60000 train / 10000 test" in capsys.readouterr().out


def test_augmentation_is_deterministic_resumable_and_only_moves_pixels():
    _, a = source("data.source=digits", "data.crop_padding=2", "data.flip=true", "data.normalize=none",
                  "data.batch_size=16")
    _, b = source("data.source=digits", "data.crop_padding=2", "data.flip=true", "data.normalize=none",
                  "data.batch_size=16")
    _, plain = source("data.source=digits", "data.normalize=none", "data.batch_size=16")
    first = [next(a.train) for _ in range(3)]
    for x in first:
        np.testing.assert_array_equal(x["inputs"], next(b.train)["inputs"])        # same seed: same draws
    state = a.train.get_state()
    more = next(a.train)
    b.train.set_state(state)
    np.testing.assert_array_equal(more["inputs"], next(b.train)["inputs"])        # resumed: same batch
    originals = next(plain.train)["inputs"]
    assert not np.array_equal(first[0]["inputs"], originals)
    for aug, orig in zip(first[0]["inputs"], originals):                           # a shift (and maybe a mirror)
        padded = np.pad(orig, ((2, 2), (2, 2), (0, 0)))
        crops = [padded[dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(np.array_equal(aug, c) or np.array_equal(aug, c[:, ::-1]) for c in crops)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (64, 6, 6, 1)).astype(np.uint8)
    flipped = random_flip(x, np.random.default_rng(1))
    mirrored = [np.array_equal(f, o[:, ::-1]) for f, o in zip(flipped, x)]
    assert 16 < sum(mirrored) < 48 and all(m or np.array_equal(f, o) for m, f, o in zip(mirrored, flipped, x))
    assert random_crop(x, 0, rng) is x


# ------------------------------------------------------------------------------------------------ ResNet

def resnet_cfg(*overrides):
    return load_config(None, ["model.name=resnet", *overrides]).model


@pytest.mark.parametrize("depth,expected", [(18, 11_689_512), (34, 21_797_672), (50, 25_557_032)])
def test_parameter_counts_equal_the_reference_resnets(depth, expected):
    """The ImageNet ResNets' published parameter counts (224² RGB, 1000 classes, width 64), counted by hand from
    the architecture: convs without bias, BN scale + bias, a dense head with bias. Running statistics are model
    state, two per BN channel."""
    cfg = resnet_cfg(f"model.depth={depth}", "model.image_size=224", "model.channels=3", "model.num_classes=1000")
    _, params, axes, stats, _ = abstract_model_split(cfg)
    assert sum(p.size for p in jax.tree.leaves(params)) == expected
    bn_params = sum(p.size for path, p in jax.tree_util.tree_flatten_with_path(params)[0]
                    if "norm" in jax.tree_util.keystr(path))
    assert sum(s.size for s in jax.tree.leaves(stats)) == bn_params            # mean + var per (scale + bias)
    rules = {name for name, _ in parallel.LOGICAL_RULES}
    for leaf_axes in jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)):
        assert all(a is None or a in rules for a in leaf_axes), leaf_axes
    # small stem: a 3×3 conv on 1 channel instead of the 7×7 on 3
    small = resnet_cfg(f"model.depth={depth}", "model.stem=small", "model.image_size=28", "model.channels=1",
                       "model.num_classes=1000")
    _, small_params, *_ = abstract_model_split(small)
    assert sum(p.size for p in jax.tree.leaves(small_params)) == expected - 7 * 7 * 3 * 64 + 3 * 3 * 1 * 64


def test_v1_5_strides_sit_on_the_3x3_conv_and_flops_match_the_reference():
    cfg = resnet_cfg("model.depth=50", "model.image_size=224", "model.channels=3", "model.num_classes=1000")
    model = nnx.eval_shape(lambda: cfg.build(nnx.Rngs(0)))
    first_of_stage2 = model.blocks[3]
    assert first_of_stage2.conv1.strides == (1, 1) and first_of_stage2.conv2.strides == (2, 2)
    assert first_of_stage2.shortcut.conv.strides == (2, 2)
    assert cfg.flops_per_example() / 3 / 2 == pytest.approx(4.1e9, rel=0.03)      # ~4.1 GMACs per 224² image
    with pytest.raises(Exception, match="depth"):
        resnet_cfg("model.depth=20")
    with pytest.raises(Exception, match="stem: small"):
        resnet_cfg("model.image_size=28")


@pytest.mark.slow
def test_batch_norm_train_eval_and_checkpointed_statistics(tmp_path):
    """A few steps on digits through the trainer; the restored model state holds moved running statistics,
    eval mode uses them (an example's logits do not depend on its batch), train mode uses the batch's."""
    from fastserve.core.setup import prepare_state
    from fastserve.core.trainer import train

    overrides = ["model.name=resnet", "model.depth=18", "model.width=4", "model.stem=small", "data.source=digits",
                 "data.batch_size=32", "train.task=classify", "train.steps=6", "train.eval_every=6",
                 "checkpoint.every=6", f"train.workdir={tmp_path / 'run'}", "log.progress=false",
                 "log.tensorboard=false", "log.peak_flops=1e9", "mesh.data=1", "optimizer.warmup_steps=1"]
    train(load_config(None, overrides))
    cfg = load_config(str(tmp_path / "run" / "config.yaml"))
    fresh, trained = prepare_state(cfg, restore=False), prepare_state(cfg)
    fresh.checkpointer.close()
    trained.checkpointer.close()
    assert trained.start_step == 6
    for x, x0 in zip(jax.tree.leaves(trained.state["model_state"]), jax.tree.leaves(fresh.state["model_state"])):
        assert not np.array_equal(np.asarray(x), np.asarray(x0))                 # every statistic moved
    variables = merge_trees(trained.state["params"], trained.state["model_state"])
    data = cfg.data.load(cfg)
    held = data.eval[0]["inputs"]
    a, b = jnp.asarray(held[:8]), jnp.asarray(np.concatenate([held[:1], held[8:15]]))

    def logits(x, mode):
        model = nnx.merge(trained.graphdef, variables)
        getattr(model, mode)()
        return np.asarray(model(x))
    np.testing.assert_allclose(logits(a, "eval")[0], logits(b, "eval")[0], rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(logits(a, "train")[0] - logits(b, "train")[0])) > 1e-4


def test_small_pool_stem_runs_the_stages_at_half_resolution():
    """stem: small_pool = the small stem's 3×3 conv at full resolution, then a 3×3/2 max pool: the stages cost
    what the small-stem network's stages cost on 14×14 images, and the logits come out as usual."""
    from fastserve.models.resnet import forward_flops

    def cfg(stem, side):
        return resnet_cfg("model.depth=18", "model.width=8", f"model.stem={stem}", f"model.image_size={side}",
                          "model.channels=1", "model.num_classes=10")
    stem_conv = lambda side: 2.0 * side * side * 9 * 1 * 8
    assert forward_flops(cfg("small_pool", 28)) - stem_conv(28) == forward_flops(cfg("small", 14)) - stem_conv(14)
    assert cfg("small_pool", 28).reduction() == 16
    model = cfg("small_pool", 28).build(nnx.Rngs(0))
    model.eval()
    assert model(jnp.ones((2, 28, 28, 1))).shape == (2, 10)
    with pytest.raises(Exception, match="smaller than the network's total stride 16"):
        resnet_cfg("model.stem=small_pool", "model.image_size=8")

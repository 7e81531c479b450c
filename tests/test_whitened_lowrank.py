"""Activation-aware (whitened) low-rank factorization and rank allocation under one parameter budget: full rank
reproduces the layer, an identity second moment reduces it to plain SVD, the reported truncation loss is the
output error measured on the calibration inputs, and the budget holds."""
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import TINY
from fastserve import parallel
from fastserve.config import MeshConfig, ModelConfig, load_config
from fastserve.core.state import init_params
from fastserve.models.layers import Linear
from fastserve.transforms import TransformError, apply_transforms, lowrank
from fastserve.transforms.calibration import input_grams
from fastserve.transforms.common import get_node

# per-layer weights, as every transform sees them (load_model hands tools per-layer weights; models/layer_stack.py)
CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
                  tie_embeddings=False, scan_layers=False)
BATCHES = [{"inputs": (np.arange(4 * 16, dtype=np.int32).reshape(4, 16) * (7 + i)) % 64,
            "weights": np.ones((4, 16), np.float32)} for i in range(2)]
PATH = "layers.1.mlp.down"


@pytest.fixture(scope="module")
def base():
    mesh = parallel.make_mesh(MeshConfig(data=1))
    graphdef, params, _ = init_params(CFG, mesh, seed=0)
    return mesh, graphdef, params


@pytest.fixture(scope="module")
def calibrate(base):
    mesh, graphdef, params = base
    return lambda paths, options: input_grams(graphdef, params, BATCHES, paths, mesh)


def _eager_inputs(graphdef, params, path):
    """The rows the layer at `path` sees on BATCHES, captured eagerly (independently of input_grams)."""
    model = nnx.merge(graphdef, params)
    target = dict((".".join(map(str, p)), m) for p, m in nnx.iter_modules(model))[path]
    seen, original = [], Linear.__call__

    def spy(self, x):
        if self is target:
            seen.append(np.asarray(x, np.float64).reshape(-1, x.shape[-1]))
        return original(self, x)
    Linear.__call__ = spy
    try:
        for b in BATCHES:
            model(jnp.asarray(b["inputs"]))
    finally:
        Linear.__call__ = original
    return np.concatenate(seen)


def test_input_grams_equal_the_second_moment_of_the_captured_inputs(base, calibrate):
    mesh, graphdef, params = base
    x = _eager_inputs(graphdef, params, PATH)
    gram, tokens = calibrate([PATH], {})[PATH]
    assert tokens == x.shape[0] == 128
    np.testing.assert_allclose(gram, x.T @ x, rtol=1e-4, atol=1e-4 * np.abs(x.T @ x).max())


def test_whitened_full_rank_equals_the_dense_layer(base, calibrate):
    _, _, params = base
    _, new, (row,) = lowrank(CFG, params, include=PATH, rank_ratio=1.0, force=True, method="whitened",
                             calibrate=calibrate)
    w = np.asarray(get_node(params, PATH)["kernel"], np.float64)
    node = get_node(new, PATH)
    np.testing.assert_allclose(np.asarray(node["u"], np.float64) @ np.asarray(node["v"], np.float64), w, atol=1e-4)
    assert row["method"] == "whitened" and row["truncation_loss"] == pytest.approx(0.0, abs=1e-6)


def test_identity_second_moment_reduces_to_plain_svd(base):
    _, _, params = base
    identity = lambda paths, options: {p: (np.eye(64) * 5.0, 10.0) for p in paths}
    _, svd, _ = lowrank(CFG, params, include=PATH, rank=6)
    _, white, _ = lowrank(CFG, params, include=PATH, rank=6, method="whitened", calibrate=identity)
    prod = lambda t: np.asarray(get_node(t, PATH)["u"], np.float64) @ np.asarray(get_node(t, PATH)["v"], np.float64)
    np.testing.assert_allclose(prod(white), prod(svd), atol=1e-4)


def test_reported_truncation_loss_is_the_measured_output_error(base, calibrate):
    mesh, graphdef, params = base
    _, new, (row,) = lowrank(CFG, params, include=PATH, rank=5, method="whitened", calibrate=calibrate)
    x = _eager_inputs(graphdef, params, PATH)
    w = np.asarray(get_node(params, PATH)["kernel"], np.float64)
    uv = np.asarray(get_node(new, PATH)["u"], np.float64) @ np.asarray(get_node(new, PATH)["v"], np.float64)
    measured = np.sum((x @ w - x @ uv) ** 2) / x.shape[0]
    assert row["truncation_loss"] == pytest.approx(measured, rel=1e-3)
    # and it is the best rank-5 output error: plain SVD at the same rank does worse on these inputs
    _, svd, _ = lowrank(CFG, params, include=PATH, rank=5)
    uv_svd = np.asarray(get_node(svd, PATH)["u"], np.float64) @ np.asarray(get_node(svd, PATH)["v"], np.float64)
    assert np.sum((x @ w - x @ uv_svd) ** 2) / x.shape[0] > measured


def test_params_ratio_allocates_ranks_within_one_budget(base, calibrate):
    _, _, params = base
    pattern = "layers.*.mlp.*"
    cfg, _, rows = lowrank(CFG, params, include=pattern, params_ratio=0.6, method="whitened", allocation="loss",
                           calibrate=calibrate)
    dense = sum(r["params_before"] for r in rows)
    assert sum(r["params_after"] for r in rows) <= 0.6 * dense
    assert sum(r["params_after"] for r in rows) > 0.5 * dense          # the budget is used, not wasted
    assert len({r["rank"] for r in rows}) > 1                          # allocated per layer, not one ratio
    assert all(r["action"] == "factorized" for r in rows)
    # uniform (the default): every layer at the same fraction of its own parameters
    _, _, rows = lowrank(CFG, params, include=pattern, params_ratio=0.6, method="whitened", calibrate=calibrate)
    for r in rows:
        m, n = r["shape"]
        assert r["rank"] == int(0.6 * m * n / (m + n)) and r["params_after"] <= 0.6 * m * n
    with pytest.raises(TransformError, match="allocation: only applies to a params_ratio"):
        lowrank(CFG, params, include=pattern, rank=3, allocation="loss")


def test_loss_allocation_keeps_a_floor_of_the_uniform_rank(base, calibrate):
    from fastserve.transforms.lowrank import allocate_ranks, uniform_rank

    # one layer whose energy sits in its first singular value: without a floor the greedy starves it to rank 1
    spectra = {"a": np.r_[100.0, np.full(31, 0.1)], "b": np.linspace(1.0, 0.5, 32)}
    shapes = {"a": (32, 48), "b": (32, 48)}
    uniform = uniform_rank(32, 48, 0.5)
    assert allocate_ranks(spectra, shapes, 0.5, floor=0.0)["a"] == 1
    floored = allocate_ranks(spectra, shapes, 0.5, floor=0.75)
    assert floored["a"] == math.ceil(0.75 * uniform) and floored["b"] > uniform
    assert sum(r * 80 for r in floored.values()) <= 0.5 * 2 * 32 * 48
    _, params = base[0], base[2]
    rows = lowrank(CFG, params, include="layers.*.mlp.*", params_ratio=0.6, method="whitened", allocation="loss",
                   allocation_floor=1.0, calibrate=calibrate)[2]
    assert all(r["rank"] >= uniform_rank(*r["shape"], 0.6) for r in rows)   # floor 1: at least uniform everywhere
    with pytest.raises(TransformError, match="allocation_floor: expected a number in"):
        lowrank(CFG, params, include="layers.*", params_ratio=0.6, allocation="loss", allocation_floor=2)
    with pytest.raises(TransformError, match="allocation_floor: only applies to allocation: loss"):
        lowrank(CFG, params, include="layers.*", params_ratio=0.6, allocation_floor=0.5)


def test_whitened_without_calibration_fails_clearly(base):
    _, _, params = base
    with pytest.raises(TransformError, match="whitened needs calibration data"):
        apply_transforms(CFG, params, [{"lowrank": {"include": PATH, "rank": 4, "method": "whitened"}}])
    with pytest.raises(TransformError, match=r"transforms\[0\]\.lowrank\.method"):
        apply_transforms(CFG, params, [{"lowrank": {"include": PATH, "rank": 4, "method": "whiten"}}])


def test_compress_calibrates_on_the_training_split(tmp_path):
    from fastserve.core.trainer import train
    from fastserve.transforms.report import REPORT_FILE, main as compress_main

    cfg = load_config(None, [*TINY, f"train.workdir={tmp_path / 'base'}", "train.steps=10", "train.eval_every=10",
                             "checkpoint.every=10", "train.eval_batches=2"])
    train(cfg)
    spec = ('transforms=[{lowrank: {include: "layers.*.mlp.*", params_ratio: 0.5, method: whitened, '
            'calibration: {sequences: 8}}}]')
    assert compress_main(["--checkpoint", cfg.train.workdir, "--out", str(tmp_path / "w"), "--eval-batches", "2",
                          "--decode-tokens", "0", spec]) == 0
    report = json.loads((tmp_path / "w" / REPORT_FILE).read_text())
    rows = [r for r in report["layers"] if r["action"] == "factorized"]
    assert rows and all(r["calibration_tokens"] > 0 and r["truncation_loss"] >= 0 for r in rows)
    assert report["ratio"]["parameters"] < 1.0


def test_distillation_accepts_an_imported_teacher_with_its_bpe_tokenizer(tmp_path):
    """A factorized SmolLM2 distils from its dense original: both work dirs carry the byte-level BPE
    (tokenizer.bpe.json) that compress writes for imported models, not a sentencepiece tokenizer.model."""
    from fastserve.tasks.distill import DistillConfig
    from fastserve.workdir import BPE_TOKENIZER_FILE

    teacher, student = tmp_path / "teacher", tmp_path / "student"
    for d in (teacher, student):
        d.mkdir()
        (d / BPE_TOKENIZER_FILE).write_text('{"model": "bpe", "vocab": {"a": 0}}')
    task = DistillConfig(teacher=str(teacher)).build()
    cfg = load_config(None, [f"tokenizer.path={student / BPE_TOKENIZER_FILE}"])
    assert task.configure(cfg) is cfg
    unset = task.configure(load_config(None, []))                   # no tokenizer given: the teacher's
    assert unset.tokenizer.path == str(teacher / BPE_TOKENIZER_FILE)
    (student / BPE_TOKENIZER_FILE).write_text('{"model": "bpe", "vocab": {"b": 0}}')
    with pytest.raises(ValueError, match="its tokenizer differs"):
        task.configure(cfg)
    with pytest.raises(ValueError, match="no tokenizer.model or tokenizer.bpe.json"):
        DistillConfig(teacher=str(tmp_path)).build().configure(cfg)

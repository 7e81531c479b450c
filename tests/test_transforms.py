"""Parameter transforms (low-rank SVD, int8, pruning) and the compressed layers they produce."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx
from jax.sharding import PartitionSpec as P

from fastserve import parallel
from fastserve.config import ConfigError, MeshConfig, ModelConfig, OptimizerConfig, dump_config, load_config
from fastserve.core.optim import make_optimizer
from fastserve.core.state import abstract_model, create_train_state, init_params
from fastserve.core.steps import make_train_step
from fastserve.tasks import make_task
from fastserve.transforms import TransformError, apply_transforms, choose_rank, lowrank, prune, quantize
from fastserve.transforms.common import get_node, replace_node

# per-layer weights, addressed by path here (scanned ones go through the same transforms unstacked:
# tests/test_scan_layers.py)
CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
                  tie_embeddings=False, scan_layers=False)
TOKENS = (jnp.arange(2 * 12, dtype=jnp.int32).reshape(2, 12) * 7) % 64


@pytest.fixture(scope="module")
def base():
    mesh = parallel.make_mesh(MeshConfig(data=1))
    graphdef, params, _ = init_params(CFG, mesh, seed=0)
    return mesh, graphdef, params


def logits(cfg, params):
    graphdef, _, _ = abstract_model(cfg)
    return np.asarray(nnx.merge(graphdef, params)(TOKENS)[0])


def kernel(params, path):
    return np.asarray(get_node(params, path)["kernel"], np.float64)


# ------------------------------------------------------------------------------------------------ low-rank

def test_full_rank_factorization_reproduces_the_logits(base):
    _, _, params = base
    cfg, new, report = lowrank(CFG, params, include="*", rank_ratio=1.0, force=True)
    assert all(r["action"] == "factorized" for r in report) and len(report) == 2 * 7 + 1   # 7 per block + lm_head
    assert cfg.compressed["lm_head"] == {"kind": "lowrank", "rank": 32}
    assert "kernel" not in new["layers"][0]["attn"]["q"] and new["layers"][0]["attn"]["q"]["u"].shape == (32, 32)
    want, got = logits(CFG, params), logits(cfg, new)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_reconstruction_error_is_the_discarded_spectrum(base):
    """Eckart–Young: ‖W − uv‖_F equals the norm of the singular values the truncation dropped."""
    _, _, params = base
    cfg, new, report = lowrank(CFG, params, include=["attn.(q|k|v|o)", "mlp.*"], rank=5)
    rows = {r["layer"]: r for r in report}
    assert len(rows) == 14 and "lm_head" not in rows
    for path, row in rows.items():
        w = kernel(params, path)
        node = get_node(new, path)
        uv = np.asarray(node["u"], np.float64) @ np.asarray(node["v"], np.float64)
        s = np.linalg.svd(w, compute_uv=False)
        discarded = np.sqrt(np.sum(s[5:] ** 2))
        assert np.linalg.norm(w - uv) == pytest.approx(discarded, rel=1e-4), path
        assert row["rel_error"] == pytest.approx(discarded / np.linalg.norm(w), rel=1e-4)
        assert row["params_after"] == 5 * sum(w.shape) and row["params_before"] == w.size
        # √σ split evenly: both factors carry the same spectrum
        np.testing.assert_allclose(np.linalg.norm(node["u"], axis=0), np.linalg.norm(node["v"], axis=1), rtol=1e-4)


def test_rank_rules_pick_the_expected_ranks(base):
    s = np.array([8.0, 4.0, 2.0, 1.0] + [0.1] * 28)                     # energies 64, 16, 4, 1, 0.01 each
    total = np.sum(s ** 2)
    assert choose_rank(s, 32, 64, {"energy": 64 / total}) == 1
    assert choose_rank(s, 32, 64, {"energy": 80 / total + 1e-9}) == 3
    assert choose_rank(s, 32, 64, {"energy": 0.99}) == 4                 # 85/85.28 = 0.9967 ≥ 0.99 > 84/85.28
    assert choose_rank(s, 32, 64, {"energy": 1.0}) == 32
    assert choose_rank(s, 32, 64, {"rank_ratio": 0.25}) == 8
    assert choose_rank(s, 32, 64, {"rank_ratio": 0.3}) == 10             # ceil(9.6)
    assert choose_rank(s, 32, 64, {"rank": 100}) == 32                   # capped at min(m, n)

    # End to end on a kernel with that spectrum: the first matching rule decides each layer.
    _, _, params = base
    rng = np.random.default_rng(0)
    qa, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    qb, _ = np.linalg.qr(rng.standard_normal((64, 32)))
    w = (qa * s) @ qb.T
    path = "layers.0.mlp.gate"
    params = replace_node(params, path, {"kernel": jnp.asarray(w, jnp.float32)})
    cfg, _, report = lowrank(CFG, params, rules=[{"include": path, "energy": 0.99},
                                                 {"include": "mlp.(gate|up)", "rank_ratio": 0.25},
                                                 {"include": "layers.1.*", "rank": 2}])
    ranks = {r["layer"]: r["rank"] for r in report}
    assert ranks[path] == 4 and ranks["layers.0.mlp.up"] == 8 and ranks["layers.1.mlp.gate"] == 8
    assert ranks["layers.1.attn.q"] == 2 and ranks["layers.1.mlp.down"] == 2 and "layers.0.mlp.down" not in ranks
    assert next(r for r in report if r["layer"] == path)["energy_kept"] == pytest.approx(85 / total, rel=1e-5)
    assert cfg.compressed[path] == {"kind": "lowrank", "rank": 4}


def test_a_rank_that_saves_nothing_stays_dense(base):
    _, _, params = base
    # (32, 64): rank r saves parameters only while r·96 < 2048, i.e. r ≤ 21
    cfg, new, report = lowrank(CFG, params, include="layers.0.mlp.gate", rank=22)
    (row,) = report
    assert row["action"].startswith("kept dense") and row["would_be"] == 22 * 96 and row["params_after"] == 2048
    assert cfg.compressed == {} and new is params
    cfg, _, (row,) = lowrank(CFG, params, include="layers.0.mlp.gate", rank=21)
    assert row["action"] == "factorized" and cfg.compressed == {"layers.0.mlp.gate": {"kind": "lowrank", "rank": 21}}


def test_factorized_model_names_logical_axes_and_its_svd_factors_train(base):
    """The factors name (outer axis, "rank") / ("rank", outer axis), and the SVD factors train on 1 device. Where they
    really land on a multi-device mesh (outer axis sharded, rank axis whole) is checked in the 8-device subprocess:
    test_sharding.py::test_low_rank_factors_shard_their_outer_axes_and_replicate_the_rank_axis."""
    mesh, _, params = base
    cfg, new, _ = lowrank(CFG, params, include="layers.*.mlp.*", rank_ratio=0.25)
    _, abstract, logical = abstract_model(cfg)
    assert logical["layers"][0]["mlp"]["gate"] == {"u": ("embed", "rank"), "v": ("rank", "mlp")}
    assert logical["layers"][1]["mlp"]["down"] == {"u": ("mlp", "rank"), "v": ("rank", "embed")}
    assert abstract["layers"][0]["mlp"]["down"]["u"].shape == (64, 8)
    assert parallel.logical_to_spec(("rank", "mlp")) == P(None, "tensor")   # the rules table: rank is replicated

    tx, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0), 10)
    graphdef, state, shardings = create_train_state(cfg, tx, mesh, seed=0)
    state["params"] = jax.device_put(jax.tree.map(jnp.copy, new), shardings["params"])  # SVD factors (donated)
    step = make_train_step(graphdef, make_task("lm"), tx, schedule, shardings, mesh)
    batch = {"inputs": TOKENS[None], "targets": jnp.roll(TOKENS, -1, axis=1)[None],
             "weights": jnp.ones((1,) + TOKENS.shape, jnp.float32)}
    state, metrics = step(state, batch, {})
    assert math.isfinite(float(metrics["loss_sum"])) and float(metrics["grad_norm"]) > 0
    for name in ("u", "v"):
        before = np.asarray(new["layers"][0]["mlp"]["gate"][name])
        assert not np.allclose(np.asarray(state["params"]["layers"][0]["mlp"]["gate"][name]), before)


# ---------------------------------------------------------------------------------------------------- int8

def test_int8_quantization_keeps_logits_close(base):
    _, _, params = base
    cfg, new, report = quantize(CFG, params)
    assert len(report) == 15 and all(r["action"] == "quantized int8" for r in report)
    q = new["layers"][1]["mlp"]["down"]
    assert q["kernel"].dtype == jnp.int8 and q["scale"].dtype == jnp.float32 and q["scale"].shape == (32,)
    assert int(jnp.max(jnp.abs(q["kernel"].astype(jnp.int32)))) == 127          # symmetric, full range per column
    _, _, logical = abstract_model(cfg)
    assert logical["layers"][1]["mlp"]["down"] == {"kernel": ("mlp", "embed"), "scale": ("embed",)}
    want, got = logits(CFG, params), logits(cfg, new)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 2e-2, rel                                                       # measured ≈ 6e-3
    assert all(r["rel_error"] < 1e-2 and r["bytes_after"] < r["bytes_before"] / 3.5 for r in report)

    # inference only: there is no gradient through an int8 kernel
    graphdef, _, _ = abstract_model(cfg)
    with pytest.raises(TypeError, match="int8"):
        jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(TOKENS)[0]))(new)
    # ... and the trainer refuses such a config up front, naming the int8 layers
    import optax
    from fastserve import parallel
    from fastserve.core.state import create_train_state
    mesh = parallel.make_mesh(load_config(None, ["mesh.data=1"]).mesh, jax.devices()[:1])
    with pytest.raises(ValueError, match=r"int8 layers \(layers\.0\.attn\.k.*inference-only"):
        create_train_state(cfg, optax.sgd(0.1), mesh, seed=0)


def test_lowrank_then_int8_composes(base):
    _, _, params = base
    cfg, new, report = apply_transforms(CFG, params, [
        {"lowrank": {"include": "layers.*.mlp.*", "rank_ratio": 0.25}},
        {"quantize": {"bits": 8, "exclude": "lm_head"}},
    ])
    kinds = {path: e["kind"] for path, e in cfg.compressed.items()}
    assert kinds["layers.0.mlp.up"] == "lowrank" and kinds["layers.1.attn.o"] == "int8" and "lm_head" not in kinds
    assert {(r["step"], r["transform"]) for r in report} == {(0, "lowrank"), (1, "quantize")}
    assert any(r["action"].startswith("skipped: lowrank") for r in report if r["step"] == 1)
    assert np.isfinite(logits(cfg, new)).all()


# ---------------------------------------------------------------------------------------------------- prune

def test_pruning_hits_the_target_and_the_2_4_pattern(base):
    _, _, params = base
    cfg, new, report = prune(CFG, params, sparsity=0.37, include="mlp.*")
    assert cfg is CFG and len(report) == 6
    for row in report:
        w = kernel(new, row["layer"])
        assert int(np.sum(w == 0)) == round(0.37 * w.size) == row["zeros"]
        assert row["storage"].startswith("dense")
        kept = np.abs(kernel(params, row["layer"]))[w != 0]
        assert kept.min() >= np.abs(kernel(params, row["layer"]))[w == 0].max()   # the smallest went

    _, new, report = prune(CFG, params, pattern="2:4", include="attn.*")
    for row in report:
        w = kernel(new, row["layer"])
        groups = (w.reshape(w.shape[0] // 4, 4, w.shape[1]) != 0).sum(axis=1)      # 4 consecutive input rows
        assert (groups == 2).all() and row["sparsity"] == 0.5
    assert np.isfinite(logits(CFG, new)).all()
    with pytest.raises(TransformError, match="prune.sparsity.*2:4"):
        prune(CFG, params, pattern="2:4", sparsity=0.3)


# ---------------------------------------------------------------------------------------- specs and config

@pytest.mark.parametrize("specs, match", [
    ([{"lowrank": {"include": "mlp.*", "rnak": 4}}],
     r"unknown option 'transforms\[0\]\.lowrank\.rnak'.*did you mean 'transforms\[0\]\.lowrank\.rank'"),
    ([{"prune": {"sparsity": 0.5}}, {"quantise": {}}],
     r"transforms\[1\]: unknown transform 'quantise'; did you mean 'quantize'"),
    ([{"quantize": {"bits": 4}}], r"transforms\[0\]\.quantize\.bits: only 8"),
    ([{"lowrank": {"include": "mlp.*", "rank": 2, "energy": 0.9}}], r"transforms\[0\]\.lowrank: give exactly one"),
    ([{"lowrank": {"rules": [{"include": "mlp.*", "energy": 1.5}]}}], r"transforms\[0\]\.lowrank\.rules\[0\]\.energy"),
    ([{"lowrank": {"include": "mpl.*", "rank": 2}}], r"transforms\[0\]\.lowrank\.include: 'mpl\.\*' matches no Linear"),
    ([{"prune": {"sparsity": 0.5, "patern": "2:4"}}],
     r"'transforms\[0\]\.prune\.patern'.*did you mean 'transforms\[0\]\.prune\.pattern'"),
    ([{"lowrank": {"include": "mlp.*", "rank": 2}, "prune": {}}], r"transforms\[0\]: expected one"),
])
def test_bad_spec_names_the_key(base, specs, match):
    with pytest.raises(TransformError, match=match):
        apply_transforms(CFG, base[2], specs)


def test_compressed_config_round_trips_and_is_validated(base):
    _, _, params = base
    cfg, _, _ = apply_transforms(CFG, params, [{"lowrank": {"include": "layers.0.mlp.up", "rank": 3}},
                                               {"quantize": {"include": "lm_head"}}])
    full = load_config(None, ["model.vocab_size=64"])
    text = dump_config(dataclasses.replace(full, model=cfg))
    again = load_config(None, [f"model.compressed={yaml.safe_dump(cfg.compressed, default_flow_style=True).strip()}"])
    assert yaml.safe_load(text)["model"]["compressed"] == cfg.compressed == again.model.compressed
    with pytest.raises(ConfigError, match=r"model\.compressed: expected a mapping"):
        load_config(None, ["model.compressed=[1, 2]"])
    with pytest.raises(ConfigError, match=r"model\.compressed\['lm_head'\]: expected a mapping"):
        load_config(None, ["model.compressed={lm_head: int8}"])
    bad = dataclasses.replace(CFG, compressed={"layers.0.mlp.up": {"kind": "lowrank", "rank": 0}})
    with pytest.raises(ValueError, match=r"model\.compressed\['layers\.0\.mlp\.up'\]\.rank"):
        abstract_model(bad)
    with pytest.raises(ValueError, match=r"'layers\.0\.mlp\.upp'.*did you mean 'layers\.0\.mlp\.up'"):
        abstract_model(dataclasses.replace(CFG, compressed={"layers.0.mlp.upp": {"kind": "int8"}}))

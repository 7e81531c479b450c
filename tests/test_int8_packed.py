"""W8A8 weights stored as the CPU kernel's VNNI panels (`layout: vnni`, serve.pack_int8): the packing is a
permutation of the codes (round trip, a token's row gathered back out of a packed head), the packed kernel's VNNI
loops give bit-for-bit the unpacked kernel's answer and its portable loops the integer reference, a quantized model
repacked by `vnni_layout` computes what it computed before (up to float rounding in the tied head), and the serving engine repacks a W8A8 model at
start-up and generates the same greedy tokens as with `serve.pack_int8=false`; serving applies a config's
`transforms` at load."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fastserve import parallel
from fastserve.config import ServeConfig, load_config
from fastserve.core.state import abstract_model, init_params
from fastserve.generation import decoding as infer
from fastserve.kernels.int8 import (int8_matmul_packed_kernel, int8_matmul_q8_kernel, pack_vnni, packed_columns,
                                    unpack_vnni, vnni_available)
from fastserve.models.compressed import validate_entry
from fastserve.serve.cli import serve
from fastserve.serve.engine import Engine, Request
from fastserve.transforms import quantize
from fastserve.transforms.quantize import vnni_layout
from fastserve.transforms.report import transformed
from fastserve.workdir import LoadedModel
from kernel_isa import lib  # noqa: F401  (a fixture)
from test_int8_w8a8 import _case, _paths, _reference

# (rows, K, N, group): 1 / 2 / 4-row tiles and their mixes (13 = 3 × 4 + 1), one to ten panels, groups of 32 / 64
CASES = [(1, 576, 640, None), (3, 96, 64, None), (8, 160, 192, 64), (13, 256, 128, 32), (2, 32, 64, None)]


def test_packing_is_a_permutation_of_the_codes():
    q = np.random.default_rng(0).integers(-127, 128, (96, 192)).astype(np.int8)
    packed = np.asarray(pack_vnni(jnp.asarray(q)))
    assert packed.shape == (3, 96, 64)
    assert sorted(packed.ravel().tolist()) == sorted(q.ravel().tolist())
    np.testing.assert_array_equal(np.asarray(unpack_vnni(jnp.asarray(packed))), q)
    # column 64p + 16L + 4j + i, rows 4kq..4kq+3 at panel p, vector 4kq + j, bytes 16L + 4i .. + 3 (the kernel's)
    p, L, j, i, kq = 2, 3, 1, 2, 5
    np.testing.assert_array_equal(packed[p, 4 * kq + j, 16 * L + 4 * i:16 * L + 4 * i + 4],
                                  q[4 * kq:4 * kq + 4, 64 * p + 16 * L + 4 * j + i])
    columns = np.array([[0, 191], [77, 64]])
    np.testing.assert_array_equal(np.asarray(packed_columns(jnp.asarray(packed), jnp.asarray(columns))),
                                  q.T[columns])


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("threads", [0, 1])
def test_packed_kernel_equals_the_unpacked_kernel(lib, monkeypatch, path, threads):
    if path == "portable":
        monkeypatch.setenv("FASTSERVE_INT8_ISA", "avx2")
    for rows, k, n, group in CASES:
        x, q, scale = _case(rows, k, n, group)
        got = np.asarray(int8_matmul_packed_kernel(x, pack_vnni(jnp.asarray(q)), scale, group, threads))
        ref = _reference(x, q, scale, group)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * np.abs(ref).max(),
                                   err_msg=f"{path} rows={rows} K={k} N={n} group={group}")
        if path == "vnni":   # the same tiles over the same sums: bit for bit
            np.testing.assert_array_equal(got, np.asarray(int8_matmul_q8_kernel(x, q, scale, group, threads)))


def _w8a8_model(d_model=64, vocab=128):
    cfg = load_config(None, [f"model.vocab_size={vocab}", f"model.d_model={d_model}", "model.n_layers=2",
                             "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=128", "model.init_std=0.3",
                             "model.max_seq_len=64", "data.seq_len=64", "mesh.data=1"])
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
    _, params, _ = init_params(cfg.model, mesh, seed=3)
    model_cfg, params, _ = quantize(cfg.model, jax.device_get(params), include="layers.*", activations="int8")
    return model_cfg, params, mesh


def test_a_repacked_model_computes_exactly_what_it_did(lib):
    model_cfg, params, _ = _w8a8_model()
    packed_cfg, packed_params, paths = vnni_layout(model_cfg, params)
    # q, o (64 wide), the MLP and the tied head are packed; k and v (2 heads × 16 = 32 columns) cannot be
    assert "embed" in paths and "layers.1.mlp.down" in paths and "layers.0.attn.k" not in paths
    assert packed_cfg.compressed["layers.0.attn.q"]["layout"] == "vnni"
    assert "layout" not in packed_cfg.compressed["layers.0.attn.k"]
    assert packed_params["embed"]["embedding"].shape == (2, 64, 64)          # (vocab / 64, d_model, 64)
    before, after = (nnx.merge(abstract_model(c)[0], p) for c, p in ((model_cfg, params),
                                                                        (packed_cfg, packed_params)))
    tokens = jnp.asarray(np.random.default_rng(1).integers(1, 128, (2, 12)), jnp.int32)
    lengths = jnp.asarray([11, 11], jnp.int32)
    # the same integer sums per block of 32; the tied head (a row-wise kernel before) adds its blocks in another order
    full = np.asarray(before(tokens)[0])
    np.testing.assert_allclose(np.asarray(after(tokens)[0]), full, rtol=0, atol=1e-6 * np.abs(full).max())
    step = []
    for model in (before, after):
        _, cache = infer.prefill(model, tokens[:, :11], lengths, model.init_cache(2, 16))
        step.append(np.asarray(jax.jit(lambda t, c, m=model: infer.decode(m, t, lengths, c)[0])(tokens[:, 11],
                                                                                                   cache)))
    np.testing.assert_allclose(step[1], step[0], rtol=0, atol=1e-6 * np.abs(step[0]).max())
    with pytest.raises(ValueError, match="needs activations: int8"):
        validate_entry("layers.0.mlp.up", {"kind": "int8", "layout": "vnni"})
    with pytest.raises(ValueError, match="layout: expected one of kn, vnni"):
        validate_entry("layers.0.mlp.up", {"kind": "int8", "activations": "int8", "layout": "nk"})
    bad = dict(model_cfg.compressed, **{"layers.0.attn.k": {"kind": "int8", "activations": "int8", "layout": "vnni"}})
    with pytest.raises(ValueError, match=r"'layers.0.attn.k'\].layout: 'vnni' needs the output dimension"):
        abstract_model(type(model_cfg)(**{**model_cfg.__dict__, "compressed": bad}))


def test_the_engine_serves_a_w8a8_model_repacked_with_the_same_tokens(lib):
    model_cfg, params, mesh = _w8a8_model()
    graphdef = abstract_model(model_cfg)[0]
    prompts = [list(range(5, 5 + n)) for n in (3, 9, 14, 6)]
    outputs, layouts = [], []
    for pack in (True, False):
        cfg = ServeConfig(slots=2, buckets=[8, 16], max_cache_len=40, scheduler="fcfs", pack_int8=pack,
                          prefill_chunk=4)
        engine = Engine(graphdef, params, model_cfg, cfg, mesh=mesh)
        reqs = [Request(p, max_new_tokens=12) for p in prompts]
        for r in reqs:
            engine.submit(r)
        engine.run_until_done(120)
        outputs.append([r.output for r in reqs])
        layouts.append(engine.model_cfg.compressed["layers.0.mlp.up"].get("layout", "kn"))
    assert layouts == (["vnni", "kn"] if vnni_available() else ["kn", "kn"])
    assert all(len(o) == 12 for o in outputs[0])
    assert outputs[0] == outputs[1]


def test_serving_applies_the_configs_transforms_at_load(lib):
    """`python -m fastserve.serve` quantizes at load what `transforms:` asks (configs/serve_smollm2_w8a8.yaml), and
    refuses transforms on an export, whose weights are fixed."""
    cfg = load_config(None, ["model.vocab_size=128", "model.d_model=64", "model.n_layers=1", "model.n_heads=4",
                             "model.d_ff=128", "model.max_seq_len=32", "data.seq_len=32", "mesh.data=1",
                             "transforms=[{quantize: {include: ['layers.*'], activations: int8}}]"])
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
    graphdef, params, _ = init_params(cfg.model, mesh, seed=0)
    loaded = LoadedModel(cfg.model, graphdef, params, None, mesh)
    assert transformed(loaded, dataclasses.replace(cfg, transforms=[])) is loaded
    served = transformed(loaded, cfg)
    assert served.model_cfg.compressed["layers.0.mlp.up"] == {"kind": "int8", "activations": "int8"}
    assert served.params["layers"][0]["mlp"]["up"]["kernel"].dtype == jnp.int8
    exported = dataclasses.replace(cfg, source=dataclasses.replace(cfg.source, kind="exported", path="exports/x"))
    with pytest.raises(ValueError, match="transforms: an export's weights are fixed"):
        serve(exported, block=False)
    shipped = load_config("configs/serve_smollm2_w8a8.yaml")
    assert shipped.transforms[0]["quantize"]["activations"] == "int8" and shipped.serve.prefill_chunk > 0

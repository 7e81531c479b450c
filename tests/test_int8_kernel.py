"""The int8 CPU kernel (fastserve.kernels): equal to dequantize-then-dot on odd shapes for every instruction-set
variant this CPU runs, per channel and per group; an int8 model's export runs the same kernel when loaded in a
fresh process; without the kernel (no compiler, or FASTSERVE_INT8_KERNEL=0) int8 layers fall back to XLA; the tied
embedding / LM head quantizes (per vocabulary row) and its logits run through the kernel at decode."""
from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fastserve.config import MeshConfig, ModelConfig
from fastserve.core.state import init_params
from fastserve.generation import decoding as infer
from fastserve.kernels import (build, dequantize, int8_matmul, int8_matmul_kernel, int8_matmul_nt,
                               int8_matmul_nt_kernel, int8_matmul_xla)
from fastserve.models.compressed import QuantizedLinear, quantize_int8
from fastserve.parallel import make_mesh
from kernel_isa import cpu_has, lib, variants  # noqa: F401  (lib: a fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (rows, K, N): K and N not multiples of 8 or 16, one N below a vector, rows 1 and 7 (4 + 2 + 1 row blocks)
SHAPES = [(1, 37, 29), (7, 37, 29), (1, 300, 203), (7, 300, 203), (3, 5, 3), (2, 200, 1100)]
GROUPS = [None, 8, 32, 128]  # 32 and 128 leave a short last group for K = 37 / 300 / 200


def _case(rows, k, n, group, seed=0):
    """x, random int8 codes and positive scales (N,) or (ceil(K / group), N), in numpy (no per-shape compiles)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    q = rng.integers(-127, 128, (k, n)).astype(np.int8)
    scale = (rng.random((n,) if group is None else (-(-k // group), n)) + 0.01).astype(np.float32) / 127
    return x, q, scale


def _reference(x, q, scale, group):
    """float64 x @ (q × each row's scale), written out independently of fastserve.kernels.dequantize."""
    per_row = np.broadcast_to(scale, q.shape) if group is None else np.repeat(scale, group, axis=0)[:q.shape[0]]
    return np.asarray(x, np.float64) @ (q.astype(np.float64) * per_row)


@pytest.mark.parametrize("isa", variants())
def test_every_tile_variant_equals_dequantize_then_dot(lib, isa):
    if not cpu_has(isa):
        pytest.skip(f"this CPU cannot run the {isa} variant")
    tile = getattr(lib.handle, f"fastserve_int8_tile_{isa}")
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    for rows, k, n in SHAPES:
        for group in GROUPS:
            x, q, scale = _case(rows, k, n, group)
            scales = scale.reshape(1, n) if group is None else scale
            y = np.full((rows, n), np.nan, np.float32)
            # two column ranges, split off a tile boundary, as the threaded path calls it
            split = n // 3
            for n0, n1 in ((0, split), (split, n)):
                tile(ptr(x), ptr(q), ptr(np.ascontiguousarray(scales)), ptr(y), ctypes.c_int64(rows),
                     ctypes.c_int64(k), ctypes.c_int64(n), ctypes.c_int64(group or k), ctypes.c_int64(n0),
                     ctypes.c_int64(n1))
            ref = _reference(x, q, scale, group)
            np.testing.assert_allclose(y, ref, rtol=0, atol=2e-5 * np.abs(ref).max(),
                                       err_msg=f"{isa} rows={rows} K={k} N={n} group={group}")


@pytest.mark.parametrize("isa", variants())
def test_every_row_variant_equals_the_transposed_reference(lib, isa):
    """The tied-head form: x @ (W [N, K] × scale [N])ᵀ, K with and without a vector-width remainder."""
    if not cpu_has(isa):
        pytest.skip(f"this CPU cannot run the {isa} variant")
    rows_fn = getattr(lib.handle, f"fastserve_int8_rows_{isa}")
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    for rows, k, n in SHAPES + [(1, 64, 9), (5, 48, 131)]:
        x, q, scale = _case(rows, k, n, None)
        w = np.ascontiguousarray(q.T)                                               # [N, K]
        y = np.full((rows, n), np.nan, np.float32)
        split = n // 3 + 1                                                          # off the 4-row blocks
        for n0, n1 in ((0, split), (split, n)):
            rows_fn(ptr(x), ptr(w), ptr(scale), ptr(y), ctypes.c_int64(rows), ctypes.c_int64(k), ctypes.c_int64(n),
                    ctypes.c_int64(n0), ctypes.c_int64(n1))
        ref = _reference(x, q, scale, None)
        np.testing.assert_allclose(y, ref, rtol=0, atol=2e-5 * np.abs(ref).max(),
                                   err_msg=f"{isa} rows={rows} K={k} N={n}")


@pytest.mark.parametrize("threads", [0, 1])
def test_transposed_custom_call_equals_the_reference(lib, threads):
    for rows, k, n in [(1, 37, 29), (7, 300, 203), (3, 577, 3000)]:                # the last uses the pool
        x, q, scale = _case(rows, k, n, None, seed=2)
        w = np.ascontiguousarray(q.T)
        y = jax.jit(lambda x, w, s: int8_matmul_nt_kernel(x, w, s, threads))(x, w, scale)
        ref = _reference(x, q, scale, None)
        np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=2e-5 * np.abs(ref).max(),
                                   err_msg=f"rows={rows} K={k} N={n}")
        assert "fastserve_int8_matmul_nt" in jax.jit(int8_matmul_nt).lower(x, w, scale).as_text()
    big = np.zeros((256, 37), np.float32)                                           # prefill-sized: XLA
    assert "fastserve_int8_matmul_nt" not in jax.jit(int8_matmul_nt).lower(big, w[:, :37], scale).as_text()


@pytest.mark.parametrize("threads", [0, 1])
def test_custom_call_equals_dequantize_then_dot(lib, threads):
    # odd shapes at 1 and 7 rows, and one large enough to use the thread pool
    for rows, k, n in [(1, 37, 29), (7, 300, 203), (9, 577, 1100)]:  # the last: 5.7 M multiply-adds
        for group in (None, 32):
            x, q, scale = _case(rows, k, n, group, seed=1)
            y = jax.jit(lambda x, q, s: int8_matmul_kernel(x, q, s, group, threads))(x, q, scale)
            ref = _reference(x, q, scale, group)
            np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=2e-5 * np.abs(ref).max(),
                                       err_msg=f"rows={rows} K={k} N={n} group={group}")
    # leading batch dimensions are rows too
    x, q, scale = _case(6, 37, 29, 8)
    y = int8_matmul_kernel(jnp.asarray(x).reshape(2, 3, 37), q, scale, 8)
    np.testing.assert_allclose(np.asarray(y).reshape(6, 29), _reference(x, q, scale, 8), atol=1e-4)


def test_group_scales_shape_and_error():
    w = np.random.default_rng(2).standard_normal((300, 40)).astype(np.float32)
    w[:10] *= 20  # an outlier block: a per-channel scale wastes the other rows' resolution
    errors = {}
    roundtrip = jax.jit(lambda w, group: (*quantize_int8(w, group), dequantize(*quantize_int8(w, group), group)),
                        static_argnums=1)  # one compile per group instead of one per eager op
    for group in (None, 32, 128):
        q, scale, deq = roundtrip(w, group)
        assert q.dtype == jnp.int8 and scale.shape == ((40,) if group is None else (-(-300 // group), 40))
        errors[group] = float(np.abs(np.asarray(deq) - w).max())
    assert errors[32] < errors[128] < errors[None]


def test_layer_uses_the_kernel_at_decode_rows_and_xla_for_prefill(lib):
    x, q, scale = _case(1, 37, 29, None)
    assert "fastserve_int8_matmul" in jax.jit(int8_matmul).lower(x, q, scale).as_text()
    big = np.zeros((256, 37), np.float32)  # prefill-sized: XLA's dot reuses the dequantized kernel better
    assert "fastserve_int8_matmul" not in jax.jit(int8_matmul).lower(big, q, scale).as_text()


def test_without_the_kernel_layers_fall_back_to_xla(monkeypatch, tmp_path, caplog):
    w = np.random.default_rng(3).standard_normal((37, 29)).astype(np.float32)
    x = np.random.default_rng(4).standard_normal((2, 37)).astype(np.float32)
    layer = QuantizedLinear(37, 29, ("embed", "mlp"), kernel=w, group=8)
    expected = int8_matmul_xla(x, layer.kernel[...], layer.scale[...], 8)
    try:
        # no compiler, empty cache: load() logs why and returns None; the layer still computes the same
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
        monkeypatch.setenv("FASTSERVE_KERNEL_CACHE", str(tmp_path / "cache"))
        build.load.cache_clear()
        with caplog.at_level("WARNING", logger="fastserve.kernels"):
            assert build.load() is None
        assert "fall back to XLA" in caplog.text and "no-such-g++" in caplog.text
        text = jax.jit(lambda x: layer(x)).lower(x).as_text()
        assert "fastserve_int8_matmul" not in text
        np.testing.assert_allclose(np.asarray(jax.jit(lambda x: layer(x))(x)), np.asarray(expected), atol=1e-5)
        # FASTSERVE_INT8_KERNEL=0 does the same on purpose
        monkeypatch.setenv("FASTSERVE_INT8_KERNEL", "0")
        build.load.cache_clear()
        assert build.load() is None and build.status()["disabled"]
    finally:
        monkeypatch.undo()
        build.load.cache_clear()
    assert build.load() is not None


_CHILD = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    from fastserve.artifacts.loader import load_exported
    from fastserve.kernels.build import KernelBuildError, load
    os.environ["FASTSERVE_INT8_KERNEL"] = "0"
    try:
        load_exported(sys.argv[1])
        refused = ""
    except KernelBuildError as e:
        refused = str(e)
    os.environ.pop("FASTSERVE_INT8_KERNEL")
    load.cache_clear()
    exp = load_exported(sys.argv[1])
    inp = np.load(sys.argv[2])
    logits, cache = exp.prefill(inp["tokens"], inp["lengths"])
    dlogits, _ = exp.decode(inp["next"], inp["lengths"], cache)
    np.savez(sys.argv[3], logits=np.asarray(logits), dlogits=np.asarray(dlogits))
    print("RESULT " + json.dumps({"refused": refused}))
""")


@pytest.mark.slow  # a fresh process, two exports' worth of tracing: ~50 s on a loaded 2-core machine
def test_int8_export_loads_with_the_kernel_in_a_fresh_process(lib, tmp_path):
    from fastserve.artifacts.writer import ExportOptions, export_params
    from fastserve.data import load_texts, train_tokenizer

    tok = train_tokenizer(load_texts("pydoc")[:4], 360, str(tmp_path / "tok.model"))
    compressed = {"layers.0.mlp.up": {"kind": "int8"}, "layers.0.attn.q": {"kind": "int8", "group": 8},
                  "layers.1.mlp.down": {"kind": "int8", "group": 32}, "embed": {"kind": "int8"},  # + the tied head
                  "layers.1.mlp.up": {"kind": "int8", "activations": "int8"}}                  # W8A8 (K = 32)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=72,
                      max_seq_len=32, init_std=0.3, compressed=compressed)
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    graphdef, params, _ = init_params(cfg, mesh, seed=0)
    out = tmp_path / "export"
    manifest = export_params(cfg, params, tok, str(out), ExportOptions(
        platforms=("cpu",), buckets=(8,), batch_sizes=(1,), functions=("prefill", "decode"), max_cache_len=16))
    decode_file = out / manifest["functions"]["decode_b1"]["file"]
    decode_module = jax.export.deserialize(bytearray(decode_file.read_bytes())).mlir_module_serialized
    assert build.INT8_TARGET.encode() in decode_module and build.INT8_Q8_TARGET.encode() in decode_module

    tokens = np.asarray([[1, 5, 9, 4, 0, 0, 0, 0]], np.int32)
    lengths = np.asarray([4], np.int32)

    @jax.jit
    def reference(params, tokens, lengths):
        model = nnx.merge(graphdef, params)
        logits, cache = infer.prefill(model, tokens, lengths, model.init_cache(1, 16))
        nxt = jnp.argmax(logits, -1).astype(jnp.int32)
        return logits, nxt, infer.decode(model, nxt, lengths, cache)[0]

    logits, nxt, dlogits = jax.device_get(reference(params, tokens, lengths))
    np.savez(tmp_path / "in.npz", tokens=tokens, lengths=lengths, next=nxt)
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(out), str(tmp_path / "in.npz"),
                           str(tmp_path / "out.npz")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert "decode_b1" in res["refused"] and "fastserve_int8_matmul" in res["refused"]
    got = np.load(tmp_path / "out.npz")
    np.testing.assert_allclose(got["logits"], logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got["dlogits"], dlogits, atol=1e-5, rtol=1e-5)


def test_quantize_transform_per_group_and_bad_group():
    from fastserve.transforms import TransformError, quantize

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=72, max_seq_len=16)
    _, params, _ = init_params(cfg, make_mesh(MeshConfig(), jax.devices()[:1]), seed=0)
    params = jax.device_get(params)
    new_cfg, new_params, report = quantize(cfg, params, group=32, include="layers.*.mlp.*")
    assert new_cfg.compressed["layers.0.mlp.down"] == {"kind": "int8", "group": 32}
    down = next(r for r in report if r["layer"] == "layers.0.mlp.down")  # kernel (72, 32): groups of 32, 32, 8
    assert down["bytes_after"] == 72 * 32 + 4 * 3 * 32 and down["rel_error"] < 0.01
    with pytest.raises(TransformError, match="quantize.group"):
        quantize(cfg, params, group=0)


def _tied_model():
    cfg = ModelConfig(vocab_size=67, d_model=40, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=72, max_seq_len=16,
                      init_std=0.3)
    _, params, _ = init_params(cfg, make_mesh(MeshConfig(), jax.devices()[:1]), seed=0)
    return cfg, jax.device_get(params)


def test_quantize_takes_the_tied_head_unless_told_not_to(lib):
    from fastserve.core.state import abstract_model
    from fastserve.transforms import TransformError, quantize

    cfg, params = _tied_model()
    new_cfg, new_params, report = quantize(cfg, params, include="layers.*.mlp.*")   # the head whatever include says
    assert new_cfg.compressed["embed"] == {"kind": "int8"}
    table = np.asarray(params["embed"]["embedding"])                                 # (vocab 67, dim 40)
    q, scale = new_params["embed"]["embedding"], new_params["embed"]["scale"]
    assert q.dtype == jnp.int8 and q.shape == (67, 40) and scale.shape == (67,)     # one scale per vocabulary row
    np.testing.assert_allclose(scale, np.abs(table).max(axis=1) / 127, rtol=1e-6)
    head = next(r for r in report if r["layer"] == "embed")
    assert head["bytes_after"] == 67 * 40 + 4 * 67 and head["rel_error"] < 0.01
    _, _, logical = abstract_model(new_cfg)
    assert logical["embed"] == {"embedding": ("vocab", "embed"), "scale": ("vocab",)}

    graphdef = abstract_model(new_cfg)[0]
    model = nnx.merge(graphdef, new_params)
    tokens = jnp.asarray([[3, 66, 0, 12]])
    deq = np.asarray(q, np.float64) * np.asarray(scale, np.float64)[:, None]        # (vocab, dim), independently
    np.testing.assert_allclose(np.asarray(model.embed(tokens))[0], deq[[3, 66, 0, 12]], rtol=1e-6, atol=1e-7)
    x = np.random.default_rng(0).standard_normal((1, 1, 40)).astype(np.float32)     # a decode row: the kernel
    assert "fastserve_int8_matmul_nt" in jax.jit(model.embed.attend).lower(x).as_text()
    np.testing.assert_allclose(np.asarray(jax.jit(model.embed.attend)(x))[0, 0], x[0, 0] @ deq.T, rtol=1e-4,
                               atol=1e-4)

    # greedy decode from a KV cache agrees with the full forward pass of the same int8 model
    logits, cache = infer.prefill(model, tokens, jnp.asarray([4]), model.init_cache(1, 8))
    full = model(jnp.concatenate([tokens, jnp.argmax(logits, -1)[:, None].astype(jnp.int32)], axis=1))[0]
    step, _ = infer.decode(model, jnp.argmax(logits, -1).astype(jnp.int32), jnp.asarray([4]), cache)
    np.testing.assert_allclose(np.asarray(step)[0], np.asarray(full)[0, 4], rtol=1e-4, atol=1e-4)

    assert "embed" not in quantize(cfg, params, head=False)[0].compressed
    assert "embed" not in quantize(cfg, params, exclude="embed")[0].compressed
    with pytest.raises(TransformError, match="quantize.head"):
        quantize(cfg, params, head="no")
    with pytest.raises(ValueError, match="embedding table takes only"):
        abstract_model(dataclasses.replace(cfg, compressed={"embed": {"kind": "int8", "group": 8}}))


def test_untied_head_is_quantized_with_the_body_or_kept_in_float():
    from fastserve.transforms import quantize

    cfg = dataclasses.replace(_tied_model()[0], tie_embeddings=False)
    _, params, _ = init_params(cfg, make_mesh(MeshConfig(), jax.devices()[:1]), seed=0)
    kinds = quantize(cfg, jax.device_get(params), include="layers.*")[0].compressed
    assert kinds["lm_head"] == {"kind": "int8"} and "embed" not in kinds     # the table is only gathered from
    assert "lm_head" not in quantize(cfg, jax.device_get(params), head=False)[0].compressed

"""W8A8 int8 layers (`activations: int8`): the activations rounded to int8 per block of 32, exact integer products.
The kernel's VNNI and portable loops equal a float64 reference written out here, on shapes with column tails, weight
groups and a K that leaves half a 64-byte chunk; the XLA path (prefill, TPU / GPU) rounds the same way; a model
quantized with the option decodes through the W8A8 custom calls and agrees with its own prefill."""
from __future__ import annotations

import ctypes
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
from fastserve.core.state import abstract_model, init_params
from fastserve.generation import decoding as infer
from fastserve.kernels import int8_matmul, int8_matmul_nt, int8_matmul_nt_q8_kernel, int8_matmul_q8_kernel
from fastserve.kernels.int8 import quantize_activations
from fastserve.models.compressed import validate_entry
from fastserve.parallel import make_mesh
from fastserve.transforms import TransformError, quantize
from kernel_isa import cpu_has, lib  # noqa: F401  (lib: a fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (rows, K, N, group): N with a tail past the 64-column tiles, rows 1 / 2 / 4+ blocks, groups of 32 and 64 (the last
# one short), K = 96 and 160 end in half a 64-byte chunk
# from 32 rows the VNNI loops pack weight panels (tiles of 4 rows, then 2 / 1): 33 = 8 × 4 + 1, 70 = 17 × 4 + 2
TILE_CASES = [(1, 576, 200, None), (3, 96, 130, None), (7, 160, 64, 64), (5, 256, 70, 32), (2, 32, 37, None),
              (13, 160, 200, 64), (33, 96, 130, None), (70, 64, 64, 32)]
NT_CASES = [(1, 576, 203), (3, 96, 7), (9, 160, 33)]


def _codes(x):
    """The int8 codes and block scales of x [M, K], written as llama.cpp's Q8_0 rounds (float32 arithmetic)."""
    blocks = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    d = (np.abs(blocks).max(-1) / np.float32(127)).astype(np.float32)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    return np.clip(np.rint(blocks * inv[..., None]), -127, 127).astype(np.int64), d.astype(np.float64)


def _reference(x, q, scale, group):
    """float64 Σ_groups scale · Σ_blocks d · (codes · W)."""
    codes, d = _codes(x)
    k, n = q.shape
    per_block = np.einsum("mbk,bkn->mbn", codes, q.reshape(k // 32, 32, n).astype(np.int64)) * d[..., None]
    g = k // 32 if group is None else group // 32
    sums = np.stack([per_block[:, i:i + g].sum(1) for i in range(0, k // 32, g)], 1)
    return (sums * scale.reshape(-1, n)[None]).sum(1)


def _case(rows, k, n, group, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[0, :32] = 0                      # an all-zero block: scale 0, codes 0
    q = rng.integers(-127, 128, (k, n)).astype(np.int8)
    scale = (rng.random((n,) if group is None else (-(-k // group), n)) + 0.01).astype(np.float32) / 127
    return x, q, scale


def _paths():
    """The integer loops this CPU can run: the VNNI ones where it has them, the portable ones always."""
    flags = open("/proc/cpuinfo").read() if cpu_has("avx512") else ""
    return (["vnni"] if " avx512_vnni" in flags else []) + ["portable"]


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("threads", [0, 1])
def test_w8a8_kernels_equal_the_integer_reference(lib, monkeypatch, path, threads):
    if path == "portable":   # the handlers read the instruction set at every call
        monkeypatch.setenv("FASTSERVE_INT8_ISA", "avx2")
    assert lib.handle.fastserve_int8_q8_vnni() == (path == "vnni")
    for rows, k, n, group in TILE_CASES:
        x, q, scale = _case(rows, k, n, group)
        y = np.asarray(int8_matmul_q8_kernel(x, q, scale, group, threads))
        ref = _reference(x, q, scale, group)
        np.testing.assert_allclose(y, ref, rtol=0, atol=1e-6 * np.abs(ref).max(),
                                   err_msg=f"{path} rows={rows} K={k} N={n} group={group}")
    for rows, k, n in NT_CASES:
        x, q_t, scale = _case(rows, k, n, None, seed=1)
        q = np.ascontiguousarray(q_t.T)                                  # [N, K]: one row per output
        y = np.asarray(int8_matmul_nt_q8_kernel(x, q, scale, threads))
        ref = _reference(x, q_t, scale, None)
        np.testing.assert_allclose(y, ref, rtol=0, atol=1e-6 * np.abs(ref).max(), err_msg=f"{path} nt {rows, k, n}")


def test_dispatch_rounds_activations_on_every_path(lib, monkeypatch):
    x, q, scale = _case(3, 96, 130, None)
    decode = jax.jit(lambda x, q, s: int8_matmul(x, q, s, None, "int8"))
    assert "fastserve_int8_matmul_q8" in decode.lower(x, q, scale).as_text()
    # prefill-sized rows: the kernel where the CPU has VNNI (its packed panels), else XLA with x rounded the same
    # way (not float activations)
    big = np.random.default_rng(5).standard_normal((48, 96)).astype(np.float32)
    ref = _reference(big, q, scale, None)
    for path in _paths():
        if path == "portable":
            monkeypatch.setenv("FASTSERVE_INT8_ISA", "avx2")
        prefill = jax.jit(lambda x, q, s: int8_matmul(x, q, s, None, "int8"))
        assert ("fastserve_int8_matmul" in prefill.lower(big, q, scale).as_text()) == (path == "vnni"), path
        np.testing.assert_allclose(np.asarray(prefill(big, q, scale)), ref, atol=1e-6 * np.abs(ref).max(),
                                   err_msg=path)
    monkeypatch.delenv("FASTSERVE_INT8_ISA")
    # K not a multiple of 32: float activations through the float kernel
    x37, q37, s37 = _case(1, 37, 29, None)
    text = jax.jit(lambda x, q, s: int8_matmul(x, q, s, None, "int8")).lower(x37, q37, s37).as_text()
    assert "fastserve_int8_matmul_q8" not in text and "fastserve_int8_matmul" in text
    # the tied head's form
    q_nt = np.ascontiguousarray(q.T)
    text = jax.jit(lambda x, q, s: int8_matmul_nt(x, q, s, "int8")).lower(x, q_nt, scale).as_text()
    assert "fastserve_int8_matmul_nt_q8" in text
    # the rounding itself: at most half a step of each block's scale away, zeros stay zero
    xr = np.asarray(quantize_activations(x))
    step = np.abs(x).reshape(3, -1, 32).max(-1, keepdims=True) / 127
    assert np.all(np.abs(xr - x).reshape(3, -1, 32) <= step / 2 + 1e-7) and not xr[0, :32].any()


def test_quantize_transform_writes_w8a8_layers_that_decode_like_their_forward_pass(lib):
    cfg = ModelConfig(vocab_size=96, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=16,
                      init_std=0.3)
    _, params, _ = init_params(cfg, make_mesh(MeshConfig(), jax.devices()[:1]), seed=0)
    new_cfg, new_params, _ = quantize(cfg, jax.device_get(params), include="layers.*", activations="int8")
    assert new_cfg.compressed["layers.0.mlp.up"] == {"kind": "int8", "activations": "int8"}
    assert new_cfg.compressed["embed"] == {"kind": "int8", "activations": "int8"}      # the tied head too
    model = nnx.merge(abstract_model(new_cfg)[0], new_params)
    float_cfg = quantize(cfg, jax.device_get(params), include="layers.*")[0]        # same weights, float activations
    float_acts = nnx.merge(abstract_model(float_cfg)[0], new_params)
    tokens = jnp.asarray(np.random.default_rng(6).integers(1, 96, (3, 12)), jnp.int32)
    lengths = jnp.asarray([11, 11, 11], jnp.int32)
    decode = jax.jit(lambda tokens, cache: infer.decode(model, tokens, lengths, cache)[0])
    logits, cache = infer.prefill(model, tokens[:, :11], lengths, model.init_cache(3, 16))
    text = decode.lower(tokens[:, 11], cache).as_text()
    assert "fastserve_int8_matmul_q8" in text and "fastserve_int8_matmul_nt_q8" in text
    step = np.asarray(decode(tokens[:, 11], cache))
    full = np.asarray(model(tokens)[0][:, 11])      # 36 rows: XLA, activations rounded the same way
    np.testing.assert_allclose(step, full, rtol=0, atol=1e-4 * np.abs(full).max())
    # the rounding of the activations is visible but small against the same int8 weights with float activations
    other = np.asarray(float_acts(tokens)[0][:, 11])
    gap = np.abs(full - other).max() / np.abs(other).max()
    assert 1e-6 < gap < 0.05, gap
    with pytest.raises(TransformError, match="quantize.activations"):
        quantize(cfg, jax.device_get(params), activations="int4")
    with pytest.raises(ValueError, match=r"activations: expected one of float32, int8"):
        validate_entry("layers.0.mlp.up", {"kind": "int8", "activations": "bf16"})


_SPIN_CHILD = textwrap.dedent("""
    import ctypes, sys
    from concurrent.futures import ThreadPoolExecutor
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    from test_int8_w8a8 import _case, _reference
    from fastserve.kernels import build, int8_matmul_kernel, int8_matmul_q8_kernel
    lib = build.load()
    lib.handle.fastserve_spin_helpers.restype = ctypes.c_int64
    assert lib.handle.fastserve_spin_helpers() == 1, lib.handle.fastserve_spin_helpers()
    groups = [None, 64, 64, None]
    cases = [_case(rows, 576, 640, g, seed=rows) for rows, g in zip([1, 2, 1, 3], groups)]
    q8 = jax.jit(lambda x, q, s, group: int8_matmul_q8_kernel(x, q, s, group), static_argnums=3)
    f32 = jax.jit(lambda x, q, s, group: int8_matmul_kernel(x, q, s, group), static_argnums=3)
    expected = [(_reference(x, q, s, g), np.asarray(x, np.float64) @ (q * (np.repeat(s, 64, 0) if g else s)))
                for (x, q, s), g in zip(cases, groups)]

    def call(i):
        (x, q, s), g = cases[i % 4], groups[i % 4]
        return i, np.asarray(q8(x, q, s, g)), np.asarray(f32(x, q, s, g))

    with ThreadPoolExecutor(4) as pool:
        for i, got_q8, got_f32 in pool.map(call, range(64)):
            ref_q8, ref_f32 = expected[i % 4]
            np.testing.assert_allclose(got_q8, ref_q8, rtol=0, atol=1e-6 * np.abs(ref_q8).max())
            np.testing.assert_allclose(got_f32, ref_f32, rtol=0, atol=2e-5 * np.abs(ref_f32).max())
    print("OK")
""")


def test_concurrent_small_products_share_the_spinning_helpers_correctly(lib):
    """With FASTSERVE_KERNEL_SPIN_THREADS=1 (read once per process: a child process), decode-sized products run on
    the spinning helper (spin_pool.cc) when it is free and alone when another product holds it: four threads
    calling at once all get the reference answer, float and W8A8 kernels."""
    env = {**os.environ, "FASTSERVE_KERNEL_SPIN_THREADS": "1", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _SPIN_CHILD, os.path.dirname(os.path.abspath(__file__))], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
    if not os.environ.get("FASTSERVE_KERNEL_SPIN_THREADS"):
        lib.handle.fastserve_spin_helpers.restype = ctypes.c_int64
        assert lib.handle.fastserve_spin_helpers() == 0          # off unless asked for

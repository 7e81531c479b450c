"""The decode-attention kernel (csrc/attention_item.cc `decode_run`, custom call `fastserve_decode_attention`): each
token (a decode row, or a column of a prompt's piece) attending to its cache row in place, up to its own length —
against a float64 reference written from the definition, per instruction-set variant, and through a decoder's cached
decode step against XLA's path."""
from __future__ import annotations

import ctypes

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fastserve import parallel
from fastserve.config import load_config
from fastserve.core.state import init_params
from fastserve.kernels.attention import decode_attention_kernel, paged_decode_attention_kernel
from kernel_isa import cpu_has, lib, variants  # noqa: F401  (lib: a fixture)


def _reference(q, k, v, length):
    """float64 softmax of q [G, D] against the first `length` rows of k, v [S, D] → [G, D]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = q @ k[:length].T / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v[:length]


def _assert_query(got, q, k_rows, v_rows, length):
    """One query's output [H, D] against the reference over its row's positions k_rows, v_rows [S, K, D], each KV
    head with its group of query heads (k_rows None: a padding column, zeros)."""
    if k_rows is None:
        np.testing.assert_array_equal(got, 0)
        return
    kv = k_rows.shape[1]
    g = q.shape[0] // kv
    for head in range(kv):
        want = _reference(q[head * g:(head + 1) * g], k_rows[:, head], v_rows[:, head], length)
        np.testing.assert_allclose(got[head * g:(head + 1) * g], want, rtol=2e-5, atol=2e-5)


def _ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


@pytest.mark.parametrize("isa", variants())
def test_every_variant_equals_the_float64_reference(lib, isa):
    """Runs of m queries in one cached row (m = 1: a decode token, short and long; m > 1: a piece's columns, each to
    its own length, a 0 among them: zeros), query rows in more than one group of 8 included."""
    if not cpu_has(isa):
        pytest.skip(f"this CPU cannot run the {isa} variant")
    fn = getattr(lib.handle, f"fastserve_decode_attention_{isa}")
    fn.restype = ctypes.c_bool
    rng = np.random.default_rng(0)
    for d, g, kv, lens, s in [(64, 3, 3, [1], 8), (64, 3, 3, [37], 40), (32, 1, 2, [9], 9), (128, 4, 1, [70], 80),
                              (16, 2, 2, [16], 16), (32, 2, 4, [30, 31, 0, 33, 34], 40),
                              (64, 3, 3, [5, 6, 7, 8], 12), (16, 1, 1, [3, 11, 12, 13, 14, 15, 16, 17, 18], 20),
                              (32, 2, 2, [600], 640)]:      # one token on a row of >= kLongRow: decode_run
        m, h = len(lens), g * kv
        q = rng.standard_normal((m, h, d)).astype(np.float32)
        k = rng.standard_normal((s, kv, d)).astype(np.float32) * 2    # [S, K, D]: this head's rows K·D apart
        v = rng.standard_normal((s, kv, d)).astype(np.float32)
        head = kv - 1
        o = np.full((m, h, d), np.nan, np.float32)
        scratch = np.zeros(8 * ((s + 7) // 8 * 8 + d), np.float32)
        qh, oh, kh, vh = q[:, head * g:], o[:, head * g:], k[:, head:], v[:, head:]   # this head's first row
        assert fn(_ptr(qh), ctypes.c_int64(h * d), _ptr(np.asarray(lens, np.int64)), ctypes.c_int64(m),
                  ctypes.c_int64(g), ctypes.c_int64(d), _ptr(kh), _ptr(vh), _ptr(oh), ctypes.c_int64(kv * d), None,
                  ctypes.c_int64(0), ctypes.c_int64(0), ctypes.c_float(d ** -0.5), _ptr(scratch))
        for i, length in enumerate(lens):
            got = o[i, head * g:(head + 1) * g]
            want = (_reference(q[i, head * g:(head + 1) * g], k[:, head], v[:, head], length) if length
                    else np.zeros_like(got))
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5,
                                       err_msg=f"{isa} D={d} G={g} lens={lens} column {i}")
        assert np.isnan(o[:, :head * g]).all()      # other heads' outputs untouched


def test_custom_call_reads_rows_in_place_and_zeroes_padding(lib):
    rng = np.random.default_rng(1)
    b, s, kv, h, d = 5, 24, 2, 6, 32
    k = rng.standard_normal((b, s, kv, d)).astype(np.float32)
    v = rng.standard_normal((b, s, kv, d)).astype(np.float32)
    q = rng.standard_normal((4, 1, h, d)).astype(np.float32)
    rows = np.array([3, 0, b, 3], np.int32)          # row 3 twice; id b: a padding column
    lengths = np.array([24, 1, 7, 25], np.int32)     # 25: past the cache's 24 positions (a masked token): zeros
    out = np.asarray(decode_attention_kernel(q, k, v, rows, lengths)).reshape(4, h, d)
    for i, (row, length) in enumerate(zip(rows, lengths)):
        padding = row >= b or length > s
        _assert_query(out[i], q[i, 0], None if padding else k[row], None if padding else v[row], length)


@pytest.mark.parametrize("s,d,m", [(24, 32, 11), (600, 64, 11), (96, 32, 40)])   # 600: work for XLA's thread pool
def test_queries_side_by_side_in_one_row(lib, s, d, m):
    """A prompt's piece: m consecutive queries of one row (a run) with growing lengths, causal like a prefill (11:
    decode_run, query rows in groups of 8; 40: past kRunColumns, the forward kernel's tiles of 8 and a remainder); a
    lone query, padding columns side by side, and the run's last two lengths past the cache's end (masked: zeros)."""
    rng = np.random.default_rng(2)
    b, kv, h = 4, 2, 4
    k = rng.standard_normal((b, s, kv, d)).astype(np.float32)
    v = rng.standard_normal((b, s, kv, d)).astype(np.float32)
    start = s - m + 3
    rows = np.array([1] + [2] * m + [b, b, 0, 0], np.int32)
    lengths = np.array([5] + list(range(start, start + m)) + [3, 3, 4, 9], np.int32)
    q = rng.standard_normal((len(rows), 1, h, d)).astype(np.float32)
    out = np.asarray(decode_attention_kernel(q, k, v, rows, lengths)).reshape(len(rows), h, d)
    for i, (row, length) in enumerate(zip(rows, lengths)):
        padding = row >= b or length > s
        _assert_query(out[i], q[i, 0], None if padding else k[row], None if padding else v[row], length)


@pytest.mark.parametrize("size", [4, 8])    # 8: a block holds whole groups of 8 positions (one lookup per group)
def test_paged_custom_call_follows_each_rows_blocks(lib, size):
    rng = np.random.default_rng(3)
    n, kv, h, d = 7, 2, 4, 16
    k = rng.standard_normal((n, size, kv, d)).astype(np.float32)
    v = rng.standard_normal((n, size, kv, d)).astype(np.float32)
    q = rng.standard_normal((3, 1, h, d)).astype(np.float32)
    pages = np.array([[5, 0, 3], [2, 6, n], [1, n, n]], np.int32)   # id n: no block (past the row's length)
    lengths = np.array([11, 6, 0], np.int32)                         # across blocks; 0: a padding column
    out = np.asarray(paged_decode_attention_kernel(q, k, v, pages, lengths)).reshape(3, h, d)
    for i in range(3):
        flat_k = k[np.minimum(pages[i], n - 1)].reshape(-1, kv, d)    # the row's positions in order
        flat_v = v[np.minimum(pages[i], n - 1)].reshape(-1, kv, d)
        padding = lengths[i] == 0
        _assert_query(out[i], q[i, 0], None if padding else flat_k, None if padding else flat_v, lengths[i])


def test_a_cached_decode_step_equals_xlas_path(lib):
    """A decoder's decode step over running rows (ids, a padding column) with the kernel (attention: auto) equals
    the same step on XLA's gather-and-attend path (attention: xla): logits and the written cache."""
    overrides = ["model.vocab_size=97", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
                 "model.n_kv_heads=2", "model.d_ff=96", "model.init_std=0.3", "mesh.data=1"]
    outs = {}
    for impl in ("auto", "xla"):
        cfg = load_config(None, overrides + [f"model.attention={impl}"])
        mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
        graphdef, params, _ = init_params(cfg.model, mesh, seed=3)
        model = nnx.merge(graphdef, params)
        cache = model.init_cache(4, 16)
        prompt = jnp.asarray(np.random.default_rng(2).integers(0, 97, (4, 9)), jnp.int32)
        _, cache = model(prompt, None, cache)
        rows = jnp.asarray([2, 0, 4], jnp.int32)          # 4: past the cache's rows (a padding column)
        cache = [{**layer, "rows": rows} for layer in cache]
        tokens = jnp.asarray([[5], [7], [11]], jnp.int32)
        positions = jnp.asarray([[9], [3], [0]], jnp.int32)
        logits, cache = jax.jit(lambda m, t, p, c: m(t, p, c))(model, tokens, positions, cache)
        text = jax.jit(lambda m, t, p, c: m(t, p, c)).lower(model, tokens, positions, cache).as_text()
        assert ("fastserve_decode_attention" in text) == (impl == "auto"), impl
        outs[impl] = (np.asarray(logits)[:2], [np.asarray(layer["k"]) for layer in cache])
    np.testing.assert_allclose(outs["auto"][0], outs["xla"][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(outs["auto"][1], outs["xla"][1]):   # (the prompt's layer-2 keys differ by float rounding)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_an_engine_on_the_kernel_path_chunks_prompts_into_decode_steps(lib):
    """Serving on the kernel's path (head dim 16): prompt pieces riding in decode steps (serve.prefill_chunk) give
    the greedy tokens of whole-prompt prefills on XLA's path; the engine compiles one decode window only (the kernel
    reads each row to its own length, so narrower windows would change nothing)."""
    from fastserve.config import ServeConfig
    from fastserve.serve.engine import Engine, Request

    overrides = ["model.vocab_size=97", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
                 "model.n_kv_heads=2", "model.d_ff=96", "model.init_std=0.3", "model.max_seq_len=256", "mesh.data=1"]
    rng = np.random.default_rng(5)
    prompts = [rng.integers(1, 97, n).tolist() for n in (4, 45, 30, 9)]
    outputs = {}
    for impl, chunk in (("auto", 8), ("xla", 0)):
        cfg = load_config(None, overrides + [f"model.attention={impl}"])
        mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
        graphdef, params, _ = init_params(cfg.model, mesh, seed=3)
        serve = ServeConfig(slots=3, buckets=[16, 64], max_cache_len=256, scheduler="fcfs", prefill_chunk=chunk)
        eng = Engine(graphdef, params, cfg.model, serve, mesh=mesh, stop_ids=[])
        assert eng.programs.windows == ([256] if impl == "auto" else [64, 256])
        first = eng.submit(Request(prompts[0], max_new_tokens=40))
        eng.step()
        rest = eng.submit_many([Request(p, max_new_tokens=12) for p in prompts[1:]])
        eng.run_until_done(timeout=120)
        outputs[impl] = [r.output for r in [first, *rest]]
        assert eng.stats()["fused_steps"] > 0 if chunk else eng.stats()["fused_steps"] == 0
    assert outputs["auto"] == outputs["xla"]

"""The fused attention CPU kernel (fastserve.kernels.attention): every instruction-set variant's forward and
backward equal a float64 reference at odd lengths — whole windows with padded keys (encoders), causal windows within
packed documents (decoders), random windows, grouped query heads, query rows that see no key; the custom calls'
values and gradients equal layers.attention; an encoder and a decoder train the same with `attention: xla` and the
kernel; `fused` asked for by name refuses what it cannot run, naming why."""
from __future__ import annotations

import ctypes

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastserve.kernels import build
from fastserve.kernels.attention import padded_attention, padded_attention_kernel
from fastserve.models.layers import attention
from kernel_isa import cpu_has, lib, variants  # noqa: F401  (lib: a fixture)


def _reference(q, k, v, seen, g):
    """float64 softmax attention of one query head over the keys `seen` [T, S] marks, and the gradients of
    Σ out·g — written out from the definitions, not from fastserve's code. A row that sees no key averages all
    keys and passes no gradient to q or k."""
    q, k, v, g = (np.asarray(a, np.float64) for a in (q, k, v, g))
    s = np.where(seen, q @ k.T / np.sqrt(q.shape[-1]), -np.inf)
    blind = ~seen.any(-1, keepdims=True)
    s = np.where(blind, 0.0, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = p @ v
    dp = g @ v.T
    ds = np.where(blind, 0.0, p * (dp - (dp * p).sum(-1, keepdims=True)))
    return out, ds @ k / np.sqrt(q.shape[-1]), ds.T @ q / np.sqrt(q.shape[-1]), p.T @ g


def _cases(rng):
    """(T, S, D, G, valid [S], lo [T], hi [T]): T != S, neither a multiple of 8 or 16; every head dim with a body;
    some keys padded, or all of them; whole windows (an encoder), causal windows within packed documents (a
    decoder), random ones; one and several query heads per KV head."""
    def padded(s, n_valid):
        valid = np.zeros(s, np.int32)
        valid[rng.permutation(s)[:n_valid]] = 1
        return valid

    def whole(t, s):
        return np.zeros(t, np.int32), np.full(t, s, np.int32)

    for t, s, d, g, n_valid in [(13, 21, 16, 1, 17), (7, 33, 32, 2, 33), (19, 5, 64, 1, 3), (3, 40, 128, 3, 29),
                                (6, 9, 32, 1, 0)]:
        yield (t, s, d, g, padded(s, n_valid), *whole(t, s))
    starts = np.array([0, 0, 0, 0, 0, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 22, 22, 22, 22, 22, 22, 22])
    t = len(starts)
    causal = (starts.astype(np.int32), np.arange(1, t + 1, dtype=np.int32))
    yield (t, t, 64, 1, np.ones(t, np.int32), *causal)
    yield (t, t, 16, 4, padded(t, 23), *causal)       # padding: some queries see no key of their document
    lo = rng.integers(-2, 30, 11).astype(np.int32)
    yield (11, 30, 32, 2, padded(30, 25), lo, (lo + rng.integers(-3, 20, 11)).astype(np.int32))


@pytest.mark.parametrize("isa", variants())
def test_every_variant_equals_the_float64_reference(lib, isa):
    if not cpu_has(isa):
        pytest.skip(f"this CPU cannot run the {isa} variant")
    fwd = getattr(lib.handle, f"fastserve_attention_fwd_{isa}")
    bwd = getattr(lib.handle, f"fastserve_attention_bwd_{isa}")
    fwd.restype = bwd.restype = ctypes.c_bool
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    at = lambda a, floats: ctypes.c_void_p(a.ctypes.data + 4 * floats)  # noqa: E731
    i64, f32 = ctypes.c_int64, ctypes.c_float
    rng = np.random.default_rng(0)
    for t, s, d, g, valid, lo, hi in _cases(rng):
        # queries [T, G, D] (G heads of one KV group side by side); keys and values the second head of [S, 2, D]
        q, dout = (rng.standard_normal((t, g, d)).astype(np.float32) for _ in range(2))
        k, v = (rng.standard_normal((s, 2, d)).astype(np.float32) for _ in range(2))
        o, dq = np.full((t, g, d), np.nan, np.float32), np.full((t, g, d), np.nan, np.float32)
        dk, dv = np.full((s, 2, d), np.nan, np.float32), np.full((s, 2, d), np.nan, np.float32)
        lse = np.zeros((g, t), np.float32)
        scratch = np.zeros(s * (5 * d + 20) + 64 * d + 384, np.float32)
        head = d  # the second KV head's first float
        args = (i64(t), i64(s), i64(g), i64(d), i64(g * d), i64(2 * d), f32(d ** -0.5), ptr(scratch))
        assert fwd(ptr(q), at(k, head), at(v, head),
                   ptr(valid), ptr(lo), ptr(hi), ptr(o), ptr(lse), *args)
        assert bwd(ptr(q), at(k, head), at(v, head), ptr(valid), ptr(lo), ptr(hi), ptr(o),
                   ptr(lse), ptr(dout), ptr(dq), at(dk, head), at(dv, head), *args)
        index = np.arange(s)
        seen = (index[None] >= lo[:, None]) & (index[None] < hi[:, None]) & valid.astype(bool)[None]
        dk_sum, dv_sum = np.zeros((s, d)), np.zeros((s, d))
        for h in range(g):
            out, dq_ref, dk_ref, dv_ref = _reference(q[:, h], k[:, 1], v[:, 1], seen, dout[:, h])
            dk_sum, dv_sum = dk_sum + dk_ref, dv_sum + dv_ref
            for name, got, want in (("out", o[:, h], out), ("dq", dq[:, h], dq_ref)):
                np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * max(1.0, np.abs(want).max()),
                                           err_msg=f"{isa} {name} head {h} T={t} S={s} D={d} G={g}")
        for name, got, want in (("dk", dk[:, 1], dk_sum), ("dv", dv[:, 1], dv_sum)):
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * max(1.0, np.abs(want).max()),
                                       err_msg=f"{isa} {name} T={t} S={s} D={d} G={g}")
        assert np.isnan(dk[:, 0]).all() and np.isnan(dv[:, 0]).all(), "wrote outside its KV head"
    assert not fwd(ptr(q), ptr(k), ptr(v), ptr(valid), ptr(lo), ptr(hi), ptr(o), ptr(lse), i64(t), i64(s), i64(1),
                   i64(24), i64(24), i64(24), f32(1.0), ptr(scratch)), "a head dim without a compiled body must be refused"


@pytest.mark.parametrize("shape", [(3, 13, 2, 32), (2, 8, 3, 16), (1, 5, 1, 64)])
def test_custom_calls_equal_layers_attention_values_and_gradients(lib, shape):
    b, t, h, d = shape
    rng = np.random.default_rng(1)
    q, k, v, g = (jnp.asarray(rng.standard_normal(x).astype(np.float32))
                  for x in (shape, shape, shape, (b, t, h * d)))
    valid = np.ones((b, t), bool)
    valid[0, t // 2:] = False
    if b > 2:
        valid[2] = False     # a row of padding only: every query averages all keys
    valid = jnp.asarray(valid)

    def loss(f):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(f(q, k, v) * g), argnums=(0, 1, 2)))

    want = loss(lambda q, k, v: attention(q, k, v, causal=False, k_valid=valid))(q, k, v)
    got = loss(lambda q, k, v: padded_attention_kernel(q, k, v, valid))(q, k, v)
    also = loss(lambda q, k, v: padded_attention(q, k, v, valid))(q, k, v)   # the platform_dependent wrapper
    for w, x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got), jax.tree.leaves(also)):
        np.testing.assert_allclose(x, w, rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(y, w, rtol=1e-5, atol=2e-6)
    hlo = jax.jit(lambda q, k, v: padded_attention(q, k, v, valid)).lower(q, k, v).as_text()
    assert build.ATTENTION_FWD_TARGET in hlo   # the kernel, not a silent fallback


def test_causal_custom_calls_equal_layers_attention_with_packing_and_grouped_heads(lib):
    """A decoder's training attention: causal within packed documents (positions restarting at each), 6 query
    heads on 2 KV heads, T = 37; values and gradients of the kernel equal the reference."""
    from fastserve.models import attention_kernels as ak

    b, t, h, kv, d = 2, 37, 6, 2, 32
    rng = np.random.default_rng(3)
    q, g = (jnp.asarray(rng.standard_normal(x).astype(np.float32)) for x in ((b, t, h, d), (b, t, h * d)))
    k, v = (jnp.asarray(rng.standard_normal((b, t, kv, d)).astype(np.float32)) for _ in range(2))
    starts = jnp.array([[15], [30]])
    seg = (jnp.arange(t)[None] >= starts).astype(jnp.int32)
    pos = jnp.arange(t)[None] - jnp.where(seg == 1, starts, 0)

    def loss(f):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(f(q, k, v) * g), argnums=(0, 1, 2)))

    want = loss(lambda q, k, v: attention(q, k, v, pos, pos, q_segments=seg, k_segments=seg))(q, k, v)
    got = loss(lambda q, k, v: ak.causal_attention(q, k, v, pos, seg, implementation="fused"))(q, k, v)
    for w, x in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(x, w, rtol=1e-5, atol=2e-5)
    assert ak.resolve("auto", jnp.float32, t, heads=(h, kv, d)) == "fused"
    hlo = jax.jit(lambda q, k, v: ak.causal_attention(q, k, v, pos, seg)).lower(q, k, v).as_text()
    assert build.ATTENTION_FWD_TARGET in hlo   # auto took the kernel


def test_decoder_trains_the_same_with_xla_and_the_kernel(lib):
    from flax import nnx

    from fastserve.models import build_model
    from fastserve.models.decoder import DecoderConfig

    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 40, (2, 21)), jnp.int32)
    grads = {}
    for impl in ("xla", "fused"):
        cfg = DecoderConfig(vocab_size=40, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=32,
                            attention=impl)
        with nnx.use_eager_sharding(False):
            model = build_model(cfg, nnx.Rngs(0))
        grads[impl] = jax.tree.leaves(nnx.state(nnx.grad(lambda m: jnp.mean(m(tokens)[0] ** 2))(model), nnx.Param))
    for a, b in zip(grads["xla"], grads["fused"]):
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-6)


def test_encoder_trains_the_same_with_xla_and_the_kernel(lib):
    from flax import nnx

    from fastserve.models.encoder import EncoderConfig

    tokens = jnp.asarray(np.random.default_rng(2).integers(1, 50, (3, 11)), jnp.int32)
    mask = jnp.asarray(np.arange(11)[None, :] < np.array([[11], [6], [1]]))
    grads = {}
    for impl in ("xla", "auto", "fused"):
        cfg = EncoderConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=16,
                            num_classes=3, head="tag", dropout=0.0, attention=impl)
        model = cfg.build(nnx.Rngs(0))

        def loss(m):
            return sum(jnp.sum(x ** 2) for x in jax.tree.leaves(m(tokens, mask=mask)))
        grads[impl] = jax.tree.leaves(nnx.state(nnx.grad(loss)(model), nnx.Param))
    for impl in ("auto", "fused"):
        for a, b in zip(grads["xla"], grads[impl]):
            np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-6)


def test_fused_by_name_refuses_what_it_cannot_run(lib):
    from fastserve.models import attention_kernels as ak

    q = jnp.zeros((1, 4, 2, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match="model.attention: fused: .*float32.*bfloat16"):
        padded_attention(q, q, q, jnp.ones((1, 4), bool), strict=True)
    with pytest.raises(ValueError, match="model.attention: fused: .*head dim.*24"):
        ak.causal_attention(*(jnp.zeros((1, 4, 2, 24)),) * 3, implementation="fused")
    out = padded_attention(q, q, q, jnp.ones((1, 4), bool))     # auto: XLA's path instead
    assert out.shape == (1, 4, 32)


def test_bad_attention_name_is_a_config_error():
    from fastserve.models.encoder import EncoderConfig

    problems = dict(EncoderConfig(attention="flash").checks())
    assert "attention" in problems and "auto, xla, fused" in problems["attention"]


def test_remat_keeps_the_kernel_output_instead_of_running_it_twice(lib):
    """Scanned layers with `remat: dots_saveable` (what `auto` picks under the scan): the backward pass reads the
    saved kernel output and log-sum-exp rather than calling the forward kernel again (one forward call in the whole
    differentiated program, not two), and the gradients equal the per-layer model without remat."""
    from flax import nnx

    from fastserve.models import build_model
    from fastserve.models.decoder import DecoderConfig
    from fastserve.models.layer_stack import stack_layers

    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 40, (2, 19)), jnp.int32)
    grads = {}
    for scanned, remat in ((False, "none"), (True, "dots_saveable")):
        cfg = DecoderConfig(vocab_size=40, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=32,
                            attention="fused", scan_layers=scanned, remat=remat)
        with nnx.use_eager_sharding(False):
            graphdef, state = nnx.split(build_model(cfg, nnx.Rngs(0)))

        def loss(state):
            return jnp.mean(nnx.merge(graphdef, state)(tokens)[0] ** 2)
        if scanned:
            program = str(jax.make_jaxpr(jax.grad(loss))(state))
            assert program.count(f"target_name={build.ATTENTION_FWD_TARGET}") == 1, "the kernel ran again in backward"
            assert program.count(f"target_name={build.ATTENTION_BWD_TARGET}") == 1
        grads[scanned] = jax.grad(loss)(state)
    per_layer = nnx.to_pure_dict(grads[False])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-6),
                 stack_layers(per_layer), nnx.to_pure_dict(grads[True]))

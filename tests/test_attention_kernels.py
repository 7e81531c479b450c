"""Attention per backend (`model.attention`): every implementation equals the `xla` reference in values and
gradients, at lengths that are not multiples of the block, with packed documents and padding."""
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fastserve.config import ConfigError, load_config
from fastserve.models import attention_kernels as ak
from fastserve.models import build_model
from fastserve.models.decoder import DecoderConfig
from fastserve.models.layers import attention

B, T, H, KV, D = 2, 37, 4, 2, 8      # T = 37: not a multiple of any block size used below


def _inputs(t=T, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, t, H, D))
    k, v = jax.random.normal(ks[1], (B, t, KV, D)), jax.random.normal(ks[2], (B, t, KV, D))
    return q, k, v, jax.random.normal(ks[3], (B, t, H * D))


def _packed(t=T):
    """Two documents per row (split at 15 and 30), positions restarting at each document's start."""
    starts = jnp.array([[15], [30]])
    seg = (jnp.arange(t)[None] >= starts).astype(jnp.int32)
    pos = jnp.arange(t)[None] - jnp.where(seg == 1, starts, 0)
    return pos, seg


def _value_and_grads(fn, q, k, v, w, rows=None):
    """The output, and the gradients of a weighted sum of it (over `rows` [B, T] only, when given)."""
    def loss(q, k, v):
        out = fn(q, k, v) * w
        return jnp.sum(out if rows is None else out * rows[..., None])
    return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)


def _assert_same(a, b, rows=None, atol=2e-5):
    (out_a, grads_a), (out_b, grads_b) = a, b
    if rows is not None:  # queries that see no key have an unspecified output: compare the others
        out_a, out_b = out_a * rows[..., None], out_b * rows[..., None]
    np.testing.assert_allclose(out_a, out_b, atol=atol)
    for name, ga, gb in zip("qkv", grads_a, grads_b):
        np.testing.assert_allclose(ga, gb, atol=atol, err_msg=f"d{name}")


def _reference(q, k, v, pos=None, seg=None, valid=None):
    if pos is None:
        pos = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
    return attention(q, k, v, pos, pos, k_valid=valid, q_segments=seg, k_segments=seg)


@pytest.mark.parametrize("block", [8, 16, 64])
def test_blocked_equals_the_reference_causal(block):
    q, k, v, w = _inputs()
    _assert_same(_value_and_grads(lambda *a: ak.blocked_attention(*a, block=block), q, k, v, w),
                 _value_and_grads(_reference, q, k, v, w))


def test_blocked_equals_the_reference_with_packed_documents_and_padding():
    q, k, v, w = _inputs()
    pos, seg = _packed()
    _assert_same(_value_and_grads(lambda *a: ak.blocked_attention(*a, pos, seg, block=8), q, k, v, w),
                 _value_and_grads(lambda *a: _reference(*a, pos, seg), q, k, v, w))
    valid = jnp.arange(T)[None] < jnp.array([[33], [37]])         # right padding in the first row
    _assert_same(_value_and_grads(lambda *a: ak.blocked_attention(*a, pos, seg, valid, block=8), q, k, v, w, valid),
                 _value_and_grads(lambda *a: _reference(*a, pos, seg, valid), q, k, v, w, valid), rows=valid)


def test_cudnn_call_masks_like_the_reference():
    """The cuDNN path's arguments (causal flag, segment and padding masks), run through JAX's XLA implementation of
    the same call: what can be checked without a GPU."""
    q, k, v, w = _inputs()
    pos, seg = _packed()
    valid = jnp.arange(T)[None] < jnp.array([[33], [37]])
    _assert_same(
        _value_and_grads(lambda *a: ak.cudnn_attention(*a, seg, valid, implementation="xla"), q, k, v, w, valid),
        _value_and_grads(lambda *a: _reference(*a, pos, seg, valid), q, k, v, w, valid), rows=valid)


def test_cudnn_on_a_gpu():
    if jax.default_backend() != "gpu":
        pytest.skip("cuDNN attention needs a GPU (this backend: %s); its masking is checked through the XLA "
                    "implementation above" % jax.default_backend())
    q, k, v, w = (x.astype(jnp.bfloat16) for x in _inputs())
    pos, seg = _packed()
    _assert_same(_value_and_grads(lambda *a: ak.cudnn_attention(*a, seg), q, k, v, w),
                 _value_and_grads(lambda *a: _reference(*a, pos, seg), q, k, v, w), atol=5e-2)


def test_cudnn_refuses_float32_naming_the_setting():
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match="model.attention: cudnn needs bfloat16"):
        ak.cudnn_attention(q, k, v)


def test_splash_kernel_equals_the_reference():
    """The TPU kernel itself, in Pallas interpret mode off a TPU: padded to its 128-row tile, packed documents."""
    q, k, v, w = _inputs()
    pos, seg = _packed()
    interpret = jax.default_backend() != "tpu"
    t0 = time.perf_counter()
    _assert_same(_value_and_grads(lambda *a: ak.splash_attention(*a, seg, interpret=interpret), q, k, v, w),
                 _value_and_grads(lambda *a: _reference(*a, pos, seg), q, k, v, w), atol=1e-4)
    assert time.perf_counter() - t0 < 120


def test_auto_picks_per_backend_and_a_bad_name_is_an_error():
    assert ak.resolve("auto", jnp.float32, 4096, backend="tpu") == "splash"
    assert ak.resolve("auto", jnp.bfloat16, 4096, backend="gpu") == "cudnn"
    assert ak.resolve("auto", jnp.float32, 4096, backend="gpu") == "xla"     # cuDNN takes 16-bit inputs only
    assert ak.resolve("auto", jnp.float32, ak.CPU_BLOCKED_MIN_LENGTH, backend="cpu") == "blocked"
    assert ak.resolve("auto", jnp.float32, ak.CPU_BLOCKED_MIN_LENGTH - 1, backend="cpu") == "xla"
    assert ak.resolve("blocked", jnp.float32, 8, backend="gpu") == "blocked"
    with pytest.raises(ValueError, match="model.attention"):
        ak.resolve("flash", jnp.float32, 8)
    with pytest.raises(ConfigError, match=r"model\.attention.*unknown attention implementation 'flash'"):
        load_config(None, ["model.attention=flash"])


@pytest.mark.slow
def test_decoder_trains_and_decodes_the_same_with_blocked_attention():
    """The decoder's training path takes `model.attention`; its KV-cached path stays on xla and agrees with it."""
    def model_with(impl):
        cfg = DecoderConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
                            attention=impl)
        with nnx.use_eager_sharding(False):
            return build_model(cfg, nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 19), 0, 32)
    blocked, xla = model_with("blocked"), model_with("xla")

    @nnx.jit
    def logits_and_grads(model):
        return nnx.value_and_grad(lambda m: (lambda y: (jnp.mean(y ** 2), y))(m(tokens)[0]), has_aux=True)(model)
    (_, full), grads_b = logits_and_grads(blocked)
    (_, full_x), grads_x = logits_and_grads(xla)
    np.testing.assert_allclose(full, full_x, atol=1e-5)
    for (path, g_b), (_, g_x) in zip(jax.tree_util.tree_leaves_with_path(grads_b),
                                     jax.tree_util.tree_leaves_with_path(grads_x)):
        np.testing.assert_allclose(g_b, g_x, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    # prefill through a KV cache, then one decode step: the same logits as the uncached forward
    pos = jnp.broadcast_to(jnp.arange(19), (2, 19))

    @nnx.jit
    def prefill_then_step(model):
        prefill, cache = model(tokens[:, :18], pos[:, :18], model.init_cache(2, 32))
        return prefill, model(tokens[:, 18:], pos[:, 18:], cache)[0]
    prefill, step = prefill_then_step(blocked)
    np.testing.assert_allclose(prefill, full[:, :18], atol=1e-5)
    np.testing.assert_allclose(step[:, 0], full[:, 18], atol=1e-5)

"""Attention for every family: padding masks, bidirectional and cross attention, and packed documents that do not
see each other (decoder LM with `data.document_masking`)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fastserve.data.lm import _to_batch
from fastserve.models import build_model
from fastserve.models.decoder import DecoderConfig
from fastserve.models.layers import attention


def _qkv(b=2, t=6, s=6, h=4, kv=2, d=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (b, t, h, d)), jax.random.normal(ks[1], (b, s, kv, d)),
            jax.random.normal(ks[2], (b, s, kv, d)))


def _reference(q, k, v, mask):
    """Plain softmax attention with an explicit [B, T, S] mask, each query head reading its KV group."""
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    scores = jnp.where(mask[:, None], scores, -1e30)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, -1), v).reshape(q.shape[0], q.shape[1], -1)


def test_bidirectional_with_padding_equals_the_reference_and_ignores_padded_keys():
    q, k, v = _qkv()
    valid = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    out = attention(q, k, v, causal=False, k_valid=valid)
    np.testing.assert_allclose(out, _reference(q, k, v, jnp.broadcast_to(valid[:, None, :], (2, 6, 6))), atol=1e-5)
    # whatever the padded keys hold, the output is the same
    k2, v2 = k.at[0, 4:].set(100.0), v.at[0, 4:].set(-100.0)
    np.testing.assert_allclose(attention(q, k2, v2, causal=False, k_valid=valid), out, atol=1e-6)


def test_cross_attention_reads_a_source_of_another_length():
    q, _, _ = _qkv(t=3)
    _, k, v = _qkv(s=7, seed=1)
    valid = jnp.arange(7)[None, :] < jnp.array([[5], [7]])
    out = attention(q, k, v, causal=False, k_valid=valid)
    assert out.shape == (2, 3, 4 * 8)
    np.testing.assert_allclose(out, _reference(q, k, v, jnp.broadcast_to(valid[:, None, :], (2, 3, 7))), atol=1e-5)


def test_segments_and_causality_combine():
    q, k, v = _qkv()
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    seg = jnp.array([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 2, 2]])
    out = attention(q, k, v, pos, pos, q_segments=seg, k_segments=seg)
    mask = (pos[:, None, :] <= pos[:, :, None]) & (seg[:, None, :] == seg[:, :, None])
    np.testing.assert_allclose(out, _reference(q, k, v, mask), atol=1e-5)


def test_a_packed_document_gives_the_same_logits_as_alone():
    """With document masking, the second document of a packed row is predicted exactly as if it stood alone."""
    cfg = DecoderConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=16)
    with nnx.use_eager_sharding(False):
        model = build_model(cfg, nnx.Rngs(0))
    eos = 2
    doc_a, doc_b = [1, 5, 6, 7, eos], [1, 9, 10, 11, 12, eos]
    row = np.array([doc_a + doc_b + [1]], np.int32)             # seq_len 11, one row of packed stream
    batch = _to_batch(row, np.ones((1, 11), np.float32), eos_id=eos)
    packed, _ = model(jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]), None,
                      jnp.asarray(batch["segments"]))
    alone, _ = model(jnp.asarray([doc_b], jnp.int32))
    np.testing.assert_allclose(packed[0, len(doc_a):], alone[0], atol=1e-5)
    # without masking the second document sees the first: its logits differ
    unmasked, _ = model(jnp.asarray(batch["inputs"]))
    assert float(jnp.abs(unmasked[0, len(doc_a):] - alone[0]).max()) > 1e-3

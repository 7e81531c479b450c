"""Inference numerics: KV-cached decoding reproduces full forward passes; sampling rules behave."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fastserve import parallel
from fastserve.config import load_config
from fastserve.generation import decoding as infer
from fastserve.core.state import init_params


@pytest.fixture(scope="module")
def model():
    cfg = load_config(None, ["model.vocab_size=97", "model.d_model=48", "model.n_layers=2", "model.n_heads=4",
                             "model.n_kv_heads=2", "model.d_ff=96", "model.init_std=0.3", "mesh.data=1"])
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
    graphdef, params, _ = init_params(cfg.model, mesh, seed=3)
    return nnx.merge(graphdef, params)


def full_forward_greedy(model, prompt, n_new):
    """Reference: re-run the whole sequence for every new token (no cache)."""
    seq, all_logits = list(prompt), []
    for _ in range(n_new):
        # Right-padding to a fixed width cannot change a causal model's logits at the last real position.
        padded = np.zeros((1, REF_WIDTH), np.int32)
        padded[0, :len(seq)] = seq
        logits = _forward(model, jnp.asarray(padded))
        all_logits.append(np.asarray(logits[0, len(seq) - 1]))
        seq.append(int(np.argmax(all_logits[-1])))
    return seq[len(prompt):], np.stack(all_logits)


REF_WIDTH = 16


@nnx.jit
def _forward(model, tokens):
    return model(tokens)[0]


def test_cached_greedy_decoding_equals_full_forward(model):
    prompts = [[5, 17, 3], [9, 2, 44, 61, 7, 8, 30], [11]]
    n_new = 6
    tokens, lengths = infer.pad_prompts(prompts, buckets=(8, 16))
    assert tokens.shape == (3, 8)
    cache = model.init_cache(3, 8 + n_new)
    logits, cache = infer.prefill(model, jnp.asarray(tokens), jnp.asarray(lengths), cache)
    got_tokens, got_logits = [], []
    pos = jnp.asarray(lengths)
    for i in range(n_new):
        got_logits.append(np.asarray(logits))
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        got_tokens.append(np.asarray(tok))
        logits, cache = infer.decode(model, tok, pos + i, cache)
    got_tokens, got_logits = np.stack(got_tokens, 1), np.stack(got_logits, 1)
    for row, prompt in enumerate(prompts):
        ref_tokens, ref_logits = full_forward_greedy(model, prompt, n_new)
        assert got_tokens[row].tolist() == ref_tokens
        np.testing.assert_allclose(got_logits[row], ref_logits, atol=2e-5, rtol=1e-5)


def test_logits_at_selects_one_position_per_row(model):
    """What a prefill asks for (the LM head at each row's last real token only) equals those rows of the full
    logits."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (3, 8)), jnp.int32)
    at = jnp.asarray([7, 0, 4], jnp.int32)
    full, _ = model(tokens)
    picked, _ = model(tokens, logits_at=at)
    assert picked.shape == (3, 1, 97)
    np.testing.assert_allclose(np.asarray(picked[:, 0]), np.asarray(full)[np.arange(3), np.asarray(at)],
                               atol=1e-5, rtol=1e-5)


def test_generate_loop_matches_stepwise_and_stops(model):
    prompts = [[5, 17, 3], [9, 2, 44, 61, 7, 8, 30]]
    tokens, lengths = infer.pad_prompts(prompts)
    b, n_new = 2, 5
    run = jax.jit(lambda t, l, stop, row_max: infer.generate(
        model, t, l, jax.random.key(0), max_new_tokens=n_new, temperature=jnp.zeros(b), top_k=jnp.zeros(b, jnp.int32),
        top_p=jnp.ones(b), stop_tokens=stop, row_max_new=row_max))
    out, count = run(tokens, lengths, jnp.array([-1], jnp.int32), jnp.array([5, 3], jnp.int32))
    ref0, _ = full_forward_greedy(model, prompts[0], n_new)
    ref1, _ = full_forward_greedy(model, prompts[1], 3)
    assert out[0].tolist() == ref0 and count.tolist() == [5, 3]
    assert out[1].tolist() == ref1 + [-1, -1]
    # A stop token ends its row and is included in the output.
    stop_tok = ref0[1]
    out, count = run(tokens, lengths, jnp.array([stop_tok], jnp.int32), jnp.array([5, 5], jnp.int32))
    assert out[0].tolist()[:2] == ref0[:2] and int(count[0]) == 2 and out[0, 2] == -1


def test_sampling_rules():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4))
    key = jax.random.key(1)
    ones = jnp.ones(4)
    greedy = infer.sample(logits, key, jnp.zeros(4), jnp.zeros(4, jnp.int32), ones)
    assert greedy.tolist() == [0, 0, 0, 0]
    top1 = infer.sample(logits, key, ones, jnp.ones(4, jnp.int32), ones)
    assert top1.tolist() == [0, 0, 0, 0]
    tiny_p = infer.sample(logits, key, ones, jnp.zeros(4, jnp.int32), jnp.full(4, 0.01))
    assert tiny_p.tolist() == [0, 0, 0, 0]
    # top_p 0.8 keeps {0, 1}; top_k 3 keeps {0, 1, 2}: draw many rows and check the support.
    many = jnp.repeat(logits[:1], 2000, axis=0)
    draws = infer.sample(many, key, jnp.ones(2000), jnp.zeros(2000, jnp.int32), jnp.full(2000, 0.8))
    assert set(np.unique(draws).tolist()) == {0, 1}
    draws = infer.sample(many, key, jnp.ones(2000), jnp.full(2000, 3, jnp.int32), jnp.ones(2000))
    assert set(np.unique(draws).tolist()) == {0, 1, 2}
    freq0 = float(jnp.mean(draws == 0))
    assert abs(freq0 - 0.5 / 0.95) < 0.05
    # Same seed, same draws; another seed, other draws.
    again = infer.sample(many, key, jnp.ones(2000), jnp.full(2000, 3, jnp.int32), jnp.ones(2000))
    other = infer.sample(many, jax.random.key(2), jnp.ones(2000), jnp.full(2000, 3, jnp.int32), jnp.ones(2000))
    assert (again == draws).all() and not (other == draws).all()


def test_sampling_rows_do_not_depend_on_their_batch_mates():
    """Per-row keys: a plain sampling row (no top-k / top-p) draws the same token whether its batch is all plain
    (the branch without the sort) or has a filtering row (the sort branch), and a greedy row is the argmax in
    every branch; the filtering row keeps to its top-k."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 500)).astype(np.float32) * 3)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(jnp.arange(3))
    temps = jnp.array([1.0, 0.0, 1.0])
    plain = infer.sample(logits, keys, temps, jnp.zeros(3, jnp.int32), jnp.ones(3))
    mixed = infer.sample(logits, keys, temps, jnp.array([0, 0, 5], jnp.int32), jnp.ones(3))
    assert int(plain[0]) == int(mixed[0])
    assert int(plain[1]) == int(mixed[1]) == int(jnp.argmax(logits[1]))
    assert int(mixed[2]) in np.argsort(-np.asarray(logits[2]))[:5].tolist()
    # over many keys the plain row's draws match across the two branches one for one
    for i in range(20):
        ks = jax.vmap(lambda j: jax.random.fold_in(jax.random.key(i), j))(jnp.arange(3))
        a = infer.sample(logits, ks, temps, jnp.zeros(3, jnp.int32), jnp.ones(3))
        b = infer.sample(logits, ks, temps, jnp.array([0, 0, 5], jnp.int32), jnp.array([1.0, 1.0, 0.9]))
        assert int(a[0]) == int(b[0])


def test_pad_prompts_errors():
    with pytest.raises(ValueError, match="longer than the largest bucket"):
        infer.pad_prompts([[1] * 20], buckets=(8, 16))
    with pytest.raises(ValueError, match="at least one token"):
        infer.pad_prompts([[]])

"""Encoder–decoder decoding (fastserve.generation.seq2seq_decode): the cached decoder equals the full teacher-forced
pass, beam size 1 equals greedy, beam search is exact against brute force on a tiny model and beats greedy where
greedy is built to fail; decoding on a 2×2×2 mesh equals 1 device."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fastserve.generation import seq2seq_decode as sd
from fastserve.models.seq2seq import Seq2SeqConfig

PAD, BOS, EOS = 0, 1, 2


def _model(vocab=11, seed=0, **kw):
    cfg = Seq2SeqConfig(vocab_size=vocab, d_model=32, n_heads=2, d_ff=48, n_encoder_layers=1, n_decoder_layers=2,
                        max_source_len=8, max_target_len=8, init_std=0.5, **kw)
    with nnx.use_eager_sharding(False):
        return cfg.build(nnx.Rngs(seed))


def _sources(b=3, s=7, vocab=11, seed=1):
    rng = np.random.default_rng(seed)
    src = rng.integers(3, vocab, (b, s)).astype(np.int32)
    lengths = rng.integers(2, s + 1, b)
    mask = np.arange(s)[None, :] < lengths[:, None]
    return jnp.asarray(np.where(mask, src, PAD)), jnp.asarray(mask)


def _sequence_logprob(model, src, mask, tokens, length_penalty=0.0):
    """Log-probability (teacher-forced, uncached) of each row of `tokens` [B, L] through its first EOS."""
    tgt_in = jnp.concatenate([jnp.full((tokens.shape[0], 1), BOS), tokens[:, :-1]], axis=1)
    logp = jax.nn.log_softmax(jax.jit(lambda *a: model(a[0], a[1], src_mask=a[2]))(src, tgt_in, mask), axis=-1)
    picked = np.asarray(jnp.take_along_axis(logp, tokens[:, :, None], axis=-1)[..., 0])
    out = []
    for row, toks in zip(picked, np.asarray(tokens)):
        n = list(toks).index(EOS) + 1 if EOS in toks else len(toks)
        out.append(row[:n].sum() / n ** length_penalty)
    return np.array(out)


def test_cached_step_logits_equal_the_full_decoder_pass():
    model = _model(target_vocab_size=9)            # a separate target vocabulary on the way
    src, mask = _sources()
    tgt_in = jnp.asarray(np.random.default_rng(2).integers(3, 9, (3, 6)).astype(np.int32))
    full = jax.jit(lambda s, t, m: model(s, t, src_mask=m))(src, tgt_in, mask)

    @jax.jit
    def cached(src, tgt_in, mask):
        step, cache = sd.model_step(model, src, mask, max_len=6)
        out = []
        for t in range(6):
            logits, cache = step(tgt_in[:, t], jnp.int32(t), cache)
            out.append(logits)
        return jnp.stack(out, axis=1)
    np.testing.assert_allclose(cached(src, tgt_in, mask), full, rtol=1e-4, atol=1e-4)


def test_cached_greedy_equals_uncached_greedy_and_beam_one():
    model = _model()
    src, mask = _sources(b=4)
    ids = dict(max_len=8, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    uncached = jax.jit(lambda s, m: model.generate(s, m, **ids))(src, mask)
    greedy = jax.jit(lambda s, m: sd.translate_tokens(model, s, m, **ids))(src, mask)
    beam1 = jax.jit(lambda s, m: sd.translate_tokens(model, s, m, beam_size=1, **ids))(src, mask)

    @jax.jit
    def beam_one(src, mask):
        step, cache = sd.model_step(model, src, mask, 8)
        return sd.beam_loop(step, cache, 4, beam_size=1, **ids)[0]
    np.testing.assert_array_equal(greedy, uncached)
    np.testing.assert_array_equal(beam1, uncached)
    np.testing.assert_array_equal(beam_one(src, mask)[:, 0], uncached)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_finds_the_brute_force_best(length_penalty):
    """Vocabulary 5, at most 3 target tokens: 50 beams keep every prefix and all 2K ≥ 16 × 5 extensions, so the
    search is exhaustive: its hypotheses must be all 1 + 4 + 16 sequences ending in EOS, ranked as full
    teacher-forced passes score them."""
    vocab, max_len = 5, 3
    model = _model(vocab=vocab, seed=3)
    src, mask = _sources(b=2, vocab=vocab, seed=4)

    @jax.jit
    def search(src, mask):
        step, cache = sd.model_step(model, src, mask, max_len, repeat=50)
        return sd.beam_loop(step, cache, 2, beam_size=50, max_len=max_len, bos_id=BOS, eos_id=EOS, pad_id=PAD,
                            length_penalty=length_penalty, early_stopping=False)
    tokens, scores = search(src, mask)
    candidates = [list(p) + [EOS] + [PAD] * (max_len - 1 - len(p))
                  for n in range(max_len) for p in itertools.product(range(vocab), repeat=n) if EOS not in p]
    cand = jnp.asarray(candidates, jnp.int32)
    for b in range(2):
        lp = _sequence_logprob(model, jnp.repeat(src[b:b + 1], len(cand), 0), jnp.repeat(mask[b:b + 1], len(cand), 0),
                               cand, length_penalty)
        best = int(np.argmax(lp))
        np.testing.assert_array_equal(tokens[b, 0], cand[best])
        np.testing.assert_allclose(scores[b, 0], lp[best], rtol=1e-4, atol=1e-5)
        finite = np.asarray(scores[b])[np.isfinite(scores[b])]
        assert len(finite) == len(candidates) == 21 and np.all(np.diff(finite) <= 1e-6)  # best first


def _table_step(table):
    """A decoder whose next-token log-probs depend only on the last token: table [V, V]."""
    def step(tokens, t, cache):
        return table[tokens], cache
    return step


def test_beam_search_beats_greedy_where_greedy_is_built_to_fail():
    # from BOS: token 3 (p .5) or 4 (p .4); after 3 every token is ≤ .25 likely; after 4, EOS at .99
    p = np.full((6, 6), 1e-3)
    p[BOS, 3], p[BOS, 4] = 0.5, 0.4
    p[3, :] = [0.01, 0.01, 0.25, 0.25, 0.24, 0.24]
    p[4, EOS] = 0.99
    p[2:, EOS] = np.maximum(p[2:, EOS], 0.2)
    table = jnp.log(jnp.asarray(p / p.sum(1, keepdims=True), jnp.float32))
    ids = dict(max_len=4, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    greedy = sd.sample_loop(_table_step(table), None, 1, jax.random.key(0), temperature=jnp.zeros(1),
                            top_k=jnp.zeros(1, jnp.int32), top_p=jnp.ones(1), **ids)
    beam, scores = sd.beam_loop(_table_step(table), None, 1, beam_size=2, length_penalty=0.0, **ids)
    assert list(np.asarray(greedy[0])) == [3, EOS, PAD, PAD]      # .5 × .25
    assert list(np.asarray(beam[0, 0])) == [4, EOS, PAD, PAD]     # .4 × .99
    np.testing.assert_allclose(scores[0, 0], table[BOS, 4] + table[4, EOS], rtol=1e-5)


def test_early_stopping_ends_the_loop_when_every_beam_has_finished():
    table = jnp.log(jnp.full((6, 6), 1 / 6, jnp.float32))
    calls = []

    def step(tokens, t, cache):
        jax.debug.callback(lambda t: calls.append(int(t)), t)
        return table[tokens], cache
    sd.beam_loop(step, None, 1, beam_size=2, max_len=20, bos_id=BOS, eos_id=EOS, pad_id=PAD, early_stopping=True)
    assert len(calls) <= 3          # EOS is among the best two at every step: two finished by step 2


MESH_SCRIPT = """
import json, jax
jax.config.update("jax_num_cpu_devices", 8)
import numpy as np
from flax import nnx
from fastserve import parallel
from fastserve.config import MeshConfig
from fastserve.generation.translation import DecodeSettings, decode_batches
from fastserve.models.seq2seq import Seq2SeqConfig
from fastserve.workdir import place_params

cfg = Seq2SeqConfig(vocab_size=16, d_model=32, n_heads=2, d_ff=48, n_encoder_layers=1, n_decoder_layers=2,
                    max_source_len=8, max_target_len=8, init_std=0.5)
with nnx.use_eager_sharding(False):
    params = nnx.to_pure_dict(nnx.state(cfg.build(nnx.Rngs(0))))
rng = np.random.default_rng(1)
lengths = rng.integers(2, 9, 8)
mask = np.arange(8)[None, :] < lengths[:, None]
batch = {"src": np.where(mask, rng.integers(3, 16, (8, 8)), 0).astype(np.int32), "src_mask": mask}
class Tok:
    bos_id, eos_id, pad_id = 1, 2, 0
    def decode(self, ids):
        return " ".join(str(int(i)) for i in ids)
out = {}
for shape in [(1, 1, 1), (2, 2, 2)]:
    mesh = parallel.make_mesh(MeshConfig(*shape), jax.devices()[:int(np.prod(shape))])
    graphdef, placed = place_params(params, cfg, mesh)
    out["x".join(map(str, shape))] = {name: decode_batches(graphdef, placed, [batch], mesh, Tok(), s, 8)
                                      for name, s in (("greedy", DecodeSettings()),
                                                      ("beam", DecodeSettings(beam_size=3)))}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_decoding_on_a_2x2x2_mesh_equals_one_device():
    """Greedy and beam search with weights sharded by the rules table and the batch split over data × fsdp."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT], cwd=root, env=env, text=True, capture_output=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["2x2x2"] == out["1x1x1"]
    assert len(out["1x1x1"]["beam"]) == 8

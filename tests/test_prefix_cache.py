"""Prefix caching: hash-chain keys and LRU eviction of the block index, and an engine with serve.prefix_cache whose
greedy tokens equal the engine's without it (shared prefixes, eviction under a small budget, preemption with KV
offload and recompute, an exported backend), with no compile after start-up and hit / queried tokens counted."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastserve import parallel
from fastserve.config import ConfigError, ServeConfig, load_config
from fastserve.core.state import init_params
from fastserve.serve.engine import Engine, Request
from fastserve.serve.prefill import SlotFiller
from fastserve.serve.prefix_cache import BlockIndex, chain_keys

BLOCK = 8
MAX_LEN = 64


# ------------------------------------------------------------------------------------------------ block index

def test_chain_keys_cover_every_token_before_a_block():
    a = list(range(1, 33))
    b = a[:20] + [99] + a[21:]                      # differs in block 2 (tokens 16..23)
    ka, kb = chain_keys(a, BLOCK, 4), chain_keys(b, BLOCK, 4)
    assert len(ka) == 4 and len(set(ka)) == 4
    assert ka[:2] == kb[:2] and ka[2] != kb[2] and ka[3] != kb[3]   # block 3's tokens are equal: its key is not
    # the same block of tokens at another position (after another prefix) has another key
    assert chain_keys(a[8:16], BLOCK, 1)[0] != ka[1]
    assert chain_keys(a[:12], BLOCK, 5) == ka[:1]   # only full blocks


def test_block_index_matches_the_longest_cached_prefix_never_the_last_token():
    idx = BlockIndex(capacity=8, block=BLOCK)
    prompt = list(range(1, 25))                     # 3 full blocks
    new = idx.add(prompt, 3)
    assert [i for i, _ in new] == [0, 1, 2] and len({bid for _, bid in new}) == 3 and len(idx) == 3
    assert idx.add(prompt, 3) == []                 # already cached: nothing to write
    assert len(idx.match(prompt, len(prompt) - 1)) == 2          # the block holding the last token is left out
    assert len(idx.match(prompt + [7], len(prompt))) == 3
    assert idx.match(prompt[:8] + [0] * 16, 23) == idx.match(prompt, 8)   # diverging in block 1: block 0 only
    assert idx.match([5] + prompt[1:], 23) == []


def test_lru_eviction_takes_chain_tails_first_and_keeps_recently_used_chains():
    idx = BlockIndex(capacity=4, block=BLOCK)
    a, b, c = ([k] * 24 for k in (1, 2, 3))
    idx.add(a, 3)
    idx.add(b, 1)                                   # full: a0 a1 a2 b0
    assert idx.evictions == 0
    idx.match(a, 24)                                # a is used again: b0 is now the oldest
    idx.add(c, 1)
    # (`longest` looks without touching)
    assert idx.evictions == 1 and len(idx.longest(b, 24)) == 0 and len(idx.longest(a, 24)) == 3
    idx.add(b, 2)                                   # two more blocks: a's tail goes (a2, then a1), its head stays
    assert idx.evictions == 3 and len(idx.longest(a, 24)) == 1 and len(idx.longest(b, 24)) == 2
    assert len(idx.longest(c, 24)) == 1
    assert len(idx) == 4
    big = BlockIndex(capacity=2, block=BLOCK)
    assert [i for i, _ in big.add(list(range(40)), 5)] == [0, 1]   # a chain longer than the store: its head
    with pytest.raises(ValueError, match="at least one block"):
        BlockIndex(capacity=0, block=BLOCK)


def test_the_prefix_is_used_only_where_the_profile_says_it_is_cheaper():
    class Prefix:
        def __init__(self, cached):
            self.cached = cached

        def lookup(self, tokens):
            return self.cached
    profile = {"prefill_s": {8: 1.0, 16: 2.0}, "extend_s": 2.0, "extend_bucket_s": {8: 1.5, 16: 2.0},
               "prefix_load_s": 0.1}
    filler = SlotFiller(None, None, [8, 16], 0, Prefix(32))
    filler.profile = profile
    # 40 tokens: plain = prefill 16 + extends of 16 and 8 = 5.5; from 32 cached: load + one extend of 8 = 1.6
    assert filler.estimate(40) == 5.5 and filler.estimate(40, 32) == pytest.approx(1.6)
    assert filler.reusable(list(range(40))) == 32
    filler.prefix = Prefix(8)                       # 12 tokens, 8 cached: prefill 16 (2.0) vs load + extend 8 (1.6)
    assert filler.reusable(list(range(12))) == 8
    filler.prefix = Prefix(8)
    profile["prefill_s"][16] = 1.0                  # ... unless the bucket prefill is cheaper
    assert filler.reusable(list(range(12))) == 0


def test_config_checks():
    with pytest.raises(ConfigError, match="prefix_cache_block"):
        load_config(None, ["serve.prefix_cache_block=0"])
    with pytest.raises(ConfigError, match="prefix_cache_bytes"):
        load_config(None, ["serve.prefix_cache_bytes=-1"])


# ------------------------------------------------------------------------------------------------ the engine

@pytest.fixture(scope="module")
def model():
    cfg = load_config(None, ["model.vocab_size=97", "model.d_model=48", "model.n_layers=2", "model.n_heads=4",
                             "model.n_kv_heads=2", "model.d_ff=96", "model.init_std=0.3",
                             f"model.max_seq_len={MAX_LEN}", f"data.seq_len={MAX_LEN}", "mesh.data=1"])
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
    graphdef, params, _ = init_params(cfg.model, mesh, seed=3)
    return graphdef, params, cfg.model, mesh


def engine(model, prefix, **kw):
    graphdef, params, model_cfg, mesh = model
    cfg = ServeConfig(**{"slots": 2, "buckets": [8, 16], "max_cache_len": MAX_LEN, "prefix_cache": prefix,
                         "prefix_cache_block": BLOCK, **kw})
    eng = Engine(graphdef, params, model_cfg, cfg, mesh=mesh, stop_ids=[])
    if prefix:   # a cost profile proportional to tokens computed: whether a hit is used must not hang on timing noise
        profile = eng.filler.profile   # (measured at start-up; on a loaded machine it can rank a copy dearer)
        profile["prefix_load_s"] = 1e-5
        profile["prefill_s"] = {b: 1e-4 * b for b in profile["prefill_s"]}
        profile["extend_bucket_s"] = {w: 1e-4 * w for w in profile["extend_bucket_s"]}
    return eng


def chat(seed=0):
    """A 36-token system prompt shared by every request, then distinct turns; and one prompt sharing only 12."""
    rng = np.random.default_rng(seed)
    system = rng.integers(1, 97, 36).tolist()
    prompts = [system + rng.integers(1, 97, n).tolist() for n in (3, 9, 1, 6, 12)]
    prompts.append(system[:12] + rng.integers(1, 97, 20).tolist())
    return [Request(p, max_new_tokens=n) for p, n in zip(prompts, (12, 8, 14, 10, 6, 12))]


_COMPILES: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *_, **__: _COMPILES.append(name) if name.startswith("/jax/core/compile/") else None)


def outputs(eng, reqs, sequential=True):
    """Greedy outputs; sequential: one request at a time, so each can hit what the ones before it cached."""
    done = [eng.generate([r], timeout=120)[0] for r in reqs] if sequential else eng.generate(reqs, timeout=120)
    assert all(r.finish_reason == "length" for r in done)
    return [r.output for r in done]


@pytest.fixture(scope="module")
def want(model):
    return outputs(engine(model, False), chat())


@pytest.mark.parametrize("budget_blocks", [64, 5])
def test_greedy_tokens_equal_the_engine_without_the_cache(model, want, budget_blocks):
    """64 blocks: nothing evicted; 5 blocks: the 36-token prefix (4 blocks) and each prompt's own blocks evict one
    another."""
    position_bytes = 2 * 2 * 2 * 12 * 4     # (k, v) × layers × kv_heads × head_dim × float32 bytes
    eng = engine(model, True, prefix_cache_bytes=budget_blocks * BLOCK * position_bytes)
    compiles = len(_COMPILES)
    got = outputs(eng, chat())
    assert len(_COMPILES) == compiles                       # the moves and every bucket's extend: compiled at start
    assert got == want
    st = eng.stats()["prefix_cache"]
    assert st["queried_tokens"] == sum(len(r.tokens) for r in chat())
    # 32 of the system prompt for 4 requests (the last one's 8: used where the profile says it is cheaper)
    assert st["hit_tokens"] >= 4 * 32
    assert st["capacity_blocks"] == budget_blocks and st["bytes"] == budget_blocks * BLOCK * position_bytes
    if budget_blocks == 5:
        assert st["evictions"] > 0 and st["blocks"] == 5
    else:
        assert st["evictions"] == 0 and st["blocks"] == st["inserted_blocks"]
    assert eng.stats()["prefills"] == len(want)
    # the copied rows are what the outputs rest on: zeroed blocks change the tokens of a request that hits them
    eng.prefix.store = jax.tree.map(jnp.zeros_like, eng.prefix.store)
    assert outputs(eng, chat()[1:2]) != want[1:2]


def test_under_preemption_with_offload_and_recompute(model, want):
    """MLFQ with tiny quanta on 2 slots and one host KV slot: evictions both offload and drop rows (recomputed
    from the cached prefix); all requests at once after one that warms the cache."""
    eng = engine(model, True, scheduler="mlfq", mlfq_levels=6, mlfq_base_quantum_s=0.0, host_kv_slots=1,
                 starvation_s=0.0, iteration_cost="profiled")
    reqs = chat()
    first = outputs(eng, reqs[:1])
    # generated tokens are cached too: a prompt continuing a finished request's answer reuses them
    follow = Request(reqs[0].tokens + reqs[0].output[:-1] + [5], max_new_tokens=4)
    eng.generate([follow], timeout=60)
    assert eng.stats()["prefix_cache"]["hit_tokens"] == (len(follow.tokens) - 1) // BLOCK * BLOCK == 48
    assert follow.output == outputs(engine(model, False), [Request(follow.tokens, max_new_tokens=4)])[0]
    rest = outputs(eng, reqs[1:], sequential=False)
    assert first + rest == want
    st = eng.stats()
    assert st["preemptions"] > 0 and st["offloads"] > 0 and st["recomputes"] > 0
    assert st["prefix_cache"]["hit_tokens"] >= 48 + 4 * 32


def test_paged_kv_with_the_prefix_cache(model, want):
    """Paged KV (serve.kv_cache_bytes) with the prefix cache: cached blocks are copied into the slot's KV blocks and
    back; the same greedy tokens one at a time and all at once under MLFQ preemption with offload and recompute."""
    position_bytes = 2 * 2 * 2 * 12 * 4
    kw = dict(kv_cache_bytes=2 * MAX_LEN * position_bytes, kv_block=BLOCK)
    eng = engine(model, True, **kw)
    assert eng.pool.paged and eng.prefix.paged
    compiles = len(_COMPILES)
    assert outputs(eng, chat()) == want
    assert len(_COMPILES) == compiles
    assert eng.stats()["prefix_cache"]["hit_tokens"] >= 4 * 32
    busy = engine(model, True, scheduler="mlfq", mlfq_levels=6, mlfq_base_quantum_s=0.0, host_kv_slots=1,
                  starvation_s=0.0, iteration_cost="profiled", **kw)
    reqs = chat()
    assert outputs(busy, reqs[:1]) + outputs(busy, reqs[1:], sequential=False) == want
    st = busy.stats()
    assert st["preemptions"] > 0 and st["prefix_cache"]["hit_tokens"] >= 4 * 32
    eng.prefix.store = jax.tree.map(jnp.zeros_like, eng.prefix.store)     # the copied blocks are what outputs use
    assert outputs(eng, chat()[1:2]) != want[1:2]
    with pytest.raises(ValueError, match="serve.prefix_cache_block=8 must equal serve.kv_block=16"):
        engine(model, True, kv_cache_bytes=kw["kv_cache_bytes"], kv_block=2 * BLOCK)
    with pytest.raises(ConfigError, match="prefix_cache_block"):
        load_config(None, ["serve.prefix_cache=true", "serve.kv_cache_bytes=1000000", "serve.kv_block=32"])


def test_metrics_report_hit_and_queried_tokens(model):
    from fastserve.serve.metrics import Metrics
    eng = engine(model, True)
    outputs(eng, chat()[:2])
    text = Metrics(eng).text().decode()
    st = eng.stats()["prefix_cache"]
    assert f"fastserve_prefix_cache_hit_tokens_total {float(st['hit_tokens'])}" in text
    assert f"fastserve_prefix_cache_queried_tokens_total {float(st['queried_tokens'])}" in text
    assert st["hit_tokens"] == 32 and st["queried_tokens"] == 39 + 45
    # a prompt whose prefix was looked up when it took its slot (chunked prefill with streams running), then written
    # whole because the streams had ended: looked up, and counted, once
    prompt = chat(seed=1)[0].tokens
    assert eng.filler.begin(prompt, 0) == 0                    # another system prompt: no hit
    eng.filler.fill(prompt, 0, None, None, save=False, begun=True)
    assert eng.stats()["prefix_cache"]["queried_tokens"] == 39 + 45 + len(prompt)


@pytest.mark.slow
def test_an_exported_backend_serves_with_the_prefix_cache(model, want, tmp_path):
    """The export has no chunked forward: the prefix's rest goes through its extend (exported decode steps)."""
    from types import SimpleNamespace

    from fastserve.artifacts.loader import load_exported
    from fastserve.artifacts.writer import ExportOptions, export_params
    from fastserve.interop.tokenizer import BPETokenizer
    from tiny_bpe import train_tiny_bpe

    _, params, model_cfg, _ = model
    bpe = BPETokenizer(train_tiny_bpe(), bos_id=1, eos_id=2, pad_id=0)
    tok = SimpleNamespace(vocab_size=97, pad_id=0, bos_id=1, eos_id=2, add_bos=False, stop_ids=[2],
                          chat_template=None, export_file=bpe.export_file)
    export_params(model_cfg, params, tok, str(tmp_path / "tiny"),
                  ExportOptions(platforms=("cpu",), buckets=(8, 16), max_cache_len=MAX_LEN,
                                functions=("prefill", "decode")))
    cfg = ServeConfig(slots=2, buckets=[8, 16], max_cache_len=0, prefix_cache=True, prefix_cache_block=BLOCK)
    eng = Engine.from_exported(load_exported(str(tmp_path / "tiny"), "cpu"), cfg)
    compiles = len(_COMPILES)
    assert outputs(eng, chat()) == want
    assert len(_COMPILES) == compiles and eng.stats()["prefix_cache"]["hit_tokens"] >= 4 * 32
    # without row decode a chunked prefill is a series of extend calls, one bucket-sized chunk per iteration
    chunked = Engine.from_exported(load_exported(str(tmp_path / "tiny"), "cpu"),
                                   ServeConfig(slots=2, buckets=[8, 16], max_cache_len=0, prefill_chunk=8))
    assert chunked.rows.fused == 0
    assert outputs(chunked, chat(), sequential=False) == want and chunked.stats()["prefill_extends"] > 0
    with pytest.raises(ValueError, match=r"serve.prefill_chunk=12 must be one of serve.buckets=\[8, 16\]"):
        Engine.from_exported(load_exported(str(tmp_path / "tiny"), "cpu"),
                             ServeConfig(slots=2, buckets=[8, 16], max_cache_len=0, prefill_chunk=12))


# ------------------------------------------------------------------------------------------------ chunked prefill

def test_a_chunked_prefill_interleaves_with_running_streams(model, want):
    """serve.prefill_chunk=8: while a stream runs, a 45-token prompt rides in its decode steps, eight tokens a step
    (at width slots + chunk = 10: the stream's column, eight prompt tokens, one padding; the last five at width 6 =
    slots + chunk / 2), so it takes six iterations, no extend call, and the stream gets a token in every one of them (alone, the prompt takes one
    iteration); greedy tokens stay equal, with the prefix cache too, under MLFQ preemption (a job evicted mid-prefill
    starts it again), and at a chunk that is no bucket (12)."""
    eng = engine(model, False, prefill_chunk=8)
    compiles = len(_COMPILES)
    short = eng.submit(Request(chat()[0].tokens[:5], max_new_tokens=20))
    eng.step()
    long = eng.submit(Request(chat()[1].tokens, max_new_tokens=8))
    steps = 0
    while not long.output:
        had = len(short.output)
        eng.step()
        steps += 1
        assert len(short.output) == had + 1           # no iteration stalls the running stream
    st = eng.stats()
    assert steps == 6 and st["prefill_extends"] == 0 and st["fused_steps"] == 6 and eng.rows.fused_widths == [4, 6, 10]
    assert st["decode_width_steps"][10] == 5 and st["decode_width_steps"][6] == 1
    eng.run_until_done(timeout=60)
    assert long.output == want[1] and len(_COMPILES) == compiles     # every chunk width compiled at start-up
    alone = eng.submit(Request(chat()[1].tokens, max_new_tokens=8))
    eng.step()                                        # no stream to keep going: the whole prompt in one iteration
    assert alone.output == want[1][:1]
    eng.run_until_done(timeout=60)
    assert outputs(engine(model, False, prefill_chunk=8), chat(), sequential=False) == want
    assert outputs(engine(model, True, prefill_chunk=16), chat()) == want
    mlfq = engine(model, True, prefill_chunk=8, scheduler="mlfq", mlfq_levels=6, mlfq_base_quantum_s=0.0,
                  host_kv_slots=1, starvation_s=0.0, iteration_cost="profiled")
    assert outputs(mlfq, chat(), sequential=False) == want and mlfq.stats()["preemptions"] > 0
    assert outputs(engine(model, True, prefill_chunk=12), chat(), sequential=False) == want


def test_prompt_pieces_of_two_requests_share_a_step(model, want):
    """Two prompts placed while a stream runs: the first one's tail and the second one's head ride in one decode
    step (eight prompt tokens in all), and both give the tokens they give alone."""
    eng = engine(model, False, prefill_chunk=8, slots=3, scheduler="fcfs")   # (mlfq: timing decides the order)
    shared = []
    fused_step = eng.rows.fused_step

    def spy(cache, jobs, pieces):
        toks, written, cache = fused_step(cache, jobs, pieces)
        shared.append(sum(n > 0 for n, _ in written))
        return toks, written, cache
    eng.rows.fused_step = spy
    eng.submit(Request(chat()[0].tokens[:5], max_new_tokens=30))
    eng.step()
    first, second = chat()[1], chat()[5]                  # 45 and 32 prompt tokens
    eng.submit_many([first, second])
    eng.run_until_done(timeout=60)
    assert first.output == want[1] and second.output == want[5]
    assert max(shared) == 2 and sum(shared) == 6 + 5      # 77 tokens, 8 a step: 10 steps, one of them shared

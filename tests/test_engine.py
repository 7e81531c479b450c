"""The serving engine: whatever the schedule (preemption, KV offload to host, recompute), every request's greedy tokens
equal those of running it alone; bad requests are refused; seeded sampling is reproducible per slot."""
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastserve.config import ServeConfig
from fastserve.generation import decoding as infer
from fastserve.serve.engine import Engine, QueueFull, Request
from fastserve.serve.scheduler import Scheduler, levels_covering
from tiny_decoder import COMPILES, tiny_decoder

BUCKETS = [8, 16]
MAX_NEW = 24
PROMPT_LENS = [3, 16, 7, 12, 5, 9]
NEW_TOKENS = [20, 12, 24, 8, 24, 15]


@pytest.fixture(scope="module")
def model():
    return tiny_decoder(seed=3)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(1, 97, n).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def alone(model):
    """Reference: one request alone through `infer.generate` (batch 1, its own cache), memoized."""
    graphdef, params, _, _ = model
    from flax import nnx

    @jax.jit
    def run(params, tokens, lengths, row_max):
        return infer.generate(nnx.merge(graphdef, params), tokens, lengths, jax.random.key(0), max_new_tokens=MAX_NEW,
                              temperature=jnp.zeros(1), top_k=jnp.zeros(1, jnp.int32), top_p=jnp.ones(1),
                              stop_tokens=jnp.array([-1], jnp.int32), row_max_new=row_max)

    memo = {}

    def ref(tokens, n):
        key = (tuple(tokens), n)
        if key not in memo:   # (a prompt longer than the buckets: one width for all, 40 + MAX_NEW = max_seq_len)
            t, lengths = infer.pad_prompts([tokens], BUCKETS if len(tokens) <= BUCKETS[-1] else (40,))
            out, count = run(params, t, lengths, np.array([n], np.int32))
            memo[key] = out[0, :int(count[0])].tolist()
        return memo[key]
    return ref


def make_engine(model, scheduler="fcfs", engine_cls=Engine, **kw):
    graphdef, params, model_cfg, mesh = model
    custom = kw.pop("scheduler_obj", None)
    cfg = ServeConfig(slots=2, buckets=BUCKETS, max_cache_len=48, scheduler=scheduler, **kw)
    return engine_cls(graphdef, params, model_cfg, cfg, mesh=mesh, stop_ids=[], scheduler=custom)


class EvenProfileEngine(Engine):
    """Every bucket's profiled prefill costs one profiled decode step, so under `iteration_cost: profiled` MLFQ's
    decisions do not depend on how loaded the machine was while profiling: new jobs join level 0 and the running
    ones, demoted after their first step, are preempted by them."""

    def _warm_and_profile(self, repeats: int = 3):
        profile = super()._warm_and_profile(repeats)
        profile["prefill_s"] = {bucket: profile["decode_s"] for bucket in profile["prefill_s"]}
        return profile


def compiled_programs():
    """Traces and compiles so far (any program): serving must never trace or compile after start-up."""
    return len(COMPILES)


def requests(prompts, **kw):
    return [Request(p, max_new_tokens=n, **kw) for p, n in zip(prompts, NEW_TOKENS)]


def check_greedy_equals_alone(reqs, alone):
    for r in reqs:
        assert r.finish_reason == "length"
        assert r.output == alone(r.tokens, r.max_new_tokens), f"{r.id} (prompt {len(r.tokens)} tokens) diverged"


def test_mlfq_under_heavy_preemption_with_offload_and_recompute_equals_alone(model, prompts, alone):
    # q0 = one profiled decode step and the scheduler charged the profile: 6 levels of tiny quanta, 2 slots,
    # one host KV slot (so evictions both offload and fall back to recompute)
    eng = make_engine(model, "mlfq", EvenProfileEngine, mlfq_levels=6, mlfq_base_quantum_s=0.0, host_kv_slots=1,
                      starvation_s=0.0, iteration_cost="profiled")
    programs = compiled_programs()
    reqs = eng.generate(requests(prompts), timeout=120)
    assert compiled_programs() == programs                  # every bucket and slot served by start-up programs
    check_greedy_equals_alone(reqs, alone)
    st = eng.stats()
    assert st["preemptions"] > 0 and sum(r.preemptions for r in reqs) == st["preemptions"]
    assert st["offloads"] > 0 and st["offloaded_bytes"] > 0 and st["restores"] == st["offloads"]
    assert st["recomputes"] > 0 and sum(r.recomputes for r in reqs) == st["recomputes"]
    assert sum(r.offloaded_bytes for r in reqs) == st["offloaded_bytes"]
    assert st["mlfq"]["demotions"] > 0 and st["host_kv_in_use"] == 0 and st["running"] == 0
    assert st["prefills"] == len(reqs) and st["tokens"] == sum(NEW_TOKENS)
    for r in reqs:   # timings for TTFT / TPOT / JCT
        assert r.arrival <= r.first_token_time <= r.token_times[-1] == r.finish_time
        assert len(r.token_times) == len(r.output) and r.ttft >= 0 and r.tpot > 0 and r.jct >= r.ttft


class RoundRobin(Scheduler):
    """Rotates the running set by one job every iteration: every step evicts a job and brings one back."""
    name = "round-robin"

    def __init__(self):
        super().__init__()
        self.turn = 0

    def select(self, now, slots):
        jobs = self.jobs
        self.turn += 1
        k = self.turn % max(len(jobs), 1)
        return (jobs[k:] + jobs[:k])[:slots]


@pytest.mark.parametrize("host_kv_slots", [0, 8])
def test_every_token_after_an_eviction_equals_alone(model, prompts, alone, host_kv_slots):
    """host_kv_slots 0: every resume recomputes (past the largest bucket too); 8: every resume restores from host."""
    eng = make_engine(model, host_kv_slots=host_kv_slots, scheduler_obj=RoundRobin())
    picked = [prompts[i] for i in (1, 3, 0, 5)]             # 16 + up to 24 tokens: recompute extends past a bucket
    programs = compiled_programs()
    reqs = eng.generate([Request(p, max_new_tokens=MAX_NEW) for p in picked], timeout=120)
    assert compiled_programs() == programs                  # slot indices are traced: no compile per slot
    for r in reqs:
        assert r.output == alone(r.tokens, MAX_NEW)
    st = eng.stats()
    if host_kv_slots:
        assert st["recomputes"] == 0 and st["offloads"] > 20 and st["restores"] == st["offloads"]
        # each offload moves a whole number of row lengths (buckets or the full cache) of k and v, 2 layers
        row = 2 * 2 * 2 * 12 * 4        # (k, v) × layers × kv_heads × head_dim × float32 bytes, per position
        assert all(r.offloaded_bytes % (8 * row) == 0 for r in reqs)
    else:
        assert st["offloads"] == 0 and st["recomputes"] > 20 and st["recompute_extends"] > 0


def test_gittins_under_preemption_equals_alone(model, prompts, alone):
    eng = make_engine(model, "gittins", mlfq_base_quantum_s=0.0, host_kv_slots=1, iteration_cost="profiled")
    programs = compiled_programs()
    reqs = eng.generate(requests(prompts), timeout=120)
    # counted before the reference runs: `alone` compiles its own programs the first time a worker needs them
    assert compiled_programs() == programs
    check_greedy_equals_alone(reqs, alone)
    st = eng.stats()
    assert st["preemptions"] > 0 and st["offloads"] > 0


def test_fcfs_and_static_give_the_same_tokens_and_their_batching(model, prompts, alone):
    fcfs = make_engine(model, "fcfs")
    reqs = fcfs.generate(requests(prompts), timeout=120)
    check_greedy_equals_alone(reqs, alone)
    assert fcfs.stats()["preemptions"] == 0 and fcfs.stats()["offloads"] == fcfs.stats()["recomputes"] == 0
    # continuous batching: request 2 starts once the first of requests 0 and 1 finishes, before the other does
    assert reqs[2].first_token_time >= min(reqs[0].finish_time, reqs[1].finish_time)
    assert reqs[2].first_token_time < max(reqs[0].finish_time, reqs[1].finish_time)

    static = make_engine(model, "static", batch_timeout_s=0.0)
    reqs = static.generate(requests(prompts), timeout=120)
    check_greedy_equals_alone(reqs, alone)
    assert static.stats()["preemptions"] == 0
    for first, second in [((0, 1), (2, 3)), ((2, 3), (4, 5))]:  # batches of 2, one after the other
        done = max(reqs[i].finish_time for i in first)
        assert all(reqs[i].first_token_time > done for i in second)


def test_bad_requests_are_refused_with_clear_errors(model):
    eng = make_engine(model, "fcfs", max_new_tokens_limit=40, max_queue=2)
    with pytest.raises(ValueError, match=r"48 tokens; the KV cache holds 48 positions .* at most 47 tokens"):
        eng.submit(Request(list(range(1, 49)), max_new_tokens=1))
    with pytest.raises(ValueError, match="exceeds the KV cache's 48 positions"):
        eng.submit(Request([1] * 16, max_new_tokens=33))
    with pytest.raises(ValueError, match="max_new_tokens_limit=40"):
        eng.submit(Request([1, 2], max_new_tokens=41))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\)"):
        eng.submit(Request([1, 97], max_new_tokens=2))
    with pytest.raises(ValueError, match="no tokens"):
        eng.submit(Request([], max_new_tokens=2))
    eng.submit(Request([1], max_new_tokens=2))
    eng.submit(Request([2], max_new_tokens=2))
    with pytest.raises(QueueFull):
        eng.submit(Request([3], max_new_tokens=2))
    # the full queue drains; then a request is accepted once, and submitting the same object again is refused
    # (queued, and again once finished) without queueing a duplicate
    eng.run_until_done(timeout=60)
    assert eng.pending == 0
    r = Request([4], max_new_tokens=2)
    assert eng.submit(r) is r and eng.pending == 1
    with pytest.raises(ValueError, match=f"request {r.id} was already submitted"):
        eng.submit(r)
    assert eng.pending == 1
    eng.run_until_done(timeout=60)
    assert eng.pending == 0 and r.done and r.finish_reason == "length" and len(r.output) == 2
    with pytest.raises(ValueError, match="already submitted"):
        eng.submit(r)
    assert eng.pending == 0


def test_seeded_sampling_is_reproducible_per_request_whatever_the_slot(model, prompts):
    eng = make_engine(model, "fcfs")
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=40, top_p=0.95)
    alone = eng.generate([Request(prompts[0], seed=7, **kw)])[0].output
    # the same request next to others (it lands in slot 1 now), and twice in one batch
    crowd = eng.generate([Request(prompts[4], seed=1, **kw), Request(prompts[0], seed=7, **kw)])
    twins = eng.generate([Request(prompts[0], seed=7, **kw), Request(prompts[0], seed=7, **kw)])
    other = eng.generate([Request(prompts[0], seed=8, **kw)])[0].output
    assert crowd[1].output == alone and twins[0].output == alone and twins[1].output == alone
    assert other != alone
    # ... and under MLFQ preemption with offload / recompute
    mlfq = make_engine(model, "mlfq", EvenProfileEngine, mlfq_levels=6, host_kv_slots=1, iteration_cost="profiled")
    mixed = mlfq.generate([Request(p, seed=7, **kw) for p in prompts[:4]], timeout=120)
    assert mixed[0].output == alone and mlfq.stats()["preemptions"] > 0


def test_stop_tokens_streaming_and_the_background_runner(model, prompts, alone):
    ref = alone(prompts[2], 10)
    eng = make_engine(model, "mlfq", iteration_cost="profiled")
    # serve.mlfq_levels 0: enough levels that the longest job (48 positions of decode steps here) never sinks to
    # the last one; q0 = the profiled decode step
    prof = eng.profile
    assert eng.scheduler.levels == levels_covering(prof["decode_s"], prof["prefill_s"][16] + 48 * prof["decode_s"])
    assert eng.scheduler.base_quantum_s == prof["decode_s"] and eng.scheduler.levels >= 7
    streamed, finished = [], threading.Event()
    stop_at = ref[3]
    first = ref.index(stop_at)                              # a stop token ends the output and is included
    eng.start()
    try:
        r1 = eng.submit(Request(prompts[2], max_new_tokens=10, stop_ids=[stop_at],
                                on_token=lambda r, t: streamed.append(t), on_finish=lambda r: finished.set()))
        r2 = eng.submit(Request(prompts[3], max_new_tokens=8))
        assert list(r2.stream(timeout=60)) == alone(prompts[3], 8)
        assert finished.wait(60) and r1.finish_reason == "stop" and r1.output == ref[:first + 1] == streamed
        r3 = eng.submit(Request(prompts[1], max_new_tokens=30))
        eng.cancel(r3)
        assert r3.wait(60) and r3.finish_reason == "cancelled"
    finally:
        eng.stop()
    assert eng.pending == 0


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """The tiny model exported for CPU with the engine's buckets and max_cache_len (prefill + decode, symbolic
    batch), loaded back. Its tokenizer is a stand-in of the model's 97 ids: the engine never tokenizes."""
    from types import SimpleNamespace

    from fastserve.artifacts.loader import load_exported
    from fastserve.artifacts.writer import ExportOptions, export_params
    from fastserve.interop.tokenizer import BPETokenizer
    from tiny_bpe import train_tiny_bpe

    _, params, model_cfg, _ = model
    bpe = BPETokenizer(train_tiny_bpe(), bos_id=1, eos_id=2, pad_id=0)
    tok = SimpleNamespace(vocab_size=97, pad_id=0, bos_id=1, eos_id=2, add_bos=False, stop_ids=[2],
                          chat_template=None, export_file=bpe.export_file)
    out = tmp_path_factory.mktemp("engine_export") / "tiny"
    export_params(model_cfg, params, tok, str(out), ExportOptions(platforms=("cpu",), buckets=tuple(BUCKETS),
                                                                  max_cache_len=48, functions=("prefill", "decode")))
    return load_exported(str(out), "cpu")


def test_exported_engine_equals_the_in_process_engine(model, prompts, exported, alone):
    """The engine over an export's functions gives the in-process engine's greedy tokens, under MLFQ preemption
    with host offload and recompute (extends past the largest bucket: exported decode steps), and round robin."""
    from dataclasses import replace

    serve = dict(scheduler="mlfq", mlfq_levels=6, mlfq_base_quantum_s=0.0, host_kv_slots=1, starvation_s=0.0,
                 iteration_cost="profiled")
    cfg = ServeConfig(slots=2, buckets=BUCKETS, max_cache_len=48, **serve)
    want = make_engine(model, **serve).generate(requests(prompts), timeout=120)
    eng = Engine.from_exported(exported, replace(cfg, max_cache_len=0))      # 0: the export's max_cache_len
    assert eng.max_len == 48 and eng.buckets == BUCKETS and eng.graphdef is None
    programs = compiled_programs()
    got = eng.generate(requests(prompts), timeout=120)
    assert compiled_programs() == programs                  # every bucket and slot served by start-up programs
    assert [r.output for r in got] == [r.output for r in want]
    st = eng.stats()
    assert st["preemptions"] > 0 and st["offloads"] > 0 and st["recomputes"] > 0 and st["tokens"] == sum(NEW_TOKENS)
    assert set(st["decode_width_steps"]) == {2}              # an export has the full-width decode only
    # prompts longer than the largest bucket: chunked prefill by the exported extend (decode steps)
    long = eng.generate(long_requests(), timeout=120)
    assert compiled_programs() == programs and eng.stats()["prefill_extends"] == 6
    check_greedy_equals_alone(long, alone)

    picked = [prompts[i] for i in (1, 3, 0, 5)]             # 16 + 24 tokens: every resume recomputes past a bucket
    rr = Engine.from_exported(exported, replace(cfg, host_kv_slots=0), scheduler=RoundRobin())
    got = rr.generate([Request(p, max_new_tokens=MAX_NEW) for p in picked], timeout=120)
    want = make_engine(model, host_kv_slots=0, scheduler_obj=RoundRobin()).generate(
        [Request(p, max_new_tokens=MAX_NEW) for p in picked], timeout=120)
    assert [r.output for r in got] == [r.output for r in want]
    assert rr.stats()["recompute_extends"] > 0


LONG = [(17, 24), (30, 12), (33, 15), (40, 8)]      # (prompt tokens, new tokens): 2, 2, 3 and 3 chunks of 16


def test_prompts_longer_than_the_largest_bucket_are_prefilled_in_chunks(model, alone):
    """A prompt past the largest bucket: a bucket prefill, then extends of bucket-sized chunks, the first token from
    the last chunk's logits; its greedy tokens equal the reference's, under MLFQ preemption with offload and
    recompute, without compiling after start-up (over an export's functions: test_exported_engine_...)."""
    long = long_requests()
    serve = dict(mlfq_levels=6, mlfq_base_quantum_s=0.0, host_kv_slots=1, starvation_s=0.0, iteration_cost="profiled")
    eng = make_engine(model, "mlfq", **serve)
    assert eng.profile["extend_s"] > 0
    programs = compiled_programs()
    reqs = eng.generate(long + [Request(p, max_new_tokens=n) for p, n in zip(prompts_short(), (20, 12))],
                        timeout=120)
    assert compiled_programs() == programs
    check_greedy_equals_alone(reqs, alone)
    st = eng.stats()
    assert st["prefill_extends"] == 1 + 1 + 2 + 2 and st["prefills"] == len(reqs) and st["preemptions"] > 0
    assert [r.bucket for r in long] == [16] * len(long)
    assert long[2].prefill_time == eng.profile["prefill_s"][16] + 2 * eng.profile["extend_s"]


def long_requests():
    rng = np.random.default_rng(1)
    return [Request(rng.integers(1, 97, p).tolist(), max_new_tokens=n) for p, n in LONG]


def prompts_short():
    rng = np.random.default_rng(2)
    return [rng.integers(1, 97, 5).tolist(), rng.integers(1, 97, 12).tolist()]


def test_exported_decode_drops_the_write_of_a_masked_row(exported):
    """The engine masks an idle slot by giving it position max_cache_len: the exported decode must drop that
    write (as the in-process one does), leaving the slot's KV untouched."""
    cache = [{n: jnp.ones_like(c[n]) for n in c} for c in exported.init_cache(2)]
    step = jax.jit(lambda p, t, q, c: exported.exported["decode"].call(p, t, q, c))
    _, out = step(exported.params, np.array([5, 6], np.int32), np.array([3, 48], np.int32), cache)
    for c in out:
        for n in ("k", "v"):
            row0 = np.asarray(c[n][0])
            assert not np.all(row0[3] == 1.0) and np.all(np.delete(row0, 3, axis=0) == 1.0)   # wrote position 3
            assert np.all(np.asarray(c[n][1]) == 1.0)                                         # masked: dropped


def test_exported_engine_refuses_shapes_the_export_lacks(exported):
    with pytest.raises(ValueError, match=r"serve.max_cache_len=40 differs from the export's max_cache_len=48"):
        Engine.from_exported(exported, ServeConfig(slots=2, buckets=BUCKETS, max_cache_len=40))
    with pytest.raises(ValueError, match=r"serve.buckets=\[8, 12, 16\]: \[12\] not exported .*buckets: \[8, 16\]"):
        Engine.from_exported(exported, ServeConfig(slots=2, buckets=[8, 12, 16], max_cache_len=48))


def test_scanned_model_is_served_per_layer(model):
    """A scanned model (stacked blocks) is served with its per-layer twin's weights — the stacked layout's decode
    copies every layer's weights out of the stack at each step; the greedy tests above check the outputs equal the
    stacked model's own `infer.generate`."""
    graphdef, params, model_cfg, _ = model
    assert model_cfg.scanned and 0 not in params["layers"]
    engine = make_engine(model)
    assert not engine.model_cfg.scanned
    assert sorted(engine.params["layers"]) == list(range(model_cfg.n_layers))
    np.testing.assert_array_equal(np.asarray(engine.params["layers"][1]["mlp"]["up"]["kernel"]),
                                  np.asarray(params["layers"]["mlp"]["up"]["kernel"][1]))

"""Paged KV (serve.kv_cache_bytes): greedy tokens equal the slot layout's on the same requests while more of them
share the same bytes (waiting and eviction when blocks run out); the allocator never hands a block out twice and
gets every block back; bad budgets and combinations fail naming the key."""
import jax
import numpy as np
import pytest

from fastserve.config import ServeConfig, load_config
from fastserve.serve.engine import Engine, Request
from fastserve.serve.paged_kv import BlockAllocator, paged_backend
from tiny_decoder import COMPILES, tiny_decoder

BUCKETS = [8, 16]
MAX_LEN = 48
BLOCK = 8
# mixed lengths: short ones and two past the largest bucket (written by prefill + extend chunks)
PROMPT_LENS = [3, 16, 30, 7, 12, 5, 9, 26, 4]
NEW_TOKENS = [20, 12, 16, 24, 8, 24, 15, 20, 6]
POSITION_BYTES = 2 * 2 * 2 * 12 * 4       # (k, v) × layers × kv_heads × head_dim × float32 bytes
SLOT_BUDGET = 2 * MAX_LEN * POSITION_BYTES   # what the slot layout's 2 slots hold: 12 blocks of 8 positions


@pytest.fixture(scope="module")
def model():
    return tiny_decoder(seed=3)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    return [rng.integers(1, 97, n).tolist() for n in PROMPT_LENS]


def make_engine(model, **kw):
    graphdef, params, model_cfg, mesh = model
    cfg = ServeConfig(buckets=BUCKETS, max_cache_len=MAX_LEN, **kw)
    return Engine(graphdef, params, model_cfg, cfg, mesh=mesh, stop_ids=[])


def run(engine, prompts):
    """Greedy outputs of every prompt, and the most jobs that held KV at once."""
    reqs = [Request(p, max_new_tokens=n) for p, n in zip(prompts, NEW_TOKENS)]
    engine.submit_many(reqs)
    most = 0
    while engine.pending:
        engine.step()
        most = max(most, sum(j is not None for j in engine._slot_job))
        if engine.pool.paged:
            engine.pool.alloc.check()
    assert all(r.finish_reason == "length" for r in reqs)
    return [r.output for r in reqs], most


@pytest.fixture(scope="module")
def slot_layout(model, prompts):
    return run(make_engine(model, slots=2, scheduler="fcfs"), prompts)


@pytest.mark.parametrize("scheduler,host_kv_slots,chunk", [("fcfs", 256, 0), ("mlfq", 0, 0), ("mlfq", 256, 8)])
def test_paged_equals_slot_layout_at_the_same_bytes(model, prompts, slot_layout, scheduler, host_kv_slots, chunk):
    """The slot layout's 2 slots × 48 positions as a budget of 12 blocks for 6 slots: more requests run at once,
    the blocks run out (later jobs wait, running ones are evicted to host or for recompute), tokens are the same
    (chunk: serve.prefill_chunk, prompts written 8 tokens per iteration while others decode)."""
    eng = make_engine(model, slots=6, scheduler=scheduler, kv_cache_bytes=SLOT_BUDGET, kv_block=BLOCK,
                      host_kv_slots=host_kv_slots, iteration_cost="profiled", mlfq_base_quantum_s=0.0,
                      prefill_chunk=chunk)
    assert eng.pool.alloc.num_blocks == 12 and eng.pool.nbytes == SLOT_BUDGET
    assert eng.programs.widths == [1, 2, 3, 6]          # decode over 1, 2, 3 or all 6 blocks per slot
    compiles = len(COMPILES)
    outputs, most = run(eng, prompts)
    assert len(COMPILES) == compiles                   # every slot, width and row length compiled at start-up
    expected, slot_most = slot_layout
    assert slot_most == 2 and most > slot_most
    assert outputs == expected
    st = eng.stats()
    assert st["preemptions"] > 0
    if chunk:
        assert st["fused_steps"] > 0          # prompt pieces rode in decode steps
    if host_kv_slots:
        assert st["offloads"] > 0 and st["restores"] == st["offloads"] and st["recomputes"] == 0
    else:
        assert st["recomputes"] > 0 and st["offloads"] == 0
    # every block came back
    assert st["paged_kv"]["free_blocks"] == 12 and not any(eng.pool.alloc.held)
    eng.pool.alloc.check()
    if scheduler == "fcfs":     # a cancelled request's blocks come back too
        req = eng.submit(Request(prompts[2], max_new_tokens=10))
        eng.step()
        assert req.output and eng.pool.alloc.available == 12 - 4      # 30 prompt tokens + 1: 4 blocks of 8
        eng.cancel(req)
        eng.step()
        assert req.finish_reason == "cancelled" and eng.pool.alloc.available == 12
        eng.pool.alloc.check()


def test_allocator_never_hands_out_a_block_twice_and_frees_all():
    rng = np.random.default_rng(0)
    alloc = BlockAllocator(num_blocks=20, block=4, slots=5, max_blocks=8)
    for _ in range(500):
        slot = int(rng.integers(5))
        if rng.random() < 0.3:
            alloc.release(slot)
        else:
            positions = int(rng.integers(1, 33))
            need = alloc.needed(slot, positions)
            if need > alloc.available:
                with pytest.raises(RuntimeError, match="KV blocks"):
                    alloc.grow(slot, positions)
            else:
                alloc.grow(slot, positions)
                assert alloc.held[slot] >= alloc.blocks_for(positions)
        alloc.check()
        held = alloc.table[alloc.table < 20]
        assert len(held) == len(set(held.tolist())) == sum(alloc.held)
    for slot in range(5):
        alloc.release(slot)
    alloc.check()
    assert alloc.available == 20 and (alloc.table == 20).all()


def test_bad_budgets_and_combinations_fail_naming_the_key(model):
    # one max-length request needs 6 blocks of 8 positions
    with pytest.raises(ValueError, match=r"serve.kv_cache_bytes: 18000 bytes hold 5 KV blocks .* needs 6"):
        make_engine(model, slots=4, kv_cache_bytes=18000, kv_block=BLOCK)
    # with the prefix cache a prefix block is one KV block (tests/test_prefix_cache.py serves the two together)
    with pytest.raises(ValueError, match=r"serve.prefix_cache_block=16 must equal serve.kv_block=8"):
        make_engine(model, slots=4, kv_cache_bytes=SLOT_BUDGET, kv_block=BLOCK, prefix_cache=True)
    with pytest.raises(ValueError, match="serve.prefix_cache_block"):
        load_config(None, ["serve.kv_cache_bytes=100000", "serve.prefix_cache=true", "serve.kv_block=8"])
    with pytest.raises(ValueError, match="serve.kv_block"):
        load_config(None, ["serve.kv_block=0"])
    with pytest.raises(ValueError, match="serve.kv_cache_bytes"):
        load_config(None, ["serve.kv_cache_bytes=-1"])
    with pytest.raises(ValueError, match="serve.kv_cache_memory_fraction"):
        load_config(None, ["serve.kv_cache_memory_fraction=1.5"])
    with pytest.raises(ValueError, match="serve.kv_cache_memory_fraction"):
        load_config(None, ["serve.kv_cache_memory_fraction=0.5", "serve.kv_cache_bytes=100000"])
    if jax.devices()[0].memory_stats() is None:       # CPU: no memory limit to take a fraction of
        with pytest.raises(ValueError, match="serve.kv_cache_memory_fraction=0.5: cpu devices report no memory"):
            make_engine(model, slots=4, kv_cache_memory_fraction=0.5)
    # a backend without paged programs (an export) is refused at start-up
    cfg = ServeConfig(slots=4, kv_cache_bytes=SLOT_BUDGET, max_cache_len=MAX_LEN)
    with pytest.raises(ValueError, match="serve.kv_cache_bytes=36864: paged KV needs the in-process model"):
        paged_backend(cfg, object(), MAX_LEN, BUCKETS, None)

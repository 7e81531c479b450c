"""serve.decode_widths: decoding only the running jobs' rows, at the narrowest compiled width that holds them, gives
the full-width engine's tokens (greedy and seeded sampling), in the slot and the paged layouts, while the running
count goes up and down (staggered arrivals, finishes, MLFQ preemptions); bad widths fail naming the key."""
import numpy as np
import pytest

from fastserve.config import ConfigError, ServeConfig, load_config
from fastserve.serve.active_rows import resolve_widths
from fastserve.serve.engine import Engine, Request
from tiny_decoder import COMPILES, tiny_decoder

BUCKETS = [8, 16]
PROMPT_LENS = [3, 16, 7, 12, 5, 9, 26, 4, 11]
NEW_TOKENS = [20, 12, 24, 8, 24, 15, 10, 30, 6]
ARRIVALS = [0, 0, 3, 10, 11, 12, 13, 40, 60]      # the step at which each request is submitted


@pytest.fixture(scope="module")
def model():
    return tiny_decoder(seed=5)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(2)
    return [rng.integers(1, 97, n).tolist() for n in PROMPT_LENS]


class EvenProfileEngine(Engine):
    """Prefills profiled as one decode step, so MLFQ (iteration_cost profiled) preempts the same way on any load."""

    def _warm_and_profile(self, repeats: int = 3):
        profile = super()._warm_and_profile(repeats)
        profile["prefill_s"] = {bucket: profile["decode_s"] for bucket in profile["prefill_s"]}
        return profile


def make_engine(model, widths, **kw):
    graphdef, params, model_cfg, mesh = model
    cfg = ServeConfig(slots=4, buckets=BUCKETS, max_cache_len=64, scheduler="mlfq", mlfq_levels=6,
                      mlfq_base_quantum_s=0.0, host_kv_slots=1, starvation_s=0.0, iteration_cost="profiled",
                      decode_widths=widths, **kw)
    return EvenProfileEngine(graphdef, params, model_cfg, cfg, mesh=mesh, stop_ids=[])


def drive(engine, prompts, **sampling):
    """Submits request i at step ARRIVALS[i] and steps until all are done → (the requests, the running counts of
    the decode steps)."""
    reqs = [Request(p, max_new_tokens=n, seed=i, **sampling) for i, (p, n) in enumerate(zip(prompts, NEW_TOKENS))]
    compiles, step, running = len(COMPILES), 0, []
    while step <= max(ARRIVALS) or engine.pending:
        for r, a in zip(reqs, ARRIVALS):
            if a == step:
                engine.submit(r)
        before = engine.counters["decode_slot_steps"]
        engine.step()
        running.append(engine.counters["decode_slot_steps"] - before)
        step += 1
        assert step < 2000
    assert len(COMPILES) == compiles            # every width compiled at start-up
    assert all(r.finish_reason == "length" for r in reqs)
    return reqs, running


@pytest.mark.parametrize("layout", [{}, {"kv_cache_bytes": 2 * 2 * 2 * 12 * 4 * 8 * 20, "kv_block": 8}],
                         ids=["slots", "paged"])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_k": 20, "top_p": 0.9}], ids=["greedy", "seeded"])
def test_widths_equal_full_width(model, prompts, layout, sampling):
    full = make_engine(model, [], **layout)
    assert full.rows.widths == [4]
    want, _ = drive(full, prompts, **sampling)
    assert set(full.stats()["decode_width_steps"]) == {4}
    eng = make_engine(model, "auto", **layout)
    widths = [2, 4] if layout else [1, 2, 4]         # paged: no one-row program (PagedPrograms.min_row_width)
    assert eng.rows.widths == widths and set(eng.profile["decode_width_s"]) == set(widths)
    got, running = drive(eng, prompts, **sampling)
    assert [r.output for r in got] == [r.output for r in want]
    st = eng.stats()
    # the running count went up and down, jobs were preempted, and every width ran
    assert {1, 2, 3, 4} <= set(running) and st["preemptions"] > 0
    assert all(n > 0 for n in st["decode_width_steps"].values())
    assert sum(st["decode_width_steps"].values()) == st["decode_steps"]


def test_widths_resolve_and_bad_widths_name_the_key(model):
    assert resolve_widths("auto", 8) == [1, 2, 4, 8] and resolve_widths("auto", 6) == [1, 2, 4, 6]
    assert resolve_widths([], 8) == [8] and resolve_widths([8], 8) == [8] and resolve_widths([3, 1], 8) == [1, 3, 8]
    assert resolve_widths("auto", 1) == [1]
    for bad in ("most", [0], [5], [True]):
        with pytest.raises(ValueError, match="serve.decode_widths"):
            make_engine(model, bad)
    assert load_config(None, ["serve.decode_widths=[1, 3]", "serve.slots=4"]).serve.decode_widths == [1, 3]
    for bad in ("serve.decode_widths=most", "serve.decode_widths=[9]"):
        with pytest.raises(ConfigError, match="decode_widths"):
            load_config(None, [bad, "serve.slots=8"])

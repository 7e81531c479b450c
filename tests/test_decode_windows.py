"""Decode windows (fastserve/serve/programs.py `decode_windows`): a decode step attends only to the first W
positions when every running row sits below W. Tokens equal those of an engine that always attends to the whole
cache (greedy and seeded sampling, full-width and row decodes), while the rows cross from the narrow window into
the whole cache; every window is compiled at start-up."""
import jax
import numpy as np
import pytest

from fastserve import parallel
from fastserve.config import ServeConfig, load_config
from fastserve.core.state import init_params
from fastserve.serve import programs
from fastserve.serve.engine import Engine, Request
from tiny_decoder import COMPILES, VOCAB

MAX_LEN = 256                                   # windows [64, 256]
PROMPT_LENS, NEW_TOKENS = [3, 40, 12, 58, 7], [30, 20, 70, 12, 40]


@pytest.fixture(scope="module")
def model():
    cfg = load_config(None, [f"model.vocab_size={VOCAB}", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
                             "model.n_kv_heads=2", "model.d_ff=64", "model.init_std=0.3",
                             f"model.max_seq_len={MAX_LEN}", f"data.seq_len={MAX_LEN}", "mesh.data=1"])
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
    graphdef, params, _ = init_params(cfg.model, mesh, seed=11)
    return graphdef, params, cfg.model, mesh


def run(model, widths, sampling, step_s=None):
    graphdef, params, model_cfg, mesh = model
    cfg = ServeConfig(slots=4, buckets=[16, 64], max_cache_len=MAX_LEN, scheduler="fcfs", decode_widths=widths)
    engine = Engine(graphdef, params, model_cfg, cfg, mesh=mesh, stop_ids=[])
    if step_s is not None:      # a profile that makes the engine split mixed steps (RowDecoder.plan)
        assert set(engine.programs.step_s) == {(w, win) for w in (1, 2, 4) for win in (64, MAX_LEN)}
        engine.programs.step_s = {k: step_s(*k) for k in engine.programs.step_s}
    rng = np.random.default_rng(4)
    reqs = [Request(rng.integers(1, VOCAB, n).tolist(), max_new_tokens=m, seed=i, **sampling)
            for i, (n, m) in enumerate(zip(PROMPT_LENS, NEW_TOKENS))]
    compiles = len(COMPILES)
    steps = dict(engine.programs.window_steps)
    for r in reqs:
        engine.submit(r)
    while engine.pending:
        engine.step()
    assert len(COMPILES) == compiles            # every window compiled at start-up
    ran = {w: n - steps[w] for w, n in engine.programs.window_steps.items()}
    if step_s is not None:
        assert engine.rows.split_steps > 0
    return [r.output for r in reqs], ran


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_k": 20, "top_p": 0.9}], ids=["greedy", "seeded"])
def test_windowed_decode_equals_whole_cache(model, sampling, monkeypatch):
    got, ran = run(model, "auto", sampling)
    assert sorted(ran) == [64, MAX_LEN] and ran[64] > 0 and ran[MAX_LEN] > 0   # both windows decoded
    # steps split in two calls (short rows in the narrow window, the long one in the whole cache)
    split, _ = run(model, "auto", sampling, step_s=lambda width, win: 1.0 if win == MAX_LEN and width > 1 else 1e-3)
    monkeypatch.setattr(programs, "decode_windows", lambda max_len: [max_len])
    want, ran_whole = run(model, [], sampling)                                  # full width, whole cache
    assert list(ran_whole) == [MAX_LEN]
    assert got == want and split == want


def test_windows():
    assert programs.decode_windows(48) == [48] and programs.decode_windows(256) == [64, 256]
    assert programs.decode_windows(2112) == [144, 528, 2112]


@pytest.mark.parametrize("start", [4, 200], ids=["narrow window", "whole cache"])
def test_in_place_extend_equals_extract_and_insert(model, start):
    """ModelPrograms.extend writes a piece's KV in place and attends to the narrowest window holding it
    (rows_extend_fn); the sampled token and every cache row equal extend_fn's (the slot's rows copied out, extended,
    copied back)."""
    graphdef, params, _, _ = model
    progs = programs.ModelPrograms(graphdef, params, MAX_LEN)
    rng = np.random.default_rng(5)
    cache = [{k: jax.numpy.asarray(rng.normal(size=(3, MAX_LEN, 2, 8)).astype(np.float32)) for k in ("k", "v")}
             for _ in range(2)]
    tokens = rng.integers(1, VOCAB, (1, 16)).astype(np.int32)
    ints, floats = np.zeros((3, 1), np.int32), np.array([[0.0], [1.0]], np.float32)
    args = (np.int32(1), tokens, np.int32(start), np.int32(11), ints, floats)
    copy = jax.tree.map(lambda x: x.copy(), cache)
    want_tok, want = progs.jitted.extend(params, copy, *args)
    got_tok, got = progs.extend(cache, *args)
    assert progs.window_of(start + 15) == (64 if start == 4 else MAX_LEN)
    assert int(got_tok[0]) == int(want_tok[0])
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)

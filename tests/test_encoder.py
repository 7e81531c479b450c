"""The BERT-style encoder family (`model.name: encoder`) with the `classify` task on `data.source: synthetic_classes`:
it trains through the CLI, ignores padding, attends both ways, drops out only in train mode, computes the same loss
on 1 device and on a 2×2×2 mesh, and a bad head count is a config error naming the key."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fastserve import cli, parallel
from fastserve.config import ConfigError, load_config
from fastserve.core.state import abstract_model
from fastserve.data.synthetic_text import CLS_ID, SyntheticClassesConfig, make_examples
from fastserve.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "encoder_synthetic.yaml")
# small and quick: the easier `present` rule (which of 3 markers appears after [CLS]: still only readable at the
# [CLS] position by attending forward), few examples, a loss line every step
SMALL = ["data.rule=present", "data.num_classes=3", "data.train_examples=512", "data.eval_examples=128",
         "data.seq_len=24", "data.min_len=6", "model.max_seq_len=24", "train.steps=60", "train.eval_every=30",
         "optimizer.learning_rate=2e-3", "optimizer.warmup_steps=5", "log.every=1", "checkpoint.async_save=false"]
MESH_STEPS = 3


def tiny(**fields):
    base = dict(vocab_size=32, num_classes=3, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=48)
    cfg = load_config(None, ["model.name=encoder"]).model
    return dataclasses.replace(cfg, **{**base, **fields})


def records(workdir, split):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if r["split"] == split}


def run_train(workdir, *overrides, devices=1):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if devices > 1:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    args = [sys.executable, "-m", "fastserve.train", "--config", RECIPE, *SMALL, f"train.workdir={workdir}",
            *overrides]
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("encoder_run")
    out = run_train(workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir, out


def test_trains_through_the_cli(trained):
    workdir, out = trained
    train, held_out = records(workdir, "train"), records(workdir, "eval")
    first = np.mean([train[s]["loss"] for s in (1, 2, 3)])
    last = np.mean([train[s]["loss"] for s in (58, 59, 60)])
    assert first > np.log(3) - 0.2 and last < first - 0.5, (first, last)
    assert sorted(held_out) == [0, 30, 60]
    assert held_out[0]["accuracy"] < 0.5                     # untrained: chance (1/3) or so
    assert held_out[60]["accuracy"] > 0.8, held_out[60]      # well above chance
    assert held_out[60]["loss"] < held_out[0]["loss"] - 0.5
    assert "final held-out loss" in out.stdout and "macro_f1" in out.stdout


def test_same_loss_on_one_device_and_on_a_2x2x2_mesh(trained, tmp_path):
    """The first steps of the run above (1 device, dropout on) again on 8 simulated devices, data×fsdp×tensor."""
    workdir, _ = trained
    out = run_train(tmp_path, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", f"train.run_steps={MESH_STEPS}",
                    "data.eval_examples=0", devices=8)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in out.stdout
    one, mesh = records(workdir, "train"), records(tmp_path, "train")
    assert sorted(mesh) == list(range(1, MESH_STEPS + 1))
    assert one[1]["loss"] != one[MESH_STEPS]["loss"]         # the steps really changed the model
    for s in mesh:
        assert mesh[s]["loss"] == pytest.approx(one[s]["loss"], rel=1e-5), s
        assert mesh[s]["grad_norm"] == pytest.approx(one[s]["grad_norm"], rel=1e-4), s


def padded_inputs(t, extra, seed=0):
    """Three examples of lengths 5, 9, t, as (tokens, mask) padded to t and to t + extra, with *random* tokens in
    the extra padding (only the mask may hide them)."""
    rng = np.random.default_rng(seed)
    lengths = np.array([5, 9, t])
    tokens = rng.integers(2, 32, (3, t + extra)).astype(np.int32)
    tokens[:, 0] = CLS_ID
    mask = np.arange(t + extra)[None] < lengths[:, None]
    short = np.where(mask[:, :t], tokens[:, :t], 0)
    return (jnp.asarray(short), jnp.asarray(mask[:, :t])), (jnp.asarray(tokens), jnp.asarray(mask))


def compiled(cfg, seed=0):
    """(variables, eval_fn, train_fn, graphdef): one model, its eval pass (logits, embed, encode) and its
    train-mode logits.
    Shared by the tests below so that each shape compiles once (compiles dominate these tests' time)."""
    graphdef, state = nnx.split(build_model(cfg, nnx.Rngs(seed)))

    @jax.jit
    def eval_fn(state, tokens, mask, types):
        m = nnx.merge(graphdef, state)          # eval mode, as build_model returns it
        return m(tokens, mask=mask, token_types=types), m.embed(tokens, mask, types), m.encode(tokens, mask, types)

    @jax.jit
    def train_fn(state, tokens, mask, types, key):
        m = nnx.merge(graphdef, state)
        m.train()
        return m(tokens, mask=mask, token_types=types, rngs=nnx.Rngs(dropout=key))
    return state, eval_fn, train_fn, graphdef


@pytest.fixture(scope="module")
def bert():
    """post-LN, [CLS] pooling, both kinds of dropout"""
    return compiled(tiny(dropout=0.3, attention_dropout=0.5))


T, EXTRA = 16, 16


def check_padding_invariance(state, eval_fn):
    (tok, mask), (tok_long, mask_long) = padded_inputs(T, EXTRA)
    types = (jnp.arange(T + EXTRA) >= 4).astype(jnp.int32)[None].repeat(3, 0)
    logits, emb, hidden = eval_fn(state, tok, mask, types[:, :T])
    logits_l, emb_l, hidden_l = eval_fn(state, tok_long, mask_long, types)
    np.testing.assert_allclose(logits_l, logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(emb_l, emb, atol=1e-5, rtol=1e-5)
    valid = np.asarray(mask)[..., None]
    np.testing.assert_allclose(np.asarray(hidden_l)[:, :T] * valid, np.asarray(hidden) * valid, atol=1e-5, rtol=1e-5)
    assert logits.shape == (3, 3) and emb.shape == (3, 32) and hidden.shape == (3, T, 32)
    assert float(jnp.max(jnp.abs(logits[0] - logits[1]))) > 1e-4        # and they do depend on the tokens


def test_outputs_do_not_depend_on_padding(bert):
    """Logits, sentence embeddings and valid hidden states are the same padded to T or T+16 (eval mode)."""
    check_padding_invariance(*bert[:2])


def test_outputs_do_not_depend_on_padding_pre_ln_mean_pooling():
    check_padding_invariance(*compiled(tiny(pooling="mean", pre_ln=True, n_layers=1))[:2])


def test_attention_is_bidirectional(bert):
    """Changing a later token changes the hidden state of every earlier position (a causal model would not)."""
    state, eval_fn, _, _ = bert
    (tokens, _), _ = padded_inputs(T, EXTRA, seed=1)
    types = jnp.zeros_like(tokens)
    changed = tokens.at[:, 9].set((tokens[:, 9] - 1) % 30 + 2)
    mask = jnp.ones_like(tokens, bool)
    diff = np.abs(np.asarray(eval_fn(state, changed, mask, types)[2] - eval_fn(state, tokens, mask, types)[2]))
    assert (diff.max(axis=-1)[:, :9] > 1e-3).all(), diff.max(axis=-1)  # positions 0..8 all see position 9
    # ... unless position 9 is padding: then nothing at the valid positions changes
    mask9 = mask.at[:, 9:].set(False)
    diff9 = np.abs(np.asarray(eval_fn(state, changed, mask9, types)[2] - eval_fn(state, tokens, mask9, types)[2]))
    assert diff9[:, :9].max() < 1e-6


def test_dropout_only_in_train_mode(bert):
    """In train mode with a dropout RNG the logits change with the key (the same for the same key); eval mode
    (what build_model returns, and the eval step) is deterministic and uses no RNG."""
    state, eval_fn, train_fn, graphdef = bert
    (tokens, mask), _ = padded_inputs(T, EXTRA, seed=2)
    types = jnp.zeros_like(tokens)
    eval_out = eval_fn(state, tokens, mask, types)[0]
    a = train_fn(state, tokens, mask, types, jax.random.key(0))
    b = train_fn(state, tokens, mask, types, jax.random.key(1))
    assert float(jnp.max(jnp.abs(a - eval_out))) > 1e-3 and float(jnp.max(jnp.abs(a - b))) > 1e-3
    np.testing.assert_array_equal(train_fn(state, tokens, mask, types, jax.random.key(0)), a)
    np.testing.assert_array_equal(eval_fn(state, tokens, mask, types)[0], eval_out)
    # the model holds no RNG: train mode needs one passed in (this fails while tracing: nothing compiles)
    model = nnx.merge(graphdef, state)
    assert not jax.tree.leaves(nnx.state(model, nnx.RngState))
    model.train()
    with pytest.raises(Exception, match="rngs"):
        jax.jit(lambda t, k: model(t, mask=k))(tokens, mask)


def test_attention_probability_dropout():
    """The train-mode attention with dropout on the probabilities equals layers.attention without it (same
    padding rule), and drops probabilities with it."""
    from fastserve.models.encoder import _attention_probs_dropout
    from fastserve.models.layers import attention
    q, k, v = np.random.default_rng(0).normal(size=(3, 3, 6, 4, 8)).astype(np.float32)
    mask = np.arange(6)[None] < np.array([[6], [3], [0]])              # the last row is all padding
    drop = nnx.Dropout(0.5)

    @jax.jit
    def outputs(q, k, v, mask):
        return (attention(q, k, v, causal=False, k_valid=mask), _attention_probs_dropout(q, k, v, mask, lambda p: p),
                _attention_probs_dropout(q, k, v, mask, lambda p: drop(p, rngs=nnx.Rngs(dropout=0))))
    reference, same, dropped = outputs(q, k, v, mask)
    np.testing.assert_allclose(same, reference, atol=1e-5)
    assert float(jnp.max(jnp.abs(dropped - reference))) > 1e-2


def test_every_parameter_names_axes_from_the_rules_table():
    _, _, logical = abstract_model(tiny(pooling="cls", pre_ln=True))
    flat = jax.tree_util.tree_flatten_with_path(logical, is_leaf=lambda n: isinstance(n, tuple))[0]
    paths = {jax.tree_util.keystr(p, simple=True, separator="."): axes for p, axes in flat}
    used = {name for axes in paths.values() for name in axes}
    assert used <= {name for name, _ in parallel.LOGICAL_RULES}, used
    # the paths a Hugging Face BERT importer maps onto
    for path in ("embeddings.word.embedding", "embeddings.position.embedding", "embeddings.token_type.embedding",
                 "embeddings.norm.scale", "layers.1.attn.q.kernel", "layers.1.attn.o.bias", "layers.1.attn_norm.bias",
                 "layers.1.mlp.up.kernel", "layers.1.mlp.down.kernel", "layers.1.mlp_norm.scale", "final_norm.scale",
                 "pooler.kernel", "classifier.kernel"):
        assert path in paths, (path, sorted(paths))


def test_synthetic_classes_data():
    cfg = SyntheticClassesConfig(num_classes=3, seq_len=20, min_len=6)
    ex = make_examples(cfg, 300, split=0)
    assert (ex["inputs"][:, 0] == CLS_ID).all() and (ex["inputs"][~ex["mask"]] == 0).all()
    assert ex["mask"][:, :6].all() and set(ex["mask"].sum(1)) <= set(range(6, 21)) and len(set(ex["mask"].sum(1))) > 5
    markers = [[list(np.flatnonzero(row == 2 + j)) for j in range(3)] for row in ex["inputs"]]
    assert all(len(m) == 1 for ms in markers for m in ms)                  # every marker exactly once
    assert all(lab == int(np.argmin([m[0] for m in ms])) for lab, ms in zip(ex["labels"], markers))
    assert np.bincount(ex["labels"]).min() > 60                              # roughly balanced
    again = make_examples(cfg, 300, split=0)
    assert all((again[k] == ex[k]).all() for k in ex)                        # seeded
    assert not (make_examples(cfg, 300, split=1)["inputs"] == ex["inputs"]).all()
    present = make_examples(dataclasses.replace(cfg, rule="present"), 300, split=0)
    found = [[j for j in range(3) if (row == 2 + j).any()] for row in present["inputs"]]
    assert all(f == [lab] and (row == 2 + lab).sum() == 1
               for f, lab, row in zip(found, present["labels"], present["inputs"]))     # exactly one marker: the label


def test_head_count_that_does_not_divide_d_model_is_a_config_error(capsys):
    with pytest.raises(ConfigError, match=r"model\.n_heads: d_model=30 is not divisible by n_heads=4"):
        load_config(RECIPE, ["model.d_model=30", "model.n_heads=4"])
    with pytest.raises(ConfigError, match=r"model\.dropout: must be in \[0, 1\)"):
        load_config(RECIPE, ["model.dropout=1.0"])
    with pytest.raises(SystemExit) as exit_info:
        cli.parse(["--config", RECIPE, "model.d_model=30"], "test")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "config error: model.n_heads" in err and "Traceback" not in err

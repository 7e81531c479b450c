"""Model fusion (fastserve.fuse / fastserve.fusion): soups of tiny runs fine-tuned from one start, the EMA of a
run's checkpoints, mismatch errors, and probability-averaging ensembles served, generated and exported like one
model."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastserve import fuse
from fastserve.config import load_config
from fastserve.fusion import FusionError, load_member
from fastserve.fusion.ensemble import ensemble_member
from fastserve.fusion.soup import HeldOut, ema_of_checkpoints, greedy_soup, uniform_soup
from fastserve.core.trainer import train
from tests.conftest import TINY
from tests.fresh_process import WITHOUT_MODEL_CODE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """base (4 steps, checkpoints at 2 and 4), two fine-tunes of it (other seed / learning rate), and a run of
    another width sharing the tokenizer."""
    root = tmp_path_factory.mktemp("fusion")

    def run(name, *overrides):
        cfg = load_config(None, [*TINY, f"train.workdir={root / name}", "train.eval_every=100",
                                 "checkpoint.every=2", "checkpoint.max_to_keep=3", *overrides])
        train(cfg)
        return str(root / name)

    base = run("base", "train.steps=4")
    tok = os.path.join(base, "tokenizer.model")
    ft = [run(f"ft{i}", "train.steps=3", f"train.init_from={base}", f"tokenizer.path={tok}", "train.seed=0",
              f"optimizer.learning_rate={lr}") for i, lr in ((1, 3e-3), (2, 1e-3))]
    wide = run("wide", "train.steps=1", "model.d_ff=96", f"tokenizer.path={tok}")
    # ensemble members of different sizes with peaked distributions (large init): greedy tokens far from ties
    sharp = [run(f"sharp{i}", "train.steps=1", "model.init_std=0.3", f"train.seed={i}", f"tokenizer.path={tok}", *dims)
             for i, dims in ((1, ()), (2, ("model.n_layers=1", "model.d_ff=96")))]
    return {"base": base, "ft": ft, "wide": wide, "sharp": sharp, "root": root}


def _close(a, b, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=atol)


def test_uniform_soup_of_identical_models_is_the_model(runs):
    out = str(runs["root"] / "soup_same")
    assert fuse.main(["--uniform", "--out", out, "--no-heldout", runs["base"], runs["base"]]) == 0
    soup, base = load_member(out), load_member(runs["base"])
    assert soup.loaded.step == 0
    _close(soup.params, base.params)


def test_greedy_soup_never_worse_than_its_best_member(runs):
    members = [load_member(w) for w in runs["ft"]]
    heldout = HeldOut(members[0].cfg, members[0])
    _, report = greedy_soup(members, heldout)
    best = min(r["heldout"]["loss"] for r in report["members"])
    assert report["soup"]["loss"] <= best
    for step in report["steps"]:  # a model joins only when the soup with it scores lower
        assert step["added"] == (step["soup_with_it"]["loss"] < best) or not step["added"]
    _, uniform = uniform_soup(members, heldout)
    assert len(uniform["used"]) == 2 and np.isfinite(uniform["soup"]["loss"])


def test_fused_work_dir_trains_and_evaluates(runs):
    from fastserve.core.evaluator import evaluate
    out = str(runs["root"] / "soup_greedy")
    assert fuse.main(["--greedy", "--out", out, *runs["ft"]]) == 0
    cfg = load_config(os.path.join(out, "config.yaml"), ["train.steps=1"])
    metrics = evaluate(cfg)
    assert metrics["step"] == 0 and np.isfinite(metrics["loss"])
    assert train(cfg)["step"] == 1  # resumes its step-0 checkpoint (fresh optimizer state)


def test_ema_of_checkpoints(runs):
    member = load_member(runs["base"])
    from fastserve.fusion.members import load_step
    latest, _ = ema_of_checkpoints(member, decay=0.0)  # decay 0: the newest checkpoint itself
    _close(latest, member.params)
    ema, report = ema_of_checkpoints(member, decay=0.5)
    assert report["steps"] == [2, 4]
    _close(ema, jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, load_step(member, 2), load_step(member, 4)), 1e-5)


def test_mismatched_architecture_names_the_parameter(runs, capsys):
    assert fuse.main(["--uniform", "--out", str(runs["root"] / "bad"), runs["base"], runs["wide"]]) == 2
    err = capsys.readouterr().err
    assert "parameter layers.0.mlp.down.kernel is float32[128, 64] in the first and float32[96, 64]" in err


def test_mismatched_tokenizer_is_refused(runs, tiny_config):
    cfg = tiny_config("train.steps=1", "tokenizer.vocab_size=500", "train.eval_every=100")
    train(cfg)
    with pytest.raises(FusionError, match="different tokenizers: vocabulary sizes differ \\(400 vs 500\\)"):
        uniform_soup([load_member(runs["base"]), load_member(cfg.train.workdir)])


SERVE = dict(slots=2, buckets=[8, 16], max_cache_len=48)
PROMPTS = [[1, 17, 5, 90, 33], [2, 250, 7, 7, 31, 64, 12, 3, 8, 200, 41]]
MAX_NEW = 10


def _served(workdir, prompts=PROMPTS, max_new=MAX_NEW):
    """Greedy tokens of `prompts` through the serving engine on the work dir's model."""
    from fastserve.config import ServeConfig
    from fastserve.serve.engine import Engine, Request
    engine = Engine.from_loaded(load_member(workdir).loaded, ServeConfig(**SERVE))
    reqs = [Request(p, max_new_tokens=max_new, stop_ids=[]) for p in prompts]
    return [r.output for r in engine.generate(reqs, timeout=300)]


def _averaged_greedy(members, prompt, max_new=MAX_NEW, width=32):
    """Reference: argmax of the members' mean softmax, each member re-reading the whole sequence (no KV cache; the
    sequence right-padded to one width, which a causal model's earlier positions never see)."""
    from fastserve.generation.program import model_program
    forwards = [model_program(m.loaded.graphdef, lambda model, tokens: jax.nn.softmax(model(tokens)[0], -1))
                for m in members]
    seq, out = list(prompt), []
    for _ in range(max_new):
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :len(seq)] = seq
        probs = np.mean([np.asarray(f(m.params, tokens))[0, len(seq) - 1] for f, m in zip(forwards, members)], axis=0)
        out.append(int(np.argmax(probs)))
        seq.append(out[-1])
    return out


def test_ensemble_of_one_is_the_model(runs):
    one = str(runs["root"] / "ens_one")
    assert fuse.main(["--ensemble", "--out", one, runs["sharp"][0]]) == 0
    model, ens = load_member(runs["sharp"][0]), load_member(one)
    assert ens.loaded.model_cfg.name == "ensemble" and ens.loaded.step == 0
    assert HeldOut(model.cfg, ens)(ens.params)["loss"] == pytest.approx(HeldOut(model.cfg, model)(model.params)["loss"],
                                                                         rel=1e-5)
    assert _served(one) == _served(runs["sharp"][0])  # through the engine: the model's own greedy tokens


def test_ensemble_of_two_sizes_serves_the_argmax_of_mean_probabilities(runs):
    out = str(runs["root"] / "ens_two")
    assert fuse.main(["--ensemble", "--out", out, *runs["sharp"]]) == 0
    members = [load_member(w) for w in runs["sharp"]]
    want = [_averaged_greedy(members, p) for p in PROMPTS]
    assert _served(out) == want
    # the average decides: it differs from what at least one member alone would say
    alone = [[_averaged_greedy([m], p) for p in PROMPTS] for m in members]
    assert any(a != want for a in alone)

    from fastserve.generation.runner import Generator      # python -m fastserve.generate's path (bucketed, batched)
    from fastserve.generation.decoding import SamplingParams
    gen = Generator(load_member(out).loaded, batch_size=2, buckets=(16,))
    for c, w in zip(gen._batch([list(p) for p in PROMPTS], SamplingParams(max_new_tokens=MAX_NEW), 0), want):
        assert c.tokens and c.tokens == w[:len(c.tokens)]   # up to a stop token, if one comes


_CHILD = WITHOUT_MODEL_CODE + textwrap.dedent("""
    import numpy as np
    from fastserve.artifacts.loader import load_exported

    m = load_exported(sys.argv[1])
    d = np.load(sys.argv[2])
    logits, cache = m.prefill(d["tokens"], d["lengths"])
    nxt = np.asarray(logits).argmax(-1).astype(np.int32)
    dlogits, cache = m.decode(nxt, d["lengths"], cache)
    np.savez(sys.argv[3], logits=np.asarray(logits), dlogits=np.asarray(dlogits))
    print("RESULT " + json.dumps({"blocked": [k for k in sys.modules if k.split(".")[0] in ("flax", "optax")]}))
""")


@pytest.mark.slow  # exports two members' prefill and decode, then compiles them in a fresh process and the engine
def test_exported_ensemble_runs_without_model_code_and_equals_in_process(runs, tmp_path):
    from flax import nnx
    from fastserve.export import main as export_main
    from fastserve.generation import decoding as infer

    ens_dir, export_dir = str(runs["root"] / "ens_export_src"), str(tmp_path / "export")
    assert fuse.main(["--ensemble", "--no-heldout", "--out", ens_dir, *runs["sharp"]]) == 0
    assert export_main(["--checkpoint", ens_dir, "--out", export_dir, "--platforms", "cpu", "--buckets", "16",
                        "--max-cache-len", "48", "--functions", "prefill,decode"]) == 0
    tokens, lengths = infer.pad_prompts(PROMPTS, (16,))
    np.savez(tmp_path / "in.npz", tokens=tokens, lengths=lengths)
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, export_dir, str(tmp_path / "in.npz"), str(tmp_path / "o.npz")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "o.npz")

    ens = load_member(ens_dir)
    model = nnx.merge(ens.loaded.graphdef, ens.params)
    logits, cache = infer.prefill(model, jnp.asarray(tokens), jnp.asarray(lengths), model.init_cache(2, 48))
    assert isinstance(cache, tuple) and len(cache) == 2                 # one KV cache per member
    dlogits, _ = infer.decode(model, jnp.argmax(logits, -1).astype(jnp.int32), jnp.asarray(lengths), cache)
    np.testing.assert_allclose(got["logits"], np.asarray(logits), atol=1e-4)
    np.testing.assert_allclose(got["dlogits"], np.asarray(dlogits), atol=1e-4)
    np.testing.assert_allclose(np.exp(got["dlogits"]).sum(-1), 1.0, atol=1e-4)   # log-probabilities

    from fastserve.artifacts.loader import load_exported   # the engine on the export: every member's cache per slot
    from fastserve.config import ServeConfig
    from fastserve.serve.engine import Engine, Request
    engine = Engine.from_exported(load_exported(export_dir), ServeConfig(slots=2, buckets=[16], max_cache_len=48))
    reqs = engine.generate([Request(p, max_new_tokens=MAX_NEW, stop_ids=[]) for p in PROMPTS], timeout=300)
    assert [r.output for r in reqs] == [_averaged_greedy([load_member(w) for w in runs["sharp"]], p) for p in PROMPTS]

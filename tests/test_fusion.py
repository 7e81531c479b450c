"""Model fusion (fastserve.fuse / fastserve.fusion): soups of tiny runs fine-tuned from one start, the EMA of a
run's checkpoints, mismatch errors, and a probability-averaging ensemble (held-out and export)."""
import os

import jax
import numpy as np
import pytest

from fastserve import fuse
from fastserve.config import load_config
from fastserve.fusion import FusionError, load_member
from fastserve.fusion.ensemble import EnsembleHeldOut, ensemble_forward, export_ensemble, forward_specs
from fastserve.fusion.soup import HeldOut, ema_of_checkpoints, greedy_soup, uniform_soup
from fastserve.core.trainer import train
from tests.conftest import TINY


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
    return {"base": base, "ft": ft, "wide": wide, "root": root}


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


def test_ensemble_of_one_is_the_model_and_exports(runs, tmp_path):
    from fastserve.artifacts.loader import load_exported
    base = load_member(runs["base"])
    alone = HeldOut(base.cfg, base)(base.params)
    assert EnsembleHeldOut([base])()["loss"] == pytest.approx(alone["loss"], rel=1e-5)

    members = [load_member(w) for w in runs["ft"]] + [load_member(runs["wide"])]  # sizes may differ
    both = EnsembleHeldOut(members)()
    assert np.isfinite(both["loss"])
    export_ensemble(members, str(tmp_path / "ens"), batch_sizes=[2])
    exported = load_exported(str(tmp_path / "ens"))
    tokens = np.random.default_rng(0).integers(0, 300, forward_specs(members[0], 2, 32)["tokens"].shape)
    fn, variables = ensemble_forward(members, ["tokens"])
    want = np.asarray(jax.jit(fn)(variables, tokens.astype(np.int32)))
    got = np.asarray(exported.forward(tokens))
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(np.exp(got).sum(-1), 1.0, atol=1e-4)  # log-probabilities

"""Hyper-parameter tuning (fastserve.tune): a study of tiny trials with pruning points, resumed after an
interruption without repeating finished trials, its best config, and search-space errors that name the key."""
import json
import os

import pytest

pytest.importorskip("optuna", reason="fastserve.tune needs Optuna: pip install 'fastserve[tune]'")

from fastserve import tune as tune_cli  # noqa: E402
from fastserve.config import load_config  # noqa: E402
from fastserve.tuning import TuneError, load_spec  # noqa: E402
from fastserve.tuning.study import open_study, tune  # noqa: E402
from tests.conftest import TINY  # noqa: E402

SPACE = """
space:
  optimizer.learning_rate: loguniform(1.0e-3, 1.0e-2)
objective: loss
direction: minimize
trials: 1
pruner: median
"""


def _lines(path):
    with open(path) as f:
        return f.read().splitlines()


@pytest.mark.slow  # 3 trials of 2 evaluation slices each: ~30 s idle, more on a loaded machine
def test_tune_resumes_without_repeating_trials_and_writes_best(tmp_path):
    base = load_config(None, [*TINY, f"train.workdir={tmp_path / 'unused'}", "train.steps=4", "train.eval_every=2",
                              "checkpoint.every=100"])
    (tmp_path / "space.yaml").write_text(SPACE)
    spec = load_spec(str(tmp_path / "space.yaml"), base)
    out = str(tmp_path / "tune")
    first = tune(base, spec, out)
    assert first["finished"] == 1 and first["ran"] == 1
    rows = [json.loads(line) for line in _lines(os.path.join(out, "trials.jsonl"))]
    assert rows[0]["baseline"] and rows[0]["params"]["optimizer.learning_rate"] == pytest.approx(3e-3)
    assert [(r["state"], r["step"]) for r in rows] == [("COMPLETE", 4)]
    assert 0 < rows[0]["cpu_seconds"] and first["cpu_seconds"] >= rows[0]["cpu_seconds"]
    metrics_before = {r["workdir"]: len(_lines(os.path.join(r["workdir"], "metrics.jsonl"))) for r in rows}

    study = open_study(out, spec, 0)  # an invocation killed mid-trial leaves it RUNNING
    stuck = study.ask()
    stuck_lr = stuck.suggest_float("optimizer.learning_rate", 1e-3, 1e-2, log=True)
    spec.trials = 3
    second = tune(base, spec, out)
    assert second["requeued"] == 1 and second["finished"] == 3
    rows = [json.loads(line) for line in _lines(os.path.join(out, "trials.jsonl"))]
    assert [r["state"] for r in rows] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert rows[2]["rerun_of"] == 1 and rows[2]["params"]["optimizer.learning_rate"] == pytest.approx(stuck_lr)
    reported = open_study(out, spec, 0).trials[0].intermediate_values  # pruning points: each evaluation
    assert sorted(reported) == [2, 4] and reported[4] == pytest.approx(rows[0]["value"])
    for workdir, n in metrics_before.items():  # finished trials were not trained again
        assert len(_lines(os.path.join(workdir, "metrics.jsonl"))) == n

    best = load_config(os.path.join(out, "best.yaml"))
    assert best.train.workdir == os.path.join(out, "best") and best.train.run_steps == 0
    assert best.optimizer.learning_rate == pytest.approx(second["best_params"]["optimizer.learning_rate"])
    assert second["best_value"] == min(r["value"] for r in rows if r["state"] == "COMPLETE")
    assert "| trial |" in _lines(os.path.join(out, "trials.md"))[2]


@pytest.mark.parametrize("line, message", [
    ("model.no_such_key: uniform(0, 1)", "space.model.no_such_key: the config does not take it"),
    ("model.d_ff: normal(1, 2)", "space.model.d_ff: unknown distribution 'normal'"),
    ("optimizer.learning_rate: loguniform(0, 1)", "space.optimizer.learning_rate: loguniform needs low > 0"),
    ("optimizer.warmup_steps: int(10, 5)", "space.optimizer.warmup_steps: int(10, 5) needs low < high"),
    ("optimizer.learning_rate: 0.1", "space.optimizer.learning_rate: '0.1' is not a distribution"),
])
def test_bad_space_names_the_key(tmp_path, line, message):
    (tmp_path / "space.yaml").write_text(f"space:\n  {line}\n")
    with pytest.raises(TuneError) as e:
        load_spec(str(tmp_path / "space.yaml"), load_config(None, TINY))
    assert message in str(e.value)


def test_cli_reports_a_bad_space(tmp_path, capsys):
    (tmp_path / "space.yaml").write_text("space:\n  model.d_ff: choice()\n")
    (tmp_path / "c.yaml").write_text("train:\n  steps: 2\n")
    assert tune_cli.main(["--config", str(tmp_path / "c.yaml"), "--space", str(tmp_path / "space.yaml"),
                          "--out", str(tmp_path / "t")]) == 2
    assert "space.model.d_ff: choice() needs at least one value" in capsys.readouterr().err


def test_prune_from_step_reaches_the_pruner(tmp_path):
    base = load_config(None, TINY)
    (tmp_path / "space.yaml").write_text(SPACE + "prune_from_step: 150\n")
    spec = load_spec(str(tmp_path / "space.yaml"), base)
    assert spec.prune_from_step == 150
    assert open_study(str(tmp_path / "t"), spec, 0).pruner._n_warmup_steps == 150  # no pruning before step 150
    (tmp_path / "bad.yaml").write_text(SPACE + "prune_from_step: -1\n")
    with pytest.raises(TuneError, match="prune_from_step: -1"):
        load_spec(str(tmp_path / "bad.yaml"), base)

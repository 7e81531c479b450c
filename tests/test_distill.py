"""Distillation as a task on the core: the loss, training a student from a trained teacher, and the teacher's params
passed to the compiled step as arguments (not baked in as constants)."""
import dataclasses
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fastserve import parallel
from fastserve.config import MeshConfig, ModelConfig, OptimizerConfig, SourceConfig
from fastserve.core.optim import make_optimizer
from fastserve.core.state import create_train_state, init_params
from fastserve.core.steps import make_eval_step, make_train_step
from fastserve.config import ConfigError, load_config
from fastserve.tasks.distill import DistillConfig
from fastserve.tasks.lm import LanguageModeling
from fastserve.workdir import load_model
from fastserve.core.trainer import train

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
                  init_std=0.3)


def _batch(b=2, t=12, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 64, (b, t + 1)).astype(np.int32)
    weights = np.ones((b, t), np.float32)
    weights[1, -3:] = 0.0  # padding: not counted
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}


def Distillation(teacher_graphdef, temperature, alpha):
    """The distill task as `init_state` leaves it, for a teacher given here as (graphdef, variables)."""
    task = DistillConfig(teacher="unused", temperature=temperature, alpha=alpha).build()
    task.teacher_graphdef = teacher_graphdef
    return task


@pytest.fixture(scope="module")
def models():
    mesh = parallel.make_mesh(MeshConfig(data=1))
    graphdef, teacher, _ = init_params(CFG, mesh, seed=0)
    _, other, _ = init_params(CFG, mesh, seed=1)
    return mesh, graphdef, teacher, other


def test_kl_is_zero_when_student_equals_teacher(models):
    mesh, graphdef, teacher, other = models
    batch = _batch()
    same = Distillation(graphdef, temperature=2.0, alpha=1.0)
    loss, sums = same.loss(nnx.merge(graphdef, teacher), batch, None, teacher)
    assert float(sums["weight"]) == 21.0
    assert abs(float(loss)) < 1e-5 * float(sums["weight"]) and abs(float(sums["kl_sum"])) < 1e-5
    # a different student: KL > 0, scaled by T²; alpha=0 is exactly the data cross-entropy of the lm task
    loss_other, s_other = same.loss(nnx.merge(graphdef, other), batch, None, teacher)
    assert float(s_other["kl_sum"]) > 0.01 and float(loss_other) == pytest.approx(4.0 * float(s_other["kl_sum"]),
                                                                                   rel=1e-6)
    ce_only, _ = Distillation(graphdef, 2.0, alpha=0.0).loss(nnx.merge(graphdef, other), batch, None, teacher)
    lm_loss, _ = LanguageModeling().loss(nnx.merge(graphdef, other), batch, None, {})
    assert float(ce_only) == pytest.approx(float(lm_loss), rel=1e-6)
    # the KL by hand, per token, weights respected
    t_logits = np.asarray(nnx.merge(graphdef, teacher)(batch["inputs"])[0], np.float64) / 2.0
    s_logits = np.asarray(nnx.merge(graphdef, other)(batch["inputs"])[0], np.float64) / 2.0
    log_p = t_logits - np.log(np.exp(t_logits).sum(-1, keepdims=True))
    log_q = s_logits - np.log(np.exp(s_logits).sum(-1, keepdims=True))
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    assert float(s_other["kl_sum"]) == pytest.approx(float((kl * batch["weights"]).sum()), rel=1e-4)
    # its options are checked when the config loads
    with pytest.raises(ConfigError, match=r"train\.task\.alpha: must be in \[0, 1\]"):
        load_config(None, ["train.task=distill", "train.task.teacher=runs/t", "train.task.alpha=1.5"])
    with pytest.raises(ConfigError, match=r"train\.task\.teacher"):
        load_config(None, ["train.task=distill"])


def test_the_teacher_gets_no_gradient(models):
    mesh, graphdef, teacher, other = models
    task = Distillation(graphdef, temperature=2.0, alpha=0.5)
    student = nnx.merge(graphdef, other)
    grads = jax.grad(lambda t: task.loss(student, _batch(), None, t)[0])(teacher)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
    # while the student does get one (the same loss, differentiated the other way)
    s_grads = jax.grad(lambda p: task.loss(nnx.merge(graphdef, p), _batch(), None, teacher)[0])(other)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(s_grads)) > 0.0


def test_teacher_params_are_jit_arguments(models):
    mesh, graphdef, teacher, _ = models
    tx, schedule = make_optimizer(OptimizerConfig(), 10)
    s_graphdef, state, shardings = create_train_state(CFG, tx, mesh, seed=3)
    teacher_shardings = jax.tree.map(lambda x: x.sharding, teacher)
    task = Distillation(graphdef, 2.0, 0.5)
    step = make_train_step(s_graphdef, task, tx, schedule, shardings, mesh, teacher_shardings)
    batch = jax.tree.map(lambda x: x[None], _batch())
    with jax.set_mesh(mesh):
        lowered = step.lower(state, batch, teacher)
    n_state, n_batch, n_teacher = (len(jax.tree.leaves(x)) for x in (state, batch, teacher))
    assert len(jax.tree.leaves(lowered.args_info)) == n_state + n_batch + n_teacher
    text = lowered.as_text()
    # the teacher's weights are parameters of the program, with their shapes, and not inlined as literals
    main = re.search(r"func.func public @main\((.*?)\)\s*->", text, re.S).group(1)
    assert main.count("tensor<64x32xf32>") >= 2          # student and teacher embedding tables are arguments
    assert 'dense<"0x' not in text and not re.search(r"dense<\[\[", text)
    # the same step, with the teacher closed over, inlines it: the check above would catch that
    closed = jax.jit(lambda s, b: make_train_step(s_graphdef, task, tx, schedule, shardings, mesh,
                                                  teacher_shardings)(s, b, teacher))
    with jax.set_mesh(mesh):
        closed_text = closed.lower(state, batch).as_text()
    assert len(closed_text) > len(text) + 4 * 64 * 32
    # and it runs: one step, the eval step takes the teacher too
    with jax.set_mesh(mesh):
        new_state, metrics = step(state, batch, teacher)
        ev = make_eval_step(s_graphdef, task, shardings["params"], mesh, teacher_shardings)  # no model state here
        sums = ev(new_state["params"], _batch(), teacher)
    assert math.isfinite(float(metrics["loss_sum"])) and float(sums["kl_sum"]) > 0


def _records(workdir, split):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if r["split"] == split}


def test_distillation_from_a_trained_teacher_lowers_the_kl(tiny_config, tmp_path):
    teacher = tiny_config("train.steps=30", "train.eval_every=30", "checkpoint.every=30", "train.eval_batches=4",
                          f"train.workdir={tmp_path / 'teacher'}")
    train(teacher)
    # a smaller student, pure distillation (alpha=1), on the teacher's tokenizer (taken from its work dir)
    student = tiny_config("train.task=distill", f"train.task.teacher={tmp_path / 'teacher'}", "train.task.alpha=1.0",
                          "train.task.temperature=2.0", "model.d_model=32", "model.d_ff=64", "train.steps=30",
                          "train.eval_every=15", "checkpoint.every=30", "train.eval_batches=4",
                          f"train.workdir={tmp_path / 'student'}")
    teacher_before = load_model(dataclasses.replace(teacher, source=SourceConfig(path=teacher.train.workdir)))
    results = train(student)
    ev = _records(student.train.workdir, "eval")
    assert sorted(ev) == [0, 15, 30]
    assert ev[30]["kl"] < ev[15]["kl"] < ev[0]["kl"], {s: r["kl"] for s, r in ev.items()}
    assert ev[30]["kl"] < 0.7 * ev[0]["kl"]
    assert results["eval"]["teacher_agreement"] > ev[0]["teacher_agreement"]
    with open(tmp_path / "student" / "config.yaml") as f:     # the student reads the teacher's tokenizer
        assert f"path: {tmp_path / 'teacher' / 'tokenizer.model'}" in f.read()
    # the teacher's work dir is untouched: same checkpoint, same weights
    teacher_after = load_model(dataclasses.replace(teacher, source=SourceConfig(path=teacher.train.workdir)))
    assert teacher_after.step == teacher_before.step == 30
    for a, b in zip(jax.tree.leaves(teacher_before.params), jax.tree.leaves(teacher_after.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # an interrupted distillation resumes (teacher reloaded) and equals the uninterrupted one step for step
    parts = dataclasses.replace(student, train=dataclasses.replace(student.train, workdir=str(tmp_path / "parts"),
                                                                   run_steps=15))
    assert train(parts)["step"] == 15
    assert train(parts)["step"] == 30
    expected, got = _records(student.train.workdir, "train"), _records(parts.train.workdir, "train")
    assert sorted(got) == sorted(expected) == list(range(1, 31))
    for step in expected:
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5, abs=1e-6), step
    assert _records(parts.train.workdir, "eval")[30]["kl"] == pytest.approx(ev[30]["kl"], rel=1e-4)
    # a teacher of another vocabulary is refused by name
    other = tiny_config("train.task=distill", f"train.task.teacher={tmp_path / 'teacher'}", "model.vocab_size=512",
                        "train.steps=1", f"train.workdir={tmp_path / 'bad'}")
    with pytest.raises(ValueError, match="vocabulary"):
        train(other)

"""The user-facing inference path on a trained work dir: evaluate, infer(), and the generate CLI."""
import json

import pytest

import fastserve
from fastserve.generation import runner as generate_cli
from fastserve.core.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import TINY
    workdir = tmp_path_factory.mktemp("gen") / "run"
    cfg = fastserve.load_config(None, [*TINY, f"train.workdir={workdir}", "train.steps=12", "train.eval_every=12",
                                       "checkpoint.every=12", "generate.max_new_tokens=8", "generate.batch_size=2",
                                       "generate.buckets=[16, 32]", "model.max_seq_len=64"])
    results = fastserve.train(cfg)
    return cfg, results


def test_evaluate_matches_the_final_eval_of_training(trained, capsys):
    cfg, results = trained
    metrics = fastserve.evaluate(cfg)
    assert metrics["step"] == 12
    assert metrics["loss"] == pytest.approx(results["eval"]["loss"], rel=1e-5)


def test_evaluate_without_checkpoint_is_a_clear_error(tiny_config):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        fastserve.evaluate(tiny_config())


def test_infer_is_deterministic_and_batches_consistently(trained):
    cfg, _ = trained
    prompts = ["The class", "A function definition", "Built-in", "The with statement", "Lambda"]
    first = fastserve.infer(cfg, prompts)
    assert len(first) == 5 and all(isinstance(t, str) for t in first)
    # Batch composition (2 per batch, a filler row in the last) must not change greedy results.
    alone = [fastserve.infer(cfg, [p])[0] for p in prompts[:2]]
    assert alone == first[:2]


def test_generate_cli_reads_prompts_file(trained, tmp_path, capsys):
    cfg, _ = trained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The class\n\nLambda\n")
    rc = generate_cli.main([f"--checkpoint={cfg.train.workdir}", f"generate.prompts_file={prompts}",
                            "generate.max_new_tokens=8", "generate.batch_size=2", "generate.buckets=[16, 32]"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count(">>> ") == 2 and "finish: " in out


def test_generate_cli_errors(trained, tmp_path, capsys):
    cfg, _ = trained
    assert generate_cli.main([f"--checkpoint={cfg.train.workdir}"]) == 2
    assert "no prompts" in capsys.readouterr().err
    assert generate_cli.main([f"--checkpoint={tmp_path}", "--prompt", "x"]) == 2
    assert "not a fastserve work dir" in capsys.readouterr().err
    # two distinct refusals, each read once (a second readouterr() would see an empty stream):
    # prompt + max_new_tokens past the model's max_seq_len (64) ...
    long_prompt = "word " * 200                     # ≥ 200 tokens
    assert generate_cli.main([f"--checkpoint={cfg.train.workdir}", "--prompt", long_prompt,
                              "generate.buckets=[16, 32]"]) == 2
    err = capsys.readouterr().err
    assert "error: prompt 0 has" in err and "that exceeds the model's max_seq_len=64" in err, err
    # ... and a prompt that fits the model but not the largest bucket
    mid_prompt = "word " * 10                       # ~41 tokens (≈ 4 per word, + BOS): > 8, and + 8 new ≤ 64
    assert generate_cli.main([f"--checkpoint={cfg.train.workdir}", "--prompt", mid_prompt,
                              "generate.max_new_tokens=8", "generate.buckets=[8]"]) == 2
    err = capsys.readouterr().err
    assert "longer than the largest bucket (8)" in err and "max_seq_len" not in err, err

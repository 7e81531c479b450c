"""Every config value is checked when the config loads: a bad one is `config error: <key>: <what is wrong>`,
exit status 2, no traceback, and nothing written (the work dir is not even created)."""
import pytest

from fastserve.config import ConfigError, load_config
from fastserve.core import trainer

BAD = [  # (override(s), the key the error names, words the message has)
    (["optimizer.learning_rate=-0.001"], "optimizer.learning_rate", "must be positive"),
    (["optimizer.name=adamx"], "optimizer.name", "unknown optimizer 'adamx'"),
    (["optimizer.schedule=cosin"], "optimizer.schedule", "did you mean 'cosine'"),
    (["optimizer.b2=1.5"], "optimizer.b2", "[0, 1]"),
    (["optimizer.warmup_steps=-5"], "optimizer.warmup_steps", ">= 0"),
    (["model.d_model=96", "model.n_heads=9"], "model.n_heads", "not divisible by n_heads=9"),
    (["model.d_model=96", "model.n_heads=7"], "model.n_heads", "not divisible"),
    (["model.d_model=96", "model.n_heads=6", "model.head_dim=13"], "model.head_dim", "odd"),
    (["model.d_model=104", "model.n_heads=8"], "model.n_heads", "head dimension 13 is odd"),
    (["model.n_heads=6", "model.n_kv_heads=4", "model.d_model=96"], "model.n_kv_heads", "multiple"),
    (["model.d_ff=-1"], "model.d_ff", "must be positive"),
    (["model.dtype=float8"], "model.dtype", "unknown dtype"),
    (["model.name=decodr"], "model.name", "did you mean 'decoder'"),
    (["model.compressed={layers.0.mlp.up: {kind: int4}}"], "model.compressed", "kind"),
    (["data.batch_size=0"], "data.batch_size", "must be positive"),
    (["data.eval_fraction=1.5"], "data.eval_fraction", "[0, 1)"),
    (["data.source=txt"], "data.source", "did you mean 'text'"),
    (["data.source=text"], "data.paths", "at least one file"),
    (["tokenizer.vocab_size=2"], "tokenizer.vocab_size", "at least 8"),
    (["tokenizer.model_type=wordpiece"], "tokenizer.model_type", "bpe or unigram"),
    (["train.steps=0"], "train.steps", "must be positive"),
    (["train.grad_accum=3"], "train.grad_accum", "does not divide"),
    (["train.task=lmm"], "train.task.name", "did you mean 'lm'"),
    (["train.task.samples=-1"], "train.task.samples", ">= 0"),
    (["train.task=distill"], "train.task.teacher", "needs train.task.teacher"),
    (["mesh.fsdp=0"], "mesh.fsdp", "positive size or -1"),
    (["checkpoint.every=0"], "checkpoint.every", "must be positive"),
    (["log.every=0"], "log.every", "must be positive"),
    (["distributed.process_id=3"], "distributed.process_id", "num_processes"),
    (["source.kind=onnx"], "source.kind", "choose from"),
    (["generate.top_p=0"], "generate.top_p", "(0, 1]"),
    (["export.max_new_tokens=0"], "export.max_new_tokens", "must be positive"),
    (["serve.scheduler=fifo"], "serve.scheduler", "choose from"),
    (["serve.port=70000"], "serve.port", "0..65535"),
    (["transforms=[lowrank]"], "transforms[0]", "expected a mapping"),
    (["transforms=[{lowrank: {rank: 4}, quantize: {bits: 8}}]"], "transforms[0]", "one-key mapping"),
]


@pytest.mark.parametrize("overrides,key,words", BAD, ids=[b[1] + ":" + b[0][-1] for b in BAD])
def test_bad_value_is_a_config_error_naming_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as info:
        load_config("configs/quickstart.yaml", overrides)
    msg = str(info.value)
    assert msg.startswith(f"{key}:"), msg
    assert words in msg, msg


def test_train_cli_refuses_before_any_work(tmp_path, capsys):
    """One bad value per section through `python -m fastserve.train`'s entry point: exit 2, the key named, no
    traceback, and the work dir never created (nothing trained, nothing written)."""
    for overrides, key, _ in BAD[::3]:
        workdir = tmp_path / key.replace(".", "_").replace("[", "_").replace("]", "")
        with pytest.raises(SystemExit) as exit_info:
            trainer.main(["--config", "configs/quickstart.yaml", f"train.workdir={workdir}", *overrides])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, key
        assert err.startswith(f"config error: {key}:") and "Traceback" not in err, err
        assert not workdir.exists(), key


def test_good_configs_pass_their_checks():
    for path in ["configs/quickstart.yaml", "configs/compress_quickstart.yaml", "configs/serve_quickstart.yaml",
                 "configs/smollm2_135m.yaml"]:
        load_config(path)
    cfg = load_config(None, ["model.d_model=96", "model.n_heads=6", "model.n_kv_heads=1", "model.d_ff=250",
                             "train.task=distill", "train.task.teacher=runs/t", "train.task.alpha=0.3"])
    assert cfg.train.task.alpha == 0.3 and cfg.train.task.name == "distill" and cfg.model.n_kv_heads == 1


def test_naming_a_task_over_a_config_that_has_one_starts_it_afresh(tmp_path):
    # a work dir's config spells its task out as a mapping; `train.task=distill` with more keys must switch it
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  task:\n    name: lm\n  steps: 5\n")
    cfg = load_config(str(path), ["train.task=distill", "train.task.teacher=runs/t"])
    assert cfg.train.task.name == "distill" and cfg.train.task.teacher == "runs/t" and cfg.train.steps == 5
    cfg = load_config(str(path), ["train.task.name=distill", "train.task.teacher=runs/t"])   # the other spelling
    assert cfg.train.task.name == "distill"

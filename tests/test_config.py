import pytest

from fastserve import cli
from fastserve.config import Config, ConfigError, load_config, parse_override


def test_defaults_and_quickstart_load():
    assert isinstance(load_config(None), Config)
    cfg = load_config("configs/quickstart.yaml", ["train.steps=50", "mesh.fsdp=2", "data.paths=[a.txt, b.txt]"])
    assert cfg.train.steps == 50 and cfg.mesh.fsdp == 2 and cfg.data.paths == ["a.txt", "b.txt"]
    # from the file, where it differs from the defaults
    assert (cfg.model.n_heads, cfg.model.n_kv_heads, cfg.model.max_seq_len) == (8, 4, 128)
    assert (Config().model.n_heads, Config().model.max_seq_len) == (4, 2048)
    assert cfg.train.workdir == "runs/quickstart" and cfg.train.eval_every == 50


def test_override_values_get_yaml_types():
    assert load_config(None, ["optimizer.learning_rate=1e-3"]).optimizer.learning_rate == 1e-3
    assert parse_override("log.progress=false") == (["log", "progress"], False)
    cfg = load_config(None, ["optimizer.learning_rate=1", "data.paths=one.txt"])
    assert cfg.optimizer.learning_rate == 1.0 and isinstance(cfg.optimizer.learning_rate, float)
    assert cfg.data.paths == ["one.txt"]


def test_unknown_key_names_it_and_the_nearest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.setps'.*did you mean 'train\.steps'"):
        load_config(None, ["train.setps=5"])
    with pytest.raises(ConfigError, match=r"unknown config key 'optimiser'.*did you mean 'optimizer'"):
        load_config(None, ["optimiser.name=sgd"])


def test_unknown_key_in_a_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  d_modle: 64\n")
    with pytest.raises(ConfigError, match=r"model\.d_modle.*model\.d_model"):
        load_config(path)


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"train\.steps: expected int, got str 'many'"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"log\.progress: expected bool"):
        load_config(None, ["log.progress=3"])
    with pytest.raises(ConfigError, match=r"model: expected a model name or a mapping with 'name'"):
        load_config(None, ["model=5"])


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/does_not_exist.yaml")


def test_cli_reports_config_errors_without_traceback(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse(["--config", "configs/quickstart.yaml", "train.stpes=3"], "test")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "train.stpes" in err and "train.steps" in err and "Traceback" not in err

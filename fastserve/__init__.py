"""fastserve: train and serve JAX models from one laptop CPU up to TPU and GPU meshes.

The Python API mirrors the CLIs (`python -m fastserve.<verb> --config FILE key=value ...`): each function takes a
config file path or a `Config`, plus the same `key=value` overrides.
"""
from __future__ import annotations

from typing import Any, Sequence

from fastserve.config import Config, ConfigError, apply_overrides, load_config

__version__ = "0.1.0"


def _config(config: str | Config | None, overrides: Sequence[str]) -> Config:
    if isinstance(config, Config):
        return apply_overrides(config, overrides)
    return load_config(config, overrides)


def train(config: str | Config | None = None, *overrides: str) -> dict[str, Any]:
    """Trains (or resumes) as `python -m fastserve.train` does; returns final train/eval metrics and samples."""
    from fastserve.training import train as _train
    return _train(_config(config, overrides))


def evaluate(config: str | Config | None = None, *overrides: str) -> dict[str, Any]:
    """Held-out metrics of the work dir's latest checkpoint."""
    from fastserve.evaluation import evaluate as _evaluate
    return _evaluate(_config(config, overrides))


def infer(config: str | Config | None, prompts: Sequence[str] | None = None, *overrides: str) -> list[str]:
    """Completes `prompts` with the model of `config.source` (default: the trained work dir); returns the texts."""
    from fastserve.inference import generate
    return [c.text for c in generate(_config(config, overrides), prompts)]


__all__ = ["Config", "ConfigError", "load_config", "train", "evaluate", "infer", "__version__"]

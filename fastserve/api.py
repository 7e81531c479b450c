"""The Python API: the same verbs as the CLIs (`python -m fastserve.<verb> --config FILE key=value ...`); each
function takes a config file path or a `Config`, plus the same `key=value` overrides. Re-exported by `fastserve`."""
from __future__ import annotations

from typing import Any, Sequence

from fastserve.config import Config, apply_overrides, load_config


def _config(config: str | Config | None, overrides: Sequence[str]) -> Config:
    if isinstance(config, Config):
        return apply_overrides(config, overrides)
    return load_config(config, overrides)


def train(config: str | Config | None = None, *overrides: str) -> dict[str, Any]:
    """Trains (or resumes) as `python -m fastserve.train` does; returns final train/eval metrics and samples."""
    from fastserve.core.trainer import train as _train
    return _train(_config(config, overrides))


def evaluate(config: str | Config | None = None, *overrides: str) -> dict[str, Any]:
    """Held-out metrics of the work dir's latest checkpoint."""
    from fastserve.core.evaluator import evaluate as _evaluate
    return _evaluate(_config(config, overrides))


def infer(config: str | Config | None, prompts: Sequence[str] | None = None, *overrides: str) -> list[Any]:
    """Runs the model of `config.source` (default: the trained work dir) on `prompts`, one result per prompt: a
    language model's completion (str); an encoder's embedding (head embed: a list of floats, L2-normalized), class
    prediction (head classify: `.label`, `.probs`) or per-piece classes (head tag); an encoder–decoder's
    translation (str, greedy)."""
    from fastserve.generation.encoders import read_texts, runner_from_config, source_is_encoder
    cfg = _config(config, overrides)
    if source_is_encoder(cfg):
        return runner_from_config(cfg).infer(read_texts(cfg, prompts or ()))
    if getattr(cfg.model, "name", "") == "seq2seq":  # encoder–decoders translate each prompt (greedy)
        from fastserve.generation.runner import read_prompts
        from fastserve.translate import translate_from_config
        return translate_from_config(cfg, read_prompts(cfg, prompts or ()))
    from fastserve.generation.runner import generate
    return [c.text for c in generate(cfg, prompts)]


def export(config: str | Config | None, out: str | None = None, *overrides: str) -> dict[str, Any]:
    """Exports the serving functions of `config.source`'s model (default: the trained work dir) to `out`
    (default: `export.out`); returns the manifest."""
    from fastserve.artifacts.writer import export_from_config
    return export_from_config(_config(config, overrides), out)


def compress(config: str | Config | None, out: str, *overrides: str, heldout: bool | None = None,
             decode_tokens: int = 32) -> dict[str, Any]:
    """Applies the config's `transforms` to `config.source`'s model and writes the result as a new work dir `out`
    (as `python -m fastserve.compress` does); returns the before/after report."""
    from fastserve.transforms.report import compress as _compress
    return _compress(_config(config, overrides), out, heldout=heldout, decode_tokens=decode_tokens)


def load_exported(directory: str, platform: str | None = None, **kwargs: Any) -> Any:
    """Loads an export: ready prefill / decode / generate callables that need no fastserve model code."""
    from fastserve.artifacts.loader import load_exported as _load  # keeps flax and the model code out of the import
    return _load(directory, platform, **kwargs)


def deploy(config: str | Config | None, *overrides: str, block: bool = True) -> Any:
    """Serves `config.source`'s model over the OpenAI-compatible HTTP API of `config.serve`, as
    `python -m fastserve.serve` does. block=True: until SIGINT / SIGTERM (returns None); block=False: returns at
    once a running handle with `.url` and `.stop()`."""
    from fastserve.serve.cli import serve
    return serve(_config(config, overrides), block=block)


__all__ = ["train", "evaluate", "infer", "export", "compress", "load_exported", "deploy"]

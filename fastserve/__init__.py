"""fastserve: train and serve JAX models from one laptop CPU up to TPU and GPU meshes.

The Python API mirrors the CLIs (`python -m fastserve.<verb> --config FILE key=value ...`): each function takes a
config file path or a `Config`, plus the same `key=value` overrides (fastserve/api.py).
"""
from __future__ import annotations

from fastserve.host_memory import tune_allocator

tune_allocator()  # before JAX starts its threads: see host_memory.py (FASTSERVE_MALLOC=system opts out)

from fastserve.api import compress, deploy, evaluate, export, infer, load_exported, train
from fastserve.config import Config, ConfigError, load_config

__version__ = "0.1.0"


def __getattr__(name: str):
    # `fs.layers` (Keras-style layer specs, no JAX) and `fs.models` (`fs.models.Sequential`), imported on first use
    # so that `import fastserve` stays light
    if name in ("layers", "models", "keras", "datasets"):
        import importlib
        return importlib.import_module(f"fastserve.{name}")
    raise AttributeError(f"module 'fastserve' has no attribute {name!r}")


__all__ = ["Config", "ConfigError", "load_config", "train", "evaluate", "infer", "export", "compress",
           "load_exported", "deploy", "__version__"]

"""Model families (Flax NNX definitions only) and the registry that builds them from a config."""
from __future__ import annotations

from typing import Any, Callable

from flax import nnx

from fastserve.models.decoder import DecoderLM, count_flops_per_token

# Parameters are created unsharded and placed by the shardings derived from the rules table (parallel.py),
# so variable creation must not try to shard eagerly.
nnx.use_eager_sharding(False)

MODELS: dict[str, Callable[..., nnx.Module]] = {"decoder": DecoderLM}


def build_model(cfg: Any, rngs: nnx.Rngs) -> nnx.Module:
    """Instantiates the model family named by `cfg.name` (a `ModelConfig`)."""
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model.name '{cfg.name}' (choose from {', '.join(MODELS)})")
    return MODELS[cfg.name](cfg, rngs=rngs)


__all__ = ["DecoderLM", "MODELS", "build_model", "count_flops_per_token"]

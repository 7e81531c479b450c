"""Model families (Flax NNX definitions only) and the registry that builds them from a config."""
from __future__ import annotations

from typing import Any, Callable

from flax import nnx

from fastserve.models.compressed import LowRankLinear, QuantizedLinear, apply_structure
from fastserve.models.decoder import DecoderLM, count_flops_per_token

# Parameters are created unsharded and placed by the shardings derived from the rules table (parallel.py),
# so variable creation must not try to shard eagerly.
nnx.use_eager_sharding(False)

MODELS: dict[str, Callable[..., nnx.Module]] = {"decoder": DecoderLM}


def build_model(cfg: Any, rngs: nnx.Rngs) -> nnx.Module:
    """Instantiates the model family named by `cfg.name` (a `ModelConfig`)."""
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model.name '{cfg.name}' (choose from {', '.join(MODELS)})")
    model = MODELS[cfg.name](cfg, rngs=rngs)
    if getattr(cfg, "compressed", None):  # low-rank / int8 layers swapped in by path (fastserve.transforms)
        apply_structure(model, cfg.compressed, rngs=rngs)
    return model


__all__ = ["DecoderLM", "LowRankLinear", "MODELS", "QuantizedLinear", "apply_structure", "build_model",
           "count_flops_per_token"]

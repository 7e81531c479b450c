"""Model families (Flax NNX definitions only) and the registry that builds them from a config."""
from __future__ import annotations

from typing import Any

from flax import nnx

from fastserve.models.compressed import LowRankLinear, QuantizedLinear, apply_structure
from fastserve.models.decoder import DecoderConfig, DecoderLM, count_flops_per_token

# Parameters are created unsharded and placed by the shardings derived from the rules table (parallel.py),
# so variable creation must not try to shard eagerly.
nnx.use_eager_sharding(False)


def build_model(cfg: Any, rngs: nnx.Rngs) -> nnx.Module:
    """Instantiates the model family whose config `cfg` is (a dataclass registered in `fastserve.registry.MODELS`).

    The model is returned in eval mode (dropout off, batch norm on its running statistics): every graph split from
    it then runs as inference unless a train step switches it with `model.train()`."""
    model = cfg.build(rngs)
    if getattr(cfg, "compressed", None):  # low-rank / int8 layers swapped in by path (fastserve.transforms)
        apply_structure(model, cfg.compressed, rngs=rngs)
    model.eval()
    return model


def __getattr__(name: str) -> Any:
    # `fs.models.Sequential` / `fs.models.load_model`: the Keras-style face (fastserve/keras/), resolved through the
    # registry because it trains on the core, which imports this package (see registry.KERAS_FACE)
    from fastserve import registry
    if name in registry.KERAS_FACE:
        return registry.resolve(registry.KERAS_FACE[name])
    raise AttributeError(f"module 'fastserve.models' has no attribute {name!r}")


__all__ = ["DecoderConfig", "DecoderLM", "LowRankLinear", "QuantizedLinear", "Sequential", "apply_structure",
           "build_model", "count_flops_per_token", "load_model"]

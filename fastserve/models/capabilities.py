"""What a model can do, asked by inference, export and serving instead of its family's name.

- `CausalLM`: next-token logits with a KV cache (`init_cache`, `__call__(tokens, positions, cache)`): prefill,
  decode, generate, the serving engine.
- `Seq2Seq`: `encode` once, then `decode` target tokens against the encoder memory.
- forward: a config that says what inputs one batch of its model takes (`forward_inputs(batch)`); the model's
  `__call__(inputs, **named)` returns its outputs (class logits, embeddings): encoders, classifiers, CNNs.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
from flax import nnx


@runtime_checkable
class CausalLM(Protocol):
    def init_cache(self, batch: int, length: int, dtype: Any = None) -> Any: ...
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, cache: Any = None) -> tuple[jax.Array, Any]: ...


@runtime_checkable
class Seq2Seq(Protocol):
    def encode(self, src: jax.Array, src_mask: jax.Array, rngs: Any = None) -> jax.Array: ...
    def decode(self, tgt_in: jax.Array, memory: jax.Array, src_mask: jax.Array, rngs: Any = None) -> jax.Array: ...


@runtime_checkable
class ForwardConfig(Protocol):
    def forward_inputs(self, batch: Any) -> dict[str, jax.ShapeDtypeStruct]: ...


def capability(model_cfg: Any, model: nnx.Module) -> str:
    """"causal_lm" | "seq2seq" | "forward" | "" (nothing inference knows how to run)."""
    if isinstance(model, Seq2Seq):  # first: an encoder–decoder has a decoder KV cache (init_cache) too
        return "seq2seq"
    if isinstance(model, CausalLM):
        return "causal_lm"
    if isinstance(model_cfg, ForwardConfig):
        return "forward"
    return ""


def cache_spec(model: nnx.Module, batch: Any, length: int) -> Any:
    """The KV cache's shapes and dtypes for `batch` rows of `length` positions, as the model itself builds it."""
    return jax.eval_shape(lambda: model.init_cache(batch, length))

"""`model.name: ensemble` — N models (of possibly different sizes) sharing a tokenizer / label set, run as one model
whose output is log(mean_i softmax(logits_i)).

A pure model definition (registered in fastserve.registry): `members` holds each member's own `model` section, and
the ensemble's variables are theirs under `members.<i>.…`. What it can do is what its members can do:

- causal LMs: `init_cache` is the tuple of the members' caches and `__call__(tokens, positions, cache)` returns the
  averaged log-probabilities with the tuple of updated caches, so prefill / decode / generate, `fastserve.export`
  and the serving engine run it like a single model (their cache handling takes any pytree of [batch, seq, …]
  arrays);
- forward models (classifiers, encoders): `forward_inputs` is the first member's; `__call__` averages outputs.

Log-probabilities, so every loss and sampler that takes logits takes them unchanged (softmax of them is the
averaged distribution; argmax is the argmax of the mean probability).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def combine_logits(outputs: Sequence[jax.Array]) -> jax.Array:
    """log of the mean of the members' softmax distributions, in float32. Averaging probabilities and taking one log
    costs one exp per member element (a log-sum-exp of log-softmaxes costs two: about 1.9x slower on CPU, measured
    for 3 tiny members); the clamp at float32's smallest normal keeps a token every member underflows finite."""
    shapes = {tuple(o.shape) for o in outputs}
    if len(shapes) != 1:
        raise ValueError(f"the members' outputs have different shapes {sorted(shapes)}: an ensemble needs one "
                         "label set / vocabulary")
    mean = sum(jax.nn.softmax(o.astype(jnp.float32), axis=-1) for o in outputs) / len(outputs)
    return jnp.log(jnp.maximum(mean, jnp.finfo(jnp.float32).tiny))


@dataclass
class EnsembleConfig:
    """`model.name: ensemble` — the members' `model` sections; max_seq_len and vocab_size are derived from them
    (the shortest context; the one shared vocabulary)."""
    name: str = "ensemble"
    members: list[dict] = field(default_factory=list)  # each member's `model:` section (its name and fields)
    max_seq_len: int = 0           # 0: the smallest member's
    vocab_size: int = 0            # 0: the members' (they must agree)
    compressed: dict[str, dict] = field(default_factory=dict)  # unused: compress the members, then ensemble them

    def __post_init__(self):
        cfgs = self.member_configs() if self.members else []
        if cfgs and not self.max_seq_len:
            self.max_seq_len = min(int(getattr(c, "max_seq_len", 0) or 0) for c in cfgs)
        if cfgs and not self.vocab_size:
            self.vocab_size = int(getattr(cfgs[0], "vocab_size", 0) or 0)

    def member_configs(self) -> list[Any]:
        """Each member's model config dataclass (parsed and checked like a `model:` section)."""
        from fastserve.config import config_from_dict
        return [config_from_dict({"model": dict(m)}).model for m in self.members]

    def checks(self):
        if not self.members:
            yield "members", "an ensemble needs at least one member (each a `model:` section)"
            return
        for i, m in enumerate(self.members):
            if m.get("name") == "ensemble":
                yield "members", f"member {i} is itself an ensemble: list its members instead"
        vocabs = {int(getattr(c, "vocab_size", 0) or 0) for c in self.member_configs()}
        if len(vocabs) > 1:
            yield "members", f"the members' vocab_size differ ({sorted(vocabs)}): an ensemble needs one vocabulary"
        if self.compressed:
            yield "compressed", "compress the members, then ensemble them"

    def forward_inputs(self, batch: Any) -> dict[str, jax.ShapeDtypeStruct]:
        first = self.member_configs()[0]
        if not hasattr(first, "forward_inputs"):
            raise ValueError(f"the ensemble's members (model.name {first.name}) have no forward inputs")
        return first.forward_inputs(batch)

    def build(self, rngs: nnx.Rngs) -> nnx.Module:
        from fastserve.models import build_model
        members = [build_model(c, rngs) for c in self.member_configs()]
        return EnsembleLM(members) if all(hasattr(m, "init_cache") for m in members) else EnsembleForward(members)


class EnsembleForward(nnx.Module):
    """Forward members (classifiers, encoders): the same inputs to each, outputs averaged as probabilities."""

    def __init__(self, members: Sequence[nnx.Module]):
        self.members = nnx.List(list(members))

    def __call__(self, inputs: jax.Array, **named: Any) -> jax.Array:
        outs = [m(inputs, **named) for m in self.members]
        return combine_logits([o[0] if isinstance(o, tuple) else o for o in outs])


class EnsembleLM(EnsembleForward):
    """Causal-LM members, each with its own KV cache: the ensemble's cache is the tuple of theirs."""

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, cache: tuple | None = None,
                 segments: jax.Array | None = None, logits_at: jax.Array | None = None,
                 logits_rows: int | None = None) -> tuple[jax.Array, tuple | None]:
        named = {} if segments is None else {"segments": segments}  # training's packed documents only
        if logits_at is not None:   # inference: each member's logits at those positions only
            named["logits_at"] = logits_at
        if logits_rows is not None:  # serving: the first rows' logits only
            named["logits_rows"] = logits_rows
        outs = [m(tokens, positions, None if cache is None else c, **named)
                for m, c in zip(self.members, cache if cache is not None else [None] * len(self.members))]
        logits = combine_logits([o[0] for o in outs])
        return logits, (None if cache is None else tuple(o[1] for o in outs))

    def init_cache(self, batch: int, length: int, dtype: Any = None) -> tuple:
        """Every member's zeroed cache, in member order."""
        return tuple(m.init_cache(batch, length, dtype) for m in self.members)

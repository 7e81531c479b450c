"""`train.task: lm` — next-token prediction on packed text, with sampled continuations at the end."""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from fastserve.checks import at_least
from fastserve.tasks.base import Task, weighted_mean


@dataclass
class LMConfig:
    name: str = "lm"
    samples: int = 3               # continuations of held-out openings printed at the end (0: none)
    sample_tokens: int = 48
    sample_temperature: float = 0.8

    def checks(self):
        yield from at_least(self, 0, "samples", "sample_tokens", "sample_temperature")

    def build(self) -> "LanguageModeling":
        return LanguageModeling(self)


def token_cross_entropy(logits: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Summed next-token cross-entropy and accuracy over the batch's weighted tokens.

    The accuracy reuses the row maximum that the log-sum-exp needs anyway: a token is correct when its target's
    logit is the maximum (a tie counts as correct). A separate `argmax` read the [B, T, vocab] logits once more,
    ~36 ms of a 2.9 s train step of the 23M decoder on the 2-core CPU (experiments/results/bench_train.md).
    """
    weights = batch["weights"].astype(jnp.float32)
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    shifted = logits - top                                                     # <= 0, and 0 at the maximum
    target = jnp.take_along_axis(shifted, batch["targets"][..., None], axis=-1)[..., 0]
    ce = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1)) - target
    correct = (target >= 0).astype(jnp.float32)
    return jnp.sum(ce * weights), {"weight": jnp.sum(weights), "correct": jnp.sum(correct * weights)}


def packed_documents(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The model's `positions` and `segments` when the batch carries them (`data.document_masking`)."""
    return {k: batch[k] for k in ("positions", "segments") if k in batch}


class LanguageModeling(Task):
    """Next-token prediction: batch = {inputs, targets, weights} of [B, T] (causal LM models)."""

    name = "lm"
    unit = "tokens"
    report = ("loss", "perplexity")
    batch_keys = ("inputs", "targets", "weights")

    def __init__(self, cfg: LMConfig | None = None):
        self.cfg = cfg or LMConfig()

    def loss(self, model, batch, rngs, task_state):
        logits, _ = model(batch["inputs"], **packed_documents(batch))
        loss_sum, sums = token_cross_entropy(logits, batch)
        return loss_sum, {**sums, "loss_sum": loss_sum}

    def summarize(self, sums):
        loss = weighted_mean(sums, "loss_sum")
        return {"loss": loss, "perplexity": math.exp(min(loss, 80.0)), "accuracy": weighted_mean(sums, "correct")}

    def units(self, batch):
        return int(batch["inputs"].size)

    def flops_per_unit(self, cfg):
        per_token = getattr(cfg.model, "flops_per_token", None)
        return per_token(cfg.data.seq_len) if per_token else None

    def after_training(self, graphdef, variables, data, mesh, cfg):
        if self.cfg.samples <= 0 or data.tokenizer is None:
            return {}
        samples = sample_continuations(graphdef, variables, data.tokenizer, data.eval_texts or ["The"], mesh,
                                       self.cfg.samples, self.cfg.sample_tokens, self.cfg.sample_temperature,
                                       cfg.train.seed)
        return {"samples": samples}


def sample_continuations(graphdef, variables, tokenizer, texts: list[str], mesh, n: int, max_new: int,
                         temperature: float, seed: int) -> list[tuple[str, str]]:
    """A few continuations of held-out text openings: a human-readable check of what the model learned."""
    from fastserve import parallel
    from fastserve.generation import decoding
    from fastserve.generation.program import model_program

    prompts = [p for p in (tokenizer.encode(t)[:12] for t in texts) if p][:n]
    if not prompts:
        return []
    if tokenizer.bos_id >= 0:
        prompts = [[tokenizer.bos_id] + p for p in prompts]
    tokens, lengths = decoding.pad_prompts(prompts, pad_id=max(tokenizer.pad_id, 0))
    b = len(prompts)
    stop = np.array([tokenizer.eos_id], np.int32)

    def run(model, tokens, lengths, rng):
        return decoding.generate(model, tokens, lengths, rng, max_new_tokens=max_new,
                                 temperature=jnp.full((b,), temperature), top_k=jnp.full((b,), 40, jnp.int32),
                                 top_p=jnp.full((b,), 0.95), stop_tokens=stop)

    rep = parallel.replicated(mesh)
    args = [jax.make_array_from_process_local_data(rep, x) for x in (tokens, lengths)]
    with jax.set_mesh(mesh):
        out, count = jax.device_get(model_program(graphdef, run)(variables, *args, jax.random.key(seed)))
    results = []
    for p, row, c in zip(prompts, out, count):
        p = [t for t in p if t != tokenizer.bos_id]
        results.append((tokenizer.decode(p), tokenizer.decode([int(t) for t in row[:c] if t != tokenizer.eos_id])))
    return results

"""`train.task: mlm` — BERT's masked-language-model pretraining, with optional next-sentence prediction.

Masking is dynamic and happens inside the step, on the device: each step draws its own positions from the step's
RNG stream (so every epoch masks the same text differently, and a resumed run draws the same masks as an
uninterrupted one). Of the real, non-special tokens, `mask_prob` are chosen; of those 80 % become [MASK], 10 % a
token drawn uniformly from the vocabulary and 10 % stay as they are (Devlin et al. 2019). Loss and accuracy count
the chosen positions only; `perplexity` is exp of the mean cross-entropy over them. Held-out batches (no RNG in
eval) are masked with the fixed key `eval_seed`, so every evaluation scores the same masked positions.

Batch: {inputs [B, T] int32, mask [B, T] bool (real tokens), maskable [B, T] bool (real and not [CLS] / [SEP] /
[PAD]: the positions masking may choose), mask_token [B] int32 (the [MASK] id, repeated per row so the batch
shards like any other)} and, with `nsp: true`, token_types [B, T] and nsp_labels [B] (0: the second segment
follows the first in the text, 1: it is a random one — Hugging Face's convention). The model (`model.head: mlm`)
returns logits [B, T, vocab] or, with `model.nsp: true`, (those, next-sentence logits [B, 2]).

With NSP the loss is Σ over chosen tokens of the MLM cross-entropy + Σ over examples of (chosen tokens in the
example) × its NSP cross-entropy: divided by the chosen-token count (the step's `weight`) that is BERT's mean MLM
loss plus a mean NSP loss, and it stays a sum that accumulates exactly over micro-batches and hosts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from fastserve.checks import at_least
from fastserve.tasks.base import Task, flops_per_token, real_tokens, weighted_mean

# how the chosen positions are corrupted: [MASK], a random token, unchanged (BERT's 80/10/10)
REPLACE_MASK, REPLACE_RANDOM = 0.8, 0.1


@dataclass
class MLMConfig:
    name: str = "mlm"
    mask_prob: float = 0.15        # fraction of the real, non-special tokens chosen as targets
    mask_token_prob: float = REPLACE_MASK     # of the chosen: replaced by [MASK]
    random_token_prob: float = REPLACE_RANDOM  # of the chosen: replaced by a random token (the rest stay)
    nsp: bool = False              # also next-sentence prediction (needs data.nsp and model.nsp)
    eval_seed: int = 0             # the fixed masking key of held-out batches

    def checks(self):
        for n in ("mask_prob", "mask_token_prob", "random_token_prob"):
            if not 0 <= getattr(self, n) <= 1:
                yield n, f"must be in [0, 1], got {getattr(self, n)}"
        if self.mask_prob == 0:
            yield "mask_prob", "must be > 0: with no masked tokens there is nothing to learn"
        if self.mask_token_prob + self.random_token_prob > 1:
            yield "random_token_prob", (f"mask_token_prob + random_token_prob must be <= 1, got "
                                        f"{self.mask_token_prob} + {self.random_token_prob}")
        yield from at_least(self, 0, "eval_seed")

    def build(self) -> "MaskedLM":
        return MaskedLM(self)


def choose_and_corrupt(key: jax.Array, inputs: jax.Array, maskable: jax.Array, mask_token: jax.Array,
                       vocab_size: int, mask_prob: float = 0.15, mask_token_prob: float = REPLACE_MASK,
                       random_token_prob: float = REPLACE_RANDOM) -> tuple[jax.Array, jax.Array]:
    """(corrupted inputs [B, T], chosen [B, T] bool): each maskable position is chosen with probability
    `mask_prob`; a chosen one becomes `mask_token` (per row, [B]) with probability `mask_token_prob`, a uniform
    random id below `vocab_size` with probability `random_token_prob`, and stays itself otherwise."""
    k_choose, k_how, k_token = jax.random.split(key, 3)
    chosen = maskable & (jax.random.uniform(k_choose, inputs.shape) < mask_prob)
    how = jax.random.uniform(k_how, inputs.shape)
    to_mask = chosen & (how < mask_token_prob)
    to_random = chosen & (how >= mask_token_prob) & (how < mask_token_prob + random_token_prob)
    random_ids = jax.random.randint(k_token, inputs.shape, 0, vocab_size, dtype=inputs.dtype)
    corrupted = jnp.where(to_mask, mask_token[:, None].astype(inputs.dtype), jnp.where(to_random, random_ids, inputs))
    return corrupted, chosen


class MaskedLM(Task):
    name = "mlm"
    unit = "tokens"
    report = ("loss", "perplexity", "accuracy")
    batch_keys = ("inputs", "mask", "maskable", "mask_token")

    def __init__(self, cfg: MLMConfig | None = None):
        self.cfg = cfg or MLMConfig()
        if self.cfg.nsp:
            self.report = ("loss", "perplexity", "accuracy", "nsp_accuracy")
            self.batch_keys = (*MaskedLM.batch_keys, "token_types", "nsp_labels")

    def configure(self, cfg):
        """Checks that the model has the masked-LM head (and NSP when asked) and the data gives pairs for NSP."""
        head = getattr(cfg.model, "head", None)
        if head is not None and head != "mlm":
            raise ValueError(f"train.task=mlm needs model.head: mlm (got {head!r})")
        if self.cfg.nsp != bool(getattr(cfg.model, "nsp", False)):
            raise ValueError(f"train.task.nsp={self.cfg.nsp} but model.nsp={getattr(cfg.model, 'nsp', False)}: "
                             "set both (the model's next-sentence head and the task's loss go together)")
        if self.cfg.nsp and not getattr(cfg.data, "nsp", False):
            raise ValueError("train.task.nsp=true needs sentence pairs from the data (data.nsp: true)")
        return cfg

    def loss(self, model, batch, rngs, task_state):
        inputs = batch["inputs"]
        key = jax.random.key(self.cfg.eval_seed) if rngs is None else rngs.dropout()
        corrupted, chosen = choose_and_corrupt(
            jax.random.fold_in(key, 0x6D6C6D), inputs, batch["maskable"].astype(bool), batch["mask_token"],
            vocab_size_of(model), self.cfg.mask_prob, self.cfg.mask_token_prob, self.cfg.random_token_prob)
        extra = {"token_types": batch["token_types"]} if "token_types" in batch else {}
        out = model(corrupted, mask=batch["mask"], rngs=rngs, **extra)
        logits, nsp_logits = out if isinstance(out, tuple) else (out, None)
        weights = chosen.astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), inputs)
        mlm_sum = jnp.sum(ce * weights)
        correct = (jnp.argmax(logits, axis=-1) == inputs).astype(jnp.float32)
        sums = {"mlm_loss_sum": mlm_sum, "weight": jnp.sum(weights), "correct": jnp.sum(correct * weights)}
        loss_sum = mlm_sum
        if self.cfg.nsp:
            if nsp_logits is None:
                raise ValueError("train.task.nsp=true but the model returns no next-sentence logits (model.nsp)")
            labels = batch["nsp_labels"]
            real = jnp.any(batch["mask"], axis=-1).astype(jnp.float32)   # padding rows of held-out batches count 0
            nsp_ce = optax.softmax_cross_entropy_with_integer_labels(nsp_logits.astype(jnp.float32), labels)
            loss_sum = loss_sum + jnp.sum(nsp_ce * jnp.sum(weights, axis=-1) * real)
            sums.update(nsp_loss_sum=jnp.sum(nsp_ce * real), nsp_weight=jnp.sum(real),
                        nsp_correct=jnp.sum((jnp.argmax(nsp_logits, axis=-1) == labels) * real))
        return loss_sum, {**sums, "loss_sum": loss_sum}

    def summarize(self, sums):
        mlm = weighted_mean(sums, "mlm_loss_sum")
        out = {"loss": weighted_mean(sums, "loss_sum"), "mlm_loss": mlm, "perplexity": math.exp(min(mlm, 80.0)),
               "accuracy": weighted_mean(sums, "correct"), "masked_tokens": float(sums["weight"])}
        if "nsp_weight" in sums:
            n = max(float(sums["nsp_weight"]), 1e-9)
            out.update(nsp_loss=float(sums["nsp_loss_sum"]) / n, nsp_accuracy=float(sums["nsp_correct"]) / n)
        return out

    def units(self, batch):
        """Real (unpadded) tokens."""
        return real_tokens(batch)

    def flops_per_unit(self, cfg):
        return flops_per_token(cfg)


def vocab_size_of(model) -> int:
    """The rows of the model's word-embedding table (the range random replacement tokens are drawn from)."""
    try:
        return int(model.embeddings.word.embedding.shape[0])
    except AttributeError:
        raise ValueError(f"train.task=mlm needs a model with word embeddings (model.embeddings.word); "
                         f"{type(model).__name__} has none") from None

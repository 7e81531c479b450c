"""`train.task: tag` — one label per word (token classification): cross-entropy over the labelled tokens, token
accuracy and, for BIO tag sets, exact-match span precision / recall / F1 (`fastserve.tasks.spans`).

Batch: {inputs [B, T] int32, mask [B, T] bool, labels [B, T] int32, weights [B, T] float32} (+ token_types):
`weights` is 1 on the tokens that carry a label — the first word piece of each word — and 0 on [CLS], [SEP],
padding and continuation pieces, whose labels (IGNORE_LABEL, -100) are never read. The tag vocabulary comes from
the data (`num_classes`); with `scheme: bio` its ids follow `spans.bio_tag_names` (0 = O, then B-/I- per type).
The model (`model.head: tag`) returns logits [B, T, num_classes].
"""
from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import optax

from fastserve.checks import one_of
from fastserve.tasks.base import Task, flops_per_token, real_tokens, weighted_mean
from fastserve.tasks.spans import span_counts, span_f1

SCHEMES = ("bio", "none")


@dataclass
class TagConfig:
    name: str = "tag"
    scheme: str = "bio"            # bio: also span F1 (class ids in spans.bio_tag_names order) | none: accuracy only

    def checks(self):
        yield from one_of(self, "scheme", SCHEMES, "tag scheme")

    def build(self) -> "Tagging":
        return Tagging(self)


class Tagging(Task):
    name = "tag"
    unit = "tokens"
    report = ("loss", "accuracy", "span_f1")
    batch_keys = ("inputs", "mask", "labels", "weights")

    def __init__(self, cfg: TagConfig | None = None):
        self.cfg = cfg or TagConfig()
        if self.cfg.scheme == "none":
            self.report = ("loss", "accuracy")

    def configure(self, cfg):
        head = getattr(cfg.model, "head", None)
        if head is not None and head != "tag":
            raise ValueError(f"train.task=tag needs model.head: tag (got {head!r})")
        return cfg

    def loss(self, model, batch, rngs, task_state):
        extra = {"token_types": batch["token_types"]} if "token_types" in batch else {}
        logits = model(batch["inputs"], mask=batch["mask"], rngs=rngs, **extra).astype(jnp.float32)
        weights = batch["weights"].astype(jnp.float32) * batch["mask"]
        labels = jnp.where(weights > 0, batch["labels"], 0)   # IGNORE_LABEL never indexes the logits
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        pred = jnp.argmax(logits, axis=-1)
        loss_sum = jnp.sum(ce * weights)
        sums = {"loss_sum": loss_sum, "weight": jnp.sum(weights), "correct": jnp.sum((pred == labels) * weights)}
        if self.cfg.scheme == "bio":
            correct, predicted, gold = span_counts(pred, labels, weights > 0)
            sums.update(spans_correct=correct, spans_predicted=predicted, spans_gold=gold)
        return loss_sum, sums

    def summarize(self, sums):
        out = {"loss": weighted_mean(sums, "loss_sum"), "accuracy": weighted_mean(sums, "correct")}
        if "spans_gold" in sums:
            p, r, f1 = span_f1(float(sums["spans_correct"]), float(sums["spans_predicted"]), float(sums["spans_gold"]))
            out.update(span_precision=p, span_recall=r, span_f1=f1)
        return out

    def units(self, batch):
        """Real (unpadded) tokens."""
        return real_tokens(batch)

    def flops_per_unit(self, cfg):
        return flops_per_token(cfg)

"""`train.task: seq2seq` — teacher-forced sequence-to-sequence training (encoder–decoder models).

Batch (every array [B, ...] padded to fixed lengths S and T):
  src          [B, S] int     source tokens
  src_mask     [B, S] bool    true on real source tokens (handed to the model: encoder and cross-attention masks)
  tgt_in       [B, T] int     decoder input: BOS + target[:-1] (teacher forcing)
  tgt_out      [B, T] int     what each decoder position predicts: target (ending in EOS)
  tgt_weights  [B, T] float   1 on real target tokens, 0 on padding: the loss and every metric count only these
  weights      [B] float      optional (held-out batches): 0 for padding examples, multiplied into tgt_weights
The model is called as `model(src, tgt_in, src_mask=..., rngs=...)` → logits [B, T, vocab].

Reported: loss (label-smoothed when `label_smoothing` > 0: the objective), perplexity (of the unsmoothed
cross-entropy), token accuracy, and exact match (examples whose every target token is predicted right, teacher-forced).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fastserve.tasks.base import Task, weighted_mean


@dataclass
class Seq2SeqTaskConfig:
    name: str = "seq2seq"
    label_smoothing: float = 0.0
    samples: int = 3               # greedy decodes of held-out sources printed at the end (0: none)
    # held-out BLEU / chrF (sacrebleu) at every evaluation, when the data has reference texts (Dataset.eval_texts):
    bleu: bool = True
    beam_size: int = 1             # decoding for those scores: 1 greedy, > 1 beam search
    length_penalty: float = 1.0    # beam scores: log-prob / length ** length_penalty

    def checks(self):
        if not 0 <= self.label_smoothing < 1:
            yield "label_smoothing", f"must be in [0, 1), got {self.label_smoothing}"
        if self.samples < 0:
            yield "samples", f"must be >= 0, got {self.samples}"
        if self.beam_size < 1:
            yield "beam_size", f"must be >= 1 (1: greedy), got {self.beam_size}"

    def build(self) -> "Seq2SeqTask":
        return Seq2SeqTask(self)


def token_weights(batch: dict[str, jax.Array]) -> jax.Array:
    """[B, T] float32: the target-token weights, zeroed for padding examples when the batch says which."""
    w = batch["tgt_weights"].astype(jnp.float32)
    if "weights" in batch:
        w = w * batch["weights"].astype(jnp.float32)[:, None]
    return w


class Seq2SeqTask(Task):
    name = "seq2seq"
    unit = "tokens"                # real target tokens
    report = ("loss", "perplexity", "accuracy", "exact_match", "bleu", "chrf")
    batch_keys = ("src", "src_mask", "tgt_in", "tgt_out", "tgt_weights")

    def __init__(self, cfg: Seq2SeqTaskConfig | None = None):
        self.cfg = cfg or Seq2SeqTaskConfig()

    def configure(self, cfg):
        if not hasattr(cfg.model, "max_target_len"):  # duck-typed: any encoder–decoder family's config
            raise ValueError(f"train.task=seq2seq needs an encoder–decoder model (model.name: seq2seq), "
                             f"got model.name={getattr(cfg.model, 'name', '?')}")
        return cfg

    def loss(self, model, batch, rngs, task_state):
        logits = model(batch["src"], batch["tgt_in"], src_mask=batch["src_mask"], rngs=rngs).astype(jnp.float32)
        labels = batch["tgt_out"]
        w = token_weights(batch)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        if self.cfg.label_smoothing > 0:
            target = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), self.cfg.label_smoothing)
            objective = optax.softmax_cross_entropy(logits, target)
        else:
            objective = nll
        correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32) * w
        has_tokens = jnp.sum(w, axis=1) > 0
        exact = has_tokens & (jnp.sum(correct, axis=1) == jnp.sum(w, axis=1))
        loss_sum = jnp.sum(objective * w)
        return loss_sum, {"loss_sum": loss_sum, "nll_sum": jnp.sum(nll * w), "weight": jnp.sum(w),
                          "correct": jnp.sum(correct), "exact": jnp.sum(exact.astype(jnp.float32)),
                          "sequences": jnp.sum(has_tokens.astype(jnp.float32))}

    def summarize(self, sums):
        nll = weighted_mean(sums, "nll_sum")
        return {"loss": weighted_mean(sums, "loss_sum"), "perplexity": math.exp(min(nll, 80.0)),
                "accuracy": weighted_mean(sums, "correct"),
                "exact_match": float(sums["exact"]) / max(float(sums["sequences"]), 1e-9)}

    def units(self, batch):
        w = np.asarray(batch["tgt_weights"], np.float32)
        if "weights" in batch:
            w = w * np.asarray(batch["weights"], np.float32)[:, None]
        return int(w.sum())

    def flops_per_unit(self, cfg):
        """FLOPs per real target token, at the padded lengths the model computes (the model's maxima), with the
        data's mean target length when it states one; else per padded target position. With length buckets
        (`data.length_buckets`) the padding varies by batch, so only the real tokens' work counts (an example at
        the data's mean lengths): MFU then measures useful FLOPs and can only understate."""
        per_example = getattr(cfg.model, "flops_per_example", None)
        if per_example is None or not cfg.model.max_target_len:
            return None
        tokens = getattr(cfg.data, "mean_target_tokens", lambda: cfg.model.max_target_len)()
        if getattr(cfg.data, "length_buckets", 0) and hasattr(cfg.data, "mean_source_tokens"):
            return per_example(cfg.data.mean_source_tokens(), tokens) / max(tokens, 1e-9)
        return per_example() / max(tokens, 1e-9)

    def heldout_extra(self, graphdef, variables, data, mesh, cfg):
        """Corpus BLEU and chrF of decoded held-out sources against their reference texts (`data.eval_texts`,
        aligned with the held-out examples); nothing when the data has no references or `bleu` is off."""
        tok = data.tokenizer
        if not self.cfg.bleu or not data.eval or not data.eval_texts or not hasattr(tok, "eos_id"):
            return {}
        from fastserve.generation.translation import DecodeSettings, corpus_scores, decode_batches

        settings = DecodeSettings(beam_size=self.cfg.beam_size, length_penalty=self.cfg.length_penalty)
        hyps = decode_batches(graphdef, variables, data.eval, mesh, tok, settings, data.eval[0]["tgt_out"].shape[1])
        return corpus_scores(hyps, data.eval_texts[:len(hyps)])

    def after_training(self, graphdef, variables, data, mesh, cfg):
        """Greedy decodes (no teacher forcing) of the first held-out batch: a few printed, and their exact match.
        Needs the data's vocabulary (`Dataset.tokenizer` with bos_id / eos_id / pad_id / decode)."""
        tok = data.tokenizer
        if self.cfg.samples <= 0 or not data.eval or not all(hasattr(tok, a) for a in ("bos_id", "eos_id", "pad_id")):
            return {}
        from jax.experimental import multihost_utils

        from fastserve import parallel
        from fastserve.generation.program import model_program

        batch = data.eval[0]
        max_len = batch["tgt_out"].shape[1]

        def run(model, src, src_mask):
            return model.generate(src, src_mask, max_len=max_len, bos_id=tok.bos_id, eos_id=tok.eos_id,
                                  pad_id=tok.pad_id)

        # this host's held-out slice, assembled into one global batch (sharded like training data), gathered back
        real = np.asarray(batch["weights"]) > 0 if "weights" in batch else np.ones(len(batch["src"]), bool)
        local = {"src": batch["src"], "src_mask": batch["src_mask"], "real": real,
                 "want": np.where(batch["tgt_weights"] > 0, batch["tgt_out"], tok.pad_id).astype(np.int32)}
        g = parallel.host_to_global(local, mesh)
        with jax.set_mesh(mesh):
            out = model_program(graphdef, run)(variables, g["src"], g["src_mask"])
        out, src, want, real = (np.asarray(multihost_utils.process_allgather(x, tiled=True))
                                for x in (out, g["src"], g["want"], g["real"]))
        exact = float(np.mean(np.all(out == want, axis=1)[real]))
        samples = [(tok.decode(src[i]), " → " + tok.decode(out[i])) for i in np.flatnonzero(real)[:self.cfg.samples]]
        if jax.process_index() == 0:
            print(f"greedy decoding of {int(real.sum())} held-out sources: exact match {exact:.4f}", flush=True)
        return {"samples": samples, "greedy_exact_match": exact}

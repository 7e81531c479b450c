"""`train.task: {name: distill, teacher: RUN}` — knowledge distillation from a trained teacher work dir.

loss = alpha · T² · KL(softmax(teacher / T) ‖ softmax(student / T)) + (1 − alpha) · CE(student, targets), summed over
tokens with the batch's weights. The teacher's variables are the task's `task_state` (a jit argument, sharded like
the teacher's own parameters on the run's mesh); its graphdef (structure only) is held by the task.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from fastserve.tasks.lm import LanguageModeling, LMConfig, packed_documents, token_cross_entropy
from fastserve.tasks.base import weighted_mean


@dataclass
class DistillConfig(LMConfig):
    name: str = "distill"
    teacher: str = ""              # the teacher's fastserve work dir (same tokenizer / vocabulary as the student)
    temperature: float = 2.0       # T: both distributions are softened by T; the KL term is scaled by T²
    alpha: float = 0.5             # loss = alpha · T² · KL(teacher ‖ student) + (1 − alpha) · CE(data)

    def checks(self):
        yield from super().checks()
        if not self.temperature > 0:
            yield "temperature", f"must be positive, got {self.temperature}"
        if not 0.0 <= self.alpha <= 1.0:
            yield "alpha", f"must be in [0, 1], got {self.alpha}"
        if not self.teacher:
            yield "teacher", "train.task=distill needs train.task.teacher (a trained fastserve work dir)"

    def build(self) -> "Distillation":
        return Distillation(self)


class Distillation(LanguageModeling):
    name = "distill"
    report = ("loss", "ce", "perplexity", "kl")

    def __init__(self, cfg: DistillConfig):
        super().__init__(cfg)
        self.teacher_graphdef = None

    def init_state(self, cfg, mesh):
        """The teacher's variables on `mesh`, checked against the student's vocabulary and tokenizer."""
        from fastserve.config import SourceConfig
        from fastserve.workdir import load_model

        teacher_cfg = dataclasses.replace(cfg, source=SourceConfig(kind="checkpoint", path=self.cfg.teacher))
        teacher = load_model(teacher_cfg, mesh=mesh)
        if teacher.model_cfg.vocab_size != cfg.model.vocab_size:
            raise ValueError(f"train.task.teacher {self.cfg.teacher}: vocabulary {teacher.model_cfg.vocab_size} "
                             f"differs from the student's model.vocab_size={cfg.model.vocab_size}")
        self.teacher_graphdef = teacher.graphdef
        return teacher.params, jax.tree.map(lambda x: x.sharding, teacher.params)

    def configure(self, cfg):
        """The student reads the teacher's tokenizer (the same vocabulary is what makes the KL meaningful): its
        sentencepiece model, or an imported model's byte-level BPE (tokenizer.bpe.json, e.g. SmolLM2 written by
        `compress`)."""
        from fastserve.workdir import BPE_TOKENIZER_FILE

        names = ("tokenizer.model", BPE_TOKENIZER_FILE)
        teacher_tok = next((os.path.join(self.cfg.teacher, n) for n in names
                            if os.path.isfile(os.path.join(self.cfg.teacher, n))), "")
        if not teacher_tok:
            raise ValueError(f"train.task.teacher {self.cfg.teacher}: no tokenizer.model or {BPE_TOKENIZER_FILE} "
                             f"there (a fastserve work dir trained on text, or written by compress, is needed)")
        if not cfg.tokenizer.path:
            return dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, path=teacher_tok))
        with open(teacher_tok, "rb") as a, open(cfg.tokenizer.path, "rb") as b:
            if a.read() != b.read():
                raise ValueError(f"train.task.teacher {self.cfg.teacher}: its tokenizer differs from tokenizer.path="
                                 f"{cfg.tokenizer.path} (leave tokenizer.path empty to use the teacher's)")
        return cfg

    def loss(self, model, batch, rngs, task_state):
        docs = packed_documents(batch)
        logits, _ = model(batch["inputs"], **docs)
        logits = logits.astype(jnp.float32)
        weights = batch["weights"].astype(jnp.float32)
        ce_sum, sums = token_cross_entropy(logits, batch)
        teacher_logits, _ = nnx.merge(self.teacher_graphdef, task_state)(batch["inputs"], **docs)
        teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
        t = self.cfg.temperature
        log_p = jax.nn.log_softmax(teacher_logits / t, axis=-1)
        log_q = jax.nn.log_softmax(logits / t, axis=-1)
        kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)          # per token, ≥ 0
        kl_sum = jnp.sum(kl * weights)
        agree = (jnp.argmax(teacher_logits, axis=-1) == jnp.argmax(logits, axis=-1)).astype(jnp.float32)
        loss_sum = self.cfg.alpha * t * t * kl_sum + (1.0 - self.cfg.alpha) * ce_sum
        return loss_sum, {**sums, "ce_sum": ce_sum, "loss_sum": loss_sum, "kl_sum": kl_sum,
                          "agree": jnp.sum(agree * weights)}

    def summarize(self, sums):
        ce = weighted_mean(sums, "ce_sum")
        return {"loss": weighted_mean(sums, "loss_sum"), "ce": ce, "perplexity": math.exp(min(ce, 80.0)),
                "accuracy": weighted_mean(sums, "correct"), "kl": weighted_mean(sums, "kl_sum"),
                "teacher_agreement": weighted_mean(sums, "agree")}

"""Offline inference for encoders (the sibling of runner.py's generation): sentence embeddings and class predictions
from a trained work dir or an imported BERT (`source`), batched and padded to length buckets.

Each text becomes `[CLS] pieces [SEP]`, truncated to `max_len` tokens (the [SEP] kept); token-id inputs are the
pieces of a text (wrapped the same way). Inputs are sorted by length so that each batch pads little, run at a fixed
batch size (one compile per bucket), and returned in the order given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fastserve.workdir import LoadedModel

# Every 8 tokens to 64, 16 to 128, 32 to 256, 64 to 512: a sorted batch pads to within ~15 % of its longest row.
# Buckets compile on first use only. 1,024 KJV verses (mean 37 tokens), batches of 32: 250 sentences/s against
# 187 with buckets 32 / 64 / 128 / 256 (same run, 2-core CPU; transformers, padding to the longest row: 270).
DEFAULT_BUCKETS = (16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def is_encoder(loaded: LoadedModel) -> bool:
    """A model with an encoder's head and a tokenizer that has [CLS] / [SEP]: what EncoderRunner can run."""
    tok = loaded.tokenizer
    return (getattr(loaded.model_cfg, "head", None) is not None and tok is not None
            and getattr(tok, "cls_id", -1) >= 0 and getattr(tok, "sep_id", -1) >= 0)


@dataclass
class Prediction:
    """One classified text: the most likely class and every class's probability."""
    label: int
    probs: list[float]


class EncoderRunner:
    """Embeddings (`embed`), class predictions (`classify`) and per-token tags (`tag`) of texts or token-id lists,
    with one compiled program per (function, bucket)."""

    def __init__(self, loaded: LoadedModel, batch_size: int = 32, buckets: Sequence[int] = DEFAULT_BUCKETS,
                 max_len: int = 0):
        if not is_encoder(loaded):
            raise ValueError(f"model.name '{loaded.model_cfg.name}' is not an encoder with a [CLS]/[SEP] tokenizer: "
                             "it has no embeddings or class predictions (generate text with fastserve.generate)")
        self.m = loaded
        self.cfg = loaded.model_cfg
        self.max_len = min(max_len or self.cfg.max_seq_len, self.cfg.max_seq_len)
        if self.max_len < 3:
            raise ValueError(f"max_len={self.max_len} leaves no room for text between [CLS] and [SEP]")
        self.buckets = sorted({min(b, self.max_len) for b in buckets} | {self.max_len})
        self.batch_size = batch_size
        self._compiled: dict[tuple[str, int], Any] = {}

    @property
    def tokenizer(self) -> Any:
        return self.m.tokenizer

    def wrap(self, item: str | Sequence[int]) -> list[int]:
        """`[CLS] pieces [SEP]` of a text or of its token ids, truncated to max_len."""
        tok = self.tokenizer
        ids = tok.encode(item) if isinstance(item, str) else [int(i) for i in item]
        return [tok.cls_id, *ids[:self.max_len - 2], tok.sep_id]

    def wrap_all(self, items: Sequence[str | Sequence[int]]) -> list[list[int]]:
        texts = [x for x in items if isinstance(x, str)]
        if len(texts) == len(items) and hasattr(self.tokenizer, "encode_batch"):   # parallel tokenization
            tok = self.tokenizer
            return [[tok.cls_id, *ids[:self.max_len - 2], tok.sep_id] for ids in tok.encode_batch(texts)]
        return [self.wrap(x) for x in items]

    def _program(self, kind: str, bucket: int) -> Any:
        key = (kind, bucket)
        if key not in self._compiled:
            graphdef = self.m.graphdef

            def run(variables, tokens, mask):
                model = nnx.merge(graphdef, variables)
                if kind == "embed":
                    return model.embed(tokens, mask, normalize=True)
                return model(tokens, mask=mask)
            self._compiled[key] = jax.jit(run)
        return self._compiled[key]

    def _run(self, kind: str, wrapped: list[list[int]]) -> list[np.ndarray]:
        """Outputs row by row, in the order of `wrapped`."""
        order = sorted(range(len(wrapped)), key=lambda i: len(wrapped[i]))
        out: list[np.ndarray | None] = [None] * len(wrapped)
        pad = max(self.tokenizer.pad_id, 0)
        b = self.batch_size
        for start in range(0, len(order), b):
            rows = order[start:start + b]
            longest = max(len(wrapped[i]) for i in rows)
            bucket = next(x for x in self.buckets if x >= longest)
            tokens = np.full((b, bucket), pad, np.int32)
            mask = np.zeros((b, bucket), bool)
            for r, i in enumerate(rows):
                tokens[r, :len(wrapped[i])] = wrapped[i]
                mask[r, :len(wrapped[i])] = True
            mask[len(rows):, 0] = True     # filler rows see one token: no all-padding row
            with jax.set_mesh(self.m.mesh):
                result = np.asarray(jax.device_get(self._program(kind, bucket)(self.m.params, jnp.asarray(tokens),
                                                                                 jnp.asarray(mask))))
            for r, i in enumerate(rows):
                out[i] = result[r]
        return out  # type: ignore[return-value]

    def embed(self, items: Sequence[str | Sequence[int]]) -> np.ndarray:
        """Mean-pooled, L2-normalized sentence embeddings [N, D] (float32), whatever the model's head."""
        return self.embed_wrapped(self.wrap_all(items))

    def embed_wrapped(self, wrapped: list[list[int]]) -> np.ndarray:
        """`embed` of inputs already wrapped in [CLS] … [SEP] (and at most max_len long)."""
        if not wrapped:
            return np.zeros((0, self.cfg.d_model), np.float32)
        return np.stack(self._run("embed", wrapped)).astype(np.float32)

    def classify(self, items: Sequence[str | Sequence[int]]) -> list[Prediction]:
        """The class of each text (a model with head classify)."""
        if self.cfg.head != "classify":
            raise ValueError(f"the model's head is {self.cfg.head}, not classify: it predicts no class per text")
        logits = self._run("call", self.wrap_all(items))
        probs = [np.exp(x - x.max()) / np.exp(x - x.max()).sum() for x in logits]
        return [Prediction(int(np.argmax(p)), [float(v) for v in p]) for p in probs]

    def tag(self, items: Sequence[str | Sequence[int]]) -> list[list[int]]:
        """The class of each piece of each text, [CLS] and [SEP] excluded (a model with head tag)."""
        if self.cfg.head != "tag":
            raise ValueError(f"the model's head is {self.cfg.head}, not tag: it predicts no class per token")
        wrapped = self.wrap_all(items)
        logits = self._run("call", wrapped)
        return [[int(c) for c in np.argmax(x[1:len(w) - 1], axis=-1)] for x, w in zip(logits, wrapped)]

    def infer(self, items: Sequence[str | Sequence[int]]) -> list[Any]:
        """What the head gives per text: embed → embedding (list of floats), classify → Prediction, tag → tags."""
        if self.cfg.head == "embed":
            return [row.tolist() for row in self.embed(items)]
        if self.cfg.head == "classify":
            return self.classify(items)
        if self.cfg.head == "tag":
            return self.tag(items)
        raise ValueError(f"head {self.cfg.head}: nothing to infer per text (embeddings: use `embed`)")


# --------------------------------------------------------------------------------------- config-driven entry points

def source_is_encoder(cfg: Any) -> bool:
    """Whether `cfg.source` holds an encoder, read from its config alone (nothing loaded): a work dir trained with
    model.name encoder, or a HF directory of model_type bert."""
    import os

    import yaml

    from fastserve.workdir import hf_model_type, resolve_path
    if cfg.source.kind == "hf":
        return hf_model_type(resolve_path(cfg.source.path)) == "bert"
    if cfg.source.kind != "checkpoint":
        return False
    workdir = cfg.source.path or cfg.train.workdir
    if os.path.basename(os.path.normpath(workdir)) == "checkpoints":
        workdir = os.path.dirname(os.path.normpath(workdir))
    path = os.path.join(workdir, "config.yaml")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        return (yaml.safe_load(f) or {}).get("model", {}).get("name") == "encoder"


def read_texts(cfg: Any, extra: Sequence[str] = ()) -> list[str]:
    """The texts to run: `extra` (--text), else `embed.texts`, plus the lines of `embed.texts_file`."""
    texts = list(extra) or list(cfg.embed.texts)
    if cfg.embed.texts_file:
        with open(cfg.embed.texts_file, encoding="utf-8") as f:
            texts += [line.rstrip("\n") for line in f if line.strip()]
    if not texts:
        raise ValueError("no texts: pass --text, set embed.texts, or embed.texts_file")
    return texts


def runner_from_config(cfg: Any) -> EncoderRunner:
    """Loads `cfg.source` and wraps it for `cfg.embed`'s batches, buckets and truncation."""
    from fastserve.workdir import load_model
    e = cfg.embed
    return EncoderRunner(load_model(cfg), e.batch_size, e.buckets, e.max_len)

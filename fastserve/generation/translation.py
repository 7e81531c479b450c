"""Translating with an encoder–decoder model: text in, text out, and corpus BLEU / chrF against references.

Shared by the seq2seq task (held-out scores during training and in `fastserve.evaluate`), `fastserve.translate`
and the translation benchmark. Decoding runs through fastserve.generation.seq2seq_decode inside the one jit
wrapper (model_program); each (model, decoding settings, batch shape) compiles once per process.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import jax
import numpy as np

from fastserve.data.packages import pypi_module


@dataclass(frozen=True)
class DecodeSettings:
    """How target tokens are chosen: beam search when `beam_size` > 1, else greedy (temperature 0) or sampling."""
    beam_size: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = True
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def describe(self) -> str:
        if self.beam_size > 1:
            return f"beam {self.beam_size} (length penalty {self.length_penalty})"
        return "greedy" if self.temperature <= 0 else f"sampling (temperature {self.temperature})"


_PROGRAMS: dict[tuple, Any] = {}


def decode_program(graphdef: Any, settings: DecodeSettings, max_len: int, bos_id: int, eos_id: int, pad_id: int):
    """The jitted `(variables, src, src_mask, rng) -> tokens [B, max_len]` for these settings (cached)."""
    from fastserve.generation.program import model_program
    from fastserve.generation.seq2seq_decode import translate_tokens

    key = (id(graphdef), settings, max_len, bos_id, eos_id, pad_id)
    if key not in _PROGRAMS:
        def run(model, src, src_mask, rng):
            return translate_tokens(model, src, src_mask, rng, max_len=max_len, bos_id=bos_id, eos_id=eos_id,
                                    pad_id=pad_id, **settings.__dict__)
        _PROGRAMS[key] = (graphdef, model_program(graphdef, run))   # graphdef kept: its id stays unique
    return _PROGRAMS[key][1]


def decode_batches(graphdef: Any, variables: Any, batches: Sequence[dict[str, np.ndarray]], mesh: Any, tok: Any,
                   settings: DecodeSettings, max_len: int, seed: int = 0) -> list[str]:
    """Translations (target text) of every real example of this host's `batches` (src, src_mask, optional
    `weights`), gathered across hosts, in global order."""
    from jax.experimental import multihost_utils

    from fastserve import parallel

    program = decode_program(graphdef, settings, max_len, tok.bos_id, tok.eos_id, tok.pad_id)
    rng = jax.random.key(seed)
    out: list[str] = []
    for batch in batches:
        real = np.asarray(batch["weights"]) > 0 if "weights" in batch else np.ones(len(batch["src"]), bool)
        g = parallel.host_to_global({"src": batch["src"], "src_mask": batch["src_mask"], "real": real}, mesh)
        rng, sub = jax.random.split(rng)
        with jax.set_mesh(mesh):
            tokens = program(variables, g["src"], g["src_mask"], sub)
        tokens, real = (np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in (tokens, g["real"]))
        out.extend(tok.decode(row) for row in tokens[real])
    return out


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu's standard 13a tokenization) and chrF, each 0-100."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} translations for {len(references)} references")
    sacrebleu = pypi_module("sacrebleu", "sacrebleu", "BLEU / chrF scores")
    return {"bleu": float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score),
            "chrf": float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score)}


def encode_sources(tok: Any, texts: Sequence[str], max_source_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(src, src_mask) [N, max_source_len] of source texts; an empty text or one longer than the model's
    source length (EOS included) is a ValueError naming it."""
    from fastserve.data.bible_pairs import pad_sources

    encode = getattr(tok, "encode_source", None) or tok.encode_batch
    ids = encode(list(texts))
    for i, (text, row) in enumerate(zip(texts, ids)):
        if not text.strip() or not row:
            raise ValueError(f"source sentence {i + 1} is empty")
        if len(row) + 1 > max_source_len:
            raise ValueError(f"source sentence {i + 1} is {len(row)} tokens (+ EOS), longer than the model's "
                             f"max_source_len={max_source_len}: split it or shorten it ({text[:60]!r}…)")
    return pad_sources(ids, max_source_len)


def translate_texts(graphdef: Any, variables: Any, mesh: Any, tok: Any, texts: Sequence[str], *,
                    max_source_len: int, max_len: int, settings: DecodeSettings, batch_size: int = 16,
                    seed: int = 0) -> list[str]:
    """Translations of `texts` in fixed-shape batches of `batch_size` (the last one padded; one compile)."""
    src, mask = encode_sources(tok, texts, max_source_len)
    n = len(texts)
    batches = []
    for start in range(0, n, batch_size):
        b_src = np.zeros((batch_size, max_source_len), np.int32)
        b_mask = np.zeros((batch_size, max_source_len), bool)
        chunk = slice(start, min(start + batch_size, n))
        b_src[:chunk.stop - start], b_mask[:chunk.stop - start] = src[chunk], mask[chunk]
        batches.append({"src": b_src, "src_mask": b_mask,
                        "weights": (np.arange(batch_size) < chunk.stop - start).astype(np.float32)})
    return decode_batches(graphdef, variables, batches, mesh, tok, settings, max_len, seed)

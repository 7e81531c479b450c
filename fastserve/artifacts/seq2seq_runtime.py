"""A loaded `seq2seq` export (fastserve/artifacts/seq2seq_export.py): translate text with the exported encoder and
whole-translation functions, without the model code (imports neither flax nor fastserve's models).

    t = load_exported("exports/translate_en_es")
    t.translate(["In the beginning God created the heaven and the earth."], beam=True)   # → ["En el principio …"]
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np


class ExportedTranslator:
    """The export's functions bound to its weights on one device. Sources are padded to the smallest exported
    bucket that holds the longest of a call, and the batch to the smallest fixed size (or run as is when the
    export has a symbolic batch)."""

    def __init__(self, directory: str, manifest: dict[str, Any], platform: str, device: jax.Device,
                 params: list[jax.Array], exported: dict[str, jax.export.Exported], tokenizer: Any,
                 source_tokenizer: Any):
        self.directory, self.manifest, self.platform, self.device = directory, manifest, platform, device
        self.params, self.exported = params, exported
        self.tokenizer, self.source_tokenizer = tokenizer, source_tokenizer
        tok = manifest["tokenizer"]
        self.bos_id, self.eos_id, self.pad_id = tok["bos_id"], tok["eos_id"], tok["pad_id"]
        self.buckets = sorted(manifest["buckets"])
        self._calls: dict[str, Any] = {}

    @property
    def functions(self) -> list[str]:
        return sorted(self.exported)

    def _pick(self, kind: str, n: int, length: int) -> tuple[str, int]:
        fitting = [t for t in self.buckets if t >= length]
        if not fitting:
            raise ValueError(f"a source of {length} tokens (EOS included) is longer than the longest exported "
                             f"source length ({self.buckets[-1]})")
        options = [(name, fn["batch"]) for name, fn in self.manifest["functions"].items()
                   if fn["kind"] == kind and fn["bucket"] == fitting[0]]
        if not options:
            raise ValueError(f"this export has no '{kind}' function (it has {', '.join(self.functions)})")
        for name, b in options:
            if isinstance(b, str):
                return name, n
        sizes = sorted((b, name) for name, b in options if b >= n)
        if not sizes:
            raise ValueError(f"{n} sentences is more than the largest exported batch; call in chunks")
        return sizes[0][1], sizes[0][0]

    def _run(self, kind: str, src: np.ndarray, mask: np.ndarray, *extra: Any) -> Any:
        n, length = src.shape[0], int(mask.sum(axis=1).max())
        name, batch = self._pick(kind, n, length)
        width = self.manifest["functions"][name]["bucket"]
        p_src = np.full((batch, width), self.pad_id, np.int32)
        p_mask = np.zeros((batch, width), bool)
        p_src[:n], p_mask[:n] = src[:, :width], mask[:, :width]
        fn = self._calls.get(name) or self._calls.setdefault(name, jax.jit(self.exported[name].call))
        with jax.default_device(self.device):
            out = fn(self.params, jax.device_put(p_src, self.device), jax.device_put(p_mask, self.device), *extra)
        return jax.tree.map(lambda x: np.asarray(x)[:n], out)

    def encode_sources(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(src, src_mask) [N, longest bucket]: pieces + EOS, padded; an empty or over-long text is a ValueError."""
        width = self.buckets[-1]
        src = np.full((len(texts), width), self.pad_id, np.int32)
        mask = np.zeros((len(texts), width), bool)
        for i, text in enumerate(texts):
            ids = list(self.source_tokenizer.encode(text))
            if not text.strip() or not ids:
                raise ValueError(f"source sentence {i + 1} is empty")
            if len(ids) + 1 > width:
                raise ValueError(f"source sentence {i + 1} is {len(ids)} tokens (+ EOS), longer than the export's "
                                 f"max source length {width}")
            src[i, :len(ids) + 1], mask[i, :len(ids) + 1] = ids + [self.eos_id], True
        return src, mask

    def translate_tokens(self, src: np.ndarray, src_mask: np.ndarray, beam: bool = False,
                         length_penalty: float = 1.0) -> np.ndarray:
        """Best target tokens [N, L] (through EOS, then pad): greedy, or the exported beam search."""
        if beam:
            tokens, _ = self._run("beam", src, src_mask, np.float32(length_penalty))
            return tokens[:, 0]
        return self._run("translate", src, src_mask)

    def translate(self, texts: Sequence[str], beam: bool = False, length_penalty: float = 1.0) -> list[str]:
        src, mask = self.encode_sources(texts)
        return [self.decode_text(row) for row in self.translate_tokens(src, mask, beam, length_penalty)]

    def decode_text(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.tokenizer.decode([i for i in ids if i not in (self.pad_id, self.bos_id)])

    def __repr__(self) -> str:
        return f"ExportedTranslator({self.directory!r}, platform={self.platform!r}, functions={self.functions})"

"""The engine's exported backend: the prefill / decode functions of a `python -m fastserve.export` directory
(`fastserve.artifacts.loader.load_exported`) run as the engine's three operations, without the model code.

  * prefill: the exported prefill of the bucket at batch 1, sampled in the same jit; its cache has max_cache_len
    positions, sliced to the bucket's length there so the KV pool inserts rows of the same lengths as in-process;
  * decode: the exported decode over every slot with the engine's masking (`programs.masked_decode`: an inactive
    row's position is max_cache_len, and the model's KV write is a scatter with mode="drop", traced into the
    export as it is, so that write is dropped exactly as in-process);
  * extend (recompute past the largest bucket, a long prompt's chunks): the export has no chunked forward, so it
    is a `lax.fori_loop` of exported decode steps at batch 1 on the slot's row, inside one jit, keeping the logits
    of the chunk's `last` token to sample from as prefill does.

The engine's shapes must be the export's: its buckets a subset of the exported ones and its max_cache_len the
export's (the cache is an argument of the exported decode, so its length is fixed). `served_model` gives the HTTP
server what it reads from a LoadedModel (tokenizer, chat template, stop ids).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp

from fastserve.serve.kv import extract_rows, insert_rows
from fastserve.serve.programs import masked_decode, sample_rows


class ExportedPrograms:
    """The engine's prefill / decode / extend over an ExportedModel's exported functions (one jit each, built by
    `check` once the engine's shapes are known)."""

    def __init__(self, exp: Any):
        self.exp = exp
        self.params = exp.params
        self.device = exp.device     # where the weights live: the engine's KV pool is placed there too
        self.max_len = exp.max_cache_len
        # the engine's KV pool holds the exported decode's cache argument (any pytree of [batch, seq, ...]) per slot
        self.cache_spec = exp.cache_spec(1)
        # what the engine's config checks read from a ModelConfig
        self.model_cfg = SimpleNamespace(max_seq_len=int(exp.max_seq_len), vocab_size=int(exp.manifest["vocab_size"]))
        self._prefill = self._decode = self._extend = None

    def serve_config(self, cfg: Any = None) -> Any:
        """`cfg` (a ServeConfig; None: the defaults) with max_cache_len 0 meaning the export's max_cache_len."""
        from fastserve.config import ServeConfig
        cfg = cfg or ServeConfig()
        return cfg if cfg.max_cache_len else replace(cfg, max_cache_len=self.exp.max_cache_len)

    def _function(self, kind: str, batch: int, bucket: int | None = None) -> jax.export.Exported:
        """The exported `kind` function (of `bucket`) that runs at `batch` rows: the symbolic-batch one or a fixed
        size equal to `batch`; a ValueError naming the missing function otherwise."""
        for name, fn in self.exp.manifest["functions"].items():
            symbolic_or_equal = isinstance(fn["batch"], str) or fn["batch"] == batch
            if fn["kind"] == kind and fn.get("bucket") == bucket and symbolic_or_equal:
                return self.exp.exported[name]
        what = f"{kind} function for bucket {bucket}" if bucket is not None else f"{kind} function"
        raise ValueError(f"the export at {self.exp.directory} has no {what} at batch {batch} (functions: "
                         f"{self.exp.functions}); re-export with a symbolic batch (no --batch-sizes) or one "
                         f"including {batch}")

    def check(self, max_len: int, buckets: list[int], slots: int) -> None:
        """Refuses engine shapes the export cannot run, then builds the jitted programs."""
        if max_len != self.exp.max_cache_len:
            raise ValueError(f"serve.max_cache_len={max_len} differs from the export's max_cache_len="
                             f"{self.exp.max_cache_len}: set serve.max_cache_len={self.exp.max_cache_len} (or 0), or "
                             f"re-export with --max-cache-len {max_len}")
        missing = [b for b in buckets if b not in self.exp.buckets]
        if missing:
            raise ValueError(f"serve.buckets={buckets}: {missing} not exported (the export's buckets: "
                             f"{list(self.exp.buckets)}); use a subset of them, or re-export with --buckets "
                             f"{','.join(map(str, buckets))}")
        prefills = {b: self._function("prefill", 1, b) for b in buckets}
        decode, decode1 = self._function("decode", slots), self._function("decode", 1)

        def prefill(params, tokens, lengths, ints, floats):
            logits, cache = prefills[tokens.shape[1]].call(params, tokens, lengths)
            # the exported cache holds max_cache_len positions; the pool takes rows of the bucket's length
            rows = jax.tree.map(lambda c: c[:, :tokens.shape[1]], cache)
            return sample_rows(logits, ints[0], ints[1], floats[0], ints[2], floats[1]), rows

        def decode_all(params, cache, ints, floats):
            step = lambda t, p, c: decode.call(params, t, p, c)  # noqa: E731
            return masked_decode(step, self.max_len, cache, ints, floats)

        def extend(params, cache, slot, tokens, start, last, ints, floats):
            row = extract_rows(cache, slot, self.max_len)

            def step(i, row):   # token i at position start + i; past max_cache_len the write is dropped
                tok = jax.lax.dynamic_index_in_dim(tokens, i, axis=1, keepdims=False)
                return decode1.call(params, tok, (start + i)[None], row)

            def one(i, carry):
                row, kept = carry
                logits, row = step(i, row)
                return row, jnp.where(i == last, logits.astype(kept.dtype), kept)

            shape = jax.eval_shape(step, 0, row)[0]
            carry = (row, jnp.zeros(shape.shape, shape.dtype))
            row, logits = jax.lax.fori_loop(0, tokens.shape[1], one, carry)
            return sample_rows(logits, ints[0], ints[1], floats[0], ints[2], floats[1]), insert_rows(cache, row, slot)

        self._prefill = jax.jit(prefill)
        self._decode = jax.jit(decode_all, donate_argnums=1)
        self._extend = jax.jit(extend, donate_argnums=1)

    def prefill(self, tokens: Any, lengths: Any, ints: Any, floats: Any) -> tuple[jax.Array, Any]:
        """tokens [1, T] (T an exported bucket) → (sampled first token [1], the cache's rows [1, T, ...])."""
        return self._prefill(self.params, tokens, lengths, ints, floats)

    def decode(self, cache: Any, ints: Any, floats: Any) -> tuple[jax.Array, Any]:
        """One masked decode step over every slot (the cache is donated)."""
        return self._decode(self.params, cache, ints, floats)

    def extend(self, cache: Any, slot: Any, tokens: Any, start: Any, last: Any, ints: Any, floats: Any
               ) -> tuple[jax.Array, Any]:
        """Writes the KV of tokens [1, T] at positions start.. into `slot` (the cache is donated) → (the token
        sampled from the logits of tokens[0, last] with ints [3, 1] / floats [2, 1] as in prefill, the cache)."""
        return self._extend(self.params, cache, slot, tokens, start, last, ints, floats)


@dataclass
class ServedModel:
    """What the HTTP server reads from a LoadedModel, for an export."""
    tokenizer: Any
    chat_template: str | None
    stop_ids: list[int]


def served_model(exp: Any) -> ServedModel:
    """The export's tokenizer as the server uses it (bos_id / eos_id / pad_id / add_bos attributes: a raw
    SentencePieceProcessor has methods instead, so it is wrapped in fastserve's Tokenizer), chat template, stop ids."""
    tok = exp.tokenizer
    if exp.manifest["tokenizer"].get("kind", "sentencepiece") == "sentencepiece":
        from fastserve.data.tokenizer import Tokenizer
        tok = Tokenizer(tok)
    return ServedModel(tok, exp.chat_template, list(exp.stop_ids))

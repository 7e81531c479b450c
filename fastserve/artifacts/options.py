"""What an export writes: its options (checked before any tracing) and the kinds of serving function."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
LM_FUNCTIONS = ("prefill", "decode", "generate")   # causal LMs
FUNCTION_KINDS = (*LM_FUNCTIONS, "forward")        # forward: encoders, classifiers, CNNs
FUNCTION_DOCS = {
    "prefill": "right-padded prompts and their true lengths -> logits after each row's last prompt token, and a "
               "fresh KV cache of max_cache_len positions holding the prompt",
    "decode": "one token per row at its absolute position -> next-token logits and the updated KV cache",
    "generate": "prefill + a while_loop of sampled decode steps; per-row temperature (0: greedy), top_k (0: off), "
                "top_p (1: off), max_new (capped by max_new_tokens and max_seq_len - length); stop_tokens padded "
                "with -1; tokens after a row ends are -1, counts include the stop token",
    "forward": "one batch of the model's inputs (manifest.inputs) -> its outputs (class logits, embeddings), "
               "eval mode",
}


class ExportError(ValueError):
    """Export options, parameters or a checkpoint that cannot be exported as asked."""


@dataclass(frozen=True)
class ExportOptions:
    """What gets exported. Empty batch-size tuples mean a symbolic batch dimension (any size)."""

    platforms: tuple[str, ...] = ("cpu", "cuda", "tpu")
    buckets: tuple[int, ...] = (32, 64, 128, 256)   # prompt lengths; those above max_cache_len are dropped
    batch_sizes: tuple[int, ...] = ()               # prefill/decode: () → symbolic "b"; else one export per size
    generate_batch_sizes: tuple[int, ...] = ()      # generate: () → symbolic "b"; else one export per size
    max_cache_len: int = 0                          # KV positions of prefill/decode caches; 0 → model.max_seq_len
    max_new_tokens: int = 128                       # length of the generate loop (callers may ask for fewer per row)
    max_stop_tokens: int = 4                        # stop-token slots of generate (padded with -1)
    functions: tuple[str, ...] = ()                # a subset of FUNCTION_KINDS; (): all the model can do

    def resolve(self, model_cfg: Any, capability: str = "causal_lm") -> ExportOptions:
        """Checks every field and returns the options with defaults filled in and buckets capped. `capability`
        (fastserve.models.capabilities) decides which kinds of function the model has: prefill / decode /
        generate for a causal LM, forward for encoders, classifiers and CNNs."""
        platforms = tuple(dict.fromkeys(p.strip().lower() for p in self.platforms if p.strip()))
        if not platforms:
            raise ExportError("export.platforms: at least one platform is required")
        bad = [p for p in platforms if p not in KNOWN_PLATFORMS]
        if bad:
            raise ExportError(f"export.platforms: unknown platform(s) {bad} (choose from {', '.join(KNOWN_PLATFORMS)})")
        possible = {"causal_lm": LM_FUNCTIONS, "forward": ("forward",),
                    "seq2seq": ("encode", "translate", "beam")}.get(capability, ())  # artifacts/seq2seq_export.py
        if not possible:
            raise ExportError(f"model.name '{model_cfg.name}': this model has no serving function to export "
                              f"(exports cover causal LMs, encoder–decoders and forward models: encoders, "
                              f"classifiers, CNNs)")
        functions = tuple(dict.fromkeys(self.functions or possible))
        bad = [f for f in functions if f not in possible]
        if bad:
            raise ExportError(f"export.functions: {bad} (model.name '{model_cfg.name}' can export "
                              f"{', '.join(possible)})")
        if capability in ("forward", "seq2seq"):
            if any(not isinstance(v, (int, np.integer)) or v <= 0 for v in (*self.buckets, *self.batch_sizes)):
                raise ExportError("export.buckets and export.batch_sizes: every entry must be a positive integer")
            return dataclasses.replace(self, platforms=platforms, functions=functions,
                                       batch_sizes=tuple(sorted({int(b) for b in self.batch_sizes})))
        max_cache = self.max_cache_len or model_cfg.max_seq_len
        if max_cache <= 0:
            raise ExportError(f"export.max_cache_len={self.max_cache_len}: must be positive (or 0 for model.max_seq_len)")
        if max_cache > model_cfg.max_seq_len:
            raise ExportError(f"export.max_cache_len={max_cache} exceeds model.max_seq_len={model_cfg.max_seq_len}")
        for name in ("buckets", "batch_sizes", "generate_batch_sizes"):
            vals = getattr(self, name)
            if any((not isinstance(v, (int, np.integer))) or isinstance(v, bool) or v <= 0 for v in vals):
                raise ExportError(f"export.{name}={list(vals)}: every entry must be a positive integer")
        buckets = tuple(sorted({int(b) for b in self.buckets if b <= max_cache}))
        if not buckets:
            raise ExportError(f"export.buckets={list(self.buckets)}: none fits max_cache_len={max_cache} "
                              f"(model.max_seq_len={model_cfg.max_seq_len})")
        if self.max_new_tokens <= 0:
            raise ExportError(f"export.max_new_tokens={self.max_new_tokens}: must be positive")
        if self.max_stop_tokens <= 0:
            raise ExportError(f"export.max_stop_tokens={self.max_stop_tokens}: must be positive")
        return dataclasses.replace(
            self, platforms=platforms, functions=functions, max_cache_len=max_cache, buckets=buckets,
            batch_sizes=tuple(sorted({int(b) for b in self.batch_sizes})),
            generate_batch_sizes=tuple(sorted({int(b) for b in self.generate_batch_sizes})))

"""Offline inference: load weights from a source (a trained work dir, a GGUF file, a HF Llama directory) and generate.

Prompts are batched to a fixed batch size and padded to length buckets, so each (bucket, max_new_tokens) compiles once.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from fastserve import cli
from fastserve.config import Config
from fastserve.generation import decoding as infer
from fastserve.generation.decoding import SamplingParams
from fastserve.generation.program import model_program
from fastserve.models.capabilities import capability
from fastserve.workdir import LoadedModel, load_model


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str          # "stop" (a stop token) or "length" (max_new_tokens)

class Generator:
    """Batched, bucketed generation with one compiled program per (bucket, max_new_tokens)."""

    def __init__(self, loaded: LoadedModel, batch_size: int = 8, buckets: Sequence[int] = (32, 64, 128, 256, 512)):
        model = nnx.merge(loaded.graphdef, loaded.params)
        if capability(loaded.model_cfg, model) != "causal_lm" or loaded.tokenizer is None:
            raise ValueError(f"model.name '{loaded.model_cfg.name}' is not a causal language model with a tokenizer: "
                             "it cannot generate text (export it for its forward function instead)")
        self.m = loaded
        self.batch_size = batch_size
        self.buckets = sorted(b for b in buckets if b <= loaded.model_cfg.max_seq_len) or [loaded.model_cfg.max_seq_len]
        self._compiled: dict[tuple[int, int], Any] = {}

    def _program(self, max_new: int):
        graphdef = self.m.graphdef

        def run(model, tokens, lengths, rng, temperature, top_k, top_p, stop, row_max):
            return infer.generate(model, tokens, lengths, rng, max_new_tokens=max_new, temperature=temperature,
                                  top_k=top_k, top_p=top_p, stop_tokens=stop, row_max_new=row_max)
        return model_program(graphdef, run)

    def encode_prompt(self, prompt: str, chat: bool = False) -> list[int]:
        tok = self.m.tokenizer
        if chat:
            if not self.m.chat_template:
                raise ValueError("generate.chat is set but this model has no chat template")
            return tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}]))
        ids = tok.encode(prompt)
        return [tok.bos_id] + ids if tok.bos_id >= 0 and getattr(tok, "add_bos", True) else ids

    def __call__(self, prompts: Sequence[str], sampling: infer.SamplingParams, chat: bool = False) -> list[Completion]:
        encoded = [self.encode_prompt(p, chat) for p in prompts]
        limit = self.m.model_cfg.max_seq_len
        for i, ids in enumerate(encoded):
            if len(ids) + sampling.max_new_tokens > limit:
                raise ValueError(f"prompt {i} has {len(ids)} tokens; with max_new_tokens={sampling.max_new_tokens} "
                                 f"that exceeds the model's max_seq_len={limit}")
        out: list[Completion] = []
        for start in range(0, len(encoded), self.batch_size):
            out.extend(self._batch(encoded[start:start + self.batch_size], sampling, start))
        return out

    def _batch(self, group: list[list[int]], s: infer.SamplingParams, offset: int) -> list[Completion]:
        b, n = self.batch_size, len(group)
        padded = group + [[0]] * (b - n)          # filler rows generate nothing (row_max_new = 0)
        tokens, lengths = infer.pad_prompts(padded, self.buckets, pad_id=max(self.m.tokenizer.pad_id, 0))
        key = (tokens.shape[1], s.max_new_tokens)
        if key not in self._compiled:
            self._compiled[key] = self._program(s.max_new_tokens)
        row_max = np.array([s.max_new_tokens] * n + [0] * (b - n), np.int32)
        stop = np.array(self.m.stop_ids, np.int32)
        with jax.set_mesh(self.m.mesh):
            toks, counts = jax.device_get(self._compiled[key](
                self.m.params, tokens, lengths, jax.random.key(s.seed + offset), np.full(b, s.temperature, np.float32),
                np.full(b, s.top_k, np.int32), np.full(b, s.top_p, np.float32), stop, row_max))
        results = []
        for row in range(n):
            ids = [int(t) for t in toks[row, :counts[row]]]
            stopped = bool(ids) and ids[-1] in self.m.stop_ids
            text_ids = ids[:-1] if stopped else ids
            results.append(Completion(self.m.tokenizer.decode(text_ids), ids, "stop" if stopped else "length"))
        return results

def read_prompts(cfg: Config, extra: Sequence[str] = ()) -> list[str]:
    prompts = list(extra) or list(cfg.generate.prompts)
    if cfg.generate.prompts_file:
        with open(cfg.generate.prompts_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError("no prompts: pass --prompt, set generate.prompts, or generate.prompts_file")
    return prompts

def generate(cfg: Config, prompts: Sequence[str] | None = None) -> list[Completion]:
    """Loads `cfg.source` and completes `prompts` (default: those of the config) with `cfg.generate`'s sampling."""
    g = cfg.generate
    generator = Generator(load_model(cfg), g.batch_size, g.buckets)
    sampling = SamplingParams(g.temperature, g.top_k, g.top_p, g.max_new_tokens, g.seed)
    return generator(read_prompts(cfg, prompts or ()), sampling, chat=g.chat)

def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser("Generate text from a trained or imported model.")
    p.add_argument("--checkpoint", help="a fastserve work dir (or its checkpoints/ folder); sets source.path")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    args = p.parse_args(argv)
    overrides = list(args.overrides) + ([f"source.path={args.checkpoint}"] if args.checkpoint else [])
    cfg = cli.load_or_exit(args.config, overrides)
    cli.quiet_logs()
    try:
        completions = generate(cfg, args.prompt)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for prompt, c in zip(read_prompts(cfg, args.prompt), completions):
        print(f">>> {prompt}\n{c.text}\n[{len(c.tokens)} tokens, finish: {c.finish_reason}]\n", flush=True)
    return 0

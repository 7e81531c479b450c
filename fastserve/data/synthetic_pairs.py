"""`data.source: synthetic_pairs` — deterministic source/target token sequences for sequence-to-sequence tests.

Each source is `min_len..max_len` random content tokens; its target is the same tokens mapped through a fixed
permutation of the content vocabulary (drawn from `seed`), so the target is learnable but only by reading the
source through the encoder. Token ids: 0 pad, 1 BOS, 2 EOS, 3..vocab_size-1 content.

Every example, padded to fixed lengths (S = T = max_len + 1):
  src          [S] int32   content + EOS, then pad
  src_mask     [S] bool    true on real source tokens (EOS included)
  tgt_in       [T] int32   BOS + mapped content (the decoder input, teacher forcing), then pad
  tgt_out      [T] int32   mapped content + EOS (what each decoder position predicts), then pad
  tgt_weights  [T] float32 1 on real target tokens (EOS included), 0 on padding
Held-out batches also carry `weights` [B] (0 for the examples that pad the last batch; their `tgt_weights` and
`src_mask` are all zero too).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fastserve.checks import at_least, positive
from fastserve.data.dataset import Dataset, ExampleBatches, padded_eval_batches

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
N_SPECIAL = 3


@dataclass
class SyntheticPairsConfig:
    source: str = "synthetic_pairs"
    vocab_size: int = 32           # special ids included (3 of them): 29 content tokens by default
    min_len: int = 3               # content tokens per source (EOS not counted)
    max_len: int = 10
    train_examples: int = 4096
    eval_examples: int = 256
    batch_size: int = 32           # global batch (pairs per optimizer step, all hosts together)
    seed: int = 0                  # the examples and the token mapping
    shuffle: bool = True

    def checks(self):
        if self.vocab_size < N_SPECIAL + 2:
            yield "vocab_size", f"must be at least {N_SPECIAL + 2} (3 special ids + 2 content tokens), got {self.vocab_size}"
        yield from positive(self, "min_len", "train_examples", "batch_size")
        if self.max_len < self.min_len:
            yield "max_len", f"must be >= data.min_len={self.min_len}, got {self.max_len}"
        yield from at_least(self, 0, "eval_examples")
        if 0 < self.train_examples < self.batch_size:
            yield "train_examples", f"must be at least data.batch_size={self.batch_size}, got {self.train_examples}"

    def mean_target_tokens(self) -> float:
        """Expected real target tokens per example (content + EOS): what FLOPs per target token divide by."""
        return (self.min_len + self.max_len) / 2 + 1

    def load(self, cfg: Any) -> Dataset:
        import jax

        pi, pc = jax.process_index(), jax.process_count()
        train = make_pairs(self, self.train_examples, split=0)
        held_out = make_pairs(self, self.eval_examples, split=1)
        batches = ExampleBatches(train, self.batch_size, cfg.train.seed, self.shuffle, pi, pc, what="training pairs",
                                 hint="raise data.train_examples or lower data.batch_size")
        eval_batches = heldout_batches(held_out, self.batch_size, pi, pc) if self.eval_examples else []
        if cfg.train.eval_batches > 0:
            eval_batches = eval_batches[:cfg.train.eval_batches]
        length = self.max_len + 1
        return Dataset(batches, eval_batches, self.train_examples, self.eval_examples,
                       f"{self.train_examples} train / {self.eval_examples} held-out pairs of {self.min_len}-"
                       f"{self.max_len} tokens (+EOS), vocabulary {self.vocab_size}",
                       model_fields={"vocab_size": self.vocab_size, "max_source_len": length,
                                     "max_target_len": length},
                       tokenizer=PairVocab(self.vocab_size))


@dataclass(frozen=True)
class PairVocab:
    """The ids a decoder needs (what `Dataset.tokenizer` offers for text): BOS, EOS, pad; tokens print as numbers."""
    vocab_size: int
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    pad_id: int = PAD_ID

    def decode(self, ids) -> str:
        return " ".join(str(int(t)) for t in ids if int(t) not in (self.bos_id, self.eos_id, self.pad_id))


def token_map(cfg: SyntheticPairsConfig) -> np.ndarray:
    """[vocab_size] int32: the fixed mapping of source tokens to target tokens (special ids map to themselves)."""
    content = np.arange(N_SPECIAL, cfg.vocab_size)
    rng = np.random.default_rng([cfg.seed, 7])
    return np.concatenate([np.arange(N_SPECIAL), rng.permutation(content)]).astype(np.int32)


def make_pairs(cfg: SyntheticPairsConfig, n: int, split: int) -> dict[str, np.ndarray]:
    """`n` padded examples of one split (0: train, 1: held-out; independent streams of the same seed)."""
    rng = np.random.default_rng([cfg.seed, split])
    length = cfg.max_len + 1
    lengths = rng.integers(cfg.min_len, cfg.max_len + 1, n)
    content = rng.integers(N_SPECIAL, cfg.vocab_size, (n, cfg.max_len)).astype(np.int32)
    pos = np.arange(length)[None, :]
    real = pos < lengths[:, None]                        # content positions
    src = np.full((n, length), PAD_ID, np.int32)
    src[:, :cfg.max_len] = np.where(real[:, :cfg.max_len], content, PAD_ID)
    src[np.arange(n), lengths] = EOS_ID
    mapped = np.where(src >= N_SPECIAL, token_map(cfg)[src], src)
    tgt_out = mapped                                      # mapped content + EOS, then pad
    tgt_in = np.full((n, length), PAD_ID, np.int32)
    tgt_in[:, 0] = BOS_ID
    tgt_in[:, 1:] = np.where(pos[:, 1:] <= lengths[:, None], tgt_out[:, :-1], PAD_ID)
    valid = pos <= lengths[:, None]                       # content + EOS
    return {"src": src, "src_mask": valid.copy(), "tgt_in": tgt_in, "tgt_out": tgt_out,
            "tgt_weights": valid.astype(np.float32)}


def heldout_batches(examples: dict[str, np.ndarray], global_batch: int, process_index: int = 0,
                    process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Every held-out pair once, in fixed-shape batches; padding examples weigh 0 per example and per token."""
    batches = padded_eval_batches(examples, global_batch, process_index, process_count)
    for b in batches:
        b["tgt_weights"] = b["tgt_weights"] * b["weights"][:, None]
        b["src_mask"] = b["src_mask"] & (b["weights"][:, None] > 0)
    return batches

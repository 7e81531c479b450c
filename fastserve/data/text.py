"""Text for language modeling (`data.source: pydoc | text`): documents → held-out split → tokenizer (trained once,
cached in the work dir) → packed rows → resumable batches of {inputs, targets, weights}."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastserve.checks import fraction, positive
from fastserve.data.corpus import load_texts, split_documents
from fastserve.data.dataset import Dataset
from fastserve.data.lm import LMBatches, eval_batches, pack_documents
from fastserve.data.tokenizer import Tokenizer, load_or_train_tokenizer


@dataclass
class TextDataConfig:
    """`data.source: pydoc` (CPython's embedded docs, no download) or `text` (UTF-8 files in `paths`, globs ok)."""
    source: str = "pydoc"
    paths: list[str] = field(default_factory=list)
    seq_len: int = 128
    batch_size: int = 16           # global batch (sequences per optimizer step, all hosts together)
    eval_fraction: float = 0.1     # documents held out for evaluation
    shuffle: bool = True
    # packed documents attend only within themselves, positions restarting at each (segment ids in the batch);
    # off: a row is one stream, as GPT-2-style packing has it
    document_masking: bool = False

    def checks(self):
        yield from positive(self, "seq_len", "batch_size")
        yield from fraction(self, "eval_fraction")
        if self.source == "text" and not self.paths:
            yield "paths", "data.source=text needs at least one file or glob in data.paths"

    def load(self, cfg: Any) -> Dataset:
        return prepare_lm_data(cfg)


def prepare_lm_data(cfg: Any) -> Dataset:
    """Corpus → held-out split → tokenizer (trained once, cached in the work dir) → packed rows → iterators."""
    import jax

    from fastserve.workdir import BPE_TOKENIZER_FILE

    imported = os.path.join(cfg.train.workdir, BPE_TOKENIZER_FILE)
    if not cfg.tokenizer.path and os.path.isfile(imported):  # an imported model's work dir: its own vocabulary
        cfg = dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, path=imported))
    docs = load_texts(cfg.data.source, cfg.data.paths)
    train_docs, eval_docs = split_documents(docs, cfg.data.eval_fraction, cfg.train.seed)
    tok = tokenizer_once(cfg, train_docs)
    train_rows = pack_documents(train_docs, tok, cfg.data.seq_len)
    pi, pc = jax.process_index(), jax.process_count()
    eos = tok.eos_id if cfg.data.document_masking else -1
    batches = LMBatches(train_rows, cfg.data.batch_size, cfg.train.seed, cfg.data.shuffle, pi, pc, eos_id=eos)
    held_out, n_eval_rows = heldout_lm_batches(cfg, tok, eval_docs)
    return Dataset(batches, held_out, len(train_rows), n_eval_rows,
                   f"{len(train_rows)} train / {n_eval_rows} held-out sequences of {cfg.data.seq_len} tokens",
                   tokenizer=tok, eval_texts=eval_docs, model_fields={"vocab_size": tok.vocab_size})


def heldout_lm_batches(cfg: Any, tok: Any, eval_docs: list[str], max_batches: int = 0
                       ) -> tuple[list[dict[str, np.ndarray]], int]:
    """(this host's held-out batches of `eval_docs` packed to `data.seq_len` rows, the number of rows); at most
    `max_batches` or else `train.eval_batches` batches when either is > 0."""
    import jax

    if not eval_docs:
        return [], 0
    rows = pack_documents(eval_docs, tok, cfg.data.seq_len)
    eos = tok.eos_id if getattr(cfg.data, "document_masking", False) else -1
    batches = eval_batches(rows, cfg.data.batch_size, jax.process_index(), jax.process_count(), eos_id=eos)
    limit = max_batches or cfg.train.eval_batches
    return (batches[:limit] if limit > 0 else batches), len(rows)


def tokenizer_once(cfg: Any, texts: list[str]) -> Tokenizer:
    """Process 0 trains (or finds) the cached tokenizer first; the others then read that same file."""
    import jax

    ckpt_dir = os.path.join(cfg.train.workdir, "checkpoints")
    trained = os.path.isdir(ckpt_dir) and any(name.isdigit() for name in os.listdir(ckpt_dir))

    def load():
        return load_or_train_tokenizer(cfg.tokenizer.path, texts, cfg.tokenizer.vocab_size, cfg.tokenizer.model_type,
                                       cfg.train.workdir, trained=trained, specials=cfg.tokenizer.specials)
    if jax.process_count() == 1:
        return load()
    from jax.experimental import multihost_utils
    tok = load() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("fastserve.tokenizer")
    return tok if tok is not None else load()

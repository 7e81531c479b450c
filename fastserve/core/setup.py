"""Set-up shared by the CLIs (train, evaluate, generate): data, tokenizer, mesh, model state, checkpoints."""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from fastserve import parallel
from fastserve.core.checkpoint import Checkpointer
from fastserve.config import Config
from fastserve.core.optim import make_optimizer
from fastserve.core.state import abstract_train_state, create_train_state
from fastserve.data import LMBatches, Tokenizer, eval_batches, load_or_train_tokenizer, load_texts, pack_documents, split_documents

log = logging.getLogger(__name__)


@dataclass
class LMData:
    tokenizer: Tokenizer
    train: LMBatches
    eval: list[dict[str, np.ndarray]]
    train_rows: int
    eval_rows: int
    eval_texts: list[str]


def prepare_lm_data(cfg: Config) -> LMData:
    """Corpus → held-out split → tokenizer (trained once, cached in the work dir) → packed rows → iterators."""
    docs = load_texts(cfg.data.source, cfg.data.paths)
    train_docs, eval_docs = split_documents(docs, cfg.data.eval_fraction, cfg.train.seed)
    tok = _tokenizer_once(cfg, train_docs)
    train_rows = pack_documents(train_docs, tok, cfg.data.seq_len)
    pi, pc = jax.process_index(), jax.process_count()
    batches = LMBatches(train_rows, cfg.data.batch_size, cfg.train.seed, cfg.data.shuffle, pi, pc)
    held_out, n_eval_rows = heldout_lm_batches(cfg, tok, eval_docs)
    return LMData(tok, batches, held_out, len(train_rows), n_eval_rows, eval_docs)


def heldout_lm_batches(cfg: Config, tok: Any, eval_docs: list[str], max_batches: int = 0
                       ) -> tuple[list[dict[str, np.ndarray]], int]:
    """(this host's held-out batches of `eval_docs` packed to `data.seq_len` rows, the number of rows); at most
    `max_batches` or else `train.eval_batches` batches when either is > 0."""
    if not eval_docs:
        return [], 0
    rows = pack_documents(eval_docs, tok, cfg.data.seq_len)
    batches = eval_batches(rows, cfg.data.batch_size, jax.process_index(), jax.process_count())
    limit = max_batches or cfg.train.eval_batches
    return (batches[:limit] if limit > 0 else batches), len(rows)


def _tokenizer_once(cfg: Config, texts: list[str]) -> Tokenizer:
    """Process 0 trains (or finds) the cached tokenizer first; the others then read that same file."""
    def load():
        return load_or_train_tokenizer(cfg.tokenizer.path, texts, cfg.tokenizer.vocab_size, cfg.tokenizer.model_type,
                                       cfg.train.workdir)
    if jax.process_count() == 1:
        return load()
    from jax.experimental import multihost_utils
    tok = load() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("fastserve.tokenizer")
    return tok if tok is not None else load()


def with_vocab(cfg: Config, tokenizer: Tokenizer) -> Config:
    """Fills `model.vocab_size` from the tokenizer when the config leaves it at 0; checks it otherwise."""
    if cfg.model.vocab_size == 0:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size))
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} pieces")
    return cfg


@dataclass
class TrainSetup:
    mesh: Any
    tx: Any
    schedule: Any
    graphdef: Any
    state: dict
    shardings: Any
    checkpointer: Checkpointer
    start_step: int
    data_state: dict | None


def prepare_state(cfg: Config, restore: bool = True) -> TrainSetup:
    """Mesh, optimizer and a fresh sharded state; then the newest readable checkpoint of the work dir, if any."""
    mesh = parallel.make_mesh(cfg.mesh)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
    graphdef, state, shardings = create_train_state(cfg.model, tx, mesh, cfg.train.seed)
    ckpt = Checkpointer(os.path.join(cfg.train.workdir, "checkpoints"), cfg.checkpoint.max_to_keep,
                        cfg.checkpoint.async_save)
    start_step, data_state = 0, None
    if restore:
        restored = ckpt.restore_latest(abstract_train_state(state, shardings))
        if restored is not None:
            start_step, state, extra = restored
            data_state = extra.get("data")
            log.info("resumed from step %d of %s", start_step, ckpt.directory)
    return TrainSetup(mesh, tx, schedule, graphdef, state, shardings, ckpt, start_step, data_state)

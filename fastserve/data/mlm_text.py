"""`data.source: mlm_text` — offline English text cut into `[CLS] segment [SEP]` examples for masked-LM pretraining
(`train.task: mlm`), or `[CLS] A [SEP] B [SEP]` sentence pairs with next-sentence labels (`nsp: true`).

Corpora (`corpus`, any of fastserve.data.english_corpora.CORPORA: gcide, kjv, reviews) are lists of documents of
passages (paragraphs, verses, sentences). Whole documents are held out (`eval_fraction`, drawn with the run's
seed, per corpus). Within a document, consecutive passages are packed into segments of at most `seq_len` tokens
with the specials (a passage longer than that is cut into pieces); no segment spans two documents. The tokenizer
is the config's: a sentencepiece model with BERT specials (`tokenizer.specials: bert`) trained on the training
documents and cached in the work dir, or an imported WordPiece vocabulary (`tokenizer.kind: wordpiece`).

Batches are fastserve.data.encoder_text's (padded per batch to a length bucket, with `mask`), plus what the mlm task
draws its masks from: `maskable` (real tokens other than the specials: [CLS], [SEP], [PAD], [MASK], [UNK]) and
`mask_token` (the [MASK] id per row). With `nsp`, half of the pairs (drawn once, with the seed) get a second
segment from another document (label 1) instead of the text that follows (label 0), as BERT built its data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from fastserve.checks import fraction, positive
from fastserve.data.dataset import Batch, Dataset
from fastserve.data.encoder_text import EncodedTexts, TextBatches, heldout_text_batches, length_buckets, wrap
from fastserve.data.english_corpora import CORPORA, Document, load_corpus


@dataclass
class MLMTextConfig:
    source: str = "mlm_text"
    corpus: list[str] = field(default_factory=lambda: ["gcide"])   # any of gcide, kjv, reviews
    seq_len: int = 128             # tokens per example, [CLS] and [SEP]s included
    buckets: list[int] = field(default_factory=list)   # padded lengths; empty: 4 spread evenly up to seq_len
    batch_size: int = 32           # global batch
    eval_fraction: float = 0.02    # documents held out, per corpus
    eval_segments: int = 1024      # held-out examples evaluated (evenly spaced over the held-out ones); 0: all
    nsp: bool = False              # sentence pairs with next-sentence labels (50 % random second segments)
    shuffle: bool = True

    def checks(self):
        yield from positive(self, "seq_len", "batch_size")
        yield from fraction(self, "eval_fraction")
        if self.eval_segments < 0:
            yield "eval_segments", f"must be >= 0 (0: every held-out segment), got {self.eval_segments}"
        if not self.corpus:
            yield "corpus", f"name at least one corpus ({', '.join(CORPORA)})"
        unknown = [c for c in self.corpus if c not in CORPORA]
        if unknown:
            yield "corpus", f"unknown corpus {unknown[0]!r}; corpora: {', '.join(CORPORA)}"
        if self.seq_len < 8:
            yield "seq_len", f"must be at least 8 (room for the specials and some text), got {self.seq_len}"
        bad = [b for b in self.buckets if not 1 <= b <= self.seq_len]
        if bad or (self.buckets and max(self.buckets) != self.seq_len):
            yield "buckets", f"each bucket must be in [1, seq_len] and the largest seq_len={self.seq_len}, got {self.buckets}"

    def prepare(self) -> str:
        """Reads every corpus (naming the package to install when one is missing); says how much text there is."""
        parts = []
        for name in self.corpus:
            docs = load_corpus(name)
            chars = sum(len(p) for d in docs for p in d.passages)
            parts.append(f"{name}: {len(docs):,} documents, {sum(len(d.passages) for d in docs):,} passages, "
                         f"{chars / 1e6:.1f}M characters")
        return "mlm_text: " + "; ".join(parts)

    def load(self, cfg: Any) -> Dataset:
        return load_mlm_text(cfg)


def split_corpora(names: Sequence[str], eval_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """(train, held-out) documents: each corpus split by whole documents with `seed`."""
    from fastserve.data.corpus import split_documents

    train, held_out = [], []
    for name in names:
        docs = load_corpus(name)
        idx_train, idx_eval = split_documents(list(range(len(docs))), eval_fraction, seed)
        train += [docs[i] for i in idx_train]
        held_out += [docs[i] for i in idx_eval]
    return train, held_out


def pack_segments(passages_ids: Sequence[Sequence[int]], budget: int) -> list[list[list[int]]]:
    """Consecutive passages (token ids) grouped so that each group holds at most `budget` tokens; a passage longer
    than `budget` becomes groups of its own pieces. Each group is a list of passages (sentence boundaries kept)."""
    groups, current, size = [], [], 0
    for ids in passages_ids:
        ids = list(ids)
        pieces = [ids[i:i + budget] for i in range(0, len(ids), budget)] or []
        for piece in pieces:
            if current and size + len(piece) > budget:
                groups.append(current)
                current, size = [], 0
            current.append(piece)
            size += len(piece)
    if current:
        groups.append(current)
    return groups


def encode_documents(tok: Any, docs: Sequence[Document]) -> list[list[list[int]]]:
    """Token ids of every passage of every document (one batched tokenizer call)."""
    flat = [p for d in docs for p in d.passages]
    batch = getattr(tok, "encode_batch", None)
    ids = list(batch(flat)) if batch is not None else [tok.encode(p) for p in flat]
    out, start = [], 0
    for d in docs:
        out.append(ids[start:start + len(d.passages)])
        start += len(d.passages)
    return out


def single_segments(doc_ids: Sequence[Sequence[Sequence[int]]], tok: Any, seq_len: int) -> EncodedTexts:
    """`[CLS] segment [SEP]` for every packed segment of every document."""
    out = []
    for passages in doc_ids:
        for group in pack_segments(passages, seq_len - 2):
            out.append(wrap([t for p in group for t in p], None, tok.cls_id, tok.sep_id, seq_len)[0])
    return EncodedTexts(out)


def pair_segments(doc_ids: Sequence[Sequence[Sequence[int]]], tok: Any, seq_len: int, seed: int
                  ) -> tuple[EncodedTexts, np.ndarray]:
    """`[CLS] A [SEP] B [SEP]` pairs and next-sentence labels: each packed segment of ≥ 2 passages is split at a
    random passage boundary; with probability 1/2 its B is replaced by the start of a segment of another document
    (label 1), else B is the text that follows A (label 0). Segments of one passage are skipped."""
    rng = np.random.default_rng([seed, 0x4E5350])
    segments = [(d, g) for d, passages in enumerate(doc_ids) for g in pack_segments(passages, seq_len - 3)]
    ids, types, labels = [], [], []
    for d, group in segments:
        if len(group) < 2:
            continue
        cut = int(rng.integers(1, len(group)))
        a = [t for p in group[:cut] for t in p]
        b = [t for p in group[cut:] for t in p]
        label = int(rng.random() < 0.5) if len(doc_ids) > 1 else 0
        if label:
            other_doc, other = segments[int(rng.integers(len(segments)))]
            while other_doc == d:
                other_doc, other = segments[int(rng.integers(len(segments)))]
            b = [t for p in other for t in p][:max(len(b), 1)]
        x, tt = wrap(a, b, tok.cls_id, tok.sep_id, seq_len)
        ids.append(x)
        types.append(tt)
        labels.append(label)
    return EncodedTexts(ids, types), np.array(labels, np.int32)


def special_ids(tok: Any) -> list[int]:
    """The ids masking never chooses: [CLS], [SEP], [PAD], [MASK], [UNK] (those the vocabulary has)."""
    names = ("cls_id", "sep_id", "pad_id", "mask_id", "unk_id", "bos_id", "eos_id")
    return sorted({int(getattr(tok, n)) for n in names if getattr(tok, n, -1) is not None and getattr(tok, n, -1) >= 0})


def add_mlm_fields(batch: Batch, specials: Sequence[int], mask_id: int) -> Batch:
    """The batch with `maskable` (real, non-special tokens) and `mask_token` (the [MASK] id per row); a pair
    batch's example labels become `nsp_labels`."""
    out = dict(batch)
    out["maskable"] = batch["mask"] & ~np.isin(batch["inputs"], np.asarray(specials, np.int32))
    out["mask_token"] = np.full((len(batch["inputs"]),), mask_id, np.int32)
    if "labels" in out:
        out["nsp_labels"] = out.pop("labels")
    return out


class MLMBatches:
    """TextBatches with the masked-LM fields added (resumable the same way)."""

    def __init__(self, batches: TextBatches, specials: Sequence[int], mask_id: int):
        self._batches, self._specials, self._mask_id = batches, list(specials), mask_id

    def __iter__(self) -> "MLMBatches":
        return self

    def __next__(self) -> Batch:
        return add_mlm_fields(next(self._batches), self._specials, self._mask_id)

    def get_state(self) -> dict[str, int]:
        return self._batches.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._batches.set_state(state)


def load_mlm_text(cfg: Any) -> Dataset:
    import jax

    from fastserve.data.reviews import encoder_tokenizer

    data = cfg.data
    train_docs, eval_docs = split_corpora(data.corpus, data.eval_fraction, cfg.train.seed)
    tok = encoder_tokenizer(cfg, ["\n".join(d.passages) for d in train_docs])
    if min(tok.cls_id, tok.sep_id, tok.mask_id) < 0:
        raise ValueError("data.source=mlm_text needs a tokenizer with [CLS], [SEP] and [MASK]: set "
                         "tokenizer.specials: bert (or use an imported WordPiece vocabulary, tokenizer.kind: wordpiece)")
    buckets = sorted(data.buckets) or length_buckets(data.seq_len)
    pi, pc = jax.process_index(), jax.process_count()

    def examples(docs, seed):
        ids = encode_documents(tok, docs)
        if data.nsp:
            return pair_segments(ids, tok, data.seq_len, seed)
        return single_segments(ids, tok, data.seq_len), None

    train, train_labels = examples(train_docs, cfg.train.seed)
    held, held_labels = examples(eval_docs, cfg.train.seed + 1)
    if data.eval_segments and len(held) > data.eval_segments:
        keep = np.linspace(0, len(held) - 1, data.eval_segments).round().astype(int)
        held = EncodedTexts([held.ids[i] for i in keep],
                            None if held.token_types is None else [held.token_types[i] for i in keep])
        held_labels = None if held_labels is None else held_labels[keep]
    specials = special_ids(tok)
    batches = MLMBatches(TextBatches(train, train_labels, data.batch_size, cfg.train.seed, buckets, tok.pad_id,
                                     data.shuffle, pi, pc), specials, tok.mask_id)
    held_out = [add_mlm_fields(b, specials, tok.mask_id)
                for b in heldout_text_batches(held, held_labels, data.batch_size, buckets, tok.pad_id, pi, pc)]
    if cfg.train.eval_batches > 0:
        held_out = held_out[:cfg.train.eval_batches]
    tokens = int(train.lengths.sum())
    kind = "sentence pairs" if data.nsp else "segments"
    return Dataset(batches, held_out, len(train), len(held),
                   f"{len(train):,} train / {len(held):,} held-out {kind} of ≤ {data.seq_len} tokens "
                   f"({tokens / 1e6:.1f}M train tokens from {len(train_docs)} documents of {'+'.join(data.corpus)})",
                   tokenizer=tok, model_fields={"vocab_size": tok.vocab_size})

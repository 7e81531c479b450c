"""`data.source: reviews` — real Amazon fine-food reviews labelled `great` / `other` (R package modeldata's
`small_fine_foods`: `training_data` 4,000 rows, `testing_data` 1,000 rows; columns product, review, score), read from
Debian's `r-cran-modeldata` without R (fastserve.data.rdata_files).

Splits: `train` = the first 4,000 − `validation` rows of training_data, `validation` = its last `validation` rows
(default 500: rows 3,501–4,000, in the package's order), `test` = testing_data. Labels: great = 0, other = 1.
`eval_split` picks which split the held-out batches are (validation while developing a recipe; test to report).

Batches come from fastserve.data.encoder_text: `[CLS] review [SEP]`, cut to `seq_len` tokens, padded per batch to the
smallest of `buckets` that holds the longest review in it, with `mask`. The tokenizer is the config's: an imported
WordPiece vocabulary (`tokenizer.kind: wordpiece`) or a sentencepiece model with BERT specials trained on the
training reviews (cached in the work dir). `load_reviews` serves the raw texts and labels (baselines, the Keras face).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastserve.checks import positive
from fastserve.data.dataset import Dataset
from fastserve.data.encoder_text import TextBatches, encode_texts, heldout_text_batches, length_buckets
from fastserve.data.packages import debian_path, pypi_module
from fastserve.data.rdata_files import R_SITE_LIBRARY, read_r_object

CLASSES = ("great", "other")
PACKAGE = "r-cran-modeldata"
SPLITS = ("train", "validation", "test")


@dataclass
class ReviewsDataConfig:
    source: str = "reviews"
    seq_len: int = 256             # tokens per review including [CLS] and [SEP]; longer reviews are cut
    buckets: list[int] = field(default_factory=list)   # padded lengths; empty: 4 spread evenly up to seq_len
    batch_size: int = 32           # global batch
    validation: int = 500          # the last rows of training_data held out for validation
    eval_split: str = "validation"  # the held-out batches: validation | test
    shuffle: bool = True
    group_by_length: int = 0       # > 0: batches of similar lengths, sorted within windows of this many batches
    r_library: str = str(R_SITE_LIBRARY)   # where R packages are installed (Debian's r-cran-* go here)

    def checks(self):
        yield from positive(self, "seq_len", "batch_size")
        if self.group_by_length < 0:
            yield "group_by_length", f"must be 0 (off) or a number of batches per sorted window, got {self.group_by_length}"
        if not 0 <= self.validation <= 3000:
            yield "validation", f"must be in [0, 3000] (rows of the 4,000 training reviews), got {self.validation}"
        if self.eval_split not in ("validation", "test"):
            yield "eval_split", f"expected validation or test, got {self.eval_split!r}"
        if self.eval_split == "validation" and self.validation == 0:
            yield "eval_split", "is validation but data.validation=0 holds nothing out; use eval_split=test"
        if self.seq_len < 3:
            yield "seq_len", f"must leave room for [CLS], [SEP] and one token: at least 3, got {self.seq_len}"
        bad = [b for b in self.buckets if not 1 <= b <= self.seq_len]
        if bad:
            yield "buckets", f"every bucket must be in [1, seq_len={self.seq_len}], got {bad}"
        if self.buckets and max(self.buckets) != self.seq_len:
            yield "buckets", (f"the largest bucket must be seq_len={self.seq_len} (reviews are cut to it), got "
                              f"{max(self.buckets)}")

    def prepare(self) -> str:
        """Checks the package is installed and readable; says what the splits hold."""
        splits = load_reviews(self.validation, self.r_library)
        counts = ", ".join(f"{len(splits[s][0]):,} {s}" for s in SPLITS)
        great = ", ".join(f"{float(np.mean(splits[s][1] == 0)):.1%}" for s in SPLITS)
        return (f"reviews: {counts} fine-food reviews from Debian {PACKAGE} (validation: the last {self.validation} "
                f"rows of training_data); share labelled great: {great}")

    def load(self, cfg: Any) -> Dataset:
        import jax

        splits = load_reviews(self.validation, self.r_library)
        train_texts, train_labels = splits["train"]
        tok = encoder_tokenizer(cfg, train_texts)
        buckets = sorted(self.buckets) or length_buckets(self.seq_len)
        pi, pc = jax.process_index(), jax.process_count()
        train = encode_texts(tok, train_texts, self.seq_len)
        batches = TextBatches(train, train_labels, self.batch_size, cfg.train.seed, buckets, tok.pad_id,
                              self.shuffle, pi, pc, self.group_by_length)
        eval_texts, eval_labels = splits[self.eval_split]
        held_out = heldout_text_batches(encode_texts(tok, eval_texts, self.seq_len), eval_labels, self.batch_size,
                                        buckets, tok.pad_id, pi, pc) if eval_texts else []
        if cfg.train.eval_batches > 0:
            held_out = held_out[:cfg.train.eval_batches]
        cut = int(np.sum(train.lengths >= self.seq_len))
        return Dataset(batches, held_out, len(train), len(eval_texts),
                       f"{len(train)} train / {len(eval_texts)} {self.eval_split} reviews, ≤ {self.seq_len} tokens "
                       f"({cut} cut), buckets {buckets}",
                       tokenizer=tok, eval_texts=list(eval_texts),
                       model_fields={"vocab_size": tok.vocab_size, "num_classes": len(CLASSES)})


def load_reviews(validation: int = 500, r_library: str = str(R_SITE_LIBRARY)
                 ) -> dict[str, tuple[list[str], np.ndarray]]:
    """{train, validation, test: (review texts, int32 labels: great 0 / other 1)}; MissingPackage names the Debian
    package (or the PyPI reader) when it is not installed."""
    from pathlib import Path

    what = "data.source=reviews"
    debian_path(Path(r_library) / "modeldata" / "data" / "Rdata.rdb", PACKAGE, what)
    pypi_module("rdata", "rdata", what)
    frames = {name: read_r_object("modeldata", name, r_library) for name in ("training_data", "testing_data")}
    out = {}
    for name, frame in frames.items():
        texts = [str(t) for t in frame["review"]]
        scores = [str(s) for s in frame["score"]]
        unknown = sorted(set(scores) - set(CLASSES))
        if unknown:
            raise ValueError(f"modeldata::{name} has scores {unknown} besides {CLASSES}: not the expected data")
        out[name] = (texts, np.array([CLASSES.index(s) for s in scores], np.int32))
    texts, labels = out["training_data"]
    keep = len(texts) - validation
    return {"train": (texts[:keep], labels[:keep]), "validation": (texts[keep:], labels[keep:]),
            "test": out["testing_data"]}


def encoder_tokenizer(cfg: Any, train_texts: list[str]) -> Any:
    """The config's tokenizer with BERT specials (cls_id, sep_id, pad_id, mask_id, unk_id): an imported WordPiece
    vocabulary (`tokenizer.kind: wordpiece`, `tokenizer.path`) or a sentencepiece model (given by `tokenizer.path`,
    or trained on `train_texts` and cached in the work dir)."""
    if getattr(cfg.tokenizer, "kind", "sentencepiece") == "wordpiece":
        from fastserve.data import wordpiece

        return wordpiece.load_wordpiece(cfg.tokenizer.path)
    from fastserve.data.text import tokenizer_once

    return tokenizer_once(cfg, train_texts)

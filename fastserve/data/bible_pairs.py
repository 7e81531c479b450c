"""`data.source: bible_pairs` — English → Spanish Bible verse pairs for translation (encoder–decoder models).

Source: the King James Version (Debian `sword-text-kjv`, module engKJV2006eb); target: the Reina-Valera 1909
(Debian `sword-text-sparv`, module spaRV1909eb). Both use the KJV versification, so verses pair by
(book, chapter, verse); verses present in only one module are dropped. Read with PyPI `pysword` through
fastserve.data.sword (converted once, cached).

Held-out data is whole books, never verses of a training book: `validation_books` (scored during training and by
`fastserve.evaluate` by default) and `test_books` (`eval_split: test`). A book named in both lists, or one that
does not exist, is a config error.

Vocabulary (`vocabulary`): `joint` trains one sentencepiece model on the training verses of both languages
(`tokenizer.vocab_size` pieces, cached in the work dir as tokenizer.model); `separate` trains one per language
(source: work dir/source_tokenizer/tokenizer.model, target: tokenizer.model) and the model gets a target
vocabulary of its own (`model.target_vocab_size`). Ids 0-3 are pad, unk, BOS, EOS on both sides.

Lengths: a side is at most `max_source_len` / `max_target_len` tokens, EOS included. Longer training pairs are
dropped (`too_long: drop`) or cut (`truncate`); held-out sources are always cut (every held-out verse is scored)
and the references keep their whole text.

Batches (the layout of fastserve.tasks.seq2seq): src, src_mask, tgt_in (BOS + target), tgt_out (target + EOS),
tgt_weights; held-out batches also carry `weights` [B] and are padded to the maximum lengths. Training batches are
cut per batch to the smallest of `length_buckets` lengths that holds their longest source and target (0: always
the maxima), and `group_by_length: K` sorts each window of K shuffled batches by length first (as Hugging Face's
`group_by_length`), so a batch pads little: the verses average 32 target tokens of the recipe's 56. `Dataset.eval_texts`
holds the held-out reference translations (plain text), in the order of the held-out examples.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastserve.checks import positive
from fastserve.data.dataset import Dataset, ExampleBatches, check_process
from fastserve.data.encoder_text import LengthGroupedOrder, bucket_for, length_buckets
from fastserve.data.synthetic_pairs import heldout_batches
from fastserve.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

SOURCE_MODULE, TARGET_MODULE = "engKJV2006eb", "spaRV1909eb"
# OSIS names of the 66 books, in canonical order: what validation_books / test_books may name
BOOKS = ("Gen Exod Lev Num Deut Josh Judg Ruth 1Sam 2Sam 1Kgs 2Kgs 1Chr 2Chr Ezra Neh Esth Job Ps Prov Eccl Song "
         "Isa Jer Lam Ezek Dan Hos Joel Amos Obad Jonah Mic Nah Hab Zeph Hag Zech Mal Matt Mark Luke John Acts Rom "
         "1Cor 2Cor Gal Eph Phil Col 1Thess 2Thess 1Tim 2Tim Titus Phlm Heb Jas 1Pet 2Pet 1John 2John 3John Jude "
         "Rev").split()
SOURCE_TOKENIZER_DIR = "source_tokenizer"
_CAPS = "A-ZÁÉÍÓÚÑÜ"
_SHOUTED_START = re.compile(rf"^(?:[{_CAPS}]+\s+)*[{_CAPS}]{{2,}}\b")
_NOTE = re.compile(r"<note\b.*?</note>", re.S)


@dataclass
class BiblePairsConfig:
    source: str = "bible_pairs"
    validation_books: list[str] = field(default_factory=lambda: ["Joel", "Col", "Phlm"])
    test_books: list[str] = field(default_factory=lambda: ["Ruth", "Jonah", "Phil", "Titus", "Jas", "1John"])
    eval_split: str = "validation"  # the held-out books training reports and fastserve.evaluate scores
    vocabulary: str = "joint"       # joint | separate (one sentencepiece model per language)
    max_source_len: int = 64        # tokens, EOS included
    max_target_len: int = 64
    too_long: str = "drop"          # training pairs longer than that: drop | truncate
    max_eval_pairs: int = 0         # 0: every held-out verse; else the first N (a quicker eval during training)
    length_buckets: int = 0         # training batches padded to one of this many lengths (both sides); 0: the maxima
    group_by_length: int = 0        # > 0: batches of similar lengths, sorted within windows of this many batches
    batch_size: int = 32            # global batch (pairs per optimizer step, all hosts together)
    shuffle: bool = True

    def checks(self):
        yield from positive(self, "batch_size")
        for name in ("max_source_len", "max_target_len"):
            if getattr(self, name) < 2:
                yield name, f"must be at least 2 (a token and EOS), got {getattr(self, name)}"
        for name in ("length_buckets", "group_by_length"):
            if getattr(self, name) < 0:
                yield name, f"must be >= 0 (0: off), got {getattr(self, name)}"
        if self.max_eval_pairs < 0:
            yield "max_eval_pairs", f"must be >= 0 (0: all), got {self.max_eval_pairs}"
        for name, allowed in (("eval_split", ("validation", "test")), ("vocabulary", ("joint", "separate")),
                              ("too_long", ("drop", "truncate"))):
            if getattr(self, name) not in allowed:
                yield name, f"expected {' or '.join(allowed)}, got {getattr(self, name)!r}"
        for name in ("validation_books", "test_books"):
            unknown = [b for b in getattr(self, name) if b not in BOOKS]
            if unknown:
                yield name, f"unknown book(s) {', '.join(unknown)}; OSIS names: {' '.join(BOOKS)}"
        both = sorted(set(self.validation_books) & set(self.test_books))
        if both:
            yield "test_books", f"{', '.join(both)} also in validation_books: a book is held out for one split only"
        if len(set(self.validation_books) | set(self.test_books)) >= len(BOOKS):
            yield "test_books", "every book is held out: nothing is left to train on"

    def prepare(self) -> str:
        """Converts both SWORD modules once (cached) and reports the pairs per split."""
        splits = verse_pairs(self)
        return "bible_pairs: " + ", ".join(f"{len(v)} {k} pairs" for k, v in splits.items())

    def load(self, cfg: Any) -> Dataset:
        import jax

        splits = verse_pairs(self)
        tok = pair_tokenizer_once(cfg, splits["train"])
        train = encode_pairs(tok, splits["train"], self.max_source_len, self.max_target_len, self.too_long)
        held = splits[self.eval_split][:self.max_eval_pairs or None]
        held_out = encode_pairs(tok, held, self.max_source_len, self.max_target_len, "truncate")
        n_train = len(train["src"])
        pi, pc = jax.process_index(), jax.process_count()
        batches = PairBatches(train, self.batch_size, cfg.train.seed, self.shuffle, pi, pc, self.length_buckets,
                              self.group_by_length)
        eval_batches = heldout_batches(held_out, self.batch_size, pi, pc) if held else []
        if cfg.train.eval_batches > 0:
            eval_batches = eval_batches[:cfg.train.eval_batches]
            held = held[:cfg.train.eval_batches * self.batch_size]
        fields = {"vocab_size": tok.source.vocab_size, "max_source_len": self.max_source_len,
                  "max_target_len": self.max_target_len}
        if self.vocabulary == "separate":
            fields["target_vocab_size"] = tok.target.vocab_size
        dropped = len(splits["train"]) - n_train
        return Dataset(batches, eval_batches, n_train, len(held),
                       f"{n_train} train pairs ({dropped} too long dropped) / {len(held)} held-out "
                       f"({self.eval_split}: {' '.join(getattr(self, self.eval_split + '_books'))}), "
                       f"{self.vocabulary} vocabulary", tokenizer=tok, eval_texts=[t for _, t in held],
                       model_fields=fields)

    def mean_target_tokens(self) -> float:
        """A typical real target length (tokens + EOS) for FLOPs per token: the training pairs the recipe keeps
        (joint 4k vocabulary, 56 tokens at most) average 32.4 target tokens with EOS (measured); capped here."""
        return float(min(32, self.max_target_len - 1))

    def mean_source_tokens(self) -> float:
        """The same for the source side: 32.5 English tokens with EOS on average (measured)."""
        return float(min(32, self.max_source_len - 1))


class PairBatches:
    """Endless, deterministic, resumable training batches of padded pairs (`ExampleBatches`' order, or
    `LengthGroupedOrder`'s with `group_by_length`), each cut to the smallest bucket that holds its longest source
    and target (each side at most its maximum); every process picks the bucket from the global batch, so all
    hosts' slices agree."""

    def __init__(self, examples: dict[str, np.ndarray], global_batch: int, seed: int, shuffle: bool,
                 process_index: int, process_count: int, bucket_count: int, group_by_length: int):
        self._src_len = examples["src_mask"].sum(axis=1)
        self._tgt_len = (examples["tgt_weights"] > 0).sum(axis=1)
        self._max = examples["src"].shape[1], examples["tgt_in"].shape[1]
        # one bucket for both sides (their lengths go together): `bucket_count` batch shapes, so as many compiles
        self._buckets = length_buckets(max(self._max), bucket_count) if bucket_count else [max(self._max)]
        kw = dict(shuffle=shuffle, process_index=0, process_count=1, what="training pairs",
                  hint="lower data.batch_size")
        index = {"index": np.arange(len(self._src_len))}
        self._order = (LengthGroupedOrder(self._src_len + self._tgt_len, global_batch, seed, group_by_length, **kw)
                       if group_by_length > 0 and shuffle else ExampleBatches(index, global_batch, seed, **kw))
        self._local = check_process(global_batch, process_index, process_count)
        self._examples, self._process_index = examples, process_index

    @property
    def batches_per_epoch(self) -> int:
        return self._order.batches_per_epoch

    def __iter__(self) -> "PairBatches":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        global_idx = next(self._order)["index"]
        n = bucket_for(int(max(self._src_len[global_idx].max(), self._tgt_len[global_idx].max())), self._buckets)
        s, t = min(n, self._max[0]), min(n, self._max[1])
        mine = global_idx[self._process_index * self._local:(self._process_index + 1) * self._local]
        return {k: v[mine, :(s if k.startswith("src") else t)] for k, v in self._examples.items()}

    def get_state(self) -> dict[str, int]:
        return self._order.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._order.set_state(state)


def spanish_case(text: str) -> str:
    """The Reina-Valera prints a chapter's first words in capitals ("EN el principio", "Y ACONTECIÓ en"):
    written in sentence case."""
    return _SHOUTED_START.sub(lambda m: m.group(0)[0] + m.group(0)[1:].lower(), text)


def verse_text(verse) -> str:
    """The verse as a translation pair side: plain text without the KJV's footnotes ("1.1 ruled: Heb. judged")."""
    from fastserve.data.sword import plain_text
    return plain_text(_NOTE.sub("", verse.markup))


def verse_pairs(cfg: BiblePairsConfig) -> dict[str, list[tuple[str, str]]]:
    """{train, validation, test}: (English, Spanish) plain-text pairs in canonical order, split by book."""
    from fastserve.data.sword import verses

    english = {(v.book, v.chapter, v.verse): verse_text(v) for v in verses(SOURCE_MODULE)}
    held = {b: "validation" for b in cfg.validation_books} | {b: "test" for b in cfg.test_books}
    out: dict[str, list[tuple[str, str]]] = {"train": [], "validation": [], "test": []}
    for v in verses(TARGET_MODULE):
        en = english.get((v.book, v.chapter, v.verse))
        es = spanish_case(verse_text(v))
        if en and es:
            out[held.get(v.book, "train")].append((en, es))
    return out


@dataclass
class PairTokenizer:
    """The source and target vocabularies (the same object when joint). Decoding-facing ids (bos / eos / pad,
    `decode`) are the target side's, so the seq2seq task and decoders treat it like any text tokenizer."""
    source: Tokenizer
    target: Tokenizer

    bos_id = property(lambda self: self.target.bos_id)
    eos_id = property(lambda self: self.target.eos_id)
    pad_id = property(lambda self: self.target.pad_id)
    stop_ids = property(lambda self: [self.target.eos_id])

    def encode_source(self, texts: list[str]) -> list[list[int]]:
        return self.source.encode_batch(texts)

    def decode(self, ids) -> str:
        """Target text of `ids`, cut at the first EOS (special ids decode to nothing)."""
        ids = [int(i) for i in ids]
        if self.target.eos_id in ids:
            ids = ids[:ids.index(self.target.eos_id)]
        return self.target.decode(ids)


def pair_tokenizer_once(cfg: Any, train_pairs: list[tuple[str, str]]) -> PairTokenizer:
    """The cached (or newly trained) vocabularies of a work dir, trained on the training verses only."""
    from fastserve.data.text import tokenizer_once

    english, spanish = [en for en, _ in train_pairs], [es for _, es in train_pairs]
    if cfg.data.vocabulary == "joint":
        tok = tokenizer_once(cfg, english + spanish)
        return PairTokenizer(tok, tok)
    target = tokenizer_once(cfg, spanish)
    src_dir = os.path.join(cfg.train.workdir, SOURCE_TOKENIZER_DIR)
    os.makedirs(src_dir, exist_ok=True)
    import dataclasses
    src_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, workdir=src_dir))
    return PairTokenizer(tokenizer_once(src_cfg, english), target)


def pair_tokenizer_from_workdir(workdir: str) -> PairTokenizer:
    """The vocabularies a bible_pairs model was trained with, read back from its work dir."""
    target = Tokenizer.from_file(os.path.join(workdir, "tokenizer.model"))
    src_path = os.path.join(workdir, SOURCE_TOKENIZER_DIR, "tokenizer.model")
    return PairTokenizer(Tokenizer.from_file(src_path) if os.path.isfile(src_path) else target, target)


def encode_pairs(tok: PairTokenizer, pairs: list[tuple[str, str]], max_source_len: int, max_target_len: int,
                 too_long: str) -> dict[str, np.ndarray]:
    """Padded example arrays (the seq2seq task's layout) of `pairs`; over-long ones dropped or cut."""
    src_ids = tok.source.encode_batch([en for en, _ in pairs])
    tgt_ids = tok.target.encode_batch([es for _, es in pairs])
    if too_long == "drop":
        keep = [i for i, (s, t) in enumerate(zip(src_ids, tgt_ids))
                if len(s) < max_source_len and len(t) < max_target_len]
        src_ids, tgt_ids = [src_ids[i] for i in keep], [tgt_ids[i] for i in keep]
    return pad_examples(src_ids, tgt_ids, max_source_len, max_target_len)


def pad_sources(src_ids: list[list[int]], max_source_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(src [N, S] int32: tokens cut to S-1, then EOS, then pad; src_mask [N, S] bool)."""
    n = len(src_ids)
    src = np.full((n, max_source_len), PAD_ID, np.int32)
    mask = np.zeros((n, max_source_len), bool)
    for i, ids in enumerate(src_ids):
        ids = list(ids[:max_source_len - 1]) + [EOS_ID]
        src[i, :len(ids)], mask[i, :len(ids)] = ids, True
    return src, mask


def pad_examples(src_ids: list[list[int]], tgt_ids: list[list[int]], max_source_len: int,
                 max_target_len: int) -> dict[str, np.ndarray]:
    n = len(src_ids)
    src, src_mask = pad_sources(src_ids, max_source_len)
    tgt_in = np.full((n, max_target_len), PAD_ID, np.int32)
    tgt_out = np.full((n, max_target_len), PAD_ID, np.int32)
    weights = np.zeros((n, max_target_len), np.float32)
    for i, ids in enumerate(tgt_ids):
        ids = list(ids[:max_target_len - 1])
        tgt_in[i, :len(ids) + 1] = [BOS_ID] + ids
        tgt_out[i, :len(ids) + 1] = ids + [EOS_ID]
        weights[i, :len(ids) + 1] = 1.0
    return {"src": src, "src_mask": src_mask, "tgt_in": tgt_in, "tgt_out": tgt_out, "tgt_weights": weights}

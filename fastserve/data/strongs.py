"""`data.source: strongs` — token tagging on the King James Bible's own word-level markup (Debian `sword-text-kjv`,
read with PyPI `pysword` through fastserve.data.sword): a real human annotation that installs offline.

The KJV module marks every English word or phrase that renders one Hebrew / Greek word with that word's Strong's
number (`<w lemma="strong:H7225">beginning</w>`, ~350k spans, ~3 % of them several words long: "shall burn them
up"), and the words the 1611 translators supplied without a counterpart in the original — printed in italics — as
`<transChange type="added">` (~21k spans: "darkness *was* upon the face"). There is no morphology in this module.
The task: tag each word B-/I-W (a translation unit for one original word; a new B at each new Strong's span) or
B-/I-ADD (translators' addition) or O (neither: "the", "of" with no own lemma, punctuation). Deciding that a word
was *supplied* needs the sentence around it — "was" is a rendered verb in one verse and an italic copula in
the next — and spans need the grouping of phrases: a most-frequent-tag-per-word baseline cannot do either.

One verse is one example; words are split off punctuation (`\\w+(?:['’-]\\w+)*` or one punctuation mark). Only the
first word piece of each word carries its tag (the others, [CLS] and [SEP] weigh 0). Whole books are held out
(`eval_books`). Tag ids follow fastserve.tasks.spans.bio_tag_names(TYPES): O, B-W, I-W, B-ADD, I-ADD.
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from fastserve.checks import positive
from fastserve.data.dataset import Dataset
from fastserve.data.encoder_text import (IGNORE_LABEL, EncodedTexts, TextBatches, heldout_text_batches, length_buckets,
                                         wrap, wrap_token_labels)
from fastserve.tasks.spans import bio_tag_names

TYPES = ("W", "ADD")
TAGS = bio_tag_names(TYPES)
MODULE = "engKJV2006eb"
# held out by default: a history, wisdom poetry, a gospel and a letter (~3,000 verses, ~10 % of the Bible)
EVAL_BOOKS = ("Judg", "Prov", "Luke", "Heb")

_MARKUP = re.compile(r"<note\b.*?</note>|<(/?)(\w+)([^>]*?)(/?)>|([^<]+)", re.S)
_WORD = re.compile(r"\w+(?:['’-]\w+)*|[^\w\s]")


@dataclass
class TaggedVerse:
    book: str
    words: list[str]
    tags: list[str]
    spaced: list[bool]   # whether whitespace precedes each word in the verse


def tag_verse(markup: str) -> tuple[list[str], list[str], list[bool]]:
    """(words, BIO tags, whitespace-before flags) of one verse's OSIS markup."""
    chars: list[str] = []
    spans: list[tuple[str, int]] = []    # per character: (type or "", span number)
    stack: list[tuple[str, int]] = []
    count = 0
    for m in _MARKUP.finditer(markup):
        closing, name, _, self_closing, text = m.groups()
        if text is not None:
            text = html.unescape(text)
            current = stack[-1] if stack else ("", 0)
            chars.extend(text)
            spans.extend([current] * len(text))
        elif name in ("w", "transChange") and not self_closing:
            if closing:
                if stack:
                    stack.pop()
            else:
                count += 1
                outer_added = stack and stack[-1][0] == "ADD"      # a lemma inside added words stays added
                stack.append(stack[-1] if outer_added else ("W" if name == "w" else "ADD", count))
    text = "".join(chars)
    words, tags, spaced, previous = [], [], [], ("", -1)
    for m in _WORD.finditer(text):
        kind, number = spans[m.start()]
        if kind:
            tags.append(("I-" if (kind, number) == previous else "B-") + kind)
        else:
            tags.append("O")
        previous = (kind, number) if kind else ("", -1)
        words.append(m.group(0))
        spaced.append(m.start() > 0 and text[m.start() - 1].isspace())
    return words, tags, spaced


def tagged_verses() -> list[TaggedVerse]:
    """Every verse of the KJV with its word tags (MissingPackage names sword-text-kjv / pysword when absent)."""
    from fastserve.data.sword import verses

    out = []
    for v in verses(MODULE):
        words, tags, spaced = tag_verse(v.markup)
        if words:
            out.append(TaggedVerse(v.book, words, tags, spaced))
    return out


def split_books(verses: Sequence[TaggedVerse], eval_books: Sequence[str]) -> tuple[list[TaggedVerse], list[TaggedVerse]]:
    held = set(eval_books)
    return [v for v in verses if v.book not in held], [v for v in verses if v.book in held]


def word_pieces(tok: Any, verse: TaggedVerse) -> tuple[list[int], list[int]]:
    """(piece ids, per-piece tag ids: the word's tag on its first piece, IGNORE_LABEL on the rest) of a verse;
    each word is encoded with the space that precedes it in the text, as the tokenizer saw running text."""
    ids, labels = [], []
    for word, tag, spaced in zip(verse.words, verse.tags, verse.spaced):
        pieces = tok.encode((" " if spaced and ids else "") + word) or [tok.unk_id]
        ids.extend(pieces)
        labels.extend([TAGS.index(tag)] + [IGNORE_LABEL] * (len(pieces) - 1))
    return ids, labels


def encode_verses(tok: Any, verses: Sequence[TaggedVerse], max_len: int) -> tuple[EncodedTexts, list[np.ndarray]]:
    """`[CLS] verse [SEP]` ids (cut to max_len) and their per-token tag ids."""
    pieces = [word_pieces(tok, v) for v in verses]
    ids = [wrap(p, None, tok.cls_id, tok.sep_id, max_len)[0] for p, _ in pieces]
    labels = wrap_token_labels([lab for _, lab in pieces], [len(x) for x in ids])
    return EncodedTexts(ids), labels


@dataclass
class StrongsDataConfig:
    source: str = "strongs"
    eval_books: list[str] = field(default_factory=lambda: list(EVAL_BOOKS))   # OSIS names of held-out books
    max_len: int = 160             # word pieces per verse with [CLS] and [SEP]; longer verses are cut
    buckets: list[int] = field(default_factory=list)   # padded lengths; empty: 4 spread evenly up to max_len
    batch_size: int = 32
    shuffle: bool = True

    def checks(self):
        yield from positive(self, "max_len", "batch_size")
        if not self.eval_books:
            yield "eval_books", "hold out at least one book (OSIS names: Gen … Rev)"
        bad = [b for b in self.buckets if not 1 <= b <= self.max_len]
        if bad or (self.buckets and max(self.buckets) != self.max_len):
            yield "buckets", f"each bucket must be in [1, max_len] and the largest max_len={self.max_len}, got {self.buckets}"

    def prepare(self) -> str:
        """Reads (and caches) the KJV module; says how many words and spans each split holds."""
        train, held = self._split()
        def words(vs):
            return sum(len(v.words) for v in vs)
        return (f"strongs: {len(train):,} train verses ({words(train):,} words) / {len(held):,} held-out verses "
                f"({words(held):,} words) from {', '.join(self.eval_books)}; tags {', '.join(TAGS)}")

    def _split(self) -> tuple[list[TaggedVerse], list[TaggedVerse]]:
        verses = tagged_verses()
        unknown = sorted(set(self.eval_books) - {v.book for v in verses})
        if unknown:
            raise ValueError(f"data.eval_books: no book {', '.join(unknown)} in the KJV (OSIS names: Gen, Exod, … Rev)")
        return split_books(verses, self.eval_books)

    def load(self, cfg: Any) -> Dataset:
        import jax

        from fastserve.data.reviews import encoder_tokenizer

        train_verses, held_verses = self._split()
        tok = encoder_tokenizer(cfg, [" ".join(v.words) for v in train_verses])
        buckets = sorted(self.buckets) or length_buckets(self.max_len)
        pi, pc = jax.process_index(), jax.process_count()
        train, train_labels = encode_verses(tok, train_verses, self.max_len)
        held, held_labels = encode_verses(tok, held_verses, self.max_len)
        batches = TextBatches(train, train_labels, self.batch_size, cfg.train.seed, buckets, tok.pad_id,
                              self.shuffle, pi, pc)
        held_out = heldout_text_batches(held, held_labels, self.batch_size, buckets, tok.pad_id, pi, pc)
        if cfg.train.eval_batches > 0:
            held_out = held_out[:cfg.train.eval_batches]
        cut = int(np.sum(train.lengths >= self.max_len))
        return Dataset(batches, held_out, len(train), len(held),
                       f"{len(train):,} train / {len(held):,} held-out verses ({', '.join(self.eval_books)}), "
                       f"≤ {self.max_len} pieces ({cut} cut), tags {'/'.join(TAGS)}",
                       tokenizer=tok, model_fields={"vocab_size": tok.vocab_size, "num_classes": len(TAGS)})


def most_frequent_tag_baseline(train: Sequence[TaggedVerse], held: Sequence[TaggedVerse]) -> list[list[str]]:
    """Each held-out word's most frequent tag in training (by exact word; an unseen word: the most frequent tag
    overall)."""
    from collections import Counter, defaultdict

    counts: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    for v in train:
        for w, t in zip(v.words, v.tags):
            counts[w][t] += 1
            overall[t] += 1
    default = overall.most_common(1)[0][0]
    best = {w: c.most_common(1)[0][0] for w, c in counts.items()}
    return [[best.get(w, default) for w in v.words] for v in held]

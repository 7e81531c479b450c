"""Offline English text for masked-LM pretraining, as documents of passages (../shared/DATA.md):

- `gcide`: the Collaborative International Dictionary of English (Webster 1913 + WordNet), Debian `dict-gcide`,
  ~40 MB in ~126k articles. A document is a run of 200 consecutive articles in dictionary order (a "page range",
  ~630 documents of similar size, so holding out a few of them holds out a fair sample); a passage is one
  paragraph of an article (a headline with its first sense, a further sense, a quotation). Pronunciations, the per-article source notes ([1913 Webster], [PJC]) and
  the cross-reference braces are dropped; accented letters written as [a^] / ['e] become their base letter.
- `kjv`: the King James Bible with Strong's numbers (Debian `sword-text-kjv`, via fastserve.data.sword): a document
  is a book, a passage a verse.
- `pydoc`: CPython's own help topics (`pydoc_data.topics`, ~465 KB, no install): a document is a topic, a passage
  a paragraph. Small: for tests and quick runs.
- `reviews`: the fine-food reviews' training rows (Debian `r-cran-modeldata`, via fastserve.data.reviews; never the
  test rows): a document is a review, a passage a sentence.
"""
from __future__ import annotations

import gzip
import re
from dataclasses import dataclass

from fastserve.data.packages import debian_path

GCIDE_DICT = "/usr/share/dictd/gcide.dict.dz"
GCIDE_INDEX = "/usr/share/dictd/gcide.index"
CORPORA = ("gcide", "kjv", "reviews", "pydoc")
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"   # dictd's offsets and lengths
GCIDE_ARTICLES_PER_DOCUMENT = 200   # a gcide "document": a page range of this many consecutive articles


@dataclass
class Document:
    name: str                  # unique within its corpus: what the held-out split draws
    passages: list[str]        # the units packed into segments, in reading order


def load_corpus(name: str) -> list[Document]:
    """The documents of one corpus; MissingPackage names the package to install when it is absent."""
    if name == "gcide":
        return gcide_documents()
    if name == "kjv":
        return kjv_documents()
    if name == "reviews":
        return reviews_documents()
    if name == "pydoc":
        return pydoc_documents()
    raise ValueError(f"unknown corpus {name!r}; corpora: {', '.join(CORPORA)}")


def _dictd_number(text: str) -> int:
    n = 0
    for c in text:
        n = n * 64 + _B64.index(c)
    return n


_PRONUNCIATION = re.compile(r" *\\[^\\\n]*\\(?:\s*\([^)\n]*\))?")       # \A*ban"don\ ([.a]*b[a^]n"d[u^]n)
_SOURCE_NOTE = re.compile(r"\[[^\]\n]*(?:Webster|WordNet|PJC|Century|Chambers)[^\]\n]*\]")
_ACCENTED = re.compile(r"\[([\^'`\"=~.\-]?)([a-z]{1,2})([\^'`\"=~.\-]?)\]")  # [a^] ['e] [=oo] [ae]
_ENTITY = re.compile(r"\[[a-z]{2,6}\]")                                 # [imac] [eth] [root]: no plain spelling
_SPACES = re.compile(r"\s+")


def _accented(m: re.Match) -> str:
    marked = m.group(1) or m.group(3) or m.group(2) in ("ae", "oe")
    return m.group(2) if marked else m.group(0)


def clean_gcide_article(article: str) -> list[str]:
    """The paragraphs of one dictionary article as plain text."""
    text = _SOURCE_NOTE.sub("", _PRONUNCIATION.sub("", article))
    text = _ENTITY.sub("", _ACCENTED.sub(_accented, text)).replace("{", "").replace("}", "")
    paragraphs = (_SPACES.sub(" ", p).strip() for p in re.split(r"\n\s*\n", text))
    return [p for p in paragraphs if len(p) > 1]


def gcide_articles() -> list[tuple[str, str]]:
    """(headword, raw article text) of every article, in dictionary order."""
    debian_path(GCIDE_DICT, "dict-gcide", "corpus gcide (Webster 1913)")
    debian_path(GCIDE_INDEX, "dict-gcide", "corpus gcide (Webster 1913)")
    data = gzip.open(GCIDE_DICT).read()   # dictzip is gzip-compatible; offsets count bytes
    seen, articles = set(), []
    with open(GCIDE_INDEX, encoding="utf-8", errors="replace") as f:
        for line in f:
            headword, offset, length = line.rstrip("\n").split("\t")
            key = (_dictd_number(offset), _dictd_number(length))
            if headword.startswith("00-") or key in seen:   # the database's own notes; aliases of one article
                continue
            seen.add(key)
            articles.append((key[0], headword, data[key[0]:key[0] + key[1]].decode("utf-8", "replace")))
    articles.sort()
    return [(h, a) for _, h, a in articles]


def gcide_documents(articles_per_document: int = GCIDE_ARTICLES_PER_DOCUMENT) -> list[Document]:
    articles = gcide_articles()
    docs = []
    for start in range(0, len(articles), articles_per_document):
        run = articles[start:start + articles_per_document]
        passages = [p for _, article in run for p in clean_gcide_article(article)]
        if passages:
            docs.append(Document(f"gcide:{run[0][0]}…{run[-1][0]}", passages))
    return docs


def kjv_documents() -> list[Document]:
    from fastserve.data.sword import verses

    books: dict[str, list[str]] = {}
    for v in verses("engKJV2006eb"):
        if v.text:
            books.setdefault(v.book, []).append(v.text)
    return [Document(f"kjv:{book}", texts) for book, texts in books.items()]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def reviews_documents() -> list[Document]:
    from fastserve.data.reviews import load_reviews

    texts, _ = load_reviews()["train"]
    docs = []
    for i, text in enumerate(texts):
        sentences = [s.strip() for s in _SENTENCE_END.split(_SPACES.sub(" ", text)) if s.strip()]
        if sentences:
            docs.append(Document(f"reviews:{i}", sentences))
    return docs


def pydoc_documents() -> list[Document]:
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        paragraphs = [_SPACES.sub(" ", p).strip() for p in re.split(r"\n\s*\n", topics[key])]
        docs.append(Document(f"pydoc:{key}", [p for p in paragraphs if p]))
    return [d for d in docs if d.passages]

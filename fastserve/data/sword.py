"""Verses of an installed SWORD Bible module (Debian `sword-text-*`), read with PyPI `pysword` and cached.

Every verse keeps its OSIS markup (`<w lemma="strong:H7225">beginning</w>` in the KJV and the Reina-Valera 1909):
`plain_text` strips it for translation and language modelling, and tagging sources read the markup itself.
pysword decompresses a block per verse (~80 s for a whole Bible), so `verses` converts a module once into
`cache_dir('sword')/MODULE.jsonl` and reads that afterwards.
"""
from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from pathlib import Path

from fastserve.data.packages import cache_dir, debian_path, pypi_module

SWORD_ROOT = Path("/usr/share/sword")
# module name → the Debian package that ships it (see ../shared/DATA.md)
MODULES = {"engKJV2006eb": "sword-text-kjv", "spaRV1909eb": "sword-text-sparv", "engWEB2014eb": "sword-text-web"}
_TAG = re.compile(r"<[^>]*>")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Verse:
    book: str      # OSIS book name: Gen, Exod, … Rev
    chapter: int
    verse: int
    markup: str    # the verse as stored, OSIS tags included

    @property
    def text(self) -> str:
        return plain_text(self.markup)


def plain_text(markup: str) -> str:
    """The verse without its OSIS tags, entities decoded, whitespace collapsed."""
    return _SPACES.sub(" ", html.unescape(_TAG.sub("", markup))).strip()


def verses(module: str) -> list[Verse]:
    """Every non-empty verse of `module`, in canonical order (cached after the first call)."""
    if module not in MODULES:
        raise ValueError(f"unknown SWORD module {module!r}; known: {', '.join(MODULES)}")
    cache = cache_dir("sword") / f"{module}.jsonl"
    if cache.exists():
        with cache.open() as f:
            return [Verse(**json.loads(line)) for line in f]
    out = _read_module(module)
    tmp = cache.with_suffix(".tmp")
    with tmp.open("w") as f:
        for v in out:
            f.write(json.dumps(v.__dict__, ensure_ascii=False) + "\n")
    tmp.replace(cache)  # atomic: a killed conversion leaves no half cache
    return out


def _read_module(module: str) -> list[Verse]:
    debian_path(SWORD_ROOT / "mods.d", MODULES[module], f"the SWORD module {module}")
    modules = pypi_module("pysword.modules", "pysword", "reading SWORD Bibles")
    library = modules.SwordModules(str(SWORD_ROOT))
    found = library.parse_modules()
    if module not in found:
        raise FileNotFoundError(f"SWORD module {module} is not installed under {SWORD_ROOT}; install the Debian "
                                f"package {MODULES[module]}")
    bible = library.get_bible_from_module(module)
    books = bible.get_structure().get_books()
    out = []
    for book in books.get("ot", []) + books.get("nt", []):
        for chapter in range(1, book.num_chapters + 1):
            numbers = list(range(1, book.chapter_lengths[chapter - 1] + 1))
            texts = bible.get(books=[book.osis_name], chapters=[chapter], verses=numbers, clean=False, join="\x00")
            for number, markup in zip(numbers, texts.split("\x00")):
                if markup.strip():
                    out.append(Verse(book.osis_name, chapter, number, markup.strip()))
    return out

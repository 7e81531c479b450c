"""Text corpora: where documents come from and how they are split for evaluation.

A *document* is the unit of both packing (an EOS separates documents) and of the
train/eval split (a document is never divided between the two, so eval text is
truly held out rather than the tail of a training document).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

import numpy as np

SOURCES = ("pydoc", "text")


def _pydoc_documents() -> list[str]:
    # CPython ships its own help text (~465 KB, 79 topics) inside the standard
    # library, which gives every install a real English+code corpus with no
    # download. Sorting by key makes the order independent of dict insertion
    # order across Python versions.
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _expand(pattern: str) -> list[str]:
    """Expand one path or glob pattern into a sorted list of existing files."""
    if glob.has_magic(pattern):
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(f"text corpus pattern matched no files: {pattern!r}")
        return matches
    if not os.path.isfile(pattern):
        raise FileNotFoundError(f"text corpus file not found: {pattern!r}")
    return [pattern]


def _read_utf8(path: str) -> str:
    # Universal-newline reading: CRLF files become LF so the same text stored
    # on different platforms tokenizes identically.
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"text corpus file is not valid UTF-8: {path!r} ({e})") from e


def load_texts(source: str, paths: Sequence[str] = ()) -> list[str]:
    """Load the documents of a corpus.

    Args:
        source: ``"pydoc"`` for the built-in CPython help corpus (``paths`` is
            ignored), or ``"text"`` to read ``paths`` as UTF-8, one document per
            file.
        paths: files or glob patterns (``**`` allowed) for ``"text"``. Each
            pattern's matches are sorted; patterns keep the given order and a
            file named twice is read once.

    Raises:
        ValueError: unknown source, or ``"text"`` with no paths.
        FileNotFoundError: a path that does not exist or a pattern that
            matches no file.
    """
    if source == "pydoc":
        return _pydoc_documents()
    if source == "text":
        if isinstance(paths, str):
            # A bare string would otherwise be iterated character by character.
            paths = [paths]
        if not paths:
            raise ValueError("source 'text' needs at least one path or glob pattern")
        files: list[str] = []
        seen: set[str] = set()
        for pattern in paths:
            for path in _expand(pattern):
                key = os.path.realpath(path)
                if key not in seen:
                    seen.add(key)
                    files.append(path)
        return [_read_utf8(p) for p in files]
    raise ValueError(f"unknown corpus source {source!r}; valid sources are {list(SOURCES)}")


def split_documents(
    docs: list[str], eval_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Split documents into (train, eval) deterministically, by whole document.

    ``round(len(docs) * eval_fraction)`` documents, chosen by a permutation
    seeded with ``seed``, go to eval; that count is clamped to at least 1 when
    ``eval_fraction > 0`` and there are at least 2 documents, and to at most
    ``len(docs) - 1`` so training never ends up empty. Both halves keep the
    original relative order of the documents.

    Raises:
        ValueError: ``eval_fraction`` outside ``[0, 1)``.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(docs)
    if eval_fraction == 0.0 or n < 2:
        return list(docs), []
    n_eval = min(max(1, round(n * eval_fraction)), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    eval_idx = set(perm[:n_eval].tolist())
    train = [d for i, d in enumerate(docs) if i not in eval_idx]
    held_out = [d for i, d in enumerate(docs) if i in eval_idx]
    return train, held_out

"""Range checks that config dataclasses yield from `checks()`: (field, problem) pairs, turned by the config loader
into `config error: <section>.<field>: <problem>` before any work."""
from __future__ import annotations

import difflib
from typing import Any, Iterator, Sequence

Problems = Iterator[tuple[str, str]]


def near(name: str, valid: Sequence[str]) -> str:
    """"; did you mean 'x'?" for the closest valid name, or ""."""
    close = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def positive(obj: Any, *names: str) -> Problems:
    for n in names:
        v = getattr(obj, n)
        if not v > 0:
            yield n, f"must be positive, got {v}"


def at_least(obj: Any, low: float, *names: str, zero: str = "") -> Problems:
    """Each of `names` >= `low`; `zero` says what 0 means (e.g. "from the data")."""
    for n in names:
        v = getattr(obj, n)
        if not v >= low:
            yield n, f"must be >= {low}{f' (0: {zero})' if zero else ''}, got {v}"


def fraction(obj: Any, *names: str, closed: bool = False) -> Problems:
    """Each of `names` in [0, 1) (or [0, 1] when `closed`)."""
    for n in names:
        v = getattr(obj, n)
        if not (0 <= v <= 1 if closed else 0 <= v < 1):
            yield n, f"must be in [0, 1{']' if closed else ')'}, got {v}"


def positive_list(obj: Any, *names: str) -> Problems:
    for n in names:
        bad = [v for v in getattr(obj, n) if v <= 0]
        if bad:
            yield n, f"every entry must be positive, got {bad[0]}"


def one_of(obj: Any, name: str, valid: Sequence[str], what: str = "") -> Problems:
    v = getattr(obj, name)
    if v not in valid:
        yield name, f"unknown {what or name} '{v}'{near(v, valid)} (choose from {', '.join(valid)})"

"""Decoding the running rows only (serve.decode_widths): the engine's decode step at a few batch widths compiled at
start-up (powers of two up to `slots` by default), each taking the cache rows (slots) of the running jobs, padded
to the width with an inactive marker (row id `slots`: its KV write is dropped, its token ignored). Each step runs the
narrowest width that holds the running jobs, so a step costs what the running jobs need, not what `slots` rows do;
the full width runs the masked decode over every slot as before (no row gather: the cheapest program when every
slot runs, and the only one an exported backend has).

A job's sampling key is fold_in(key(seed), i) for its i-th token and `infer.sample` draws each row alone, so a
seeded request draws the same tokens whatever width or column it lands in.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from fastserve.serve.programs import sampled_columns


def resolve_widths(value: Any, slots: int) -> list[int]:
    """serve.decode_widths → the sorted widths the engine compiles, `slots` always the last: "auto" = powers of two
    below slots, [] = slots only (ValueError naming the key for anything else)."""
    if value == "auto":
        widths = [1 << i for i in range(slots.bit_length()) if 1 << i < slots]
    elif isinstance(value, (list, tuple)) and all(isinstance(w, int) and not isinstance(w, bool) for w in value):
        widths = list(value)
        if any(not 1 <= w <= slots for w in widths):
            raise ValueError(f"serve.decode_widths={widths}: every width must be in [1, serve.slots={slots}]")
    else:
        raise ValueError(f"serve.decode_widths={value!r}: expected auto or a list of batch widths in [1, slots]")
    return sorted(set(widths) | {slots})


def job_arrays(jobs: Sequence[Any], width: int, columns: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The decode inputs of `jobs`: ints [6, width] (token, position, seed, count, top_k, active), floats [2, width]
    (temperature, top_p); job i in column columns[i] (default i); other columns inactive."""
    ints = np.zeros((6, width), np.int32)
    floats = np.zeros((2, width), np.float32)
    floats[1] = 1.0
    for i, job in enumerate(jobs):
        c, n = (i if columns is None else columns[i]), len(job.output)
        ints[:, c] = (job.output[-1], position(job), job.seed % 2 ** 31, n, job.top_k, 1)
        floats[:, c] = (job.temperature, job.top_p)
    return ints, floats


class RowDecoder:
    """Runs one decode step of the running jobs on `programs` at the narrowest of `widths` holding them (a backend
    without `row_decode`, e.g. an export: the full width only; none below its `min_row_width`); counts the calls
    per width.

    With a backend that profiled its decode windows (ModelPrograms.step_s: seconds per (width, window)), a step whose
    jobs sit in different windows may run as two calls — the short jobs in their narrow window, the long ones in the
    wide one — when the profile says the two cost less than one call attending every row to the longest job's
    length: one 2,000-token job then no longer makes every short stream pay for its context."""

    SPLIT_GAIN = 0.8     # split only when the two calls are profiled at <= 80 % of the one (profiles are noisy)

    def __init__(self, programs: Any, slots: int, widths: Sequence[int], chunk: int = 0):
        self.programs, self.slots = programs, slots
        row_decode = getattr(programs, "row_decode", False)
        least = getattr(programs, "min_row_width", 1)     # a backend's narrowest useful width
        self.widths = sorted(w for w in widths if w >= least or w == slots) if row_decode else [slots]
        # serve.prefill_chunk on a backend with row decode: prompt pieces ride in the decode step (`fused_step`),
        # at the row widths below `slots` or at slots + a quarter, a half or all of the chunk (whose first `slots`
        # columns are sampled): a short prompt does not pay for a whole chunk's padding columns
        self.fused_widths = sorted({slots + max(1, chunk // d) for d in (4, 2, 1)}) if chunk and row_decode else []
        self.chunk = chunk
        self.steps = {w: 0 for w in self.widths + self.fused_widths}
        self.split_steps = self.fused_steps = 0

    @property
    def fused(self) -> int:
        """The widest step that carries prompt pieces (0: pieces never ride)."""
        return self.fused_widths[-1] if self.fused_widths else 0

    def width(self, n: int) -> int:
        """The narrowest width holding `n` running jobs."""
        return next(w for w in self.widths if w >= n)

    def step(self, cache: Any, jobs: Sequence[Any]) -> tuple[list[int], Any]:
        """Decodes `jobs` (each in its slot `job._slot`) → (their sampled tokens, in order; the cache, donated)."""
        groups = self.plan(jobs)
        self.split_steps += len(groups) > 1
        tokens: dict[int, int] = {}
        for group in groups:
            toks, cache = self._call(cache, group)
            tokens.update(zip(map(id, group), toks))
        return [tokens[id(j)] for j in jobs], cache

    def fused_step(self, cache: Any, jobs: Sequence[Any], pieces: Sequence[Any]
                   ) -> tuple[list[int], list[tuple[int, int]], Any]:
        """`step` of `jobs` that also writes the next prompt tokens of `pieces` (jobs whose slot holds the first
        `job._filled` positions of their prompt) in the same call, SARATHI's hybrid batch → (the jobs' tokens; per
        piece (positions written now, the token sampled from its last one: the first output token once the prompt
        is complete); the cache, donated).

        Columns: the jobs' first, then each piece's last token (sampled as a prefill samples: count 0), then the
        pieces' other tokens: `chunk` tokens in all (pieces in order; one that gets no room writes 0 positions), at
        the narrowest width holding them and the jobs. A prompt token is a column of its slot's row at its own position:
        the model writes every column's KV before any column attends, so a piece's tokens see each other causally
        (models/decoder.py)."""
        r, left = len(jobs), [len(j.tokens) - j._filled for j in pieces]
        width = next(w for w in [w for w in self.widths if w < self.slots] + self.fused_widths
                     if w >= r + min(self.chunk, sum(left)) or w == self.fused)
        # at most `chunk` prompt tokens a step, even where the width has more room: a padding column costs its
        # share of the products only, a prompt token also attends over every position before it
        room, spans = min(width - r, self.chunk), []
        for n in left:
            spans.append(min(n, room))
            room -= spans[-1]
        ints, floats = job_arrays(jobs, width)
        rows = np.full(width, self.slots, np.int32)
        rows[:r] = [j._slot for j in jobs]
        written = [(j, j._filled, n) for j, n in zip(pieces, spans) if n]
        last = r + np.arange(len(written))
        rest = iter(range(r + len(written), width))
        for i, (job, start, n) in enumerate(written):
            for p in range(start, start + n):
                c = last[i] if p == start + n - 1 else next(rest)
                rows[c] = job._slot
                ints[:, c] = (job.tokens[p], p, job.seed % 2 ** 31, 0, job.top_k, 1)
                floats[:, c] = (job.temperature, job.top_p)
        self.steps[width] += 1
        self.fused_steps += 1
        toks, cache = self.programs.decode_rows(cache, rows, ints, floats, head=sampled_columns(width, self.slots))
        toks = np.asarray(jax.device_get(toks))
        done = {id(job): (n, int(toks[last[i]])) for i, (job, _, n) in enumerate(written)}
        return [int(t) for t in toks[:r]], [done.get(id(j), (0, -1)) for j in pieces], cache

    def plan(self, jobs: Sequence[Any]) -> list[list[Any]]:
        """The calls of this step: [jobs], or [short jobs, long jobs] when the profile prices that lower."""
        profile = getattr(self.programs, "step_s", None)
        if not profile or len(jobs) < 2:
            return [list(jobs)]
        ordered = sorted(jobs, key=position)
        window = self.programs.window_of
        wide = window(position(ordered[-1]))
        best, cut = profile[(self.width(len(jobs)), wide)] * self.SPLIT_GAIN, 0
        for k in range(1, len(ordered)):
            narrow = window(position(ordered[k - 1]))
            if narrow < wide:
                cost = profile[(self.width(k), narrow)] + profile[(self.width(len(jobs) - k), wide)]
                if cost < best:
                    best, cut = cost, k
        return [ordered[:cut], ordered[cut:]] if cut else [list(jobs)]

    def _call(self, cache: Any, jobs: Sequence[Any]) -> tuple[list[int], Any]:
        w = self.width(len(jobs))
        self.steps[w] += 1
        if w == self.slots:      # every slot: the masked decode, each job in its slot's column
            columns = [j._slot for j in jobs]
            ints, floats = job_arrays(jobs, w, columns)
            toks, cache = self.programs.decode(cache, ints, floats)
        else:                    # the jobs' rows in columns 0.., padded with row id `slots` (out of the cache)
            columns = list(range(len(jobs)))
            rows = np.full(w, self.slots, np.int32)
            rows[:len(jobs)] = [j._slot for j in jobs]
            ints, floats = job_arrays(jobs, w)
            toks, cache = self.programs.decode_rows(cache, rows, ints, floats)
        toks = np.asarray(jax.device_get(toks))              # the one device→host transfer of the call
        return [int(toks[c]) for c in columns], cache


def position(job: Any) -> int:
    """The position a job's next decode step writes (its last token's)."""
    return len(job.tokens) + len(job.output) - 1

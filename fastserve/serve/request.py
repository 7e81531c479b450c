"""A generation request as the serving engine sees it: prompt ids, sampling settings, the stream of its tokens, and
the timings from which TTFT / TPOT / JCT are computed. `summarize` aggregates them (mean / p50 / p99)."""
from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:
    from fastserve.serve.kv import HostKV

_ids = itertools.count()
_END = object()          # end of a request's token stream (put on its queue by the engine)


class QueueFull(RuntimeError):
    """The engine holds `serve.max_queue` unfinished requests already (the HTTP server answers 429 with Retry-After)."""


@dataclass(eq=False)
class Request:
    """One generation job: the prompt's token ids, sampling settings, and (filled by the engine) its results/timings.

    temperature 0 → greedy; top_k 0 → off; top_p 1.0 → off. stop_ids None → the model's stop tokens.
    A stop token ends the output and is included in it (finish_reason "stop"); else "length" at max_new_tokens.
    Times are on the engine's clock (time.perf_counter by default).
    """
    tokens: Sequence[int]
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: Sequence[int] | None = None
    on_token: Callable[["Request", int], None] | None = None     # called on the engine thread
    on_finish: Callable[["Request"], None] | None = None
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")

    # results and metrics (engine-owned)
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None        # stop | length | cancelled | error
    error: str | None = None
    arrival: float = 0.0
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish_time: float | None = None
    preemptions: int = 0                    # times it ran in one iteration and not in the next, unfinished
    offloads: int = 0                       # evictions whose KV went to host memory
    offloaded_bytes: int = 0
    recomputes: int = 0                     # evictions whose KV was dropped and recomputed on resume
    bucket: int = 0
    prefill_time: float = 0.0               # the profiled prefill time of its bucket (MLFQ skip-join)

    def __post_init__(self) -> None:
        self.tokens = [int(t) for t in self.tokens]
        self._slot: int | None = None
        self._host: HostKV | None = None          # its KV rows in host memory while evicted
        self._recompute = False
        self._filled = 0                          # prompt positions written by a chunked prefill in progress
        self._prefilling = False                  # its slot holds part of its prompt (chunked prefill)
        self._cancel = False
        self._submitted = False
        self._live = False                        # counts against the engine's serve.max_queue
        self._stop: frozenset[int] = frozenset()
        self._queue: queue.Queue = queue.Queue()
        self._done = threading.Event()

    # -- results
    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def stream(self, timeout: float | None = None) -> Iterator[int]:
        """Yields the generated token ids as they come, until the request finishes (raises on an engine error)."""
        while True:
            item = self._queue.get(timeout=timeout)
            if item is _END:
                if self.finish_reason == "error":
                    raise RuntimeError(f"request {self.id} failed: {self.error}")
                return
            yield item

    # -- metrics
    @property
    def ttft(self) -> float | None:
        """Time to first token (arrival → first token)."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (mean gap)."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)

    @property
    def jct(self) -> float | None:
        """Job completion time (arrival → finish)."""
        return None if self.finish_time is None else self.finish_time - self.arrival


def summarize(requests: Sequence[Request]) -> dict[str, float]:
    """Mean / p50 / p99 of TTFT, TPOT and JCT (seconds) over finished requests."""
    out: dict[str, float] = {}
    for name in ("ttft", "tpot", "jct"):
        vals = sorted(v for v in (getattr(r, name) for r in requests) if v is not None)
        if vals:
            out[f"{name}_mean"] = float(np.mean(vals))
            out[f"{name}_p50"] = float(np.percentile(vals, 50))
            out[f"{name}_p99"] = float(np.percentile(vals, 99))
    out["requests"] = float(len(requests))
    out["tokens"] = float(sum(len(r.output) for r in requests))
    return out

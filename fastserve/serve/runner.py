"""The engine's drivers: stepping it synchronously until its requests are done, or on a background thread for a
server (`start()` / `stop()`), and its `stats()` report. A mixin of `Engine` (fastserve/serve/engine.py), which owns
the state they use."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Sequence

from fastserve.serve.request import Request
from fastserve.serve.scheduler import MLFQScheduler

log = logging.getLogger("fastserve.serve.engine")


class Runner:
    """Drives an engine's `step()` and reports its state; the engine provides step, submit, clock, _finish, and the
    state _step_lock, _lock, _inbox, _jobs, _live, _last_running, _slot_job, _host_jobs, pool, prefix, rows, scheduler,
    counters, profile, _thread, _stop_event, _wake."""

    @property
    def pending(self) -> int:
        """Requests submitted and not finished (a cancelled one until the loop has retired it)."""
        with self._lock:
            return len(self._inbox) + len(self._jobs)

    @property
    def live(self) -> int:
        """Requests submitted, not finished and not cancelled: what serve.max_queue bounds."""
        with self._lock:
            return self._live

    def run_until_done(self, timeout: float | None = None) -> None:
        """Steps synchronously until every submitted request has finished."""
        deadline = None if timeout is None else self.clock() + timeout
        while self.pending:
            if deadline is not None and self.clock() > deadline:
                raise TimeoutError(f"{self.pending} requests unfinished after {timeout} s")
            if not self.step():
                time.sleep(0.001)

    def generate(self, requests: Sequence[Request], timeout: float | None = None) -> list[Request]:
        """Submits `requests` and returns them finished (steps here, or waits for the background runner)."""
        for r in requests:
            self.submit(r)
        if self._thread is not None and self._thread.is_alive():
            for r in requests:
                if not r.wait(timeout):
                    raise TimeoutError(f"request {r.id} unfinished after {timeout} s")
        else:
            self.run_until_done(timeout)
        return list(requests)

    def start(self) -> None:
        """Runs the loop on a background thread (for a server); `stop()` ends it."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop_event.clear()
        self._thread = threading.Thread(target=self._run, name="fastserve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Ends the background loop (waits up to `timeout` seconds for its current step)."""
        self._stop_event.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop_event.is_set():
            try:
                worked = self.step()
            except Exception as e:  # fail what was in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(f"{type(e).__name__}: {e}")
                worked = False
            if not worked:
                self._wake.wait(0.002 if self.pending else 0.1)
                self._wake.clear()

    def _fail_all(self, error: str) -> None:
        """Finishes every request in flight with `error` and starts the KV state afresh (after a failed step)."""
        with self._step_lock:
            with self._lock:
                arrivals, self._inbox = self._inbox, []
            now = self.clock()
            for job in list(self._jobs) + arrivals:
                self._finish(job, "error", now, error)
            self._last_running = []
            self._slot_job = [None] * self.slots
            self._host_jobs.clear()
            self.pool.reset()
            if self.prefix is not None:
                self.prefix.reset()

    def stats(self) -> dict[str, Any]:
        """Counters, the start-up profile, and the scheduler's queues."""
        out: dict[str, Any] = dict(self.counters)
        out.update(scheduler=self.scheduler.name, slots=self.slots, max_cache_len=self.max_len, buckets=self.buckets,
                   running=sum(j is not None for j in self._slot_job), waiting=self.pending,
                   host_kv_in_use=len(self._host_jobs), profile=self.profile,
                   decode_width_steps=dict(self.rows.steps),     # decode steps run at each batch width
                   fused_steps=self.rows.fused_steps)            # of them, steps that also wrote prompt pieces
        if self.pool.paged:
            out["paged_kv"] = self.pool.stats()
        if self.prefix is not None:   # hit_tokens / queried_tokens: prompt tokens copied from the store / looked up
            out["prefix_cache"] = self.prefix.stats()
        if isinstance(self.scheduler, MLFQScheduler):
            out["mlfq"] = dict(quanta=[self.scheduler.quantum(i) for i in range(self.scheduler.levels)],
                               queue_lengths=[len(q) for q in self.scheduler.queues()],
                               demotions=self.scheduler.demotions, promotions=self.scheduler.promotions)
        return out

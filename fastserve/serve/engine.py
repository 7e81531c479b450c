"""The serving engine: fixed decode slots over a preallocated KV cache, driven one iteration at a time by a scheduler.

Shapes stay static (ARCHITECTURE.md, "Serving keeps shapes static"):
  * a prompt's KV is written into a free slot by fastserve/serve/prefill.py: prefilled alone, right-padded to the
    smallest fitting bucket (every bucket compiled at start-up), its rows inserted by a jitted insert whose slot
    index is a traced argument (one compile for all slots; the pool's cache is donated); past the largest bucket,
    the rest by the extend program in chunks. With serve.prefix_cache, the longest cached prefix of the prompt is
    copied from the prefix store (fastserve/serve/prefix_cache.py) instead, and only the rest is extended;
  * with serve.prefill_chunk, while streams decode, a new prompt is written `chunk` tokens per iteration as extra
    columns of their decode step (SARATHI's hybrid batch, fastserve/serve/active_rows.py; a backend without row
    decode, e.g. an export: one extend call per chunk), so a long prompt does not stall running streams;
  * one jitted decode step runs the running jobs' rows at the narrowest of a few batch widths compiled at start-up
    (serve.decode_widths, fastserve/serve/active_rows.py), or every slot at the full width (slots not scheduled
    this iteration masked: their position is set past the cache, so their KV write is dropped and their token
    ignored), with per-job temperature / top_k / top_p and per-job randomness: the key of a request's i-th token is
    fold_in(key(seed), i), whatever slot, width or schedule it runs in;
  * the per-slot inputs go up as two small arrays and the sampled tokens [slots] come back in ONE device→host
    transfer per step; stop tokens and lengths are checked on the host.

With serve.kv_cache_bytes (paged KV, fastserve/serve/paged_kv.py) the cache is a pool of blocks sized from that
budget: a slot holds the blocks its job has written, the jobs scheduled each iteration get the blocks they need or
wait, and jobs are evicted (as below) when blocks run out.

A preempted job keeps its slot while no other job needs it. When one does, the resident jobs not scheduled this
iteration are evicted lowest priority first: their KV rows go to host memory (numpy; at most `host_kv_slots` jobs)
and come back into any free slot when the job runs again; beyond that budget the rows are dropped and recomputed
from prompt + generated tokens on resume (counted as recomputes).

`step()` is synchronous and single-threaded; `start()` runs it on a background thread for a server, and `submit()`
is thread-safe. Each request streams through `Request.stream()` and / or its `on_token` callback.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from fastserve.config import ServeConfig
from fastserve.serve.active_rows import RowDecoder, job_arrays, resolve_widths
from fastserve.serve.kv import KVPool, evict_job
from fastserve.serve.paged_kv import fit_blocks, kv_positions, paged_backend
from fastserve.serve.prefill import SlotFiller
from fastserve.serve.prefix_cache import PrefixCache
from fastserve.serve.programs import ModelPrograms, serving_model, warm_and_profile
from fastserve.serve.request import _END, QueueFull, Request, summarize
from fastserve.serve.runner import Runner
from fastserve.serve.scheduler import Scheduler, levels_covering, make_scheduler
from fastserve.serve.validation import check_config, check_request

log = logging.getLogger(__name__)

__all__ = ["Engine", "Request", "QueueFull", "summarize"]   # Request & co. live in fastserve/serve/request.py


class Engine(Runner):
    """Continuous-batching engine over `cfg.slots` decode slots, scheduled by fcfs / static / mlfq / gittins.

    graphdef, params: the model (`nnx.split`, params a pure dict placed on `mesh`); model_cfg: its ModelConfig.
    `scheduler` / `iteration_cost` override cfg's; `programs`: the prefill / decode / extend backend (default:
    ModelPrograms over graphdef + params; `from_exported` passes an ExportedPrograms and no graphdef / params).
    """

    def __init__(self, graphdef: Any, params: Any, model_cfg: Any, cfg: ServeConfig | None = None, *, mesh: Any = None,
                 stop_ids: Sequence[int] = (), pad_id: int = 0, scheduler: Scheduler | None = None,
                 iteration_cost: str | None = None, clock: Callable[[], float] = time.perf_counter,
                 programs: Any = None):
        cfg = cfg or ServeConfig()
        if programs is None:        # per-layer weights, W8A8 ones in the CPU kernel's layout (serving_model)
            graphdef, params, model_cfg = serving_model(graphdef, params, model_cfg, mesh, cfg.pack_int8)
        self.cfg, self.model_cfg, self.graphdef, self.params, self.mesh = cfg, model_cfg, graphdef, params, mesh
        self.clock = clock
        self.iteration_cost = iteration_cost or cfg.iteration_cost
        self.max_len, self.buckets = check_config(cfg, model_cfg, self.iteration_cost, scheduler is not None)
        self.slots = cfg.slots
        self.vocab = model_cfg.vocab_size
        self.stop_ids = frozenset(int(t) for t in stop_ids)
        self.pad_id = max(int(pad_id), 0)

        self.programs = programs or ModelPrograms(graphdef, params, self.max_len)
        self.programs.check(self.max_len, self.buckets, self.slots)
        if cfg.kv_cache_bytes or cfg.kv_cache_memory_fraction:
            self.pool, self.programs = paged_backend(cfg, self.programs, self.max_len, self.buckets, mesh)
        else:
            self.pool = KVPool(self.programs.cache_spec, self.slots, self.max_len, self.buckets, mesh,
                               self.programs.device)
        self.prefix = PrefixCache(self.pool, cfg.prefix_cache_block, cfg.prefix_cache_bytes) \
            if cfg.prefix_cache else None
        self.rows = RowDecoder(self.programs, self.slots, resolve_widths(cfg.decode_widths, self.slots),
                               cfg.prefill_chunk)
        self.filler = SlotFiller(self.programs, self.pool, self.buckets, self.pad_id, self.prefix, cfg.prefill_chunk,
                                 fused=bool(self.rows.fused))

        # scheduling state
        self._lock = threading.Lock()            # guards the inbox and _live (submit() runs on other threads)
        self._step_lock = threading.Lock()
        self._inbox: list[Request] = []
        self._live = 0                           # submitted, not cancelled, not finished: what max_queue bounds
        self._jobs: set[Request] = set()         # admitted, unfinished
        self._slot_job: list[Request | None] = [None] * self.slots
        self._host_jobs: set[Request] = set()
        self._last_running: list[Request] = []
        self.counters = dict(steps=0, decode_steps=0, prefills=0, tokens=0, preemptions=0, offloads=0,
                             offloaded_bytes=0, restores=0, recomputes=0, recompute_extends=0, finished=0,
                             decode_slot_steps=0, prefill_extends=0)
        # decode_slot_steps: jobs decoded, summed over decode steps; prefill_extends: prompt chunks past a bucket
        # wall seconds spent per kind of work (where a step's time goes: the benchmark's throughput breakdown)
        self.timings = dict(schedule=0.0, prefill=0.0, decode=0.0, restore=0.0, offload=0.0, recompute=0.0)
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._wake = threading.Event()

        self.profile = self.filler.profile = self._warm_and_profile()
        q0 = cfg.mlfq_base_quantum_s or self.profile["decode_s"]
        # the longest job the engine accepts, at the profiled speed: the largest bucket's prefill, then decode steps
        longest = self.profile["prefill_s"][self.buckets[-1]] + \
            min(cfg.max_new_tokens_limit, self.max_len) * self.profile["decode_s"]
        self.mlfq_levels = cfg.mlfq_levels or levels_covering(q0, longest)
        if scheduler is None:   # (an empty Scheduler is falsy: it has a length)
            scheduler = make_scheduler(cfg.scheduler, levels=self.mlfq_levels, base_quantum_s=q0,
                                       starvation_s=cfg.starvation_s, starvation_quanta=cfg.starvation_quanta,
                                       batch_timeout_s=cfg.batch_timeout_s,
                                       size_quantile=cfg.mlfq_size_quantile)
        self.scheduler = scheduler

    @classmethod
    def from_loaded(cls, loaded: Any, cfg: ServeConfig | None = None, **kwargs: Any) -> "Engine":
        """From `fastserve.workdir.load_model(cfg)`'s LoadedModel."""
        return cls(loaded.graphdef, loaded.params, loaded.model_cfg, cfg, mesh=loaded.mesh, stop_ids=loaded.stop_ids,
                   pad_id=getattr(loaded.tokenizer, "pad_id", 0), **kwargs)

    @classmethod
    def from_exported(cls, exp: Any, cfg: ServeConfig | None = None, **kwargs: Any) -> "Engine":
        """From `fastserve.artifacts.loader.load_exported(dir)`'s ExportedModel (serve.max_cache_len 0: the export's)."""
        from fastserve.serve.backends import ExportedPrograms
        p = ExportedPrograms(exp)
        return cls(None, None, p.model_cfg, p.serve_config(cfg), stop_ids=exp.stop_ids, pad_id=exp.pad_id, programs=p,
                   **kwargs)

    # ------------------------------------------------------------------------------------------- start-up

    def _ctx(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _warm_and_profile(self, repeats: int = 3) -> dict[str, Any]:
        """Compiles every bucket's prefill, the decode step, the recompute extend and the pool's moves (and with a
        prefix cache its moves and every bucket's extend); times them."""
        with self._ctx():
            profile = warm_and_profile(self.programs, self.pool, self.buckets, self.pad_id, job_arrays([], self.slots),
                                       self.clock, repeats, extend_widths=self.buckets if self.filler.fitted else (),
                                       decode_widths=self.rows.widths + self.rows.fused_widths)
            if self.prefix is not None:
                profile["prefix_load_s"] = self.prefix.warm(self.clock, repeats)
            return profile

    # ----------------------------------------------------------------------------------------- requests

    def check(self, req: Request) -> None:
        """Raises ValueError (naming the setting) unless this engine can serve `req`; queues nothing."""
        check_request(req, self.buckets, self.max_len, self.cfg.max_new_tokens_limit, self.vocab)

    def submit(self, req: Request) -> Request:
        """Validates and queues a request (thread-safe). Raises ValueError for a bad request, QueueFull when full."""
        self.submit_many([req])
        return req

    def submit_many(self, reqs: Sequence[Request]) -> list[Request]:
        """Validates and queues `reqs` all or none (thread-safe): ValueError for a bad request or a batch larger
        than serve.max_queue, QueueFull when the free capacity cannot take the whole batch now; nothing is queued
        then. Capacity counts live requests only (a cancelled one frees its place at once)."""
        reqs = list(reqs)
        for req in reqs:
            self.check(req)
        if len({id(r) for r in reqs}) != len(reqs):
            raise ValueError("the same request object appears twice in the batch")
        mq = self.cfg.max_queue
        if len(reqs) > mq:
            raise ValueError(f"{len(reqs)} requests at once; the engine queues at most {mq} (serve.max_queue)")
        with self._lock:
            for req in reqs:
                if req._submitted:
                    raise ValueError(f"request {req.id} was already submitted")
            if self._live + len(reqs) > mq:
                raise QueueFull(f"the engine holds serve.max_queue={mq} requests" if len(reqs) == 1 else
                                f"the engine holds {self._live} of serve.max_queue={mq} requests; {len(reqs)} more "
                                f"do not fit")
            now = self.clock()
            for req in reqs:
                req.arrival = now
                req.bucket = next((b for b in self.buckets if b >= len(req.tokens)), self.buckets[-1])
                req.prefill_time = self.filler.estimate(len(req.tokens))
                req._stop = frozenset(int(t) for t in req.stop_ids) if req.stop_ids is not None else self.stop_ids
                req._submitted = req._live = True
                self._live += 1
                self._inbox.append(req)
        self._wake.set()
        return reqs

    def cancel(self, req: Request) -> None:
        """Stops a request at the next iteration (finish_reason "cancelled"); thread-safe. It stops counting
        against serve.max_queue at once."""
        req._cancel = True
        with self._lock:
            self._release(req)
        self._wake.set()

    def _release(self, req: Request) -> None:
        """`req` no longer counts as live (cancelled or finished); idempotent. Call with self._lock held."""
        if req._live:
            req._live = False
            self._live -= 1

    # -------------------------------------------------------------------------------------------- the loop

    def step(self) -> bool:
        """One iteration: admit, schedule, (evict / prefill / restore / recompute), decode, retire.

        Returns False when nothing ran (no job, or the scheduler is waiting, e.g. static forming a batch)."""
        with self._step_lock, self._ctx():
            return self._step()

    def _step(self) -> bool:
        now = self.clock()
        with self._lock:
            arrivals, self._inbox = self._inbox, []
        for req in arrivals:
            if self.prefix is not None and (cached := self.filler.reusable(req.tokens)):
                req.prefill_time = self.filler.estimate(len(req.tokens), cached)     # what MLFQ's skip-join sees
            self._jobs.add(req)
            self.scheduler.add(req, req.arrival)
        for req in [j for j in self._jobs if j._cancel]:
            self._finish(req, "cancelled", now)
        selected = list(self.scheduler.select(now, self.slots))[:self.slots]
        if self.pool.paged:     # only the jobs whose KV blocks fit run (evicting lower-priority ones for them)
            selected = fit_blocks(self, selected)
        self.timings["schedule"] += self.clock() - now
        finished_last = {j for j in self._last_running if j.finish_reason is not None}
        for job in self._last_running:
            if job not in finished_last and job not in selected:
                job.preemptions += 1
                self.counters["preemptions"] += 1
        self._last_running = selected
        if not selected:
            return False
        self.counters["steps"] += 1
        cost: dict[Request, float] = {j: 0.0 for j in selected}

        # make room: evict resident jobs that are not scheduled now, lowest priority first
        chosen = set(selected)
        need = [j for j in selected if j._slot is None]
        free = [s for s, j in enumerate(self._slot_job) if j is None]
        if len(need) > len(free):
            paused = [j for j in self._slot_job if j is not None and j not in chosen]
            paused.sort(key=self.scheduler.priority, reverse=True)
            t0 = self.clock()
            for victim in paused[:len(need) - len(free)]:
                free.append(self._evict(victim))
            self.timings["offload"] += self.clock() - t0
        # place: prefill new jobs, bring back offloaded ones, recompute dropped ones
        prefilled = []

        def streaming() -> bool:    # streams decode this iteration (one just prefilled too): chunk long prefills
            return any(j.output and j.finish_reason is None for j in selected)
        for job in need:
            slot = free.pop(0)
            self.pool.grow(slot, kv_positions(job))      # paged: blocks fit_blocks reserved
            t0 = self.clock()
            if job._host is not None:
                self.pool.restore(job._host, slot)
                self._host_jobs.discard(job)
                job._host = None
                self.counters["restores"] += 1
                self.timings["restore"] += self.clock() - t0
            elif job._recompute:
                self._recompute(job, slot)
                job._recompute = False
                self.timings["recompute"] += self.clock() - t0
            else:
                self._slot_job[slot], job._slot = job, slot
                if self.rows.fused and streaming():   # a cached prefix copied now, the rest in decode steps
                    job._filled, job._prefilling = self.filler.begin(job.tokens, slot), True
                    continue
                self._prefill(job, cost, streaming())
                prefilled.append(job)
                continue
            if self.iteration_cost == "measured":       # a resumed job is charged for bringing its KV back
                cost[job] += self.clock() - t0
            self._slot_job[slot], job._slot = job, slot
        fuse = bool(self.rows.fused) and streaming()     # prompt pieces ride in the decode step
        pieces = [j for j in selected if j._prefilling and j not in prefilled] if fuse else []
        for job in selected:        # chunked prefills in progress (serve.prefill_chunk): one more chunk each
            if job._prefilling and job not in prefilled and not fuse:
                self._prefill(job, cost, streaming())
                prefilled.append(job)
        # one decode step of the scheduled, unfinished jobs that were not just prefilled (+ prompt pieces)
        decoding = [j for j in selected if j not in prefilled and j not in pieces and j.finish_reason is None]
        if decoding or pieces:
            t0 = self.clock()
            if pieces:
                toks, written, self.pool.cache = self.rows.fused_step(self.pool.cache, decoding, pieces)
            else:
                toks, self.pool.cache = self.rows.step(self.pool.cache, decoding)
            t = self.clock()
            self.counters["decode_steps"] += 1
            self.counters["decode_slot_steps"] += len(decoding)
            self.timings["decode"] += t - t0
            for job, tok in zip(decoding, toks):
                # profiled: the full-width step whatever the width, so the schedule does not depend on the load
                cost[job] += t - t0 if self.iteration_cost == "measured" else self.profile["decode_s"]
                self._emit(job, tok, t)
            for job, (n, tok) in zip(pieces, written if pieces else ()):
                cost[job] += t - t0 if self.iteration_cost == "measured" else job.prefill_time * n / len(job.tokens)
                job._filled += n
                if job._filled == len(job.tokens):
                    self._prompt_done(job, tok, t)
        for job in selected:
            if job.finish_reason is None:
                self.scheduler.on_iteration(job, cost[job])
        return True

    def _prefill(self, job: Request, cost: dict[Request, float], chunked: bool) -> None:
        """Writes the prompt's KV into the job's slot (a cached prefix copied, the rest prefilled) and emits the
        first token; `chunked` (streams are decoding) with serve.prefill_chunk: one chunk per call (the job keeps
        its slot and `_filled` position)."""
        t0 = self.clock()
        ints = np.array([[job.seed % 2 ** 31], [0], [job.top_k]], np.int32)
        floats = np.array([[job.temperature], [job.top_p]], np.float32)
        before = job._filled
        tok, extends, job._filled = self.filler.fill(job.tokens, job._slot, ints, floats, save=False, start=before,
                                                     chunked=chunked, begun=job._prefilling)
        self.counters["prefill_extends"] += extends
        t = self.clock()
        self.timings["prefill"] += t - t0
        share = (job._filled - before) / len(job.tokens)
        cost[job] += t - t0 if self.iteration_cost == "measured" else job.prefill_time * share
        job._prefilling = tok is None
        if tok is not None:
            self._prompt_done(job, tok, t)

    def _prompt_done(self, job: Request, tok: int, t: float) -> None:
        """The prompt's KV is in the job's slot and `tok` is its first token."""
        job._filled, job._prefilling = 0, False
        self.counters["prefills"] += 1
        # the prompt's blocks go into the prefix store after its first token is out (not part of its TTFT), or
        # before it when that token ends the request (its slot is freed then)
        slot, last = job._slot, tok in job._stop or len(job.output) + 1 >= job.max_new_tokens
        if self.prefix is not None and last:
            self.prefix.save(job.tokens, slot)
        self._emit(job, tok, t)
        if self.prefix is not None and not last:
            self.prefix.save(job.tokens, slot)

    def _recompute(self, job: Request, slot: int) -> None:
        """Rebuilds the KV of prompt + generated[:-1] in `slot` (from a cached prefix where there is one)."""
        _, extends, _ = self.filler.fill(job.tokens + job.output[:-1], slot, None, None, save=False)
        self.counters["recompute_extends"] += extends

    def _evict(self, job: Request) -> int:
        """Frees `job`'s slot (fastserve/serve/kv.py's evict_job) → the slot."""
        return evict_job(self, job)

    def _emit(self, job: Request, tok: int, t: float) -> None:
        job.output.append(tok)
        job.token_times.append(t)
        if job.first_token_time is None:
            job.first_token_time = t
        self.counters["tokens"] += 1
        job._queue.put(tok)
        if job.on_token is not None:
            try:
                job.on_token(job, tok)
            except Exception:  # a consumer's bug must not stop the engine
                log.exception("on_token callback of %s failed", job.id)
        if tok in job._stop:
            self._finish(job, "stop", t)
        elif len(job.output) >= job.max_new_tokens:
            self._finish(job, "length", t)

    def _finish(self, job: Request, reason: str, t: float, error: str | None = None) -> None:
        with self._lock:
            self._release(job)
        if self.prefix is not None and job._slot is not None and reason in ("stop", "length") and len(job.output) > 1:
            # its generated tokens' KV too: a chat's next turn starts with this one's prompt and answer
            self.prefix.save(job.tokens + job.output[:-1], job._slot)
        job.finish_reason, job.finish_time, job.error = reason, t, error
        self.scheduler.remove(job)
        self._jobs.discard(job)
        if job._slot is not None:
            self.pool.release(job._slot)
            self._slot_job[job._slot], job._slot = None, None
        self._host_jobs.discard(job)
        job._host = None
        self.counters["finished"] += 1
        job._queue.put(_END)
        job._done.set()
        if job.on_finish is not None:
            try:
                job.on_finish(job)
            except Exception:
                log.exception("on_finish callback of %s failed", job.id)

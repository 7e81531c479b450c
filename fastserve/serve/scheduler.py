"""Iteration-level schedulers for the serving engine (pure Python: no JAX, unit-testable with any job objects).

A job is any object with a hashable identity and two attributes the schedulers read:
  `arrival`       (seconds on the engine's clock) — FCFS order;
  `prefill_time`  (seconds; the engine's profiled prefill time of the job's bucket) — MLFQ's skip-join.

Every engine iteration asks `select(now, slots)` which jobs run (at most `slots`, best first), reports each job's
time in that iteration with `on_iteration(job, seconds)`, and calls `remove(job)` when a job finishes. A job that
was running and is not selected again is preempted (at token granularity); `priority(job)` orders jobs for the
engine's eviction of preempted jobs' KV (the largest key is evicted, i.e. offloaded to host memory, first).

  fcfs    run to completion in arrival order; a free slot is filled at once (continuous batching, vLLM / Orca)
  static  wait until `slots` jobs are waiting (or the oldest waited `batch_timeout_s`), run that batch to
          completion, only then form the next one (the naive baseline)
  mlfq    FastServe's skip-join multi-level feedback queue (Wu et al., 2023): K levels, quantum q_i = q0 * 2**i;
          an arriving job joins the highest level whose quantum is at least its prefill time; a job whose time at
          its level exceeds that level's quantum moves down one level; a job that has waited longer than
          `starvation_s` moves to the top; FCFS within a level (a job entering a level queues at its tail).
          The engine starts with K from `levels_covering` unless serve.mlfq_levels is set: too few levels let short
          jobs sink into the last level (FCFS, no demotion) behind the long ones, which made mlfq lose to fcfs. Too
          many make the long jobs share the slots round-robin through ever deeper levels, so they all finish late
          (processor sharing: the worst order for their mean). So K is then learned (serve.mlfq_size_quantile,
          default 0.8): the last level starts where that quantile of the recently finished jobs had completed —
          jobs known to be long run oldest-first there, short ones still finish above them. On the serving
          benchmark's workload (simulated, 5 seeds of 400 requests: experiments/results/bench_serving_sim.json) this
          took fcfs / mlfq mean JCT from 1.08-1.24x to 1.16-1.44x at capacity (1.14-1.76x to 1.56-2.33x at 1.2x,
          p99 12.5 -> 7.3 s); an oracle that knows every output length reaches 1.21-1.55x (1.71-3.06x).
          `starvation_quanta` K also promotes a job that waited K x its level's quantum (off by default).
  gittins the Gittins index over the service times of recently finished jobs (learned online): LAS where the sizes
          have a decreasing hazard, closest-to-done first where they have an increasing one (e.g. among long jobs)
"""
from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Protocol

import numpy as np


class Job(Protocol):
    arrival: float
    prefill_time: float


class Scheduler:
    """The common interface; subclasses keep their own per-job state keyed by the job object."""

    name = "base"

    def __init__(self) -> None:
        self._seq = itertools.count()
        self._order: dict[Hashable, int] = {}     # job → admission sequence number (ties of equal arrival)

    # -- interface
    def add(self, job: Any, now: float | None = None) -> None:
        if job in self._order:
            raise ValueError(f"{job!r} was already added to the scheduler")
        self._order[job] = next(self._seq)

    def select(self, now: float, slots: int) -> list[Any]:
        raise NotImplementedError

    def on_iteration(self, job: Any, seconds: float) -> None:
        """`job` ran one iteration (a prefill or a decode step) that took `seconds`."""

    def remove(self, job: Any) -> None:
        self._order.pop(job, None)

    def priority(self, job: Any) -> tuple:
        """Sort key: smaller runs first. The engine evicts the largest key first."""
        return (self._fcfs_key(job),)

    # -- helpers
    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, job: Any) -> bool:
        return job in self._order

    @property
    def jobs(self) -> list[Any]:
        return sorted(self._order, key=self._fcfs_key)

    def _fcfs_key(self, job: Any) -> tuple[float, int]:
        return (job.arrival, self._order[job])


class FCFSScheduler(Scheduler):
    """Run to completion in arrival order with continuous batching: the `slots` oldest unfinished jobs run.

    A running job is never preempted: every job that arrives later sorts after it."""

    name = "fcfs"

    def select(self, now: float, slots: int) -> list[Any]:
        return self.jobs[:max(slots, 0)]


class StaticScheduler(Scheduler):
    """Whole batches: once formed, a batch runs until every member has finished; nobody joins it meanwhile."""

    name = "static"

    def __init__(self, batch_timeout_s: float = 0.05) -> None:
        super().__init__()
        self.batch_timeout_s = batch_timeout_s
        self._batch: list[Any] = []

    def select(self, now: float, slots: int) -> list[Any]:
        self._batch = [j for j in self._batch if j in self._order]
        if self._batch:
            return list(self._batch)
        waiting = self.jobs
        if waiting and (len(waiting) >= slots or now - waiting[0].arrival >= self.batch_timeout_s):
            self._batch = waiting[:max(slots, 0)]
        return list(self._batch)

    def priority(self, job: Any) -> tuple:
        return (0 if job in self._batch else 1, *self._fcfs_key(job))

    @property
    def batch(self) -> list[Any]:
        return [j for j in self._batch if j in self._order]


@dataclass
class _Level:
    level: int
    attained: float      # seconds run at this level
    served: float        # seconds run in all (its size so far)
    enqueued: int        # position in the level's FCFS queue (a counter taken on entering the level)
    since: float         # when the job last ran (or entered); the starvation clock


class MLFQScheduler(Scheduler):
    """Skip-join MLFQ. `levels` K, `base_quantum_s` q0; level 0 is the highest priority."""

    name = "mlfq"

    def __init__(self, levels: int = 4, base_quantum_s: float = 0.01, starvation_s: float = 0.0,
                 starvation_quanta: float = 0.0, size_quantile: float = 0.0, history: int = 1000,
                 min_history: int = 20) -> None:
        super().__init__()
        if not 0.0 <= size_quantile < 1.0:
            raise ValueError(f"serve.mlfq_size_quantile={size_quantile}: must be in [0, 1) (0: off)")
        if levels < 1:
            raise ValueError(f"serve.mlfq_levels={levels}: must be at least 1")
        if base_quantum_s <= 0:
            raise ValueError(f"serve.mlfq_base_quantum_s={base_quantum_s}: must be positive")
        self.levels = levels
        self.base_quantum_s = base_quantum_s
        if starvation_s < 0 or starvation_quanta < 0:
            raise ValueError("serve.starvation_s and serve.starvation_quanta must be >= 0 (0: off)")
        self.starvation_s = starvation_s
        self.starvation_quanta = starvation_quanta
        self._state: dict[Hashable, _Level] = {}
        self._enq = itertools.count()
        self.demotions = 0
        self.promotions = 0
        # learned levels: the last level (FCFS, no demotion) begins where `size_quantile` of the recently finished
        # jobs had completed, so jobs known to be long run oldest-first instead of round-robin among themselves
        self.size_quantile, self.min_history = size_quantile, min_history
        self.sizes: collections.deque[float] = collections.deque(maxlen=history)

    def quantum(self, level: int) -> float:
        return self.base_quantum_s * 2 ** level

    def join_level(self, prefill_time: float) -> int:
        """The skip-join: the highest level whose quantum is >= the job's prefill time (else the lowest level)."""
        for i in range(self.levels):
            if self.quantum(i) >= prefill_time:
                return i
        return self.levels - 1

    def starvation_limit(self, level: int) -> float:
        """How long a job at `level` may wait before it is promoted (inf: never): starvation_s, or, if sooner,
        starvation_quanta x the level's quantum: a wait that is long relative to the service the level grants."""
        limits = [self.starvation_s] if self.starvation_s > 0 else []
        if self.starvation_quanta > 0:
            limits.append(self.starvation_quanta * self.quantum(level))
        return min(limits, default=float("inf"))

    def level(self, job: Any) -> int:
        return self._state[job].level

    def add(self, job: Any, now: float | None = None) -> None:
        super().add(job, now)
        now = job.arrival if now is None else now
        self._state[job] = _Level(self.join_level(job.prefill_time), 0.0, 0.0, next(self._enq), now)

    def remove(self, job: Any) -> None:
        super().remove(job)
        st = self._state.pop(job, None)
        # a finished job's service is one more size sample; a cancelled job's partial time is not its size
        if self.size_quantile and st is not None and st.served and \
                getattr(job, "finish_reason", None) != "cancelled":
            self.sizes.append(st.served)
            if len(self.sizes) >= self.min_history:
                self.set_levels(levels_covering(self.base_quantum_s,
                                                float(np.quantile(self.sizes, self.size_quantile)), margin=1.0))

    def set_levels(self, levels: int) -> None:
        """K levels from now on (at least 2); jobs below the new last level join it, in their queue order."""
        self.levels = max(2, levels)
        for st in self._state.values():
            st.level = min(st.level, self.levels - 1)

    def priority(self, job: Any) -> tuple:
        st = self._state[job]
        return (st.level, st.enqueued)

    def select(self, now: float, slots: int) -> list[Any]:
        if self.starvation_s > 0 or self.starvation_quanta > 0:
            starving = [j for j, st in self._state.items() if now - st.since > self.starvation_limit(st.level)]
            # to level 0's tail, the longest-waiting first
            for job in sorted(starving, key=lambda j: (self._state[j].since, self._fcfs_key(j))):
                st = self._state[job]
                if st.level > 0:
                    self.promotions += 1
                    st.level, st.attained, st.enqueued = 0, 0.0, next(self._enq)
                st.since = now
        chosen = sorted(self._state, key=self.priority)[:max(slots, 0)]
        for job in chosen:
            self._state[job].since = now
        return chosen

    def on_iteration(self, job: Any, seconds: float) -> None:
        st = self._state.get(job)
        if st is None:
            return
        st.attained += seconds
        st.served += seconds
        if st.attained > self.quantum(st.level) and st.level < self.levels - 1:
            st.level, st.attained, st.enqueued = st.level + 1, 0.0, next(self._enq)
            self.demotions += 1

    def queues(self) -> list[list[Any]]:
        """Each level's jobs in queue order (level 0 first)."""
        out: list[list[Any]] = [[] for _ in range(self.levels)]
        for job in sorted(self._state, key=self.priority):
            out[self._state[job].level].append(job)
        return out


class GittinsScheduler(Scheduler):
    """Gittins-index scheduling with the job-size distribution learned online (Gittins, 1989; for batching servers
    see Scully et al., "The Gittins policy in the M/G/k queue", 2021): the mean-JCT-optimal policy for unknown job
    sizes. A job that has attained service a has the index

        G(a) = max over s > a of  P(S <= s | S > a) / E[min(S, s) - a | S > a]

    (the best rate of completions per unit of service it can offer), S drawn from the service times of the last
    `history` finished jobs; the `slots` highest indices run. Where sizes have a decreasing hazard (a heavy tail)
    this is least-attained-service, like MLFQ; where they have an increasing one (e.g. within a class of long jobs)
    it favours the job closest to finishing, which MLFQ's processor sharing among the long jobs does not. Until
    `min_history` jobs have finished it falls back to least attained service. The index is tabulated per quantum of
    attained service and refreshed every `refresh` completions; ties (and jobs past every recorded size) go FCFS."""

    name = "gittins"

    def __init__(self, quantum_s: float = 0.01, history: int = 1000, min_history: int = 20, refresh: int = 32):
        super().__init__()
        if quantum_s <= 0:
            raise ValueError(f"gittins quantum {quantum_s}: must be positive")
        self.quantum_s, self.min_history, self.refresh = quantum_s, min_history, refresh
        self.attained: dict[Hashable, float] = {}
        self.sizes: collections.deque[float] = collections.deque(maxlen=history)
        self._table: np.ndarray | None = None
        self._since_refresh = 0

    def add(self, job: Any, now: float | None = None) -> None:
        super().add(job, now)
        self.attained[job] = 0.0

    def on_iteration(self, job: Any, seconds: float) -> None:
        if job in self.attained:
            self.attained[job] += seconds

    def remove(self, job: Any) -> None:
        a = self.attained.pop(job, None)
        super().remove(job)
        # a finished job's service time is one more sample; a cancelled job's partial time is not its size
        if a and getattr(job, "finish_reason", None) != "cancelled":
            self.sizes.append(a)
            self._since_refresh += 1
            if len(self.sizes) >= self.min_history and (self._table is None or self._since_refresh >= self.refresh):
                self._table = gittins_table(np.asarray(self.sizes), self.quantum_s)
                self._since_refresh = 0

    def index(self, job: Any) -> float:
        a = self.attained[job]
        if self._table is None:
            return -a                           # least attained service first
        b = int(a / self.quantum_s)
        return float(self._table[b]) if b < len(self._table) else 0.0

    def priority(self, job: Any) -> tuple:
        return (-self.index(job), *self._fcfs_key(job))

    def select(self, now: float, slots: int) -> list[Any]:
        return sorted(self._order, key=self.priority)[:max(slots, 0)]


def gittins_table(sizes: np.ndarray, quantum_s: float) -> np.ndarray:
    """G(a) for a = 0, q, 2q, ... up to the largest size, from samples of the service time S (seconds)."""
    x = np.sort(sizes)
    out = np.zeros(int(x[-1] / quantum_s) + 1)
    for b in range(len(out)):
        a = b * quantum_s
        rest = x[x > a] - a                     # S - a given S > a, sorted
        if not len(rest):
            break
        k = np.arange(1, len(rest) + 1)
        spent = np.cumsum(rest) + (len(rest) - k) * rest   # E[min(S - a, s)] x n for s = each remaining size
        out[b] = np.max(k / spent)
    return out


SCHEDULERS = ("fcfs", "static", "mlfq", "gittins")


def levels_covering(base_quantum_s: float, longest_s: float, margin: float = 2.0) -> int:
    """The number of MLFQ levels K such that a job is demoted into the last level only after it has run
    `margin` x `longest_s` (the longest job's profiled time): q0 * (2**(K-1) - 1) >= margin * longest_s.

    With too few levels, short jobs sink to the last level along with the long ones before they finish; the last
    level is FCFS and never demotes, so they then queue behind every long job there and MLFQ degrades to FCFS plus
    preemption overhead. Covering the longest job keeps jobs sorted by attained service (geometric bins) instead.
    The margin absorbs measured iteration times above the start-up profile (a loaded machine)."""
    if base_quantum_s <= 0:
        raise ValueError(f"serve.mlfq_base_quantum_s={base_quantum_s}: must be positive")
    k = 1
    while base_quantum_s * (2 ** (k - 1) - 1) < margin * longest_s:
        k += 1
    return k


def make_scheduler(name: str, *, levels: int = 4, base_quantum_s: float = 0.01, starvation_s: float = 0.0,
                   starvation_quanta: float = 0.0, batch_timeout_s: float = 0.05, size_quantile: float = 0.0
                   ) -> Scheduler:
    if name == "fcfs":
        return FCFSScheduler()
    if name == "static":
        return StaticScheduler(batch_timeout_s)
    if name == "mlfq":
        return MLFQScheduler(levels, base_quantum_s, starvation_s, starvation_quanta, size_quantile)
    if name == "gittins":
        return GittinsScheduler(base_quantum_s)
    raise ValueError(f"serve.scheduler='{name}': choose from {', '.join(SCHEDULERS)}")


def preempted(previous: Iterable[Any], current: Iterable[Any], finished: Iterable[Any] = ()) -> list[Any]:
    """Jobs that ran in the previous iteration, have not finished, and do not run in this one."""
    now, done = set(current), set(finished)
    return [j for j in previous if j not in now and j not in done]

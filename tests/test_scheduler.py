"""Schedulers as specifications (pure Python, no JAX): skip-join levels, demotion, starvation, order, batching."""
from dataclasses import dataclass

import pytest

from fastserve.serve.scheduler import (FCFSScheduler, GittinsScheduler, MLFQScheduler, StaticScheduler, gittins_table,
                                       levels_covering, make_scheduler)


@dataclass(eq=False)
class J:
    name: str
    arrival: float = 0.0
    prefill_time: float = 0.0

    def __repr__(self):
        return self.name


def names(jobs):
    return [j.name for j in jobs]


# ------------------------------------------------------------------------------------------------ MLFQ

def test_quanta_double_per_level():
    s = MLFQScheduler(levels=4, base_quantum_s=0.5)
    assert [s.quantum(i) for i in range(4)] == [0.5, 1.0, 2.0, 4.0]


def test_skip_join_picks_the_highest_level_whose_quantum_covers_the_prefill():
    s = MLFQScheduler(levels=4, base_quantum_s=1.0)        # quanta 1, 2, 4, 8
    expected = {0.0: 0, 0.5: 0, 1.0: 0, 1.01: 1, 2.0: 1, 2.5: 2, 4.0: 2, 4.1: 3, 8.0: 3, 100.0: 3}
    assert {p: s.join_level(p) for p in expected} == expected
    jobs = [J(f"p{p}", arrival=0.0, prefill_time=p) for p in (0.2, 3.0, 1.5, 50.0)]
    for j in jobs:
        s.add(j)
    assert [s.level(j) for j in jobs] == [0, 2, 1, 3]
    assert [names(q) for q in s.queues()] == [["p0.2"], ["p1.5"], ["p3.0"], ["p50.0"]]


def test_demotion_after_the_quantum_is_exceeded_and_attained_time_resets():
    s = MLFQScheduler(levels=3, base_quantum_s=1.0)        # quanta 1, 2, 4
    a = J("a", prefill_time=0.1)
    s.add(a)
    s.on_iteration(a, 0.5)
    s.on_iteration(a, 0.5)
    assert s.level(a) == 0                                  # exactly the quantum: not exceeded
    s.on_iteration(a, 0.25)
    assert s.level(a) == 1                                  # 1.25 > 1
    for _ in range(4):
        s.on_iteration(a, 0.5)                              # 2.0 at level 1: not exceeded
    assert s.level(a) == 1
    s.on_iteration(a, 0.5)
    assert s.level(a) == 2
    for _ in range(100):
        s.on_iteration(a, 1.0)                              # the last level has no way down
    assert s.level(a) == 2 and s.demotions == 2


def test_a_demoted_job_queues_behind_the_jobs_already_at_its_new_level():
    s = MLFQScheduler(levels=3, base_quantum_s=1.0)
    a, b, c = J("a", 0.0, 0.1), J("b", 1.0, 1.5), J("c", 2.0, 0.1)   # levels 0, 1, 0
    for j in (a, b, c):
        s.add(j)
    assert names(s.select(now=2.0, slots=3)) == ["a", "c", "b"]
    s.on_iteration(a, 1.5)                                  # a → level 1, behind b
    assert names(s.select(now=3.0, slots=3)) == ["c", "b", "a"]
    assert names(s.select(now=3.0, slots=2)) == ["c", "b"]  # a is preempted


def test_selection_is_by_level_then_fcfs_within_a_level():
    s = MLFQScheduler(levels=4, base_quantum_s=1.0)
    jobs = [J("l2-early", 0.0, 3.0), J("l0-late", 5.0, 0.5), J("l1", 1.0, 1.5), J("l0-early", 2.0, 0.9),
            J("l3", 0.5, 9.0), J("l2-late", 3.0, 4.0)]
    for j in sorted(jobs, key=lambda j: j.arrival):        # the engine adds jobs as they arrive
        s.add(j)
    assert names(s.select(now=6.0, slots=6)) == ["l0-early", "l0-late", "l1", "l2-early", "l2-late", "l3"]
    assert names(s.select(now=6.0, slots=2)) == ["l0-early", "l0-late"]
    assert s.select(now=6.0, slots=0) == []
    s.remove(jobs[3])
    assert names(s.select(now=6.0, slots=2)) == ["l0-late", "l1"]
    assert len(s) == 5


def test_a_new_short_job_preempts_a_long_running_one_at_the_next_iteration():
    s = MLFQScheduler(levels=3, base_quantum_s=1.0)
    long = J("long", 0.0, 0.1)
    s.add(long)
    assert names(s.select(0.0, 1)) == ["long"]
    s.on_iteration(long, 1.5)                               # demoted to level 1
    short = J("short", 1.5, 0.1)
    s.add(short)
    assert names(s.select(1.5, 1)) == ["short"]             # token-granularity preemption
    s.remove(short)
    assert names(s.select(1.6, 1)) == ["long"]


def test_starvation_promotes_waiting_jobs_to_the_top_level_tail():
    s = MLFQScheduler(levels=3, base_quantum_s=1.0, starvation_s=5.0)
    low = J("low", 0.0, 3.0)                                # level 2
    hi1, hi2 = J("hi1", 0.0, 0.1), J("hi2", 0.0, 0.1)       # level 0
    for j in (low, hi1, hi2):
        s.add(j)
    assert names(s.select(now=1.0, slots=2)) == ["hi1", "hi2"]
    assert names(s.select(now=5.0, slots=2)) == ["hi1", "hi2"]   # low waited exactly 5 s: not longer
    assert s.level(low) == 2
    assert names(s.select(now=5.5, slots=2)) == ["hi1", "hi2"]   # promoted, but queued behind hi1 and hi2
    assert s.level(low) == 0 and s.promotions == 1
    assert names(s.select(now=5.5, slots=3)) == ["hi1", "hi2", "low"]
    # a promoted job starts its level afresh: its quantum at level 0 applies
    s.on_iteration(low, 0.9)
    assert s.level(low) == 0
    s.on_iteration(low, 0.2)
    assert s.level(low) == 1


def test_only_waiting_jobs_are_promoted_and_starvation_can_be_off():
    s = MLFQScheduler(levels=2, base_quantum_s=1.0, starvation_s=2.0)
    a, c = J("a", 0.0, 1.5), J("c", 0.0, 1.5)               # both at level 1: a runs, c waits
    s.add(a)
    s.add(c)
    assert names(s.select(now=1.0, slots=1)) == ["a"]
    assert names(s.select(now=2.0, slots=1)) == ["a"]
    assert names(s.select(now=2.5, slots=1)) == ["c"]       # c waited 2.5 s > 2 → level 0; a last ran at 2.0
    assert (s.level(c), s.level(a)) == (0, 1)
    assert names(s.select(now=4.1, slots=1)) == ["c"]       # a waited 2.1 s → level 0, but behind c
    assert (s.level(a), s.promotions) == (0, 2)
    assert names(s.select(now=4.1, slots=2)) == ["c", "a"]
    off = MLFQScheduler(levels=2, base_quantum_s=1.0, starvation_s=0.0)
    x, y = J("x", 0.0, 0.1), J("y", 0.0, 1.5)
    off.add(x)
    off.add(y)
    assert names(off.select(now=1e6, slots=1)) == ["x"] and off.level(y) == 1


def test_starved_job_runs_once_promoted():
    s = MLFQScheduler(levels=2, base_quantum_s=1.0, starvation_s=2.0)
    a, b = J("a", 0.0, 0.1), J("b", 0.0, 1.5)               # a at level 0 keeps running; b waits at level 1
    s.add(a)
    s.add(b)
    assert names(s.select(now=1.0, slots=1)) == ["a"]
    assert names(s.select(now=2.0, slots=1)) == ["a"]       # b waited 2.0 s: not longer than 2
    assert names(s.select(now=2.5, slots=1)) == ["a"]       # b promoted to level 0, behind a (a's clock is fresh)
    assert s.level(b) == 0
    s.on_iteration(a, 1.5)                                  # a exhausts its quantum → level 1
    assert names(s.select(now=3.0, slots=1)) == ["b"]


def test_promotion_after_a_number_of_quanta_of_the_jobs_level():
    # starvation_quanta 3: a job at level i is promoted once it has waited > 3 * q_i (q = 1, 2, 4)
    s = MLFQScheduler(levels=3, base_quantum_s=1.0, starvation_s=0.0, starvation_quanta=3.0)
    assert [s.starvation_limit(i) for i in range(3)] == [3.0, 6.0, 12.0]
    hi, mid, low = J("hi", 0.0, 0.1), J("mid", 0.0, 1.5), J("low", 0.0, 3.0)   # levels 0, 1, 2
    for j in (hi, mid, low):
        s.add(j)
    assert names(s.select(now=6.0, slots=1)) == ["hi"]      # mid waited exactly 3 x q1 = 6 s: not longer
    assert s.promotions == 0
    assert names(s.select(now=6.5, slots=1)) == ["hi"]      # mid promoted to level 0's tail; low (12 s) not yet
    assert (s.level(mid), s.level(low), s.promotions) == (0, 2, 1)
    assert names(s.select(now=12.5, slots=2)) == ["hi", "mid"]
    assert (s.level(low), s.promotions) == (0, 2)
    # with starvation_s as well, the sooner of the two limits applies
    both = MLFQScheduler(levels=3, base_quantum_s=1.0, starvation_s=5.0, starvation_quanta=3.0)
    assert [both.starvation_limit(i) for i in range(3)] == [3.0, 5.0, 5.0]
    assert MLFQScheduler(levels=2, starvation_s=0.0).starvation_limit(1) == float("inf")
    with pytest.raises(ValueError, match="starvation_quanta"):
        MLFQScheduler(levels=2, starvation_quanta=-1.0)


def test_mlfq_rejects_bad_settings():
    with pytest.raises(ValueError, match="mlfq_levels"):
        MLFQScheduler(levels=0, base_quantum_s=1.0)
    with pytest.raises(ValueError, match="mlfq_base_quantum_s"):
        MLFQScheduler(levels=2, base_quantum_s=0.0)


def test_levels_covering_the_longest_job():
    assert levels_covering(1.0, 0.0) == 1
    k = levels_covering(0.01, 2.5)                          # the last level is entered after 2 x 2.5 s of service
    assert 0.01 * (2 ** (k - 1) - 1) >= 5.0 > 0.01 * (2 ** (k - 2) - 1)
    with pytest.raises(ValueError, match="mlfq_base_quantum_s"):
        levels_covering(0.0, 1.0)


def simulate(sched, jobs, slots):
    """Discrete time, one unit per iteration: jobs = [(job, arrival, work units)] → {job: completion time}."""
    left = {j: w for j, _, w in jobs}
    pending = sorted(jobs, key=lambda x: x[1])
    done, t = {}, 0.0
    while len(done) < len(jobs):
        while pending and pending[0][1] <= t:
            sched.add(pending.pop(0)[0], t)
        for j in sched.select(t, slots):
            left[j] -= 1
            sched.on_iteration(j, 1.0)
            if left[j] == 0:
                done[j] = t + 1
                sched.remove(j)
        t += 1
    return done


def test_covering_levels_keep_short_jobs_ahead_of_long_ones():
    """The loss to fcfs found in the serving benchmark: with too few levels, short jobs are demoted into the last
    (FCFS) level before they finish and queue there behind every long job, worse off than under plain FCFS; levels
    that cover the longest job keep them in the upper levels, above the long jobs (which attained more service)."""
    def mean_short_jct(sched):
        longs = [(J(f"L{i}", i), i, 100) for i in range(4)]                        # 4 long jobs, 2 slots
        shorts = [(J(f"s{i}", 5 + 10 * i), 5 + 10 * i, 12) for i in range(20)]     # 12 units each, every 10 units
        done = simulate(sched, longs + shorts, slots=2)
        return sum(done[j] - j.arrival for j, _, _ in shorts) / len(shorts)
    few = mean_short_jct(MLFQScheduler(levels=4, base_quantum_s=1.0))
    covering = mean_short_jct(MLFQScheduler(levels=levels_covering(1.0, 100), base_quantum_s=1.0))
    fcfs = mean_short_jct(FCFSScheduler())
    assert few > fcfs > 5 * covering and covering < 2.5 * 12


def test_learned_levels_run_the_known_long_jobs_oldest_first():
    """With size_quantile, the last (FCFS) level starts where that quantile of the finished jobs' service ended:
    short jobs still finish in the upper levels, while the long ones, instead of sharing the slots round-robin
    through ever deeper levels (each finishing late), run oldest-first: mean JCT falls, the shorts' does not rise."""
    def run(sched):
        longs = [(J(f"L{i}", i), i, 100) for i in range(4)]
        shorts = [(J(f"s{i}", 5 + 10 * i), 5 + 10 * i, 12) for i in range(20)]
        done = simulate(sched, longs + shorts, slots=2)
        jct = {j: done[j] - j.arrival for j, _, _ in longs + shorts}
        return jct, [done[j] for j, _, _ in longs], sum(jct[j] for j, _, _ in shorts) / len(shorts)
    covering = MLFQScheduler(levels=levels_covering(1.0, 100), base_quantum_s=1.0)
    learned = MLFQScheduler(levels=levels_covering(1.0, 100), base_quantum_s=1.0, size_quantile=0.8, min_history=5)
    jct_c, longs_c, short_c = run(covering)
    jct_l, longs_l, short_l = run(learned)
    assert learned.levels == levels_covering(1.0, 12, margin=1.0) == 5 < covering.levels
    assert sum(jct_l.values()) < 0.95 * sum(jct_c.values()) and short_l <= short_c
    assert longs_l == sorted(longs_l) and longs_l[1] - longs_l[0] >= 40       # one after another
    assert longs_c[0] - longs_l[0] >= 50       # round-robin holds even the oldest long job back until late


def test_learned_levels_ignore_cancelled_jobs_and_move_deeper_jobs_to_the_new_last_level():
    s = MLFQScheduler(levels=8, base_quantum_s=1.0, size_quantile=0.5, min_history=2)
    deep = J("deep")
    s.add(deep)
    for _ in range(40):                                       # 40 units of service: level 5 (1 + 2 + 4 + 8 + 16 < 40)
        s.on_iteration(deep, 1.0)
    assert s.level(deep) == 5
    cancelled = J("c")
    cancelled.finish_reason = "cancelled"
    s.add(cancelled)
    s.on_iteration(cancelled, 1.0)
    s.remove(cancelled)
    assert list(s.sizes) == [] and s.levels == 8
    for name in ("a", "b"):
        j = J(name)
        s.add(j)
        s.on_iteration(j, 3.0)
        s.remove(j)
    assert list(s.sizes) == [3.0, 3.0] and s.levels == 3 and s.level(deep) == 2    # 1 + 2 >= 3: K = 3
    with pytest.raises(ValueError, match="mlfq_size_quantile"):
        MLFQScheduler(levels=2, base_quantum_s=1.0, size_quantile=1.0)


# ------------------------------------------------------------------------------------------------ FCFS

def test_fcfs_runs_in_arrival_order_and_refills_a_free_slot_at_once():
    s = FCFSScheduler()
    jobs = {n: J(n, t) for n, t in [("c", 2.0), ("a", 0.0), ("b", 1.0), ("d", 3.0)]}
    for j in jobs.values():
        s.add(j)
    assert names(s.select(now=3.0, slots=2)) == ["a", "b"]
    s.remove(jobs["a"])
    assert names(s.select(now=3.1, slots=2)) == ["b", "c"]  # continuous batching: c joins b at once
    # equal arrival times keep submission order
    e, f = J("e", 5.0), J("f", 5.0)
    s.add(f)
    s.add(e)
    assert names(s.select(now=5.0, slots=10)) == ["b", "c", "d", "f", "e"]


def test_fcfs_never_preempts_whatever_arrives():
    s = FCFSScheduler()
    running = []
    t = 0.0
    for step in range(30):
        t += 1.0
        s.add(J(f"j{step}", t, prefill_time=0.0 if step % 2 else 100.0))   # short and long jobs interleaved
        if running:
            s.on_iteration(running[0], 50.0)               # charging time changes nothing in fcfs
        chosen = s.select(t, slots=3)
        assert all(j in chosen for j in running), "a running job was preempted"
        if step % 4 == 3:
            s.remove(chosen[0])                             # one job finishes now and then
            chosen = chosen[1:]
        running = chosen


# ---------------------------------------------------------------------------------------------- static

def test_static_waits_for_a_full_batch_then_admits_nobody_until_it_is_done():
    s = StaticScheduler(batch_timeout_s=10.0)
    a, b, c, d, e = (J(n, t) for n, t in [("a", 0.0), ("b", 0.1), ("c", 0.2), ("d", 0.3), ("e", 0.4)])
    s.add(a)
    s.add(b)
    assert s.select(now=1.0, slots=3) == []                 # 2 of 3 and no timeout yet: wait
    s.add(c)
    assert names(s.select(now=1.0, slots=3)) == ["a", "b", "c"]
    s.add(d)
    s.add(e)
    s.remove(a)
    assert names(s.select(now=2.0, slots=3)) == ["b", "c"]  # a's slot stays empty: d and e wait
    s.remove(b)
    assert names(s.select(now=3.0, slots=3)) == ["c"]
    s.remove(c)
    assert s.select(now=3.5, slots=3) == []                 # d, e: a partial batch, not timed out (arrived 0.3, 0.4)
    assert names(s.select(now=10.35, slots=3)) == ["d", "e"]  # d waited ≥ 10 s: run the partial batch


def test_static_priority_puts_the_running_batch_first():
    s = StaticScheduler(batch_timeout_s=0.0)
    a, b = J("a", 0.0), J("b", 1.0)
    s.add(a)
    assert names(s.select(now=0.0, slots=2)) == ["a"]
    s.add(b)
    assert names(s.select(now=1.0, slots=2)) == ["a"]
    assert s.priority(a) < s.priority(b)


# --------------------------------------------------------------------------------------------- Gittins

def test_gittins_index_of_a_bimodal_size_distribution():
    # 90 % of jobs need 1 s of service, 10 % need 10 s: a fresh job (likely short) ranks first; a job past 1 s is
    # known long, and among long jobs the one closest to finishing ranks first (increasing hazard), unlike LAS
    g = gittins_table([1.0] * 9 + [10.0], quantum_s=0.5)
    assert len(g) == 21
    assert g[0] == pytest.approx(9 / (9 * 1.0 + 1 * 1.0))            # s = 1: 9 of 10 done per 10 s of service
    assert g[2] == pytest.approx(1 / 9.0)                            # a = 1: only the 10 s job is left
    assert g[2] < g[10] < g[0] < g[18]      # closer to 10 s: higher; with 1 s left it outranks a fresh job (SRPT)
    assert g[20] == 0.0                                              # past every recorded size


def test_gittins_learns_the_sizes_and_runs_the_longest_attained_long_job_first():
    s = GittinsScheduler(quantum_s=0.5, min_history=10, refresh=1)
    old, new = J("old", 0.0), J("new", 1.0)
    s.add(old)
    s.add(new)
    s.on_iteration(old, 3.0)
    assert names(s.select(1.0, 1)) == ["new"]                        # no history yet: least attained service
    for k in range(10):                                              # the sizes: 1 s x 9, 10 s x 1
        j = J(f"j{k}", 0.0)
        s.add(j)
        s.on_iteration(j, 10.0 if k == 0 else 1.0)
        s.remove(j)
    s.on_iteration(new, 1.5)                                         # both known long now; old is closer to done
    assert names(s.select(2.0, 2)) == ["old", "new"]
    fresh = J("fresh", 2.0)
    s.add(fresh)
    assert names(s.select(2.0, 1)) == ["fresh"]                      # a fresh job (likely short) preempts both
    assert s.priority(new) > s.priority(old)                         # the engine evicts `new` first
    assert isinstance(make_scheduler("gittins", base_quantum_s=0.5), GittinsScheduler)


def test_make_scheduler_names():
    assert isinstance(make_scheduler("fcfs"), FCFSScheduler)
    assert isinstance(make_scheduler("static"), StaticScheduler)
    m = make_scheduler("mlfq", levels=5, base_quantum_s=0.2, starvation_s=3.0)
    assert isinstance(m, MLFQScheduler) and m.levels == 5 and m.quantum(1) == 0.4 and m.starvation_s == 3.0
    with pytest.raises(ValueError, match="choose from fcfs, static, mlfq"):
        make_scheduler("sjf")
    s = FCFSScheduler()
    j = J("x")
    s.add(j)
    with pytest.raises(ValueError, match="already added"):
        s.add(j)

"""The host allocator settings fastserve runs under (glibc malloc on Linux), set when fastserve is imported.

Why: XLA:CPU allocates a step's temporary buffers (hundreds of MB for a training step) with malloc and frees them
when the step ends. glibc serves allocations over 32 MB with mmap and hands them back with munmap, and its
per-thread arenas return freed memory to the kernel too, so every step faults all of that memory in again: for
experiments/bench_train.py's 23M decoder on 2 cores, 146,000 page faults and 0.23 s of kernel time per 1.24 s
step. With one arena, no mmap for large blocks and no trimming, freed memory stays in the process and the next
step reuses it: 0 faults, 1.158 vs 1.247 s per step (−7 %; the MiniLM fine-tuning step −11 %), measured in
separate processes on the same machine by `experiments/step_faults.py` (run it with and without
FASTSERVE_MALLOC=system).

The price: memory freed by the process is kept for reuse instead of returned to the operating system (resident
memory stays at its peak), and threads share one malloc arena. Set `FASTSERVE_MALLOC=system` to keep glibc's
defaults. The settings only reach threads that have not allocated yet: import fastserve before JAX initializes
its backend (before the first `jax.devices()` or array), or export the same settings yourself:
`GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647`.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = {"arena_max": (M_ARENA_MAX, 1), "mmap_max": (M_MMAP_MAX, 0), "trim_threshold": (M_TRIM_THRESHOLD, 2**31 - 1)}
ENV = "FASTSERVE_MALLOC"

_state: dict = {"applied": False, "why": "not attempted"}


def tune_allocator() -> dict:
    """Applies SETTINGS through mallopt once per process (glibc only); returns what was done and why."""
    if _state["why"] != "not attempted":
        return dict(_state)
    choice = os.environ.get(ENV, "tuned").strip().lower()
    if choice not in ("tuned", "system"):
        _state.update(applied=False, why=f"{ENV}={choice!r} is neither 'tuned' nor 'system': glibc defaults kept")
    elif choice == "system":
        _state.update(applied=False, why=f"{ENV}=system")
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _state.update(applied=False, why="not Linux with glibc")
    else:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = {name: bool(libc.mallopt(param, value)) for name, (param, value) in SETTINGS.items()}
        _state.update(applied=all(ok.values()), why="mallopt " + ", ".join(
            f"{n}={SETTINGS[n][1]}{'' if ok[n] else ' (refused)'}" for n in SETTINGS))
    return dict(_state)


def allocator_state() -> dict:
    """What tune_allocator did in this process (recorded by the benchmarks)."""
    return dict(_state)

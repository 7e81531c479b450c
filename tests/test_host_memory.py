"""fastserve's host allocator settings (fastserve/host_memory.py): applied on import, and they keep freed memory
for reuse instead of faulting it in again on every allocation (what cost a CPU train step 7 % of its time)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="the settings are glibc malloc's (Linux)")

# mallocs, writes and frees a 64 MiB buffer (over glibc's largest mmap threshold) 8 times; page faults of the last 7
PROBE = """
import ctypes, json, resource
import fastserve
from fastserve.host_memory import allocator_state
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def touch():  # malloc itself (numpy would ask the kernel for huge pages and hide the count)
    p = libc.malloc(64 << 20)
    ctypes.memset(p, 1, 64 << 20)
    libc.free(p)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(7):
    touch()
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, **allocator_state()}))
"""


def probe(choice: str) -> dict:
    env = {**os.environ, "FASTSERVE_MALLOC": choice, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_tuned_allocator_reuses_freed_memory_and_system_keeps_glibc_defaults():
    tuned, system = probe("tuned"), probe("system")
    assert tuned["applied"] and "arena_max=1" in tuned["why"], tuned
    assert not system["applied"] and system["why"] == "FASTSERVE_MALLOC=system", system
    # 7 × 64 MiB of fresh pages is ~115,000 page faults with glibc's defaults; reused memory faults not at all
    assert system["faults"] > 50_000, system
    assert tuned["faults"] < 1_000, tuned


def test_an_unknown_choice_is_named_and_changes_nothing():
    out = probe("fast")
    assert not out["applied"]
    assert "FASTSERVE_MALLOC='fast'" in out["why"] and "'tuned' nor 'system'" in out["why"]


@glibc
def test_applied_in_this_process_once():
    from fastserve.host_memory import allocator_state, tune_allocator

    state = allocator_state()
    if os.environ.get("FASTSERVE_MALLOC", "tuned") == "tuned":
        assert state["applied"], state
    assert tune_allocator() == state        # a second call changes nothing

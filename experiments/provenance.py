"""What every recorded result says about the code it measured: the commit, whether the tree was dirty, and the host
(the machine, as `recorded_on`; a benchmark's own "machine" / "date" keys, where it writes them, say more)."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess

# Imported before any benchmark initializes JAX, as `python -m fastserve.<verb>` does: fastserve sets the host
# allocator on import (fastserve/host_memory.py), which reaches only threads that have not allocated yet. Peers
# measured in the same process (PyTorch) run under the same allocator settings.
from fastserve.host_memory import allocator_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def provenance() -> dict:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    # recorded results are not code: a tree whose only changes are earlier runs' results measures the commit
    # (porcelain lines are "XY path"; git() strips the first line's leading blank, hence [2:].lstrip())
    status = [line for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
              if not line[2:].lstrip().startswith("experiments/results/")]
    return {"commit": git("rev-parse", "HEAD") or "unknown", "dirty": bool(status), "host_allocator": allocator_state(),
            "recorded_on": {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "cpu": cpu_model(),
                            "date": datetime.date.today().isoformat()}}


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo): the shared machines here change between sessions (an AMD EPYC,
    an Intel Xeon), and a figure measured on one does not carry over to the other."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return platform.processor() or "unknown"

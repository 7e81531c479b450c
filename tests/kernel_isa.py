"""What the C++ kernel tests share: the built library (a failure, not a skip: CI has g++) and the instruction-set
variants this machine can run."""
from __future__ import annotations

import os
import platform

import pytest

from fastserve.kernels import build


@pytest.fixture(scope="module")
def lib():
    loaded = build.load()
    if loaded is None:
        pytest.fail(f"the kernel did not build here: {build.status()}")  # CI has g++: the kernel must work there
    return loaded


def variants() -> list[str]:
    """Every variant the library holds on this architecture."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return ["generic"] + ([v[0] for v in build.X86_VARIANTS] if x86 else [])


def cpu_has(isa: str) -> bool:
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    return {"generic": True, "avx2": " avx2" in flags and " fma" in flags,
            "avx512": " avx512f" in flags and " avx512bw" in flags and " avx512vl" in flags}[isa]

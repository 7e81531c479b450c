"""Builds fastserve's C++ CPU kernels on first use into a cache directory and registers them with XLA (`jax.ffi`).

Why on first use rather than at install time: the kernels compile against the XLA FFI headers of the *installed*
jaxlib (`jax.ffi.include_dir()`), which a setuptools build would have to install into its isolated build
environment, and an editable install (`pip install -e .`, CI) would go stale when jax is upgraded. Here the
library is keyed by a hash of the sources, the jax version and the compiler, built once (~20 s, three instruction
set variants in parallel) and reused by every later process; `python -m fastserve.kernels build` does it ahead of
time (e.g. in a container image). Without a C++ compiler, or with FASTSERVE_INT8_KERNEL=0, `load()` returns None,
logs why once, and int8 layers use the pure-XLA dequantize-then-dot path and encoders XLA's attention (correct,
slower on CPU).

Environment: CXX (compiler; default g++ / c++ / clang++ on PATH), FASTSERVE_KERNEL_CACHE (default
~/.cache/fastserve/kernels), FASTSERVE_INT8_KERNEL=0 (never use the kernel), FASTSERVE_INT8_ISA=avx2|generic
(a narrower variant than the CPU allows; read when the library is first called), FASTSERVE_KERNEL_SPIN_THREADS
(helper threads that stay awake between a decode step's products, csrc/spin_pool.cc; default 0: none; `auto`:
min(cores, 4) − 1) and FASTSERVE_KERNEL_SPIN_US (how long they spin before sleeping; default 2000).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jax

log = logging.getLogger("fastserve.kernels")

CSRC = Path(__file__).with_name("csrc")
LIBRARY = "libfastserve_kernels.so"
INT8_TARGET = "fastserve_int8_matmul"
INT8_NT_TARGET = "fastserve_int8_matmul_nt"   # x @ (int8 W [N, K] × scale [N])ᵀ: a tied LM head
INT8_Q8_TARGET = "fastserve_int8_matmul_q8"         # the same products with activations quantized to int8 (W8A8)
INT8_NT_Q8_TARGET = "fastserve_int8_matmul_nt_q8"
INT8_Q8_PACKED_TARGET = "fastserve_int8_matmul_q8_packed"   # W8A8 with the weights in the VNNI loops' panels
ATTENTION_FWD_TARGET = "fastserve_attention_fwd"   # bidirectional attention over padded keys (encoders)
ATTENTION_BWD_TARGET = "fastserve_attention_bwd"
DECODE_ATTENTION_TARGET = "fastserve_decode_attention"   # one decode step's attention read in place from a KV cache
PAGED_DECODE_ATTENTION_TARGET = "fastserve_decode_attention_paged"   # the same from a block-paged KV cache
TARGETS = (INT8_TARGET, INT8_NT_TARGET, INT8_Q8_TARGET, INT8_NT_Q8_TARGET, INT8_Q8_PACKED_TARGET, ATTENTION_FWD_TARGET,
           ATTENTION_BWD_TARGET, DECODE_ATTENTION_TARGET, PAGED_DECODE_ATTENTION_TARGET)
# sources: the FFI handlers (compiled once) and the inner loops (compiled once per instruction-set variant)
FFI_UNITS = ("int8_ffi", "int8_q8", "spin_pool", "attention_ffi")
ISA_UNITS = ("int8_tile", "attention_item")
COMMON_FLAGS = ["-O3", "-fPIC", "-std=c++17", "-Wno-psabi", "-fno-math-errno", "-fopenmp-simd"]
# (name, floats per vector, vectors per tile for 1 / 2 / 4 rows, flags): the tile widths keep each variant's
# accumulators in its registers (32 zmm, 16 ymm, 16 xmm)
X86_VARIANTS = [("avx512", 16, (8, 8, 4), ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma"]),
                ("avx2", 8, (4, 3, 2), ["-mavx2", "-mfma"])]
GENERIC_VARIANT = ("generic", 4, (2, 2, 1), [])
# x86 only, compiled once: the W8A8 inner loops, called where the CPU reports avx512_vnni (int8_q8.cc checks)
VNNI_UNIT = ("int8_q8_vnni", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma"])


class KernelBuildError(RuntimeError):
    """The C++ kernels could not be compiled or loaded here (the message says why)."""


@dataclass(frozen=True)
class KernelLibrary:
    """The loaded shared library, registered with XLA as the `TARGETS` custom calls on CPU."""
    path: Path
    isa: str
    handle: ctypes.CDLL


def disabled() -> bool:
    return os.environ.get("FASTSERVE_INT8_KERNEL", "1").strip().lower() in ("0", "false", "off", "no")


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _variants() -> list[tuple[str, int, tuple[int, int, int], list[str]]]:
    return (X86_VARIANTS if _x86() else []) + [GENERIC_VARIANT]


def library_path(cxx: str) -> Path:
    """Where the library for these sources, this jax and this compiler lives (built or not)."""
    h = hashlib.sha256()
    for src in sorted([*CSRC.glob("*.cc"), *CSRC.glob("*.h")]):
        h.update(src.name.encode() + src.read_bytes())
    h.update(f"{jax.__version__}|{cxx}|{platform.machine()}|{COMMON_FLAGS}|{_variants()}".encode())
    root = Path(os.environ.get("FASTSERVE_KERNEL_CACHE") or Path.home() / ".cache" / "fastserve" / "kernels")
    return root / h.hexdigest()[:16] / LIBRARY


def build(cxx: str | None = None) -> Path:
    """Compiles the kernels (unless this version is already in the cache); returns the library's path."""
    cxx = cxx or compiler()
    if not cxx:
        raise KernelBuildError("no C++ compiler found (set CXX, or install g++)")
    out = library_path(cxx)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        jobs = [[cxx, *COMMON_FLAGS, "-I", jax.ffi.include_dir(), "-c", str(CSRC / f"{unit}.cc"), "-o",
                 f"{tmp}/{unit}.o"] for unit in FFI_UNITS]
        for name, lanes, (nv1, nv2, nv4), flags in _variants():
            for unit in ISA_UNITS:
                jobs.append([cxx, *COMMON_FLAGS, *flags, f"-DFS_ISA={name}", f"-DFS_LANES={lanes}", f"-DFS_NV1={nv1}",
                             f"-DFS_NV2={nv2}", f"-DFS_NV4={nv4}", "-c", str(CSRC / f"{unit}.cc"),
                             "-o", f"{tmp}/{unit}_{name}.o"])
        special = [VNNI_UNIT] if _x86() else []
        for unit, flags in special:
            jobs.append([cxx, *COMMON_FLAGS, *flags, "-c", str(CSRC / f"{unit}.cc"), "-o", f"{tmp}/{unit}.o"])
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for cmd in jobs]
        for cmd, p in zip(jobs, procs):
            output = p.communicate()[0]
            if p.returncode:
                raise KernelBuildError(f"`{' '.join(cmd)}` failed:\n{output[-2000:]}")
        objects = ([f"{tmp}/{unit}.o" for unit in FFI_UNITS] + [f"{tmp}/{unit}.o" for unit, _ in special] +
                   [f"{tmp}/{unit}_{v[0]}.o" for v in _variants() for unit in ISA_UNITS])
        link = subprocess.run([cxx, "-shared", "-o", f"{tmp}/{LIBRARY}", *objects], capture_output=True, text=True)
        if link.returncode:
            raise KernelBuildError(f"linking {LIBRARY} failed:\n{link.stderr[-2000:]}")
        os.replace(f"{tmp}/{LIBRARY}", out)  # atomic: parallel builders (pytest -n) each publish a whole file
    return out


_failure: list[str] = []  # why the last `load()` found no kernel


@functools.lru_cache(maxsize=None)
def load() -> KernelLibrary | None:
    """The built, loaded and registered kernel library, or None (logged once) where it cannot be had."""
    if disabled():
        log.info("FASTSERVE_INT8_KERNEL=0: int8 layers use the XLA dequantize-then-dot path, encoders XLA's attention")
        return None
    try:
        path = build()
        handle = ctypes.CDLL(str(path))
    except (KernelBuildError, OSError) as e:
        _failure.append(str(e))
        log.warning("fastserve CPU kernels unavailable, int8 layers fall back to XLA's dequantize-then-dot "
                    "(correct, slower): %s", e)
        return None
    for target in TARGETS:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handle, target)), platform="cpu")
    handle.fastserve_int8_isa.restype = ctypes.c_char_p
    return KernelLibrary(path, handle.fastserve_int8_isa().decode(), handle)


def status() -> dict:
    """What `load()` found: available, instruction set, library path (builds it if needed)."""
    lib = load()
    if lib is None:
        return {"available": False, "disabled": disabled(), "compiler": compiler()}
    return {"available": True, "isa": lib.isa, "path": str(lib.path), "compiler": compiler()}


def export_checks() -> list:
    """The `disabled_checks` jax.export needs for a function that may call the kernel: the custom call is
    fastserve's own, so jax cannot vouch for its stability; `require_for_exports` re-registers it when loading."""
    return [jax.export.DisabledSafetyCheck.custom_call(target) for target in TARGETS]


def require_for_exports(exported: dict, platform_name: str, where: str) -> None:
    """Before running loaded exports on `platform_name`: registers the kernel if any of them calls it, or raises
    KernelBuildError naming what the artifact needs when it cannot be built here."""
    if platform_name != "cpu":
        return
    needs = [name for name, exp in exported.items()
             if any(target.encode() in exp.mlir_module_serialized for target in TARGETS)]
    if needs and load() is None:
        why = "FASTSERVE_INT8_KERNEL=0" if disabled() else (_failure[-1] if _failure else "unknown")
        raise KernelBuildError(
            f"{where}: {', '.join(sorted(needs))} call fastserve's CPU kernels (custom calls '{INT8_TARGET}' & co.), "
            f"which is not available in this process ({why}). Install a C++ compiler (g++, or set CXX), "
            "or re-export with FASTSERVE_INT8_KERNEL=0 for an artifact that runs XLA's dequantize-then-dot instead")

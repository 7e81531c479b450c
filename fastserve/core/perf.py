"""Speed accounting: the peak FLOP/s that MFU is stated against, and MFU a user can trust.

On accelerators the peak is the device's published dense peak for the compute dtype (`PUBLISHED_PEAKS`); on CPU
(or an unlisted device) it is measured: the best of several n×n matmuls, re-measured whenever the achieved rate
exceeds it (a peak taken while the machine was busy), and MFU is never reported above 100 %.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Dense FLOP/s per JAX device (a TPU v2/v3 device is one core: half a chip), from the vendors' data sheets.
# float32 on TPU runs the MXU in bfloat16 passes at default precision, so it is stated against the bf16 peak;
# float32 on A100/H100/H200 runs as TF32 at JAX's default matmul precision, so it is stated against TF32.
PUBLISHED_PEAKS: dict[str, dict[str, float]] = {
    "TPU v2": {"bfloat16": 22.5e12, "float32": 22.5e12},
    "TPU v3": {"bfloat16": 61.5e12, "float32": 61.5e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},   # v5e
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},   # v6e (Trillium)
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "H100": {"bfloat16": 989e12, "float32": 494.7e12},
    "H200": {"bfloat16": 989e12, "float32": 494.7e12},
}


def published_peak(device_kind: str, dtype: str) -> float | None:
    """The published peak of a device kind (as `jax.Device.device_kind` names it) for `dtype`, or None."""
    # longest key first: "TPU v5 lite" must not match as "TPU v5p"'s prefix or vice versa
    for key in sorted(PUBLISHED_PEAKS, key=len, reverse=True):
        if key in device_kind:
            return PUBLISHED_PEAKS[key].get(dtype)
    return None


def measure_matmul_peak(n: int = 2048, dtype: str = "float32", repeats: int = 7, device: jax.Device | None = None) -> float:
    """Best FLOP/s of an n×n @ n×n matmul on one device over `repeats` runs (the best, not the median: on a shared
    machine the others only ever make it slower)."""
    device = device or jax.local_devices()[0]
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    b = jax.device_put(jnp.ones((n, n), dtype), device)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


class PeakFlops:
    """The per-device peak MFU is stated against: given (`log.peak_flops`), published, or measured."""

    def __init__(self, given: float = 0.0, dtype: str = "float32", device: jax.Device | None = None,
                 measure=measure_matmul_peak):
        device = device or jax.local_devices()[0]
        self._measure = lambda: measure(dtype=dtype, device=device)
        published = published_peak(device.device_kind, dtype)
        if given:
            self.per_device, self.source = float(given), "log.peak_flops"
        elif published:
            self.per_device, self.source = published, f"the published {dtype} peak of {device.device_kind}"
        else:
            self.per_device, self.source = self._measure(), f"a measured {dtype} matmul on {device.device_kind or device.platform}"
        self.measured = not given and not published

    def describe(self) -> str:
        return f"MFU against {self.per_device / 1e9:,.0f} GFLOP/s per device ({self.source})"

    def mfu(self, flops_per_s: float, devices: int) -> float:
        """Achieved / peak, in [0, 1]. A measured peak that the achieved rate exceeds was taken while the machine
        was busy: it is measured again, and raised to the achieved rate if still below it."""
        total = self.per_device * devices
        if flops_per_s > total and self.measured:
            self.per_device = max(self.per_device, self._measure(), flops_per_s / devices)
            total = self.per_device * devices
        return min(flops_per_s / total, 1.0)

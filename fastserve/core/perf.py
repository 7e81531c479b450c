"""Speed accounting: the measured matmul peak that MFU is stated against."""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def measure_matmul_peak(n: int = 2048, dtype: str = "float32", repeats: int = 5, device: jax.Device | None = None) -> float:
    """Median FLOP/s of an n×n @ n×n matmul on one device (the peak MFU is stated against)."""
    device = device or jax.local_devices()[0]
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    b = jax.device_put(jnp.ones((n, n), dtype), device)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mm(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)

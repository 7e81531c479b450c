"""The serving KV pool: one preallocated cache [slots, max_cache_len, kv_heads, head_dim] per layer (k and v), rows
moved in and out of slots by jitted functions whose slot index is a traced argument (one compile for all slots),
and host-memory copies of preempted jobs' rows (numpy).

Rows move in a few static lengths (the prompt buckets and max_cache_len): a job with L cached positions moves the
smallest such length >= L. Rows past a job's position hold stale values; they are harmless because a query only
sees keys at positions <= its own, and decoding writes position p before attending to it.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fastserve import parallel
from fastserve.models.decoder import CACHE_AXES

Rows = list[dict[str, Any]]   # per layer {"k": [1, L, K, D], "v": [1, L, K, D]}


@dataclass
class HostKV:
    """A preempted job's KV rows in host memory."""
    rows: Rows                 # numpy arrays
    length: int                # rows held (a pool row length >= the job's cached positions)
    nbytes: int


def insert_rows(cache: Rows, rows: Rows, slot: Any) -> Rows:
    """`rows` ([1, length ≤ L, ...] per layer) written into `slot` of the cache, from position 0 (traceable)."""
    return [{n: jax.lax.dynamic_update_slice(c[n], r[n].astype(c[n].dtype), (slot, 0, 0, 0)) for n in ("k", "v")}
            for c, r in zip(cache, rows)]


def extract_rows(cache: Rows, slot: Any, length: int) -> Rows:
    """The first `length` positions of `slot`'s rows ([1, length, ...] per layer; traceable, length static)."""
    return [{n: jax.lax.dynamic_slice(c[n], (slot, 0, 0, 0), (1, length) + c[n].shape[2:]) for n in ("k", "v")}
            for c in cache]


# Module-level jits: engines over the same model shapes share their compiled programs.
_insert_jit = jax.jit(insert_rows, donate_argnums=0)
_extract_jit = jax.jit(extract_rows, static_argnums=2)


class KVPool:
    """The device cache of all slots plus jitted insert / extract (slot traced, the cache donated on insert).

    Placed by `mesh` (sharded by CACHE_AXES) or, without one, on `device` (an exported backend's device)."""

    def __init__(self, n_layers: int, slots: int, max_len: int, kv_heads: int, head_dim: int, dtype: Any,
                 lengths: Sequence[int], mesh: Any = None, device: Any = None):
        self.n_layers, self.slots, self.max_len = n_layers, slots, max_len
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, jnp.dtype(dtype)
        self.lengths = sorted({int(x) for x in lengths if 0 < x <= max_len} | {max_len})
        self.mesh = mesh
        shape = (slots, max_len, kv_heads, head_dim)
        sharding = parallel.named_sharding(mesh, CACHE_AXES, shape) if mesh is not None else None
        # Committed from the start: the programs return a committed cache (placed like their weights), and jax
        # compiles insert / extract apart for a committed and an uncommitted argument, so an uncommitted first cache
        # would leave the start-up warm compiling the wrong variants.
        self.device = device
        if sharding is None and device is not None:
            sharding = jax.sharding.SingleDeviceSharding(device)

        def zeros():
            return [{"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)} for _ in range(n_layers)]

        out_sh = None if sharding is None else [{"k": sharding, "v": sharding}] * n_layers
        self._zeros = jax.jit(zeros, out_shardings=out_sh)
        self.cache = self._zeros()

    def reset(self) -> None:
        """A fresh zeroed cache (after a failed step may have consumed the donated one)."""
        self.cache = self._zeros()

    def row_bytes(self, length: int) -> int:
        """Bytes of one slot's k and v rows over `length` positions, all layers."""
        return 2 * self.n_layers * length * self.kv_heads * self.head_dim * self.dtype.itemsize

    def row_length(self, positions: int) -> int:
        """The smallest movable row length holding `positions` cached positions."""
        i = bisect.bisect_left(self.lengths, positions)
        if i == len(self.lengths):
            raise ValueError(f"{positions} positions exceed the cache's {self.max_len}")
        return self.lengths[i]

    def insert(self, rows: Rows, slot: int) -> None:
        """Writes rows (device or numpy, [1, L, ...] per layer) at positions [0, L) of `slot`."""
        self.cache = _insert_jit(self.cache, rows, np.int32(slot))

    def extract(self, slot: int, length: int) -> Rows:
        """Device copies of `slot`'s first `length` positions (length: one of `self.lengths`)."""
        return _extract_jit(self.cache, np.int32(slot), length)

    def offload(self, slot: int, positions: int) -> HostKV:
        """Copies `slot`'s first `positions` positions (rounded up to a row length) to host memory."""
        length = self.row_length(positions)
        rows = jax.device_get(self.extract(slot, length))
        return HostKV(rows, length, sum(r["k"].nbytes + r["v"].nbytes for r in rows))

    def restore(self, host: HostKV, slot: int) -> None:
        """Uploads host rows into `slot` (placed like the cache, so the insert program compiled at start-up runs)."""
        self.insert(jax.device_put(host.rows, self._row_shardings(host.rows)), slot)

    def _row_shardings(self, rows: Rows) -> Any:
        if self.mesh is None:
            return None if self.device is None else [{n: jax.sharding.SingleDeviceSharding(self.device) for n in r}
                                                     for r in rows]
        return [{n: parallel.named_sharding(self.mesh, CACHE_AXES, r[n].shape) for n in r} for r in rows]

    def warm(self) -> None:
        """Compiles insert and extract for every row length (slot 0 is written with its own contents)."""
        for length in self.lengths:
            self.restore(self.offload(0, length), 0)
        jax.block_until_ready(self.cache)

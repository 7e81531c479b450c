"""The serving KV pool: the model's own cache preallocated for every slot (each leaf [slots, max_cache_len, ...];
for the decoder one {"k", "v"} of [slots, max_cache_len, kv_heads, head_dim] per layer, for an ensemble the tuple
of its members' caches), rows moved in and out of slots by jitted functions whose slot index is a traced argument
(one compile for all slots), and host-memory copies of preempted jobs' rows (numpy).

Any pytree of arrays whose axis 0 is the batch (slot) and axis 1 the position works; rows move in a few static
lengths (the prompt buckets and max_cache_len): a job with L cached positions moves the smallest such length >= L.
Rows past a job's position hold stale values; they are harmless because a query only sees keys at positions <= its
own, and decoding writes position p before attending to it.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fastserve import parallel
from fastserve.models.decoder import CACHE_AXES

Rows = Any   # the cache's pytree with [1, L, ...] leaves (decoder: per layer {"k", "v"} of [1, L, K, D])


def _cache_axes(ndim: int) -> tuple:
    """Logical axes of a cache leaf: the decoder's [batch, seq, kv_heads, head_dim], else batch and seq only."""
    return CACHE_AXES if ndim == len(CACHE_AXES) else ("cache_batch", "cache_seq") + (None,) * (ndim - 2)


@dataclass
class HostKV:
    """A preempted job's KV rows in host memory."""
    rows: Rows                 # numpy arrays
    length: int                # rows held (a pool row length >= the job's cached positions)
    nbytes: int


def insert_rows(cache: Rows, rows: Rows, slot: Any) -> Rows:
    """`rows` (leaves [1, length ≤ L, ...]) written into `slot` of the cache, from position 0 (traceable)."""
    return jax.tree.map(lambda c, r: jax.lax.dynamic_update_slice(c, r.astype(c.dtype), (slot,) + (0,) * (c.ndim - 1)),
                        cache, rows)


def extract_rows(cache: Rows, slot: Any, length: int) -> Rows:
    """The first `length` positions of `slot`'s rows (leaves [1, length, ...]; traceable, length static)."""
    return jax.tree.map(lambda c: jax.lax.dynamic_slice(c, (slot,) + (0,) * (c.ndim - 1), (1, length) + c.shape[2:]),
                        cache)


def movable_lengths(lengths: Sequence[int], max_len: int) -> list[int]:
    """The row lengths a pool moves: the given ones within (0, max_len], and max_len."""
    return sorted({int(x) for x in lengths if 0 < x <= max_len} | {max_len})


def position_bytes(spec: Any) -> int:
    """Bytes of one position of one slot's rows, all leaves of a cache spec ([batch, seq, ...] leaves)."""
    return sum(math.prod(x.shape[2:]) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(spec))


def cache_length(cache: Rows) -> int:
    """Positions the cache holds (axis 1 of its leaves)."""
    return jax.tree.leaves(cache)[0].shape[1]


# Module-level jits: engines over the same model shapes share their compiled programs.
_insert_jit = jax.jit(insert_rows, donate_argnums=0)
_extract_jit = jax.jit(extract_rows, static_argnums=2)


class KVPool:
    """The device cache of all slots plus jitted insert / extract (slot traced, the cache donated on insert).

    Placed by `mesh` (sharded by CACHE_AXES) or, without one, on `device` (an exported backend's device). Every
    slot owns its rows: `grow` / `release` (the paged pool's block accounting, fastserve/serve/paged_kv.py) do
    nothing here."""

    paged = False

    def __init__(self, spec: Any, slots: int, max_len: int, lengths: Sequence[int], mesh: Any = None,
                 device: Any = None):
        """`spec`: the model's cache at any batch and length (a pytree of arrays or ShapeDtypeStructs, e.g.
        `jax.eval_shape(lambda: model.init_cache(1, 1))`); the pool holds it at [slots, max_len, ...]."""
        self.slots, self.max_len = slots, max_len
        self.lengths = movable_lengths(lengths, max_len)
        self.mesh = mesh
        self.spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct((slots, max_len, *x.shape[2:]), x.dtype), spec)
        self.position_bytes = position_bytes(self.spec)
        # Committed from the start: the programs return a committed cache (placed like their weights), and jax
        # compiles insert / extract apart for a committed and an uncommitted argument, so an uncommitted first cache
        # would leave the start-up warm compiling the wrong variants.
        self.device = device
        self._zeros = jax.jit(lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), self.spec),
                              out_shardings=self._shardings(self.spec))
        self.cache = self._zeros()

    def reset(self) -> None:
        """A fresh zeroed cache (after a failed step may have consumed the donated one)."""
        self.cache = self._zeros()

    def row_bytes(self, length: int) -> int:
        """Bytes of one slot's rows over `length` positions, all leaves (decoder: k and v of every layer)."""
        return length * self.position_bytes

    def row_length(self, positions: int) -> int:
        """The smallest movable row length holding `positions` cached positions."""
        i = bisect.bisect_left(self.lengths, positions)
        if i == len(self.lengths):
            raise ValueError(f"{positions} positions exceed the cache's {self.max_len}")
        return self.lengths[i]

    def grow(self, slot: int, positions: int) -> None:
        """Nothing: a slot always holds max_len positions."""

    def release(self, slot: int) -> None:
        """Nothing: a slot's rows stay allocated."""

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
        return HostKV(rows, length, sum(r.nbytes for r in jax.tree.leaves(rows)))

    def restore(self, host: HostKV, slot: int) -> None:
        """Uploads host rows into `slot` (placed like the cache, so the insert program compiled at start-up runs)."""
        self.insert(jax.device_put(host.rows, self._shardings(host.rows)), slot)

    def _shardings(self, tree: Any) -> Any:
        """Placements of cache-shaped leaves: by the cache's logical axes on the mesh, else on the device."""
        if self.mesh is not None:
            return jax.tree.map(lambda x: parallel.named_sharding(self.mesh, _cache_axes(len(x.shape)), x.shape), tree)
        if self.device is not None:
            return jax.tree.map(lambda x: jax.sharding.SingleDeviceSharding(self.device), tree)
        return None

    def warm(self) -> None:
        """Compiles insert and extract for every row length (slot 0 is written with its own contents)."""
        for length in self.lengths:
            self.restore(self.offload(0, length), 0)
        jax.block_until_ready(self.cache)


def evict_job(engine: Any, job: Any) -> int:
    """Frees `job`'s slot in `engine`: its KV goes to host memory while serve.host_kv_slots allows, else is dropped
    and recomputed when the job runs again (a prompt being written piecewise: dropped, and written again from its
    start) → the slot."""
    slot = job._slot
    if job._prefilling:
        job._filled, job._prefilling = 0, False
    elif len(engine._host_jobs) < engine.cfg.host_kv_slots:
        # cached: the prompt and all but the last token
        job._host = engine.pool.offload(slot, len(job.tokens) + len(job.output) - 1)
        engine._host_jobs.add(job)
        job.offloads += 1
        job.offloaded_bytes += job._host.nbytes
        engine.counters["offloads"] += 1
        engine.counters["offloaded_bytes"] += job._host.nbytes
    else:
        job._recompute = True
        job.recomputes += 1
        engine.counters["recomputes"] += 1
    engine.pool.release(slot)       # paged: its blocks go back to the free list (after the offload read them)
    engine._slot_job[slot], job._slot = None, None
    return slot

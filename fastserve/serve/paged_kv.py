"""Paged KV (serve.kv_cache_bytes > 0): the serving cache sized from a memory budget instead of slots × max_cache_len.

  * the pool: per layer {"k", "v"} of [num_blocks, kv_block, kv_heads, head_dim], num_blocks = kv_cache_bytes //
    the bytes of one block (k and v, all layers). No position is reserved for a slot: a slot holds the blocks its
    job has written so far, so many short requests and a few long ones share one budget;
  * the page table: [slots, max_blocks] int32 on the host (max_blocks = ceil(max_cache_len / kv_block)), a slot's
    block ids in position order, `num_blocks` where it has none. It goes to the decode and extend programs as an
    argument each call; the model's attention (fastserve/models/decoder.py, `paged_write`) writes a token at
    (pages[slot, p // kv_block], p % kv_block) and reads a slot's blocks back position-major;
  * the allocator (`BlockAllocator`): free block ids on the host. The engine calls `fit_blocks` after the scheduler
    picked this iteration's jobs: best first, each gets the blocks its next write needs (a new job: its prompt and
    its first generated token), evicting lower-priority jobs (not scheduled now first) through the engine's usual
    preemption (KV to host memory, else recompute) when the free blocks do not cover it; a job that still does not
    fit waits. The best job can always evict every other one and one max-length request always fits (checked at
    start-up), so the engine always progresses. Blocks return to the free list on finish, cancel and eviction.

Prefill, the recompute/chunk extend, host offload and restore move rows exactly as the slot layout does, through
the page table: rows [1, L, ...] are scattered into / gathered from the slot's blocks (a position without a block
is dropped on write), one compile per row length for every slot (the slot's page row is a traced argument).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fastserve import parallel
from fastserve.generation import decoding as infer
from fastserve.models.decoder import PAGED_AXES
from fastserve.serve.kv import KVPool, Rows, movable_lengths, position_bytes
from fastserve.serve.programs import ModelPrograms, extend_positions, masked_decode, sample_rows, sampled_columns


class BlockAllocator:
    """Free block ids and each slot's blocks (the page table, ids in position order; `num_blocks`: no block)."""

    def __init__(self, num_blocks: int, block: int, slots: int, max_blocks: int):
        self.num_blocks, self.block, self.max_blocks = num_blocks, block, max_blocks
        self.table = np.full((slots, max_blocks), num_blocks, np.int32)
        self.held = [0] * slots
        self._free = list(range(num_blocks - 1, -1, -1))     # a stack: low ids first

    @property
    def available(self) -> int:
        """Blocks not held by any slot."""
        return len(self._free)

    def blocks_for(self, positions: int) -> int:
        """Blocks covering positions [0, positions)."""
        return -(-positions // self.block)

    def needed(self, slot: int | None, positions: int) -> int:
        """More blocks `slot` (None: a slot holding none) needs to cover `positions` positions."""
        return max(self.blocks_for(positions) - (self.held[slot] if slot is not None else 0), 0)

    def grow(self, slot: int, positions: int) -> None:
        """Gives `slot` the blocks it lacks for `positions` positions (RuntimeError when too few are free: the
        caller checks `needed` against `available` first)."""
        want = min(self.blocks_for(positions), self.max_blocks)
        if want - self.held[slot] > len(self._free):
            raise RuntimeError(f"slot {slot} needs {want - self.held[slot]} KV blocks, {len(self._free)} free")
        while self.held[slot] < want:
            self.table[slot, self.held[slot]] = self._free.pop()
            self.held[slot] += 1

    def release(self, slot: int) -> None:
        """Returns `slot`'s blocks to the free list."""
        self._free.extend(int(b) for b in self.table[slot, :self.held[slot]][::-1])
        self.table[slot] = self.num_blocks
        self.held[slot] = 0

    def check(self) -> None:
        """Asserts the invariants: every block is free or held by exactly one slot, never both."""
        held = [int(b) for s, n in enumerate(self.held) for b in self.table[s, :n]]
        assert len(held) == len(set(held)), "a block is held twice"
        assert not set(held) & set(self._free), "a block is both held and free"
        assert len(held) + len(self._free) == self.num_blocks, "blocks were lost"
        assert all((self.table[s, n:] == self.num_blocks).all() for s, n in enumerate(self.held))


def _flat_ids(pages: jax.Array, length: int, blocks: jax.Array) -> jax.Array:
    """Row positions 0..length of a slot with block ids `pages` [M] → indices into the blocks flattened to
    [N·P, ...] (past the slot's blocks: N·P and beyond, i.e. out of range)."""
    n, size = blocks.shape[:2]
    pos = jnp.arange(length)
    return jnp.take(pages, pos // size, mode="fill", fill_value=n) * size + pos % size


def insert_paged(cache: Rows, rows: Rows, pages: jax.Array) -> Rows:
    """`rows` (leaves [1, L, ...]) scattered into a slot's blocks `pages` [M] from position 0 (traceable)."""
    def one(c, r):
        flat = c.reshape(-1, *c.shape[2:]).at[_flat_ids(pages, r.shape[1], c)].set(r[0].astype(c.dtype), mode="drop")
        return flat.reshape(c.shape)
    return jax.tree.map(one, cache, rows)


def extract_paged(cache: Rows, pages: jax.Array, length: int) -> Rows:
    """The first `length` positions of a slot's blocks `pages` [M] as rows [1, length, ...] (traceable; positions
    without a block read some other block: stale, like any row past a job's position)."""
    def one(c):
        return jnp.take(c.reshape(-1, *c.shape[2:]), _flat_ids(pages, length, c), axis=0, mode="clip")[None]
    return jax.tree.map(one, cache)


_insert_jit = jax.jit(insert_paged, donate_argnums=0)
_extract_jit = jax.jit(extract_paged, static_argnums=2)


class PagedKVPool(KVPool):
    """The KVPool interface (insert / extract / offload / restore / warm / reset) over a block pool of `budget`
    bytes, plus the allocator. `spec`: the model's cache (the decoder's list of {"k", "v"} [B, S, K, D])."""

    paged = True

    def __init__(self, spec: Any, slots: int, max_len: int, lengths: Sequence[int], budget: int, block: int,
                 mesh: Any = None, device: Any = None, key: str = "serve.kv_cache_bytes"):
        if not (isinstance(spec, list) and all(isinstance(x, dict) and set(x) == {"k", "v"} for x in spec)):
            raise ValueError(f"{key} (paged KV) needs the decoder's cache (one {{k, v}} per layer); this model's "
                             f"cache differs: set {key}=0")
        self.slots, self.max_len, self.mesh, self.device, self.block = slots, max_len, mesh, device, block
        self.lengths = movable_lengths(lengths, max_len)
        self.position_bytes = position_bytes(spec)
        max_blocks = -(-max_len // block)
        num_blocks = budget // (block * self.position_bytes)
        if num_blocks < max_blocks:
            raise ValueError(f"{key}: {budget} bytes hold {num_blocks} KV blocks of serve.kv_block={block} "
                             f"positions ({block * self.position_bytes} bytes each); one request of max_cache_len="
                             f"{max_len} positions needs {max_blocks}: at least "
                             f"{max_blocks * block * self.position_bytes} bytes")
        self.alloc = BlockAllocator(num_blocks, block, slots, max_blocks)
        self.view_len = max_blocks * block        # positions of a slot's view in attention
        self.spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct((num_blocks, block, *x.shape[2:]), x.dtype), spec)
        self.nbytes = num_blocks * block * self.position_bytes
        self._zeros = jax.jit(lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), self.spec),
                              out_shardings=self._pool_shardings())
        self.cache = self._zeros()

    def _pool_shardings(self) -> Any:
        if self.mesh is not None:
            return jax.tree.map(lambda x: parallel.named_sharding(self.mesh, PAGED_AXES, x.shape), self.spec)
        return self._shardings(self.spec)

    def reset(self) -> None:
        """A fresh zeroed pool and every block free (after a failed step; the engine forgets its slots too)."""
        self.cache = self._zeros()
        self.alloc = BlockAllocator(self.alloc.num_blocks, self.block, self.slots, self.alloc.max_blocks)

    def pages(self, slot: int) -> np.ndarray:
        """`slot`'s row of the page table [max_blocks]."""
        return self.alloc.table[slot]

    def insert(self, rows: Rows, slot: int) -> None:
        """Writes rows [1, L, ...] at positions [0, L) of `slot` (positions past its blocks are dropped)."""
        self.cache = _insert_jit(self.cache, rows, self.pages(slot))

    def extract(self, slot: int, length: int) -> Rows:
        """Device copies of `slot`'s first `length` positions (length: one of `self.lengths`)."""
        return _extract_jit(self.cache, self.pages(slot), length)

    def grow(self, slot: int, positions: int) -> None:
        self.alloc.grow(slot, positions)

    def release(self, slot: int) -> None:
        self.alloc.release(slot)

    def warm(self) -> None:
        """Compiles insert and extract for every row length (slot 0 given every block it can hold, then none)."""
        self.alloc.grow(0, self.max_len)
        super().warm()
        self.alloc.release(0)

    def stats(self) -> dict[str, Any]:
        """Blocks in the pool, free, and its bytes."""
        return dict(blocks=self.alloc.num_blocks, free_blocks=self.alloc.available, block_positions=self.block,
                    bytes=self.nbytes)


def kv_positions(job: Any) -> int:
    """Positions a job's blocks must cover once this iteration has run: its prompt and its first generated token
    (what a new job needs: its first decode step then grows nothing), or the position its next decode writes."""
    return len(job.tokens) + max(len(job.output), 1)


def fit_blocks(engine: Any, selected: list) -> list:
    """The scheduled jobs that get the KV blocks they need this iteration, best first (resident ones grown now,
    others reserved for their placement); evicts lower-priority jobs through `engine._evict` for them, those not
    scheduled now first. The others of `selected` wait."""
    alloc, priority = engine.pool.alloc, engine.scheduler.priority
    chosen = set(selected)
    order = sorted(selected, key=priority)
    # who may give blocks back: resident jobs not scheduled now, then the scheduled ones, lowest priority first
    victims = sorted((j for j in engine._slot_job if j is not None and j not in chosen), key=priority, reverse=True)
    victims += [j for j in reversed(order) if j._slot is not None]
    kept, reserved, evicted = [], 0, set()
    for job in order:
        if job in evicted:
            continue
        need = alloc.needed(job._slot, kv_positions(job))
        while need > alloc.available - reserved and victims and victims[0] is not job:
            victim = victims.pop(0)
            if victim._slot is not None and victim not in kept:
                t0 = engine.clock()
                engine._evict(victim)
                engine.timings["offload"] += engine.clock() - t0
                evicted.add(victim)
        if need > alloc.available - reserved:
            continue
        if job._slot is not None:
            alloc.grow(job._slot, kv_positions(job))
        else:
            reserved += need
        kept.append(job)
    return kept


# ------------------------------------------------------------------------------------------------ programs

def with_pages(cache: list, pages: jax.Array) -> list:
    return [dict(layer, pages=pages) for layer in cache]


def without_pages(cache: list) -> list:
    return [{"k": layer["k"], "v": layer["v"]} for layer in cache]


def paged_decode_fn(graphdef, head, params, cache, pages, ints, floats):
    """The masked decode step of every slot over the block pool; pages [slots, W] (W <= max_blocks: the first W
    blocks of each slot, all an active slot holds); a masked slot's position is W·P, past them, so its write is
    dropped. `head` (static) as programs.rows_decode_fn's."""
    model = nnx.merge(graphdef, params)
    view_len = pages.shape[1] * cache[0]["k"].shape[1]

    def step(tokens, positions, blocks):
        logits, blocks = infer.decode(model, tokens, positions, with_pages(blocks, pages), head)
        return logits, without_pages(blocks)
    return masked_decode(step, view_len, cache, ints, floats)


def paged_extend_fn(graphdef, view_len, params, cache, pages, tokens, start, last, ints, floats):
    """programs.extend_fn on a slot with blocks `pages` [M]: its rows gathered, extended, scattered back."""
    model = nnx.merge(graphdef, params)
    row = extract_paged(cache, pages, view_len)
    positions = extend_positions(tokens, start, last, view_len)
    logits, row = model(tokens, positions, row, logits_at=jnp.reshape(last, (1,)))
    return sample_rows(logits[:, 0], ints[0], ints[1], floats[0], ints[2], floats[1]), insert_paged(cache, row, pages)


@functools.lru_cache(maxsize=16)
def bound_paged_programs(graphdef: Any) -> tuple[Any, Any]:
    """(decode, extend) above, jitted with the graphdef bound (see programs.bound_programs: a static graphdef is
    hashed at every call)."""
    return (jax.jit(functools.partial(paged_decode_fn, graphdef), static_argnums=0, donate_argnums=2),
            jax.jit(functools.partial(paged_extend_fn, graphdef), static_argnums=0, donate_argnums=2))


def memory_budget(fraction: float, mesh: Any = None) -> int:
    """`fraction` of the device memory free now (serve.kv_cache_memory_fraction): of the mesh's first device times
    its `tensor` size (the pool's KV heads split over it; its blocks are not split), else of the default device."""
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        raise ValueError(f"serve.kv_cache_memory_fraction={fraction}: {device.platform} devices report no memory "
                         "limit; set serve.kv_cache_bytes instead")
    tensor = dict(mesh.shape).get("tensor", 1) if mesh is not None else 1
    return int(fraction * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) * tensor)


def paged_backend(cfg: Any, programs: Any, max_len: int, buckets: Sequence[int], mesh: Any
                  ) -> tuple[PagedKVPool, "PagedPrograms"]:
    """The pool of serve.kv_cache_bytes (or serve.kv_cache_memory_fraction) and the programs over it, for an
    engine of these shapes (ValueError naming the key for a backend without paged programs, e.g. an export, or a
    budget short of one max-length request)."""
    key = "serve.kv_cache_bytes" if cfg.kv_cache_bytes else "serve.kv_cache_memory_fraction"
    if not isinstance(programs, ModelPrograms):
        raise ValueError(f"{key}={cfg.kv_cache_bytes or cfg.kv_cache_memory_fraction}: paged KV needs the in-process "
                         f"model; this backend ({type(programs).__name__}, e.g. an export) has slot-layout programs "
                         f"only: set {key}=0")
    budget = cfg.kv_cache_bytes or memory_budget(cfg.kv_cache_memory_fraction, mesh)
    pool = PagedKVPool(programs.cache_spec, cfg.slots, max_len, buckets, budget, cfg.kv_block, mesh,
                       programs.device, key)
    return pool, PagedPrograms(programs, pool)


class PagedPrograms:
    """ModelPrograms' prefill / decode / extend over a PagedKVPool (the page table read from the pool per call).

    The decode step attends over the first W blocks of every slot, W the smallest of `widths` (max_blocks and its
    halves down to an eighth) covering the blocks of every active slot: a step costs what the longest running job
    holds, not max_cache_len (all widths compiled at start-up by `warm_decode`). Where the CPU decode-attention
    kernel reads each slot's blocks to its own length (`ModelPrograms.in_place`), max_blocks is the only width."""

    def __init__(self, base: ModelPrograms, pool: PagedKVPool):
        self.base, self.pool = base, pool
        self.device, self.cache_spec = base.device, base.cache_spec
        self._decode, self._extend = bound_paged_programs(base.graphdef)
        self.row_decode = True     # decode_rows: the page table's rows, whatever the model
        # XLA:CPU runs the one-row paged step several times slower than two rows (SmolLM2-135M int8, 8 slots of
        # 320 positions: 97 ms against 21 ms; experiments/bench_decode_widths.py): the engine runs width 2 for one job
        self.min_row_width = 2
        m = pool.alloc.max_blocks      # (on the CPU kernel's path the blocks attended per slot are its own anyway)
        self.widths = [m] if base.in_place else sorted({-(-m // d) for d in (1, 2, 4, 8)})

    def width(self, ints: np.ndarray, rows: np.ndarray | None = None) -> int:
        """The decode width for the active columns `ints[5]` (slots, or with `rows` the rows' ids; none active: the
        widest, as the start-up profile times)."""
        active = np.flatnonzero(np.asarray(ints)[5])
        held = [self.pool.alloc.held[s] for s in (active if rows is None else np.asarray(rows)[active])]
        need = max(held, default=self.widths[-1])
        return next(w for w in self.widths if w >= need)

    def warm_decode(self, cache: Any, ints: Any, floats: Any, row_widths: Sequence[int] = ()) -> Any:
        """Compiles the decode step at every width (on `ints`: no slot active), and that of the running rows at
        every width of each of `row_widths` (no row running) → the cache."""
        for w in self.widths:
            toks, cache = self.decode(cache, ints, floats, w)
            jax.block_until_ready(toks)
            for n in row_widths:
                if n != self.pool.slots:
                    rows, z = np.full(n, self.pool.slots, np.int32), np.zeros((6, n), np.int32)
                    toks, cache = self.decode_rows(cache, rows, z, np.ones((2, n), np.float32), w,
                                                   sampled_columns(n, self.pool.slots))
                    jax.block_until_ready(toks)
        return cache

    def check(self, max_len: int, buckets: list[int], slots: int) -> None:
        self.base.check(max_len, buckets, slots)

    def prefill(self, tokens: Any, lengths: Any, ints: Any, floats: Any) -> tuple[jax.Array, Any]:
        """As ModelPrograms.prefill (its rows go into the pool by `PagedKVPool.insert`)."""
        return self.base.prefill(tokens, lengths, ints, floats)

    def decode(self, cache: Any, ints: Any, floats: Any, width: int | None = None) -> tuple[jax.Array, Any]:
        """One masked decode step over every slot (the pool is donated); `width`: blocks attended per slot (None:
        the narrowest covering the active slots)."""
        pages = np.ascontiguousarray(self.pool.alloc.table[:, :width or self.width(ints)])
        return self._decode(None, self.base.params, cache, pages, ints, floats)

    def decode_rows(self, cache: Any, rows: Any, ints: Any, floats: Any, width: int | None = None,
                    head: int | None = None) -> tuple[jax.Array, Any]:
        """The decode step of slots `rows` [n] only (a row id >= slots: padding), ints [6, n] / floats [2, n] as
        ModelPrograms.decode_rows (`head` too): the same program as `decode`, over the rows' page-table rows
        (padding: no block, so its write is dropped)."""
        rows = np.asarray(rows)
        alloc = self.pool.alloc
        table = np.concatenate([alloc.table, np.full_like(alloc.table[:1], alloc.num_blocks)])   # + padding's row
        pages = np.ascontiguousarray(table[np.minimum(rows, self.pool.slots), :width or self.width(ints, rows)])
        return self._decode(head, self.base.params, cache, pages, ints, floats)

    def extend(self, cache: Any, slot: Any, tokens: Any, start: Any, last: Any, ints: Any, floats: Any
               ) -> tuple[jax.Array, Any]:
        """As ModelPrograms.extend, into `slot`'s blocks."""
        return self._extend(self.pool.view_len, self.base.params, cache, self.pool.pages(int(slot)), tokens, start,
                            last, ints, floats)

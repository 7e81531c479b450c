"""Prefix caching: the KV rows of prompt prefixes that earlier requests computed, kept on the device in fixed-size
token blocks and copied into a new request's slot so that only the rest of its prompt is prefilled.

  * keys: a prompt is cut into blocks of `block` tokens; block i's key is a hash chain, blake2b(key of block i-1 +
    the block's token ids), so a key covers every token before it (and so its positions: the KV of a token depends
    on all tokens before it). A 128-bit digest: a false match is as unlikely as a blake2b collision;
  * the store: one device array per cache leaf, [blocks, block, ...] (the pool's cache pytree with the slot axis
    replaced by a block id and the position axis cut to one block), bounded by serve.prefix_cache_bytes;
  * eviction: least recently used first. A match touches its chain from its last block to its first, and an insert
    does the same, so within a chain the deepest blocks are older and go first: a chain shrinks from its end instead
    of losing its head and stranding the rest;
  * moves: two jitted programs, slot and block ids traced (one compile each): `load_blocks` writes the store's blocks
    (a fixed count, max_cache_len // block ids, unused ones pointing anywhere) at positions 0.. of a slot, and
    `save_blocks` scatters blocks of a slot's row into the store (unused destinations out of range: dropped). Blocks
    are copied, never shared, so a running request never pins a block and eviction needs no reference counts.
    Positions a load writes past the matched prefix hold stale rows, which are harmless like every row past a job's
    position (fastserve/serve/kv.py). With paged KV (fastserve/serve/paged_kv.py) a prefix block is one KV block
    (serve.prefix_cache_block = serve.kv_block): `load_paged` copies store blocks into the slot's first KV blocks
    and `save_paged` copies KV blocks into the store, by id.

`BlockIndex` is the host-side bookkeeping (keys, LRU, free ids) and holds no arrays; `PrefixCache` adds the store.
"""
from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fastserve import parallel
from fastserve.serve.kv import _cache_axes


def chain_keys(tokens: Sequence[int], block: int, n_blocks: int) -> list[bytes]:
    """The hash-chain keys of the first `n_blocks` full blocks of `tokens` (fewer if it has fewer)."""
    keys, prev = [], b""
    n_blocks = min(n_blocks, len(tokens) // block)
    arr = np.asarray(tokens[:n_blocks * block], np.int64)
    for i in range(n_blocks):
        prev = hashlib.blake2b(prev + arr[i * block:(i + 1) * block].tobytes(), digest_size=16).digest()
        keys.append(prev)
    return keys


class BlockIndex:
    """Which token-block chains are cached, in which block ids of a store of `capacity` blocks; LRU eviction."""

    def __init__(self, capacity: int, block: int):
        if capacity < 1 or block < 1:
            raise ValueError(f"a prefix cache needs at least one block of at least one token (capacity {capacity}, "
                             f"block {block})")
        self.capacity, self.block = capacity, block
        self._ids: OrderedDict[bytes, int] = OrderedDict()     # key -> block id, least recently used first
        self._free = list(range(capacity - 1, -1, -1))
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._ids)

    def _touch(self, keys: Sequence[bytes]) -> None:
        for k in reversed(keys):           # the chain's head ends most recent: its tail is evicted first
            self._ids.move_to_end(k)

    def longest(self, tokens: Sequence[int], max_tokens: int) -> list[bytes]:
        """Keys of the longest cached chain of full blocks prefixing `tokens`, at most `max_tokens` tokens."""
        keys = chain_keys(tokens, self.block, min(max_tokens, len(tokens)) // self.block)
        n = 0
        while n < len(keys) and keys[n] in self._ids:
            n += 1
        return keys[:n]

    def match(self, tokens: Sequence[int], max_tokens: int) -> list[int]:
        """Block ids of the longest cached prefix of `tokens` (≤ max_tokens tokens), marked recently used."""
        keys = self.longest(tokens, max_tokens)
        self._touch(keys)
        return [self._ids[k] for k in keys]

    def add(self, tokens: Sequence[int], n_blocks: int) -> list[tuple[int, int]]:
        """Registers the first `n_blocks` full blocks of `tokens` (at most `capacity`): returns (block index in
        `tokens`, store id) of those not cached yet, whose rows the caller must write; evicts LRU blocks for them."""
        keys = chain_keys(tokens, self.block, min(n_blocks, self.capacity))
        new = []
        for i, k in enumerate(keys):
            if k in self._ids:
                self._ids.move_to_end(k)   # keep it from being evicted for its own chain's later blocks
                continue
            if self._free:
                bid = self._free.pop()
            else:
                _, bid = self._ids.popitem(last=False)
                self.evictions += 1
            self._ids[k] = bid
            new.append((i, bid))
        self._touch(keys)
        return new


def load_blocks(cache: Any, store: Any, ids: Any, slot: Any) -> Any:
    """Writes store blocks `ids` [n] one after another at positions 0..n*block of `slot` (traceable)."""
    def one(c, s):
        rows = jnp.take(s, ids, axis=0)                                     # [n, block, ...]
        rows = rows.reshape((1, rows.shape[0] * rows.shape[1]) + rows.shape[2:])
        return jax.lax.dynamic_update_slice(c, rows.astype(c.dtype), (slot,) + (0,) * (c.ndim - 1))
    return jax.tree.map(one, cache, store)


def save_blocks(store: Any, cache: Any, slot: Any, src: Any, dst: Any) -> Any:
    """Copies blocks `src` [n] of `slot`'s row into store ids `dst` [n] (a dst out of range: dropped; traceable)."""
    def one(s, c):
        n, block = src.shape[0], s.shape[1]
        row = jax.lax.dynamic_slice(c, (slot,) + (0,) * (c.ndim - 1), (1, n * block) + c.shape[2:])
        blocks = row.reshape((n, block) + c.shape[2:])
        return s.at[dst].set(jnp.take(blocks, src, axis=0).astype(s.dtype), mode="drop")
    return jax.tree.map(one, store, cache)


def load_paged(cache: Any, store: Any, ids: Any, dst: Any) -> Any:
    """Copies store blocks `ids` [n] into KV blocks `dst` [n] of a paged pool (a dst out of range: dropped;
    traceable): the paged layout's `load_blocks`, a prefix block being one KV block."""
    return jax.tree.map(lambda c, s: c.at[dst].set(jnp.take(s, ids, axis=0).astype(c.dtype), mode="drop"), cache, store)


def save_paged(store: Any, cache: Any, src: Any, dst: Any) -> Any:
    """Copies KV blocks `src` [n] of a paged pool into store ids `dst` [n] (a dst out of range: dropped; traceable)."""
    return jax.tree.map(lambda s, c: s.at[dst].set(jnp.take(c, src, axis=0).astype(s.dtype), mode="drop"), store, cache)


def _store_shardings(pool: Any, spec: Any) -> Any:
    """The store placed like the pool's cache, except its block axis, which is not split (on a mesh a load gathers
    any blocks into any slot; the KV heads still split over `tensor` as the cache's do)."""
    if pool.mesh is None:
        return pool._shardings(spec)
    return jax.tree.map(lambda x: parallel.named_sharding(pool.mesh, (None,) + _cache_axes(len(x.shape))[1:],
                                                          x.shape), spec)


log = logging.getLogger(__name__)
_load_jit = jax.jit(load_blocks, donate_argnums=0)
_save_jit = jax.jit(save_blocks, donate_argnums=0)
_load_paged_jit = jax.jit(load_paged, donate_argnums=0)
_save_paged_jit = jax.jit(save_paged, donate_argnums=0)


class PrefixCache:
    """The block index plus its device store, moving rows between the store and a KVPool's slots."""

    def __init__(self, pool: Any, block: int, budget_bytes: int):
        """`pool`: the engine's KVPool; `block`: tokens per block; `budget_bytes`: the store's size (0: as many
        bytes as the pool's cache, slots × max_cache_len positions)."""
        self.pool, self.block = pool, block
        self.paged = getattr(pool, "paged", False)     # blocks move between the store and the slot's KV blocks
        if self.paged and block != pool.block:
            raise ValueError(f"with paged KV a cached prefix block is copied into one KV block: "
                             f"serve.prefix_cache_block={block} must equal serve.kv_block={pool.block}")
        self.per_load = pool.max_len // block      # blocks a load writes: all that fit one slot's row
        if self.per_load < 1:
            raise ValueError(f"serve.prefix_cache_block={block} exceeds max_cache_len={pool.max_len}")
        block_bytes = block * pool.position_bytes
        budget = budget_bytes or pool.slots * pool.max_len * pool.position_bytes
        capacity = budget // block_bytes
        if capacity < 1:
            raise ValueError(f"serve.prefix_cache_bytes={budget_bytes} holds no block of {block} tokens "
                             f"({block_bytes} bytes)")
        self.index = BlockIndex(int(capacity), block)
        self.nbytes = int(capacity) * block_bytes
        spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct((int(capacity), block, *x.shape[2:]), x.dtype), pool.spec)
        self._zeros = jax.jit(lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), spec),
                              out_shardings=_store_shardings(pool, spec))
        self.store = self._zeros()
        self.hit_tokens = self.queried_tokens = self.inserted_blocks = 0
        log.info("prefix cache: %d blocks of %d tokens (%.1f MiB of device memory)", capacity, block,
                 self.nbytes / 2 ** 20)

    def reset(self) -> None:
        """Forgets every block (after a failed step may have consumed the donated store); counters go on."""
        evictions = self.index.evictions
        self.index = BlockIndex(self.index.capacity, self.block)
        self.index.evictions = evictions
        self.store = self._zeros()

    def lookup(self, tokens: Sequence[int]) -> int:
        """Tokens of `tokens`' longest cached prefix, leaving its last token out (its logits are always needed);
        touches nothing."""
        return len(self.index.longest(tokens, len(tokens) - 1)) * self.block

    def load(self, tokens: Sequence[int], slot: int) -> int:
        """Copies the longest cached prefix of `tokens` (all but the last token at most) into `slot` → its tokens."""
        ids = self.index.match(tokens, len(tokens) - 1)
        if ids:
            padded = np.zeros(self.per_load, np.int32)
            padded[:len(ids)] = ids
            if self.paged:      # into the slot's first KV blocks (the engine grew it to the prompt first)
                dst = np.full(self.per_load, self.pool.alloc.num_blocks, np.int32)
                dst[:len(ids)] = self.pool.pages(slot)[:len(ids)]
                self.pool.cache = _load_paged_jit(self.pool.cache, self.store, padded, dst)
            else:
                self.pool.cache = _load_jit(self.pool.cache, self.store, padded, np.int32(slot))
        return len(ids) * self.block

    def save(self, tokens: Sequence[int], slot: int) -> int:
        """Caches the full blocks of `tokens` whose KV `slot` holds (positions 0..len(tokens)) → blocks written."""
        new = self.index.add(tokens, min(len(tokens), self.pool.max_len) // self.block)
        if new:
            src = np.zeros(self.per_load, np.int32)
            dst = np.full(self.per_load, self.index.capacity, np.int32)        # out of range: dropped
            for j, (i, bid) in enumerate(new):
                src[j], dst[j] = i, bid
            if self.paged:      # the slot's i-th KV block holds the prompt's i-th block
                src = self.pool.pages(slot)[src].astype(np.int32)      # unused entries: dst out of range
                self.store = _save_paged_jit(self.store, self.pool.cache, src, dst)
            else:
                self.store = _save_jit(self.store, self.pool.cache, np.int32(slot), src, dst)
            self.inserted_blocks += len(new)
        return len(new)

    def warm(self, clock: Callable[[], float], repeats: int = 3) -> float:
        """Compiles both moves (saves that drop every block, loads of stale rows into slot 0) → a load's median
        seconds."""
        ids, dst = np.zeros(self.per_load, np.int32), np.full(self.per_load, self.index.capacity, np.int32)
        times = []
        for _ in range(repeats + 1):
            t0 = clock()
            if self.paged:      # every destination out of range: nothing written either way
                self.store = _save_paged_jit(self.store, self.pool.cache, ids, dst)
                none = np.full(self.per_load, self.pool.alloc.num_blocks, np.int32)
                self.pool.cache = _load_paged_jit(self.pool.cache, self.store, ids, none)
            else:
                self.store = _save_jit(self.store, self.pool.cache, np.int32(0), ids, dst)
                self.pool.cache = _load_jit(self.pool.cache, self.store, ids, np.int32(0))
            jax.block_until_ready(self.pool.cache)
            times.append(clock() - t0)
        return float(np.median(times[1:]))

    def stats(self) -> dict[str, Any]:
        """Hit / queried prompt tokens, blocks held, evictions."""
        return dict(block_tokens=self.block, blocks=len(self.index), capacity_blocks=self.index.capacity,
                    bytes=self.nbytes, hit_tokens=self.hit_tokens, queried_tokens=self.queried_tokens,
                    hit_rate=round(self.hit_tokens / max(self.queried_tokens, 1), 4),
                    inserted_blocks=self.inserted_blocks, evictions=self.index.evictions)

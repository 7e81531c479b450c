"""The engine's compiled programs: prefill one bucket-padded prompt, one decode step over every slot (or over the
running rows only, at a few batch widths: fastserve/serve/active_rows.py), and the recompute extend;
`warm_and_profile` compiles and times them at start-up. They are jitted once per model graphdef (`bound_programs`),
so that engines over the same model and shapes share their compiled programs (a server and a benchmark may hold
several engines).

The engine reaches them through a backend object with three operations (`prefill`, `decode`, `extend`: the
recompute of an evicted job's KV and the chunks of a prompt longer than the largest bucket) and the
KV layout it needs for its pool: `ModelPrograms` here (graphdef + params), `ExportedPrograms` in
fastserve/serve/backends.py (the functions of a `fastserve.export` directory)."""
from __future__ import annotations

import functools
import logging
import time
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fastserve.generation import decoding as infer
from fastserve.models.capabilities import CausalLM, cache_spec
from fastserve.serve.kv import cache_length, extract_rows, insert_rows

log = logging.getLogger(__name__)


def sample_rows(logits, seeds, counts, temperature, top_k, top_p):
    """infer.sample per row with the row's own key fold_in(key(seed), count)."""
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counts)
    # one batched call, not a vmap of rows: the batch's sampling needs are decided once (see infer.sample)
    return infer.sample(logits, keys, temperature, top_k, top_p)


def prefill_fn(graphdef, params, tokens, lengths, ints, floats):
    """tokens [1, T] → (first token [1], KV rows [1, T, ...]); ints [3, 1]: seed, count, top_k; floats [2, 1]:
    temperature, top_p."""
    model = nnx.merge(graphdef, params)
    cache = model.init_cache(tokens.shape[0], tokens.shape[1])
    logits, cache = infer.prefill(model, tokens, lengths, cache)
    return sample_rows(logits, ints[0], ints[1], floats[0], ints[2], floats[1]), cache


def masked_decode(step: Callable, max_len: int, cache: Any, ints: Any, floats: Any) -> tuple[jax.Array, Any]:
    """One decode step over every slot, inactive slots masked; `step(tokens, positions, cache)` → (logits, cache)
    is the model's decode. ints [6, S]: token, position, seed, count, top_k, active; floats [2, S]: temperature,
    top_p. Shared by both backends so that their masking and sampling cannot drift apart. A `step` may return the
    logits of its first h columns only (the rest: prompt tokens written, nothing sampled): h tokens come back."""
    tokens, positions, seeds, counts, top_k, active = ints
    active = active > 0
    # masked rows: position = max_len, past the cache, so their KV write is dropped (the model scatters with
    # mode="drop", exported or not) and their token is ignored
    positions = jnp.where(active, positions, max_len)
    logits, cache = step(tokens, positions, cache)
    h = logits.shape[0]
    sampled = sample_rows(logits, seeds[:h], counts[:h], floats[0, :h], top_k[:h], floats[1, :h])
    return jnp.where(active[:h], sampled, -1), cache


def _with(cache: Any, **extra: Any) -> list:
    """The layers' cache dicts with `extra` entries (the model's "rows" / "window", see models/decoder.py)."""
    return [dict(layer, **extra) for layer in cache]


def _without(cache: Any, *names: str) -> list:
    return [{k: v for k, v in layer.items() if k not in names} for layer in cache]


def decode_fn(graphdef, max_len, params, cache, ints, floats, window=None):
    """ints [6, S]: token, position, seed, count, top_k, active; floats [2, S]: temperature, top_p; `window`
    (static): attend to the first `window` positions only (every active slot's position is below it)."""
    model = nnx.merge(graphdef, params)
    if window is None:
        return masked_decode(lambda t, p, c: infer.decode(model, t, p, c), max_len, cache, ints, floats)

    def step(tokens, positions, cache):
        logits, cache = infer.decode(model, tokens, positions, _with(cache, window=jnp.zeros(window, jnp.int32)))
        return logits, _without(cache, "window")
    return masked_decode(step, max_len, cache, ints, floats)


def rows_decode_fn(graphdef, max_len, params, cache, rows, ints, floats, window=None, head=None):
    """The decode step of cache rows `rows` [w] only (a row id >= slots: padding, masked); ints [6, w] / floats
    [2, w] as decode_fn's, column i for row rows[i]; `window` as decode_fn's. A row id may repeat with other
    positions (a prompt's piece riding in the step: fastserve/serve/active_rows.py); `head` (static): only the
    first that many columns are sampled (→ tokens [head])."""
    model = nnx.merge(graphdef, params)
    extra = {"rows": rows} if window is None else {"rows": rows, "window": jnp.zeros(window, jnp.int32)}

    def step(tokens, positions, cache):
        logits, cache = infer.decode(model, tokens, positions, _with(cache, **extra), head)
        return logits, _without(cache, *extra)
    return masked_decode(step, max_len, cache, ints, floats)


def sampled_columns(width: int, slots: int) -> int | None:
    """How many columns a decode step of `width` samples: a width above `slots` carries prompt tokens past the
    first `slots` columns (chunked prefill riding in the step), which sample nothing; None: every column."""
    return slots if width > slots else None


def decode_windows(max_len: int, least: int = 64) -> list[int]:
    """The attention windows a decode step is compiled for: max_len, a quarter and a sixteenth of it (rounded up to a
    multiple of 16), none below `least` positions. A step attends to the narrowest window holding every running row's
    position, so it costs about what the longest running job holds, not max_cache_len (as the paged layout's block
    widths do, fastserve/serve/paged_kv.py). Quickstart-shaped decode of 8 rows at position 60, max_len 448, one
    process, interleaved: 8.7 ms over the whole cache, 5.0 ms in a window of 112. Each window costs a compile per
    decode width at start-up, hence powers of four and the floor."""
    return sorted({max_len} | {w for d in (4, 16) if (w := -(-max_len // d // 16) * 16) >= least and w < max_len})


def extend_positions(tokens: jax.Array, start: jax.Array, last: jax.Array, length: int) -> jax.Array:
    """Positions of an extend's tokens [1, T]: start, start+1, ... through tokens[0, last], then `length` (the
    cache's end) for the bucket's padding: its KV write is dropped, and the CPU kernel gives a query past the row's
    positions zeros instead of attending to the whole row for nothing (a 40-token hit in a 64-token bucket: 24
    queries over the cached prefix)."""
    j = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    return jnp.where(j <= last, start + j, length)


def extend_fn(graphdef, params, cache, slot, tokens, start, last, ints, floats):
    """Writes the KV of tokens [1, T] at positions start, start+1, ... into `slot` (recompute past one bucket, a
    long prompt's chunks) → (the token [1] sampled from the logits of tokens[0, last], as prefill_fn samples with
    ints [3, 1] / floats [2, 1]; the cache)."""
    model = nnx.merge(graphdef, params)
    row = extract_rows(cache, slot, cache_length(cache))
    positions = extend_positions(tokens, start, last, cache_length(cache))
    logits, row = model(tokens, positions, row, logits_at=jnp.reshape(last, (1,)))
    return sample_rows(logits[:, 0], ints[0], ints[1], floats[0], ints[2], floats[1]), insert_rows(cache, row, slot)


def rows_extend_fn(graphdef, params, cache, slot, tokens, start, last, ints, floats, window=None):
    """extend_fn through the model's row path (a model with `cache_row_ids`): the tokens' KV is written at their
    positions of row `slot` in place, and they attend to the row's first `window` positions (static; None: all) —
    no copy of the slot's whole rows out of the cache and back. A 32-token piece in a 2,112-position cache
    (quickstart shape, ad hoc, interleaved): at position 64 5.2 ms in a window of 144 against 9.5 ms through
    extend_fn; at 1968 (the whole cache) 11.4 against 12.0 ms."""
    model = nnx.merge(graphdef, params)
    extra = {"rows": jnp.reshape(slot, (1,)).astype(jnp.int32)}
    if window is not None:
        extra["window"] = jnp.zeros(window, jnp.int32)
    positions = extend_positions(tokens, start, last, cache_length(cache))
    logits, cache = model(tokens, positions, _with(cache, **extra), logits_at=jnp.reshape(last, (1,)))
    return sample_rows(logits[:, 0], ints[0], ints[1], floats[0], ints[2], floats[1]), _without(cache, *extra)


@functools.lru_cache(maxsize=16)
def bound_programs(graphdef: Any) -> SimpleNamespace:
    """The programs above as jitted functions of the rest of their arguments, with the model's graphdef bound (as
    `fastserve.generation.program.model_program` binds it): a static argument is hashed at every call, and hashing
    SmolLM2-135M's per-layer GraphDef (30 layers) made its one-row int8 engine step 29.9 ms against 21.4 ms bound (ad
    hoc, same machine). Called once per ModelPrograms; engines over the same graphdef share the compiled programs."""
    bind = functools.partial
    return SimpleNamespace(
        prefill=jax.jit(bind(prefill_fn, graphdef)),
        decode=jax.jit(bind(decode_fn, graphdef), static_argnums=(0, 5), donate_argnums=2),
        decode_rows=jax.jit(bind(rows_decode_fn, graphdef), static_argnums=(0, 6, 7), donate_argnums=2),
        extend=jax.jit(bind(extend_fn, graphdef), donate_argnums=1),
        extend_rows=jax.jit(bind(rows_extend_fn, graphdef), static_argnums=8, donate_argnums=1))


def per_layer_model(graphdef: Any, params: Any, model_cfg: Any) -> tuple[Any, Any, Any]:
    """(graphdef, params, model_cfg) of a scanned decoder's per-layer twin (the same weights, unstacked; other
    models unchanged). A stacked model's KV-cached step slices every layer's weights out of the stack, and XLA:CPU
    copies each slice at every step: the quickstart-shaped decode step measured 11-16 % slower stacked (one process,
    interleaved). `fastserve.workdir.load_model` unstacks the same way."""
    from fastserve.core.state import abstract_model
    from fastserve.models.layer_stack import as_per_layer

    if not getattr(model_cfg, "scanned", False):
        return graphdef, params, model_cfg
    model_cfg, params = as_per_layer(model_cfg, params)
    return abstract_model(model_cfg)[0], params, model_cfg


def cpu_layout_model(graphdef: Any, params: Any, model_cfg: Any, mesh: Any = None) -> tuple[Any, Any, Any]:
    """(graphdef, params, model_cfg) with the W8A8 layers' weights in the CPU kernel's VNNI panels
    (fastserve.transforms.quantize.vnni_layout) where that kernel runs: one CPU device (or a one-device mesh) with
    AVX-512 VNNI. Other models and machines unchanged. Outputs are identical; a decode step at 1-8 rows streams
    the weights about twice as fast (experiments/int8_stream.py --packed)."""
    from fastserve.core.state import abstract_model
    from fastserve.kernels import build
    from fastserve.kernels.int8 import vnni_available
    from fastserve.transforms.quantize import vnni_layout

    if not getattr(model_cfg, "compressed", None) or jax.default_backend() != "cpu" or \
            (mesh is not None and mesh.size > 1) or build.load() is None or not vnni_available():
        return graphdef, params, model_cfg
    if len({d for leaf in jax.tree.leaves(params) for d in getattr(leaf, "devices", lambda: set())()}) > 1:
        return graphdef, params, model_cfg
    model_cfg, new_params, packed = vnni_layout(model_cfg, params)
    if not packed:
        return graphdef, params, model_cfg
    log.info("serve.pack_int8: %d W8A8 weights stored as the CPU kernel's VNNI panels", len(packed))
    return abstract_model(model_cfg)[0], new_params, model_cfg


def serving_model(graphdef: Any, params: Any, model_cfg: Any, mesh: Any = None, pack_int8: bool = True
                  ) -> tuple[Any, Any, Any]:
    """The model as the in-process engine serves it: per-layer (`per_layer_model`), and with `pack_int8` its W8A8
    weights in the CPU kernel's layout where that kernel runs (`cpu_layout_model`)."""
    graphdef, params, model_cfg = per_layer_model(graphdef, params, model_cfg)
    return cpu_layout_model(graphdef, params, model_cfg, mesh) if pack_int8 else (graphdef, params, model_cfg)


class ModelPrograms:
    """The in-process backend: the module-level programs above over a model's graphdef + params."""

    def __init__(self, graphdef: Any, params: Any, max_len: int):
        self.graphdef, self.params, self.max_len = graphdef, params, max_len
        self.jitted = bound_programs(graphdef)
        model = nnx.merge(graphdef, params)
        if not isinstance(model, CausalLM):
            raise ValueError(f"{type(model).__name__} is not a causal LM (no KV cache): the serving engine decodes "
                             "tokens; export a forward model instead")
        # the engine's KV pool holds the model's own cache (any pytree of [batch, seq, ...] leaves) for every slot
        self.cache_spec = cache_spec(model, 1, 1)
        self.device = None     # the pool is placed by the engine's mesh
        # decode of the running rows only (`decode_rows`): the model takes row ids in its cache dicts (and a window)
        self.row_decode = bool(getattr(model, "cache_row_ids", False)) and isinstance(self.cache_spec, list) and \
            all(isinstance(x, dict) and set(x) == {"k", "v"} for x in self.cache_spec)
        # windows bound XLA's attention path; the CPU kernel reads each row to its own length whatever the window,
        # so there the narrower windows would only cost compiles at start-up
        self.in_place = bool(getattr(model, "reads_cache_in_place", lambda: False)())
        self.windows = decode_windows(max_len) if self.row_decode and not self.in_place else [max_len]
        self.window_steps = {w: 0 for w in self.windows}    # decode steps run in each window (warm-up included)

    def check(self, max_len: int, buckets: list[int], slots: int) -> None:
        """Nothing to check: the programs compile for whatever shapes the engine picked."""

    def prefill(self, tokens: Any, lengths: Any, ints: Any, floats: Any) -> tuple[jax.Array, Any]:
        """tokens [1, T] → (sampled first token [1], the cache's rows: leaves [1, T, ...])."""
        return self.jitted.prefill(self.params, tokens, lengths, ints, floats)

    def window(self, ints: np.ndarray) -> int | None:
        """The narrowest compiled window holding every active column's position of `ints` [6, w] (None: the whole
        cache, also when no column is active, as the start-up profile times)."""
        ints = np.asarray(ints)
        active = ints[5] > 0
        w = self.window_of(int(ints[1][active].max())) if active.any() else self.max_len
        self.window_steps[w] += 1
        return None if w >= self.max_len else w

    def window_of(self, position: int) -> int:
        """The narrowest window holding a row that writes `position`."""
        return next((w for w in self.windows if w > position), self.max_len)

    def decode(self, cache: Any, ints: Any, floats: Any, window: int | None = 0) -> tuple[jax.Array, Any]:
        """One masked decode step over every slot (the cache is donated); `window`: positions attended (0: the
        narrowest holding the active slots, None: all)."""
        window = self.window(ints) if window == 0 else window
        return self.jitted.decode(self.max_len, self.params, cache, ints, floats, window)

    def decode_rows(self, cache: Any, rows: Any, ints: Any, floats: Any, window: int | None = 0,
                    head: int | None = None) -> tuple[jax.Array, Any]:
        """One decode step of cache rows `rows` [w] (padding: row id >= slots) with ints [6, w] / floats [2, w] →
        (tokens [w], or [head] with `head`: see rows_decode_fn; the cache, donated); `window` as `decode`'s."""
        window = self.window(ints) if window == 0 else window
        return self.jitted.decode_rows(self.max_len, self.params, cache, rows, ints, floats, window, head)

    def warm_decode(self, cache: Any, ints: Any, floats: Any, row_widths: Sequence[int] = (), repeats: int = 3
                    ) -> Any:
        """Compiles the decode step (on `ints`: no slot active) and that of the running rows at each of `row_widths`
        (no row running) at every window below max_len (warm_and_profile compiled the whole cache's), and times
        each (width, window) into `step_s` (median of `repeats`; the engine's RowDecoder plans with it) → the
        cache."""
        slots = np.asarray(ints).shape[1]
        self.step_s = {}
        if len(self.windows) < 2:
            return cache
        for window in self.windows:
            for n in sorted(set(row_widths) | {slots}):
                if n == slots:
                    run = functools.partial(self.decode, ints=ints, floats=floats)
                else:
                    rows, z = np.full(n, slots, np.int32), np.zeros((6, n), np.int32)
                    run = functools.partial(self.decode_rows, rows=rows, ints=z, floats=np.ones((2, n), np.float32),
                                            head=sampled_columns(n, slots))
                times = []
                for _ in range(repeats + 1):      # the first call compiles (the whole cache's: compiled already)
                    t0 = time.perf_counter()
                    toks, cache = run(cache, window=None if window == self.max_len else window)
                    jax.block_until_ready(toks)
                    times.append(time.perf_counter() - t0)
                self.step_s[(n, window)] = float(np.median(times[1:]))
        return cache

    def extend(self, cache: Any, slot: Any, tokens: Any, start: Any, last: Any, ints: Any, floats: Any
               ) -> tuple[jax.Array, Any]:
        """Writes the KV of tokens [1, T] at positions start.. into `slot` (the cache is donated) → (the token
        sampled from the logits of tokens[0, last] with ints [3, 1] / floats [2, 1] as in prefill, the cache).
        A model with row decode writes in place and attends to the narrowest window holding the tokens."""
        if not self.row_decode:
            return self.jitted.extend(self.params, cache, slot, tokens, start, last, ints, floats)
        window = self.window_of(int(start) + np.shape(tokens)[1] - 1)
        return self.jitted.extend_rows(self.params, cache, slot, tokens, start, last, ints, floats,
                                       None if window >= self.max_len else window)

    def warm_extend(self, cache: Any, widths: Sequence[int], pad_id: int) -> Any:
        """Compiles the extend of each of `widths` in every window below max_len that holds it (the whole cache's
        is compiled by warm_and_profile) → the cache."""
        ints, floats = np.zeros((3, 1), np.int32), np.array([[0.0], [1.0]], np.float32)
        for window in self.windows[:-1]:        # (one window, the whole cache, without row decode)
            for width in (w for w in widths if w <= window):
                tok, cache = self.extend(cache, np.int32(0), np.full((1, width), pad_id, np.int32),
                                         np.int32(window - width), np.int32(width - 1), ints, floats)
                jax.block_until_ready(tok)
        return cache


def warm_and_profile(programs: Any, pool: Any, buckets: list[int], pad_id: int,
                     decode_inputs: tuple[np.ndarray, np.ndarray], clock: Callable[[], float], repeats: int = 3,
                     extend_widths: Sequence[int] = (), decode_widths: Sequence[int] = ()) -> dict[str, Any]:
    """Compiles every bucket's prefill, the decode step (on `decode_inputs`: no slot active), the decode of the
    running rows at each of `decode_widths` (no row running), the extend (of the largest bucket's length, and of
    each of `extend_widths`: the prefix cache's chunks) and the KV pool's moves; returns the median times
    {"prefill_s": {bucket: s}, "decode_s": s, "decode_width_s": {w: s}, "extend_s": s, "extend_bucket_s": {w: s}}
    ("decode_s": the full-width step, also "decode_width_s"[slots])."""
    def median_time(run: Callable[[], Any]) -> float:
        times = []
        for _ in range(repeats + 1):       # the first run compiles
            t0 = clock()
            jax.device_get(run())
            times.append(clock() - t0)
        return float(np.median(times[1:]))

    pool.warm()
    ints1, floats1 = np.zeros((3, 1), np.int32), np.array([[0.0], [1.0]], np.float32)

    def prefill(b: int) -> Any:
        tok, rows = programs.prefill(np.full((1, b), pad_id, np.int32), np.array([b], np.int32), ints1, floats1)
        pool.insert(rows, 0)
        return tok

    def decode() -> Any:
        toks, pool.cache = programs.decode(pool.cache, *decode_inputs)
        return toks

    def extend(width: int) -> Any:     # at the cache's end: the whole cache attended (a backend with windows)
        tok, pool.cache = programs.extend(pool.cache, np.int32(0), np.full((1, width), pad_id, np.int32),
                                          np.int32(pool.max_len - width), np.int32(width - 1), ints1, floats1)
        return tok

    def decode_rows(width: int) -> Any:
        rows = np.full(width, pool.slots, np.int32)        # every row padding: nothing written
        ints, floats = np.zeros((6, width), np.int32), np.ones((2, width), np.float32)
        toks, pool.cache = programs.decode_rows(pool.cache, rows, ints, floats, head=sampled_columns(width, pool.slots))
        return toks

    prefill_s = {b: median_time(lambda: prefill(b)) for b in buckets}
    decode_s = median_time(decode)
    decode_width_s = {w: decode_s if w == pool.slots else median_time(lambda: decode_rows(w)) for w in decode_widths}
    if hasattr(programs, "warm_decode"):    # the decode over fewer positions per row (its windows / paged widths)
        pool.cache = programs.warm_decode(pool.cache, *decode_inputs, row_widths=decode_widths)
    extend_s = median_time(lambda: extend(buckets[-1]))
    extend_bucket_s = {w: median_time(lambda: extend(w)) for w in extend_widths}
    if hasattr(programs, "warm_extend"):
        pool.cache = programs.warm_extend(pool.cache, sorted({buckets[-1], *extend_widths}), pad_id)
    return {"prefill_s": prefill_s, "decode_s": decode_s, "decode_width_s": decode_width_s, "extend_s": extend_s,
            "extend_bucket_s": extend_bucket_s}

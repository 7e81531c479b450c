"""Llama-style decoder LM: RMSNorm, RoPE, SwiGLU, grouped-query attention, optional tied embeddings.

A pure definition: no I/O, no training logic, no sharding decisions (only logical axis names).
The same `__call__` serves training (no cache) and KV-cached inference (prefill and decode).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fastserve.kernels.attention import SAVEABLE_NAMES
from fastserve.models.attention_kernels import cached_decode_attention, causal_attention, check_attention, \
    fused_unsupported
from fastserve.models.layers import Embed, Linear, RMSNorm, attention, constrain, dtype_of, rope

@dataclass
class DecoderConfig:
    """`model.name: decoder` — a Llama-style causal LM (registered in fastserve.registry)."""
    name: str = "decoder"
    vocab_size: int = 0            # 0: take it from the tokenizer
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0            # 0: same as n_heads (multi-head); fewer: grouped-query attention
    head_dim: int = 0              # 0: d_model // n_heads
    d_ff: int = 688                # SwiGLU hidden width
    max_seq_len: int = 2048        # longest position the model (and its KV cache) supports
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dtype: str = "float32"         # compute dtype: float32 | bfloat16. bfloat16 is mixed precision: matmuls and the
                                   # residual stream in bf16; norms, attention softmax, logits and the loss in f32;
                                   # weights (param_dtype), gradients and optimizer state stay float32
    param_dtype: str = "float32"
    remat: str | bool = "auto"     # auto | none | full | dots_saveable: what the backward pass recomputes instead
                                   # of storing (true = full, false = none, the old boolean's meanings); auto:
                                   # dots_saveable for scanned layers, none per layer (REMAT_POLICIES says why)
    scan_layers: bool = True       # the blocks as one stacked block under lax.scan: compile time flat in depth.
                                   # Weights then carry a leading `layers` axis; tools convert (models/layer_stack.py).
                                   # A model with `compressed` layers is always per-layer.
    attention: str = "auto"        # auto | xla | fused | blocked | cudnn | splash (fastserve/models/attention_kernels.py)
    init_std: float = 0.02
    # Compressed layers (written by fastserve.transforms): dotted path → {kind: lowrank, rank: R} | {kind: int8}.
    # int8 layers are inference-only (no gradient through an int8 kernel).
    compressed: dict[str, dict] = field(default_factory=dict)

    def checks(self):
        from fastserve.checks import at_least, positive
        from fastserve.models.compressed import validate_entry
        from fastserve.models.layers import check_dtypes

        yield from positive(self, "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "rope_theta", "norm_eps",
                            "init_std")
        yield from at_least(self, 0, "vocab_size", "n_kv_heads", "head_dim", zero="derived")
        yield from check_dtypes(self)
        if remat_policy_name(self.remat) not in REMAT_POLICIES:
            yield "remat", (f"unknown remat policy {self.remat!r} "
                            f"(choose from auto, {', '.join(REMAT_POLICIES)}, or true/false)")
        yield from check_attention(self)
        if self.n_heads <= 0:
            return
        if not self.head_dim and self.d_model % self.n_heads:
            yield "n_heads", (f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; choose a divisor "
                              f"or set model.head_dim explicitly")
        head_dim = self.head_dim or self.d_model // self.n_heads
        if head_dim % 2:
            yield "head_dim" if self.head_dim else "n_heads", (
                f"the head dimension {head_dim} is odd; rotary position embeddings need an even head_dim")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            yield "n_kv_heads", f"n_heads={self.n_heads} must be a multiple of n_kv_heads={kv}"
        for path, entry in self.compressed.items():
            try:
                validate_entry(path, entry, where="compressed")
            except ValueError as e:
                yield "compressed", str(e)

    @property
    def scanned(self) -> bool:
        """Whether the model holds its blocks stacked (scan_layers, and no compressed layer: those differ per layer)."""
        return bool(self.scan_layers) and not self.compressed

    def build(self, rngs: nnx.Rngs) -> "DecoderLM":
        return DecoderLM(self, rngs=rngs)

    def flops_per_token(self, seq_len: int) -> float:
        return count_flops_per_token(self, seq_len)


# A KV cache is a list (one entry per layer) of {"k": [B, S, K, D], "v": [B, S, K, D]}.
KVCache = list[dict[str, jax.Array]]
CACHE_AXES = ("cache_batch", "cache_seq", "kv_heads", "head_dim")
# A layer's dict may also carry "rows": [b] int32, the cache rows the step's b tokens belong to (b <= B: a decode
# step over the running rows of a larger cache), and "window": [W] int32, whose length (static) bounds the positions
# attended to the first W (a decode step whose rows all sit below W reads W positions per row, not the cache's S).
# A paged KV cache (serving's memory-budgeted layout) is per layer {"k": [N, P, K, D], "v": same, "pages": [B, M]}:
# N blocks of P positions shared by all rows, and per row the ids of its M blocks (an id >= N: none), so that row b's
# position p lives in block pages[b, p // P] at offset p % P. The block axis is its own logical name (the rules
# table leaves it unsplit: any row may point at any block).
PAGED_AXES = ("cache_blocks", None, "kv_heads", "head_dim")


def paged_write(blocks: jax.Array, pages: jax.Array, positions: jax.Array, new: jax.Array) -> jax.Array:
    """Writes new [B, T, K, D] at positions [B, T] of the rows' blocks (a position without a block: dropped) →
    blocks [N, P, K, D]."""
    n, size = blocks.shape[:2]
    ids = jnp.take_along_axis(pages, positions // size, axis=1, mode="fill", fill_value=n)    # [B, T]
    flat = (ids * size + positions % size).reshape(-1)
    blocks = blocks.reshape(n * size, *blocks.shape[2:]).at[flat].set(
        new.reshape(-1, *new.shape[2:]).astype(blocks.dtype), mode="drop").reshape(blocks.shape)
    return constrain(blocks, PAGED_AXES)


def paged_view(blocks: jax.Array, pages: jax.Array) -> jax.Array:
    """Each row's positions gathered from its blocks → [B, M·P, K, D], position-major like a contiguous cache
    (unused ids read a block clipped into range: masked by position)."""
    view = jnp.take(blocks, pages, axis=0, mode="clip")      # [B, M, P, K, D]
    return view.reshape(pages.shape[0], -1, *blocks.shape[2:])


def row_write(cache: jax.Array, rows: jax.Array, positions: jax.Array, new: jax.Array) -> jax.Array:
    """Writes new [b, T, K, D] at (rows[i], positions[i]) of a cache [B, S, K, D] (a row id >= B or a position >= S:
    dropped)."""
    return constrain(cache.at[rows[:, None], positions].set(new.astype(cache.dtype), mode="drop"), CACHE_AXES)


class Attention(nnx.Module):
    def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, cfg.head_dim or cfg.d_model // cfg.n_heads
        if h % kv:
            raise ValueError(f"model.n_heads={h} must be a multiple of model.n_kv_heads={kv}")
        kw = dict(rngs=rngs, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype), init_std=cfg.init_std)
        # Q, K, V stay separate kernels: a fused QKV sharded on `tensor` and then split rematerializes.
        self.q = Linear(d, h * hd, ("embed", "heads"), **kw)
        self.k = Linear(d, kv * hd, ("embed", "kv_heads"), **kw)
        self.v = Linear(d, kv * hd, ("embed", "kv_heads"), **kw)
        self.o = Linear(h * hd, d, ("heads", "embed"), **{**kw, "init_std": cfg.init_std / (2 * cfg.n_layers) ** 0.5})
        self.n_heads, self.n_kv_heads, self.head_dim, self.theta = h, kv, hd, cfg.rope_theta
        # training / prefill attention; a cached decode step takes the CPU decode kernel unless this says xla
        self.implementation = getattr(cfg, "attention", "auto")

    def __call__(self, x: jax.Array, positions: jax.Array, cache: dict[str, jax.Array] | None,
                 segments: jax.Array | None = None):
        b, t, _ = x.shape
        q = rope(self.q(x).reshape(b, t, self.n_heads, self.head_dim), positions, self.theta)
        k = rope(self.k(x).reshape(b, t, self.n_kv_heads, self.head_dim), positions, self.theta)
        v = self.v(x).reshape(b, t, self.n_kv_heads, self.head_dim)
        if cache is None:  # training: packed documents (segments) do not see each other
            out = causal_attention(q, k, v, positions, segments, implementation=self.implementation)
            return self.o(out), None
        # Write the new keys/values at their absolute positions (rows past the cache are dropped), then attend
        # over the whole cache: the position mask hides slots not yet written for this query.
        paged = "pages" in cache   # paged: the same, through each row's block ids
        if paged:
            where = cache["pages"]
            ck, cv = paged_write(cache["k"], where, positions, k), paged_write(cache["v"], where, positions, v)
        else:                      # `rows` [b]: the cache rows the tokens belong to (serving's running rows)
            where = cache["rows"] if "rows" in cache else jnp.arange(b, dtype=jnp.int32)
            ck, cv = row_write(cache["k"], where, positions, k), row_write(cache["v"], where, positions, v)
        new_cache = {"k": ck, "v": cv, **{key: cache[key] for key in ("pages", "rows", "window") if key in cache}}

        def gathered():            # the b rows' view (a padding row id >= B reads row B-1; the caller ignores it)
            if paged:
                vk, vv = paged_view(ck, where), paged_view(cv, where)
            elif "rows" in cache:
                vk, vv = jnp.take(ck, where, axis=0, mode="clip"), jnp.take(cv, where, axis=0, mode="clip")
            else:
                vk, vv = ck, cv
            if "window" in cache:  # only the first W positions are attended (the caller's rows all sit below W)
                w = cache["window"].shape[0]
                vk, vv = vk[:, :w], vv[:, :w]
            return self._attend(q, vk, vv, positions)
        if self.implementation != "xla" and (t == 1 or paged or "rows" in cache):
            # decode steps and serving's in-place extends: the CPU kernel reads each row in place, every token up
            # to its own position (a whole-prompt prefill into a fresh cache keeps the batched path)
            out = cached_decode_attention(q, ck, cv, where, positions + 1, gathered, paged=paged)
        else:
            out = gathered()
        return self.o(out), new_cache

    @staticmethod
    def _attend(q: jax.Array, vk: jax.Array, vv: jax.Array, positions: jax.Array) -> jax.Array:
        b = q.shape[0]
        k_pos = jnp.broadcast_to(jnp.arange(vk.shape[1], dtype=positions.dtype), (b, vk.shape[1]))
        return attention(q, vk.astype(q.dtype), vv.astype(q.dtype), positions, k_pos)


class MLP(nnx.Module):
    def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype), init_std=cfg.init_std)
        self.gate = Linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw)
        self.up = Linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw)
        self.down = Linear(cfg.d_ff, cfg.d_model, ("mlp", "embed"),
                           **{**kw, "init_std": cfg.init_std / (2 * cfg.n_layers) ** 0.5})

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
        kw = dict(eps=cfg.norm_eps, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        self.attn_norm = RMSNorm(cfg.d_model, **kw)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, **kw)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: dict[str, jax.Array] | None,
                 segments: jax.Array | None = None):
        h, cache = self.attn(self.attn_norm(x), positions, cache, segments)
        x = constrain(x + h, ("batch", "seq", "embed"))
        x = constrain(x + self.mlp(self.mlp_norm(x)), ("batch", "seq", "embed"))
        return x, cache


# `model.remat`: what the backward pass recomputes. none: store every activation; full: store only each block's
# input and recompute the rest; dots_saveable: store matmul outputs, recompute the cheap elementwise ops around them.
# auto: dots_saveable under lax.scan, where every stored activation is written into a [layers, …] stack and read
# back (23M decoder of experiments/bench_train.py, 2-core CPU, same run: 1.57 s/step against 1.66 with none), and
# none per layer, where XLA keeps what it likes (1.54 against 1.63 with dots_saveable). Same loss to the bit.
# dots_saveable also keeps the fused attention kernel's output and log-sum-exp (a matmul-like result XLA cannot see
# into): recomputing the kernel in the backward pass costs a second forward attention per layer.
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots_saveable": jax.checkpoint_policies.save_from_both_policies(
                      jax.checkpoint_policies.dots_saveable,
                      jax.checkpoint_policies.save_only_these_names(*SAVEABLE_NAMES))}


def remat_policy_name(remat: str | bool, scanned: bool = False) -> str:
    """The policy name for `model.remat` (`auto` resolved for a scanned or per-layer model), mapping the old
    boolean (true → full, false → none)."""
    if isinstance(remat, bool):
        return "full" if remat else "none"
    if remat == "auto":
        return "dots_saveable" if scanned else "none"
    return remat


def _stacked_blocks(cfg: Any, rngs: nnx.Rngs) -> Block:
    """One Block whose every parameter is the L blocks' stacked along a leading `layers` axis.

    The blocks are built one by one (the same random draws, in the same order, as a per-layer model: the two
    initialize identically) and their variables stacked; the logical axes gain `layers` in front.
    """
    blocks = [Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)]
    graphdef = nnx.graphdef(blocks[0])

    def stack(*variables: nnx.Variable) -> nnx.Variable:
        axes = variables[0].get_metadata().get("out_sharding")
        return variables[0].copy(jnp.stack([v.get_value() for v in variables]),
                                 out_sharding=None if axes is None else ("layers", *axes))
    states = [nnx.state(b) for b in blocks]
    return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable)))


class DecoderLM(nnx.Module):
    """tokens [B, T] → logits [B, T, vocab] (float32), and the updated KV cache when one is given."""
    # the cached path accepts {"k", "v", "rows"} per layer (Attention, `row_write`): the serving engine's decode of
    # its running rows only
    cache_row_ids = True

    def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (the trainer fills it from the tokenizer)")
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, dtype=dt, param_dtype=pdt, init_std=cfg.init_std)
        self.scanned = bool(getattr(cfg, "scan_layers", False)) and not getattr(cfg, "compressed", None)
        if self.scanned:
            self.layers = _stacked_blocks(cfg, rngs)
        else:
            self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
        self.lm_head = None if cfg.tie_embeddings else Linear(
            cfg.d_model, cfg.vocab_size, ("embed", "vocab"), rngs=rngs, dtype=dt, param_dtype=pdt, init_std=cfg.init_std)
        self.remat = remat_policy_name(cfg.remat, self.scanned)
        self.n_layers = cfg.n_layers
        self.cache_dims = (cfg.n_kv_heads or cfg.n_heads, cfg.head_dim or cfg.d_model // cfg.n_heads)
        self.dtype = dt

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, cache: KVCache | None = None,
                 segments: jax.Array | None = None, logits_at: jax.Array | None = None,
                 logits_rows: int | None = None):
        """`segments` [B, T] (training only): packed documents attend within their own segment; pass `positions`
        that restart at each segment's start with it. `logits_at` [B]: the logits of that index of each row only
        ([B, 1, V]): a prefill samples from one position, and the LM head is a fifth of a small model's work.
        `logits_rows` (static): the logits of the first that many rows only (a serving step whose other rows are
        prompt tokens that sample nothing)."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        x = constrain(self.embed(tokens), ("batch", "seq", "embed"))
        if cache is None:
            x = self._blocks(x, positions, segments)
            new_cache = None
        else:
            x, new_cache = self._blocks_cached(x, positions, cache)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at.astype(jnp.int32)[:, None, None], axis=1)
        if logits_rows is not None:
            x = x[:logits_rows]
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
        logits = constrain(logits.astype(jnp.float32), ("batch", "seq", "vocab"))
        return logits, new_cache

    def _blocks(self, x: jax.Array, positions: jax.Array, segments: jax.Array | None) -> jax.Array:
        """Every block without a cache (training, scoring): one scanned block, or the blocks one after another."""
        policy = REMAT_POLICIES[self.remat]
        if not self.scanned:
            for layer in self.layers:
                if self.remat == "none":
                    x, _ = layer(x, positions, None, segments)
                else:
                    x, _ = nnx.remat(lambda blk, x, p, s: blk(x, p, None, s), policy=policy)(
                        layer, x, positions, segments)
            return x
        graphdef, stacked = nnx.split(self.layers)

        def step(x, layer_state):
            y, _ = nnx.merge(graphdef, layer_state)(x, positions, None, segments)
            return y, None
        if self.remat != "none":
            step = jax.checkpoint(step, policy=policy, prevent_cse=False)  # inside scan, CSE cannot undo it
        x, _ = jax.lax.scan(step, x, stacked)
        return x

    def _blocks_cached(self, x: jax.Array, positions: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """KV-cached inference: the cache stays one {"k", "v"} per layer (what serving and export lay out), so a
        scanned model runs its blocks one after another too, each a view of the stacked weights."""
        new_cache = []
        for i, layer_cache in enumerate(cache):
            x, layer_cache = self.block(i)(x, positions, layer_cache)
            new_cache.append(layer_cache)
        return x, new_cache

    def reads_cache_in_place(self) -> bool:
        """Whether a KV-cached step's attention takes the CPU decode kernel here (each row read in place up to its
        own length: a window bounding the positions attended then changes nothing)."""
        attn = self.block(0).attn
        heads = (attn.n_heads, attn.n_kv_heads, attn.head_dim)
        return attn.implementation != "xla" and jax.default_backend() == "cpu" and \
            fused_unsupported(self.dtype, heads) is None

    def block(self, i: int) -> Block:
        """Layer `i`'s block: its own module, or, when scanned, a view of the i-th slice of the stacked weights."""
        if not self.scanned:
            return self.layers[i]
        graphdef, stacked = nnx.split(self.layers)
        return nnx.merge(graphdef, jax.tree.map(lambda w: w[i], stacked))

    def init_cache(self, batch: int, length: int, dtype: Any = None) -> KVCache:
        """Zeroed KV cache: one {"k", "v"} of [batch, length, kv_heads, head_dim] per layer."""
        kv, hd = self.cache_dims
        dtype = dtype or self.dtype
        def zeros():  # laid out by logical axes, so the cache shards by the same rules as everything else
            return constrain(jnp.zeros((batch, length, kv, hd), dtype), CACHE_AXES)
        return [{"k": zeros(), "v": zeros()} for _ in range(self.n_layers)]


def count_flops_per_token(cfg: Any, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3× forward): 6·N for the matmuls + 12·L·d_attn·T for attention."""
    hd = cfg.head_dim or cfg.d_model // cfg.n_heads
    kv = cfg.n_kv_heads or cfg.n_heads
    per_layer = cfg.d_model * hd * (2 * cfg.n_heads + 2 * kv) + 3 * cfg.d_model * cfg.d_ff
    matmul_params = cfg.n_layers * per_layer + cfg.d_model * cfg.vocab_size  # the logits projection
    attn = 12 * cfg.n_layers * cfg.n_heads * hd * seq_len
    return 6.0 * matmul_params + attn

"""A small encoder–decoder transformer (`model.name: seq2seq`): pre-LN, RMSNorm, RoPE, SwiGLU, shared embeddings.

- Encoder: bidirectional self-attention over the source, padding keys masked out (`src_mask`).
- Decoder: causal self-attention over the target, then cross-attention to the encoder output (the memory) with the
  same source mask, then the MLP.
- Positions restart at 0 on each side. Self-attention rotates queries and keys by their own side's positions;
  cross-attention (when `cross_attention_rope`) rotates queries by target positions and keys by source positions,
  so an alignment "target t ↔ source t + c" is a fixed relative offset the model can learn directly.
- One vocabulary for source and target (one embedding table), or a separate target vocabulary
  (`target_vocab_size` > 0: a target embedding table of its own); the output projection reuses the target side's
  table when `tie_embeddings`.

A pure definition: no I/O, no training logic, no sharding decisions (only logical axis names). Dropout layers are
built without rngs; a train step passes `rngs` (an `nnx.Rngs` with a `dropout` stream) down through every call.
Cached decoding: `memory_kv` projects the encoder output to every layer's cross-attention keys / values once,
`init_cache` / `decode_step` run the decoder one position at a time over a self-attention KV cache (the loops —
greedy, sampling, beam search — live in fastserve.generation.seq2seq_decode). `generate` is the uncached greedy
reference: it re-runs the decoder over the whole prefix at every step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fastserve.models.dropout import Dropout
from fastserve.models.layers import Embed, Linear, RMSNorm, attention, constrain, dtype_of, rope

ACT = ("batch", "seq", "embed")


@dataclass
class Seq2SeqConfig:
    """`model.name: seq2seq` — an encoder–decoder transformer (registered in fastserve.registry)."""
    name: str = "seq2seq"
    vocab_size: int = 0            # 0: from the data; the source vocabulary (and the target's when shared)
    target_vocab_size: int = 0     # 0: the target shares the source vocabulary and embedding table; > 0: its own
    d_model: int = 256
    n_encoder_layers: int = 3
    n_decoder_layers: int = 3
    n_heads: int = 4
    d_ff: int = 688                # SwiGLU hidden width
    max_source_len: int = 0        # longest (padded) source it is trained for; 0: from the data (a data longer than a
    max_target_len: int = 0        # set value fails at start-up); RoPE itself sets no hard limit. Target: the same
    dropout: float = 0.0           # on embeddings and on every residual branch, in train mode only
    tie_embeddings: bool = True    # the output projection is the (shared) embedding table
    cross_attention_rope: bool = True  # rotate cross-attention by target (q) and source (k) positions
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dtype: str = "float32"         # compute dtype: float32 | bfloat16
    param_dtype: str = "float32"
    init_std: float = 0.02

    def checks(self):
        from fastserve.checks import at_least, fraction, positive
        from fastserve.models.layers import check_dtypes

        yield from positive(self, "d_model", "n_encoder_layers", "n_decoder_layers", "n_heads", "d_ff", "rope_theta",
                            "norm_eps", "init_std")
        yield from at_least(self, 0, "vocab_size", "target_vocab_size", "max_source_len", "max_target_len",
                            zero="from the data")
        yield from fraction(self, "dropout")
        yield from check_dtypes(self)
        if self.n_heads > 0 and self.d_model > 0:
            if self.d_model % self.n_heads:
                yield "n_heads", f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            elif (self.d_model // self.n_heads) % 2:
                yield "n_heads", (f"the head dimension d_model/n_heads = {self.d_model // self.n_heads} is odd; "
                                  "rotary position embeddings need an even head dimension")

    def build(self, rngs: nnx.Rngs) -> "Seq2Seq":
        return Seq2Seq(self, rngs=rngs)

    def flops_per_example(self, source_len: int | None = None, target_len: int | None = None) -> float:
        """Training FLOPs (forward + backward = 3× forward) of one example padded to the given lengths (default:
        the model's maxima): 6·params·tokens for the matmuls, plus the attention score and value products."""
        s = source_len or self.max_source_len
        t = target_len or self.max_target_len
        d, f = self.d_model, self.d_ff
        enc = self.n_encoder_layers * (4 * d * d + 3 * d * f)          # q, k, v, o + SwiGLU
        dec = self.n_decoder_layers * (4 * d * d + 2 * d * d + 3 * d * f)  # self q,k,v,o + cross q,o + SwiGLU
        cross_kv = self.n_decoder_layers * 2 * d * d                    # cross k, v: over the source tokens
        matmuls = s * (enc + cross_kv) + t * (dec + d * (self.target_vocab_size or self.vocab_size))
        attn = 2 * d * (self.n_encoder_layers * s * s + self.n_decoder_layers * (t * t + t * s))
        return 6.0 * matmuls + 6.0 * attn


def _kw(cfg: Any) -> dict:
    return dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype), init_std=cfg.init_std)


class MultiHeadAttention(nnx.Module):
    """Self- or cross-attention: q from `x`, k and v from `kv_input` (x itself for self-attention)."""

    def __init__(self, cfg: Any, n_layers: int, *, rngs: nnx.Rngs):
        d, h = cfg.d_model, cfg.n_heads
        kw = _kw(cfg)
        # separate Q, K, V kernels: a fused one sharded on `tensor` and then split rematerializes
        self.q = Linear(d, d, ("embed", "heads"), rngs=rngs, **kw)
        self.k = Linear(d, d, ("embed", "heads"), rngs=rngs, **kw)
        self.v = Linear(d, d, ("embed", "heads"), rngs=rngs, **kw)
        self.o = Linear(d, d, ("heads", "embed"), rngs=rngs, **{**kw, "init_std": cfg.init_std / (2 * n_layers) ** 0.5})
        self.n_heads, self.head_dim, self.theta = h, d // h, cfg.rope_theta

    def __call__(self, x, q_pos, kv_input, k_pos, *, causal: bool, k_valid=None, use_rope: bool = True):
        k, v = self.keys_values(kv_input, k_pos, use_rope=use_rope)
        return self.attend(x, q_pos, k, v, k_pos, causal=causal, k_valid=k_valid, use_rope=use_rope)

    def keys_values(self, kv_input, k_pos, *, use_rope: bool = True):
        """(k, v) [B, S, H, D] of `kv_input`, k rotated by `k_pos`: what a KV cache or a cross memory holds."""
        b, s, _ = kv_input.shape
        k = self.k(kv_input).reshape(b, s, self.n_heads, self.head_dim)
        v = self.v(kv_input).reshape(b, s, self.n_heads, self.head_dim)
        return (rope(k, k_pos, self.theta) if use_rope else k), v

    def attend(self, x, q_pos, k, v, k_pos, *, causal: bool, k_valid=None, use_rope: bool = True):
        """Queries of `x` against given keys and values (projected by `keys_values`)."""
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, self.n_heads, self.head_dim)
        if use_rope:
            q = rope(q, q_pos, self.theta)
        return self.o(attention(q, k, v, q_pos, k_pos, causal=causal, k_valid=k_valid))


class MLP(nnx.Module):
    def __init__(self, cfg: Any, n_layers: int, *, rngs: nnx.Rngs):
        kw = _kw(cfg)
        self.gate = Linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), rngs=rngs, **kw)
        self.up = Linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), rngs=rngs, **kw)
        self.down = Linear(cfg.d_ff, cfg.d_model, ("mlp", "embed"), rngs=rngs,
                           **{**kw, "init_std": cfg.init_std / (2 * n_layers) ** 0.5})

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


def _norm(cfg: Any) -> RMSNorm:
    return RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))


class EncoderBlock(nnx.Module):
    def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
        self.attn_norm, self.attn = _norm(cfg), MultiHeadAttention(cfg, cfg.n_encoder_layers, rngs=rngs)
        self.mlp_norm, self.mlp = _norm(cfg), MLP(cfg, cfg.n_encoder_layers, rngs=rngs)
        self.drop = Dropout(cfg.dropout)

    def __call__(self, x, pos, src_mask, rngs):
        h = self.attn_norm(x)
        x = constrain(x + self.drop(self.attn(h, pos, h, pos, causal=False, k_valid=src_mask), rngs=rngs), ACT)
        return constrain(x + self.drop(self.mlp(self.mlp_norm(x)), rngs=rngs), ACT)


class DecoderBlock(nnx.Module):
    def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
        n = cfg.n_decoder_layers
        self.self_norm, self.self_attn = _norm(cfg), MultiHeadAttention(cfg, n, rngs=rngs)
        self.cross_norm, self.cross_attn = _norm(cfg), MultiHeadAttention(cfg, n, rngs=rngs)
        self.mlp_norm, self.mlp = _norm(cfg), MLP(cfg, n, rngs=rngs)
        self.drop = Dropout(cfg.dropout)
        self.cross_rope = cfg.cross_attention_rope

    def __call__(self, x, pos, memory, src_pos, src_mask, rngs):
        h = self.self_norm(x)
        x = constrain(x + self.drop(self.self_attn(h, pos, h, pos, causal=True), rngs=rngs), ACT)
        h = self.cross_attn(self.cross_norm(x), pos, memory, src_pos, causal=False, k_valid=src_mask,
                            use_rope=self.cross_rope)
        x = constrain(x + self.drop(h, rngs=rngs), ACT)
        return constrain(x + self.drop(self.mlp(self.mlp_norm(x)), rngs=rngs), ACT)

    def step(self, x, t, cache, cross, src_pos, src_mask):
        """One decoding position `t` (a scalar: every row decodes in step) of x [B, 1, d]: its self-attention
        keys / values written into `cache` ({k, v} [B, L, H, D]), cross-attention against the cached memory
        `cross` ((k, v) of the encoder output). Returns (x, cache)."""
        b = x.shape[0]
        pos = jnp.full((b, 1), t, jnp.int32)
        h = self.self_norm(x)
        k_new, v_new = self.self_attn.keys_values(h, pos)
        k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k_new.astype(cache["k"].dtype), t, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v_new.astype(cache["v"].dtype), t, axis=1)
        k_pos = jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32), (b, k.shape[1]))
        x = x + self.self_attn.attend(h, pos, k, v, k_pos, causal=True)   # slots after t are masked
        x = x + self.cross_attn.attend(self.cross_norm(x), pos, *cross, src_pos, causal=False, k_valid=src_mask,
                                       use_rope=self.cross_rope)
        return x + self.mlp(self.mlp_norm(x)), {"k": k, "v": v}


def _positions(tokens: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


class Seq2Seq(nnx.Module):
    """(src [B, S], tgt_in [B, T], src_mask [B, S]) → logits [B, T, vocab] (float32), teacher-forced."""

    def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (the trainer fills it from the data)")
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, dtype=dt, param_dtype=pdt, init_std=cfg.init_std)
        self.encoder = nnx.List([EncoderBlock(cfg, rngs=rngs) for _ in range(cfg.n_encoder_layers)])
        self.encoder_norm = _norm(cfg)
        self.decoder = nnx.List([DecoderBlock(cfg, rngs=rngs) for _ in range(cfg.n_decoder_layers)])
        self.decoder_norm = _norm(cfg)
        target_vocab = cfg.target_vocab_size or cfg.vocab_size
        self.target_embed = None if not cfg.target_vocab_size else Embed(
            cfg.target_vocab_size, cfg.d_model, rngs=rngs, dtype=dt, param_dtype=pdt, init_std=cfg.init_std)
        self.lm_head = None if cfg.tie_embeddings else Linear(
            cfg.d_model, target_vocab, ("embed", "vocab"), rngs=rngs, dtype=dt, param_dtype=pdt,
            init_std=cfg.init_std)
        self.drop = Dropout(cfg.dropout)

    def encode(self, src: jax.Array, src_mask: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """The memory [B, S, d_model]: the encoder output (rows at padding positions are never attended to)."""
        pos = _positions(src)
        x = constrain(self.drop(self.embed(src), rngs=rngs), ACT)
        for block in self.encoder:
            x = block(x, pos, src_mask, rngs)
        return self.encoder_norm(x)

    def decode(self, tgt_in: jax.Array, memory: jax.Array, src_mask: jax.Array,
               rngs: nnx.Rngs | None = None) -> jax.Array:
        """Logits [B, T, vocab] (float32) for each target position, given the shifted target and the memory."""
        pos = _positions(tgt_in)
        src_pos = _positions(src_mask)
        x = constrain(self.drop(self.target_embedding(tgt_in), rngs=rngs), ACT)
        for block in self.decoder:
            x = block(x, pos, memory, src_pos, src_mask, rngs)
        return self.logits(self.decoder_norm(x))

    def target_embedding(self, tokens: jax.Array) -> jax.Array:
        return (self.embed if self.target_embed is None else self.target_embed)(tokens)

    def logits(self, x: jax.Array) -> jax.Array:
        """Float32 logits over the target vocabulary of decoder outputs `x` (after the final norm)."""
        table = self.embed if self.target_embed is None else self.target_embed
        logits = table.attend(x) if self.lm_head is None else self.lm_head(x)
        return constrain(logits.astype(jnp.float32), ("batch", "seq", "vocab"))

    def __call__(self, src: jax.Array, tgt_in: jax.Array, *, src_mask: jax.Array,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        return self.decode(tgt_in, self.encode(src, src_mask, rngs), src_mask, rngs)

    # ---- cached decoding (driven by fastserve.generation.seq2seq_decode) ----

    def init_cache(self, batch: int, max_len: int) -> list[dict[str, jax.Array]]:
        """Empty self-attention KV cache for `max_len` target positions: per decoder layer {k, v} [B, L, H, D]."""
        attn = self.decoder[0].self_attn
        shape = (batch, max_len, attn.n_heads, attn.head_dim)
        return [{"k": jnp.zeros(shape, self.embed.dtype), "v": jnp.zeros(shape, self.embed.dtype)}
                for _ in self.decoder]

    def memory_kv(self, memory: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
        """The cross-attention keys and values of every decoder layer, computed once from the encoder output."""
        src_pos = _positions(memory[..., 0])
        return [block.cross_attn.keys_values(memory, src_pos, use_rope=block.cross_rope) for block in self.decoder]

    def decode_step(self, tokens: jax.Array, t: jax.Array, cache: list, cross: list,
                    src_mask: jax.Array) -> tuple[jax.Array, list]:
        """Next-token logits [B, V] (float32) for `tokens` [B] at target position `t`, and the updated cache."""
        src_pos = _positions(src_mask)
        x = self.target_embedding(tokens[:, None])
        new_cache = []
        for block, layer_cache, layer_cross in zip(self.decoder, cache, cross):
            x, layer_cache = block.step(x, t, layer_cache, layer_cross, src_pos, src_mask)
            new_cache.append(layer_cache)
        return self.logits(self.decoder_norm(x))[:, 0], new_cache

    def generate(self, src: jax.Array, src_mask: jax.Array, *, max_len: int, bos_id: int, eos_id: int,
                 pad_id: int = 0) -> jax.Array:
        """Greedy decoding, jittable (`max_len` and the ids static): tokens [B, max_len] after BOS, `pad_id` after
        each row's first EOS. Without a KV cache: every step re-runs the decoder over the whole prefix."""
        memory = self.encode(src, src_mask)
        b = src.shape[0]
        buf = jnp.full((b, max_len + 1), pad_id, jnp.int32).at[:, 0].set(bos_id)

        def step(t, carry):
            buf, done = carry
            logits = self.decode(buf[:, :-1], memory, src_mask)          # causal: position t sees buf[:, :t+1]
            nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False), axis=-1)
            nxt = jnp.where(done, pad_id, nxt).astype(jnp.int32)
            buf = jax.lax.dynamic_update_index_in_dim(buf, nxt, t + 1, axis=1)
            return buf, done | (nxt == eos_id)

        buf, _ = jax.lax.fori_loop(0, max_len, step, (buf, jnp.zeros((b,), bool)))
        return buf[:, 1:]

"""BERT-style bidirectional encoder: learned positions, token types, post-LN (or pre-LN), GELU MLP, dropout, and one
head (`model.head`):

    classify  model(tokens, mask=, token_types=, rngs=) → class logits [B, num_classes] (pooled: `pooling`)
    tag       → per-token class logits [B, T, num_classes]
    mlm       → masked-LM logits [B, T, vocab_size] (BERT's transform, decoder tied to the word embeddings);
              with `nsp: true` a tuple (mlm logits, next-sentence logits [B, 2] from the tanh pooler)
    embed     → sentence embeddings [B, D] (float32): masked mean over the tokens, L2-normalized
All logits are float32.

A pure definition: no I/O, no training logic, no sharding decisions (only logical axis names). Padding is a mask
[B, T] (true on real tokens): padded keys are never attended to, so an example's outputs do not depend on how far
it is padded. Parameter paths follow Hugging Face BERT one to one, for importing checkpoints (MiniLM & co.):

    embeddings.word.embedding          ← embeddings.word_embeddings.weight
    embeddings.position.embedding      ← embeddings.position_embeddings.weight
    embeddings.token_type.embedding    ← embeddings.token_type_embeddings.weight
    embeddings.norm.{scale,bias}       ← embeddings.LayerNorm.{weight,bias}
    layers.N.attn.{q,k,v,o}.{kernel,bias} ← encoder.layer.N.attention.self.{query,key,value} / attention.output.dense
    layers.N.attn_norm                 ← encoder.layer.N.attention.output.LayerNorm
    layers.N.mlp.up / mlp.down         ← encoder.layer.N.intermediate.dense / output.dense
    layers.N.mlp_norm                  ← encoder.layer.N.output.LayerNorm
    pooler.{kernel,bias}               ← pooler.dense (classify with pooling cls, or mlm with nsp)
    classifier.{kernel,bias}           ← classifier (classify, tag)
    mlm.dense / mlm.norm / mlm.bias    ← cls.predictions.transform.dense / transform.LayerNorm / cls.predictions.bias
    nsp.{kernel,bias}                  ← cls.seq_relationship
(kernels are [in, out]: the transpose of torch's Linear.weight). With `pre_ln: true` the norms move before each
sublayer and a `final_norm` follows the last layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fastserve.kernels.attention import padded_attention
from fastserve.models.dropout import Dropout
from fastserve.models.layers import Embed, Linear, attention, constrain, dtype_of, gelu

POOLINGS = ("cls", "mean")
HEADS = ("classify", "tag", "mlm", "embed")
ATTENTIONS = ("auto", "xla", "fused")


@dataclass
class EncoderConfig:
    """`model.name: encoder` — a BERT-style bidirectional encoder with one head (`head`, see the module docstring;
    registered in fastserve.registry). Defaults are BERT's (post-LN, eps 1e-12, exact GELU, dropout 0.1), except
    that dropout on the attention probabilities is off unless `attention_dropout` asks for it."""
    name: str = "encoder"
    vocab_size: int = 0            # 0: take it from the data
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 1024               # GELU MLP hidden width
    max_seq_len: int = 512         # rows of the learned position table: the longest input
    type_vocab_size: int = 2       # token-type (segment) ids; 0: no token-type embedding
    num_classes: int = 0           # 0: take it from the data (heads classify and tag only)
    head: str = "classify"         # classify | tag | mlm | embed
    nsp: bool = False              # mlm only: also next-sentence logits [B, 2] from the pooled [CLS] position
    dropout: float = 0.1           # embeddings, after each sublayer, before the classifier
    attention_dropout: float = 0.0  # on the attention probabilities (BERT: 0.1); > 0 trains through a local twin of
                                    # layers.attention, which has no dropout hook (eval always uses layers.attention)
    attention: str = "auto"        # auto | xla | fused: fused = fastserve's C++ CPU kernel (fastserve/kernels/
                                   # attention.py; float32, head dim 16/32/64/128, one device); auto: fused where it
                                   # runs, else xla (layers.attention, the reference)
    norm_eps: float = 1e-12
    pre_ln: bool = False           # false: BERT's post-LN (norm after each residual add); true: pre-LN + final norm
    pooling: str = "cls"           # classify: cls = tanh pooler on the first ([CLS]) position | mean = masked mean
                                   # over tokens (head embed always takes the masked mean)
    dtype: str = "float32"         # compute dtype: float32 | bfloat16
    param_dtype: str = "float32"
    init_std: float = 0.02

    def checks(self):
        from fastserve.checks import fraction, positive
        from fastserve.models.layers import check_dtypes

        yield from positive(self, "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "norm_eps", "init_std")
        for n in ("vocab_size", "num_classes", "type_vocab_size"):
            if getattr(self, n) < 0:
                zero = "none" if n == "type_vocab_size" else "from the data"
                yield n, f"must be >= 0 (0: {zero}), got {getattr(self, n)}"
        if self.n_heads > 0 and self.d_model % self.n_heads:
            yield "n_heads", f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; choose a divisor"
        yield from fraction(self, "dropout", "attention_dropout")
        if self.pooling not in POOLINGS:
            yield "pooling", f"expected one of {', '.join(POOLINGS)}, got {self.pooling!r}"
        if self.head not in HEADS:
            yield "head", f"expected one of {', '.join(HEADS)}, got {self.head!r}"
        if self.nsp and self.head != "mlm":
            yield "nsp", f"next-sentence prediction is part of the mlm head; head is {self.head!r}"
        if self.attention not in ATTENTIONS:
            yield "attention", f"expected one of {', '.join(ATTENTIONS)}, got {self.attention!r}"
        yield from check_dtypes(self)

    def build(self, rngs: nnx.Rngs) -> "Encoder":
        return Encoder(self, rngs=rngs)

    @property
    def has_pooler(self) -> bool:
        """The tanh pooler on [CLS] exists for classify with cls pooling and for next-sentence prediction."""
        return (self.head == "classify" and self.pooling == "cls") or (self.head == "mlm" and self.nsp)

    def forward_inputs(self, batch, length: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
        """What a `forward` export takes: tokens and their padding mask, padded to `length` (default max_seq_len),
        and the token types of a sentence pair, for next-sentence prediction."""
        shape = (batch, length or self.max_seq_len)
        inputs = {"inputs": jax.ShapeDtypeStruct(shape, jnp.int32), "mask": jax.ShapeDtypeStruct(shape, jnp.bool_)}
        if self.head == "mlm" and self.nsp:
            inputs["token_types"] = jax.ShapeDtypeStruct(shape, jnp.int32)
        return inputs

    def forward_lengths(self, buckets: Sequence[int]) -> list[int]:
        """Sequence lengths a `forward` export is written at: the export's buckets below max_seq_len and max_seq_len
        itself, so every input fits one and a short one runs at a short length."""
        return sorted({int(b) for b in buckets if b < self.max_seq_len} | {self.max_seq_len})

    @property
    def per_token_outputs(self) -> tuple[bool, ...]:
        """Which of the model's outputs have a sequence axis (axis 1): tag and masked-LM logits do; pooled
        embeddings, class logits and next-sentence logits do not."""
        if self.head == "mlm":
            return (True, False) if self.nsp else (True,)
        return (self.head == "tag",)

    def flops_per_example(self, seq_len: int) -> float:
        """Training FLOPs per example of `seq_len` tokens (forward + backward = 3× forward), head included."""
        d = self.d_model
        per_layer = 4 * d * d + 2 * d * self.d_ff
        matmuls = 2 * seq_len * self.n_layers * per_layer
        attn = 4 * self.n_layers * seq_len * seq_len * d
        head = 2 * d * d if self.has_pooler else 0
        if self.head == "classify":
            head += 2 * d * max(self.num_classes, 1)
        elif self.head == "tag":
            head += 2 * seq_len * d * max(self.num_classes, 1)
        elif self.head == "mlm":
            head += 2 * seq_len * (d * d + d * self.vocab_size) + (2 * d * 2 if self.nsp else 0)
        return 3.0 * (matmuls + attn + head)


class LayerNorm(nnx.Module):
    """y = (x - mean) / sqrt(var + eps) · scale + bias, statistics in float32."""

    def __init__(self, dim: int, *, eps: float, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class Table(nnx.Module):
    """A small embedding table (positions, token types): replicated rows, model dimension on `embed`."""

    def __init__(self, rows: int, dim: int, row_axis: str, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any,
                 init_std: float):
        init = nnx.initializers.normal(init_std)
        self.embedding = nnx.Param(init(rngs.params(), (rows, dim), param_dtype), out_sharding=(row_axis, "embed"))
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


def _kw(cfg: Any, rngs: nnx.Rngs) -> dict[str, Any]:
    return dict(rngs=rngs, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype), init_std=cfg.init_std)


def _norm(cfg: Any) -> LayerNorm:
    return LayerNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))


class Embeddings(nnx.Module):
    def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
        kw = _kw(cfg, rngs)
        self.word = Embed(cfg.vocab_size, cfg.d_model, **kw)
        self.position = Table(cfg.max_seq_len, cfg.d_model, "positions", **kw)
        self.token_type = Table(cfg.type_vocab_size, cfg.d_model, "token_types", **kw) if cfg.type_vocab_size else None
        self.norm = _norm(cfg)
        self.dropout = Dropout(cfg.dropout)

    def __call__(self, tokens: jax.Array, token_types: jax.Array | None, rngs: nnx.Rngs | None) -> jax.Array:
        x = self.word(tokens) + self.position(jnp.arange(tokens.shape[1]))[None]
        if self.token_type is not None:
            x = x + self.token_type(jnp.zeros_like(tokens) if token_types is None else token_types)
        return self.dropout(self.norm(x), rngs=rngs)


class SelfAttention(nnx.Module):
    """Bidirectional multi-head self-attention over the valid (unpadded) keys."""

    def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
        kw = _kw(cfg, rngs)
        d = cfg.d_model
        # separate Q, K, V kernels (a fused QKV sharded on `tensor` and then split rematerializes)
        self.q = Linear(d, d, ("embed", "heads"), use_bias=True, **kw)
        self.k = Linear(d, d, ("embed", "heads"), use_bias=True, **kw)
        self.v = Linear(d, d, ("embed", "heads"), use_bias=True, **kw)
        self.o = Linear(d, d, ("heads", "embed"), use_bias=True, **kw)
        self.n_heads, self.head_dim = cfg.n_heads, d // cfg.n_heads
        self.probs_dropout = Dropout(cfg.attention_dropout)
        self.implementation = cfg.attention

    def __call__(self, x: jax.Array, mask: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        b, t, _ = x.shape
        q, k, v = (proj(x).reshape(b, t, self.n_heads, self.head_dim) for proj in (self.q, self.k, self.v))
        if self.probs_dropout.deterministic or self.probs_dropout.rate == 0:
            # the fused kernel's attention: 0.65x the time of XLA's (forward + backward, MiniLM's shapes on CPU)
            fused = self.implementation != "xla"
            out = (padded_attention(q, k, v, mask, strict=self.implementation == "fused") if fused
                   else attention(q, k, v, causal=False, k_valid=mask))
        else:
            out = _attention_probs_dropout(q, k, v, mask, lambda p: self.probs_dropout(p, rngs=rngs))
        return self.o(out)


def _attention_probs_dropout(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, drop) -> jax.Array:
    """Training-only twin of `layers.attention(causal=False, k_valid=mask)` with dropout on the attention
    probabilities (BERT's attention_probs_dropout), which `layers.attention` has no hook for. Same masking rule:
    padded keys get zero probability; a query with no valid key averages uniformly."""
    b, t, h, d = q.shape
    scores = jnp.einsum("bthd,bshd->bhts", q * d ** -0.5, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask.astype(bool)[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = drop(jax.nn.softmax(scores, axis=-1)).astype(v.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v).reshape(b, t, h * d)


class MLP(nnx.Module):
    def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
        kw = _kw(cfg, rngs)
        self.up = Linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), use_bias=True, **kw)
        self.down = Linear(cfg.d_ff, cfg.d_model, ("mlp", "embed"), use_bias=True, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(gelu(self.up(x)))  # BERT's exact (erf) GELU


class Layer(nnx.Module):
    def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
        self.attn = SelfAttention(cfg, rngs=rngs)
        self.attn_norm = _norm(cfg)
        self.mlp = MLP(cfg, rngs=rngs)
        self.mlp_norm = _norm(cfg)
        self.dropout = Dropout(cfg.dropout)
        self.pre_ln = cfg.pre_ln

    def __call__(self, x: jax.Array, mask: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        if self.pre_ln:
            x = x + self.dropout(self.attn(self.attn_norm(x), mask, rngs), rngs=rngs)
            x = constrain(x, ("batch", "seq", "embed"))
            x = x + self.dropout(self.mlp(self.mlp_norm(x)), rngs=rngs)
        else:
            x = self.attn_norm(x + self.dropout(self.attn(x, mask, rngs), rngs=rngs))
            x = constrain(x, ("batch", "seq", "embed"))
            x = self.mlp_norm(x + self.dropout(self.mlp(x), rngs=rngs))
        return constrain(x, ("batch", "seq", "embed"))


class MLMHead(nnx.Module):
    """BERT's masked-LM head: dense + GELU + LayerNorm, then the word embeddings (tied) as the decoder, plus an
    output bias per vocabulary entry."""

    def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
        self.dense = Linear(cfg.d_model, cfg.d_model, ("embed", "mlp"), use_bias=True, **_kw(cfg, rngs))
        self.norm = LayerNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype_of(cfg.dtype),
                              param_dtype=dtype_of(cfg.param_dtype))
        self.bias = nnx.Param(jnp.zeros((cfg.vocab_size,), dtype_of(cfg.param_dtype)), out_sharding=("vocab",))

    def __call__(self, hidden: jax.Array, word: Embed) -> jax.Array:
        h = self.norm(gelu(self.dense(hidden)))
        return word.attend(h).astype(jnp.float32) + self.bias[...].astype(jnp.float32)


def masked_mean(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over the valid positions: [B, T, D], [B, T] → [B, D] (float32; an all-padding row gives zeros)."""
    m = mask.astype(jnp.float32)[..., None]
    return jnp.sum(hidden.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


class Encoder(nnx.Module):
    """tokens [B, T] (+ mask [B, T], token types [B, T]) → hidden states, sentence embeddings, or class logits."""

    def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (the trainer fills it from the data)")
        if cfg.head in ("classify", "tag") and cfg.num_classes <= 0:
            raise ValueError(f"model.num_classes must be set for head {cfg.head} (the trainer fills it from the data)")
        kw = _kw(cfg, rngs)
        self.embeddings = Embeddings(cfg, rngs=rngs)
        self.layers = nnx.List([Layer(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_norm = _norm(cfg) if cfg.pre_ln else None
        self.pooler = Linear(cfg.d_model, cfg.d_model, ("embed", "mlp"), use_bias=True, **kw) \
            if cfg.has_pooler else None
        self.head_dropout = Dropout(cfg.dropout)
        self.classifier = Linear(cfg.d_model, cfg.num_classes, ("embed", "classes"), use_bias=True, **kw) \
            if cfg.head in ("classify", "tag") else None
        self.mlm = MLMHead(cfg, rngs=rngs) if cfg.head == "mlm" else None
        self.nsp = Linear(cfg.d_model, 2, ("embed", "classes"), use_bias=True, **kw) if cfg.nsp else None
        self.head, self.pooling = cfg.head, cfg.pooling
        self.max_seq_len = cfg.max_seq_len

    def encode(self, tokens: jax.Array, mask: jax.Array | None = None, token_types: jax.Array | None = None,
               rngs: nnx.Rngs | None = None) -> jax.Array:
        """Hidden states [B, T, D] of the last layer (after the final norm with pre-LN); padded positions hold
        values that depend on nothing valid tokens see, and should be ignored."""
        if tokens.shape[1] > self.max_seq_len:
            raise ValueError(f"input length {tokens.shape[1]} exceeds model.max_seq_len={self.max_seq_len}")
        if mask is None:
            mask = jnp.ones(tokens.shape, bool)
        x = constrain(self.embeddings(tokens, token_types, rngs), ("batch", "seq", "embed"))
        for layer in self.layers:
            x = layer(x, mask, rngs)
        return x if self.final_norm is None else self.final_norm(x)

    def embed(self, tokens: jax.Array, mask: jax.Array | None = None, token_types: jax.Array | None = None,
              *, normalize: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Sentence embeddings [B, D] (float32): the masked mean of the hidden states (sentence-transformers'
        mean pooling), L2-normalized when `normalize`."""
        if mask is None:
            mask = jnp.ones(tokens.shape, bool)
        pooled = masked_mean(self.encode(tokens, mask, token_types, rngs), mask)
        if normalize:
            pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return pooled

    def __call__(self, tokens: jax.Array, *, mask: jax.Array | None = None, token_types: jax.Array | None = None,
                 rngs: nnx.Rngs | None = None) -> jax.Array | tuple[jax.Array, jax.Array]:
        """The head's output (float32): classify [B, C] | tag [B, T, C] | mlm [B, T, V] (with nsp: that and
        [B, 2]) | embed [B, D], L2-normalized."""
        if mask is None:
            mask = jnp.ones(tokens.shape, bool)
        if self.head == "embed":
            return constrain(self.embed(tokens, mask, token_types, normalize=True, rngs=rngs), ("batch", "embed"))
        hidden = self.encode(tokens, mask, token_types, rngs)
        if self.head == "tag":
            logits = self.classifier(self.head_dropout(hidden, rngs=rngs))
            return constrain(logits.astype(jnp.float32), ("batch", "seq", "classes"))
        if self.head == "mlm":
            logits = constrain(self.mlm(hidden, self.embeddings.word), ("batch", "seq", "vocab"))
            if self.nsp is None:
                return logits
            nsp = self.nsp(self.head_dropout(jnp.tanh(self.pooler(hidden[:, 0])), rngs=rngs))
            return logits, constrain(nsp.astype(jnp.float32), ("batch", "classes"))
        if self.pooling == "cls":
            pooled = jnp.tanh(self.pooler(hidden[:, 0]))
        else:
            pooled = masked_mean(hidden, mask).astype(hidden.dtype)
        logits = self.classifier(self.head_dropout(pooled, rngs=rngs))
        return constrain(logits.astype(jnp.float32), ("batch", "classes"))

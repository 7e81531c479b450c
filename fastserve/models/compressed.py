"""Compressed stand-ins for `Linear`: low-rank factors and int8 weights, swapped in by dotted path.

A compressed model is a model config (`ModelConfig.compressed`: path → {"kind": "lowrank", "rank": r} or
{"kind": "int8"}) plus its params: `build_model` builds the dense model and calls `apply_structure`, so the
compressed layers' params name logical axes like every other one and the model shards, checkpoints, trains,
generates and exports unchanged. The parameter transforms that produce such params live in fastserve.transforms.

- `LowRankLinear`: u (in, r) on ("<in axis>", "rank"), v (r, out) on ("rank", "<out axis>"); y = (x @ u) @ v,
  W = u @ v is never formed. Trainable (low-rank fine-tuning to recover accuracy).
- `QuantizedLinear`: int8 kernel (in, out) + float32 scales, symmetric: per output channel (out,), or with
  {"kind": "int8", "group": g} per group of g input rows (ceil(in / g), out). y = x @ dequantize(kernel, scale)
  through `fastserve.kernels.int8_matmul`: a C++ kernel on CPU (XLA:CPU would materialize the dequantized kernel
  at every step, slower than float32), XLA's fused dequantize-then-dot on TPU / GPU. INFERENCE ONLY: the int8 kernel is an
  `nnx.Param` (so it checkpoints and exports like any weight) but it has no gradient — `jax.grad` refuses
  integer inputs, so building a train step on a model with int8 layers fails at trace time.
- Either int8 layer with {"activations": "int8"} in its entry is W8A8: its input is rounded to int8 per block of
  32 (llama.cpp's Q8_0 activations) on every path, and on CPU the C++ kernel multiplies the bytes (AVX-512 VNNI
  where the CPU has it, at any row count; elsewhere at decode, at most KERNEL_MAX_ROWS rows) — about twice the
  float kernel's speed where the weights are in cache, at the rounding error of int8 activations. Needs the input dimension (and group) to
  be a multiple of 32; a layer where it is not keeps float activations.
- {"layout": "vnni"} (W8A8 only; set by the serving engine at start-up, fastserve.serve.programs.cpu_layout):
  the int8 kernel is stored as the CPU kernel's panels, (out / 64, in, 64) (`fastserve.kernels.int8.pack_vnni`),
  so a decode step streams each weight once with no rearranging (about 2× the product speed at 1-8 rows on one
  Zen 4 core). The same weights, another order: XLA's path on other platforms unpacks them.
- `QuantizedEmbed`: an int8 token embedding table that is also the tied output projection ({"kind": "int8"} at the
  table's path, e.g. "embed"): the int8 table (vocab, embed) + scale (vocab,), one per row of the table = one per
  output channel of the logits matvec, which runs through `int8_matmul_nt` (the C++ kernel on CPU, reading each
  logit's row contiguously); a lookup reads the token's int8 row × its scale. Inference only, as above.
"""
from __future__ import annotations

import difflib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fastserve.kernels.int8 import (ACTIVATIONS, int8_matmul, int8_matmul_nt, int8_matmul_packed, pack_vnni,
                                    packable, packed_columns)
from fastserve.models.layers import Embed, Linear

KINDS = ("lowrank", "int8")
LAYOUTS = ("kn", "vnni")   # an int8 kernel as (in, out), or as the CPU kernel's VNNI panels (W8A8 only)


class LowRankLinear(nnx.Module):
    """y = (x @ u) @ v (+ b), u of shape (in, rank), v of shape (rank, out)."""

    def __init__(self, in_features: int, out_features: int, rank: int, axes: tuple[str, str], *, rngs: nnx.Rngs,
                 use_bias: bool = False, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 init_std: Any = 0.02):
        # Each factor with std (init_std² / rank)^¼: the product u @ v then has entries of std init_std.
        std = (init_std ** 2 / rank) ** 0.25
        init = nnx.initializers.normal(std)
        self.u = nnx.Param(init(rngs.params(), (in_features, rank), param_dtype), out_sharding=(axes[0], "rank"))
        self.v = nnx.Param(init(rngs.params(), (rank, out_features), param_dtype), out_sharding=("rank", axes[1]))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype), out_sharding=(axes[1],)) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.dot(x.astype(self.dtype), self.u[...].astype(self.dtype))
        y = jnp.dot(h, self.v[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class QuantizedLinear(nnx.Module):
    """y = x @ dequantize(kernel, scale) (+ b): int8 kernel (in, out), float32 scale (out,) per channel or
    (ceil(in / group), out) per group of `group` input rows. Inference only."""

    def __init__(self, in_features: int, out_features: int, axes: tuple[str, str], *, rngs: nnx.Rngs | None = None,
                 use_bias: bool = False, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 kernel: jax.Array | None = None, group: int | None = None, activations: str = "float32",
                 layout: str = "kn"):
        if kernel is None:
            kernel = jnp.zeros((in_features, out_features), jnp.float32)
        q, scale = quantize_int8(kernel, group)
        if layout == "vnni":   # panels of output columns: they shard as the output axis does
            q, kernel_axes = pack_vnni(q), (axes[1], axes[0], None)
        else:
            kernel_axes = axes
        self.kernel = nnx.Param(q, out_sharding=kernel_axes)
        self.scale = nnx.Param(scale, out_sharding=(axes[1],) if group is None else (None, axes[1]))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype), out_sharding=(axes[1],)) if use_bias else None
        self.dtype = dtype
        self.group = group
        self.activations = activations
        self.layout = layout

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.layout == "vnni":
            y = int8_matmul_packed(x, self.kernel[...], self.scale[...], self.group).astype(self.dtype)
        else:
            y = int8_matmul(x, self.kernel[...], self.scale[...], self.group, self.activations).astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class QuantizedEmbed(nnx.Module):
    """int8 embedding table (vocab, dim) with float32 scale (vocab,), one per row: lookup = table[token] ×
    scale[token]; `attend` (the tied LM head) = int8_matmul_nt(x, table, scale), each logit one contiguous row.
    Inference only."""

    def __init__(self, vocab: int, dim: int, *, table: jax.Array | None = None, dtype: Any = jnp.float32,
                 activations: str = "float32", layout: str = "kn"):
        if table is None:
            table = jnp.zeros((vocab, dim), jnp.float32)
        q, scale = quantize_int8(jnp.asarray(table, jnp.float32).T)   # per column of the (dim, vocab) head
        if layout == "vnni":   # the head (dim, vocab) as VNNI panels; a lookup gathers a token's column
            self.embedding = nnx.Param(pack_vnni(q), out_sharding=("vocab", "embed", None))
        else:
            self.embedding = nnx.Param(q.T, out_sharding=("vocab", "embed"))
        self.scale = nnx.Param(scale, out_sharding=("vocab",))
        self.dtype = dtype
        self.activations = activations
        self.layout = layout

    def __call__(self, tokens: jax.Array) -> jax.Array:
        tokens = jnp.asarray(tokens)
        if self.layout == "vnni":
            rows = packed_columns(self.embedding[...], tokens).astype(jnp.float32)
        else:
            rows = jnp.take(self.embedding[...], tokens, axis=0).astype(jnp.float32)
        return (rows * jnp.take(self.scale[...], tokens, axis=0)[..., None]).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        if self.layout == "vnni":
            return int8_matmul_packed(x, self.embedding[...], self.scale[...]).astype(self.dtype)
        return int8_matmul_nt(x, self.embedding[...], self.scale[...], self.activations).astype(self.dtype)


def quantize_int8(w: jax.Array, group: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8: q = round(w / scale) in [-127, 127] with scale = max |w| / 127 over each output column
    (scale (out,)), or with `group` over each block of `group` rows of a column (scale (ceil(in / group), out); the
    last block may be shorter).

    An all-zero column or block gets scale 1 (its codes are all 0). Works on numpy arrays, jax arrays and tracers.
    """
    w = jnp.asarray(w, jnp.float32)
    if group is None:
        amax = jnp.max(jnp.abs(w), axis=0)
        scale = jnp.where(amax > 0, amax / 127.0, 1.0).astype(jnp.float32)
        return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale
    m, n = w.shape
    groups = -(-m // group)
    blocks = jnp.pad(w, ((0, groups * group - m), (0, 0))).reshape(groups, group, n)
    amax = jnp.max(jnp.abs(blocks), axis=1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(blocks / scale[:, None, :]), -127, 127).astype(jnp.int8)
    return q.reshape(groups * group, n)[:m], scale


# ----------------------------------------------------------------------------------------- structure

def _kernel_info(layer: Linear) -> tuple[int, int, tuple[str, str], Any]:
    value = layer.kernel.get_value()
    axes = tuple(layer.kernel.get_metadata().get("out_sharding") or (None, None))
    return value.shape[0], value.shape[1], axes, value.dtype


def linear_layers(model: nnx.Module) -> dict[str, str]:
    """Dotted path → "dense" | "lowrank" | "int8" for every Linear (or compressed Linear) in the model."""
    kinds = {Linear: "dense", LowRankLinear: "lowrank", QuantizedLinear: "int8"}
    out = {}
    for path, module in nnx.iter_modules(model):
        kind = kinds.get(type(module))
        if kind is not None:
            out[".".join(str(p) for p in path)] = kind
    return out


def embedding_tables(model: nnx.Module) -> dict[str, str]:
    """Dotted path → "dense" | "int8" for every token embedding table (Embed or QuantizedEmbed) in the model."""
    kinds = {Embed: "dense", QuantizedEmbed: "int8"}
    return {".".join(str(p) for p in path): kinds[type(m)] for path, m in nnx.iter_modules(model) if type(m) in kinds}


def validate_entry(path: str, entry: Any, where: str = "model.compressed") -> dict:
    """Checks one `compressed` entry: {"kind": "lowrank", "rank": r>0} or {"kind": "int8"} (optionally "group": g>0,
    "activations": "float32" | "int8"); errors name the key."""
    key = f"{where}[{path!r}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{key}: expected a mapping like {{kind: lowrank, rank: 32}} or {{kind: int8}}, got {entry!r}")
    kind = entry.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{key}.kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    allowed = {"kind", "rank"} if kind == "lowrank" else {"kind", "group", "activations", "layout"}
    for name in entry:
        if name not in allowed:
            near = difflib.get_close_matches(str(name), sorted(allowed), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ValueError(f"{key}: unknown key '{name}' for kind {kind}{hint} (valid: {', '.join(sorted(allowed))})")
    if kind == "lowrank":
        rank = entry.get("rank")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise ValueError(f"{key}.rank: expected a positive int, got {rank!r}")
    group = entry.get("group")
    if group is not None and (not isinstance(group, int) or isinstance(group, bool) or group <= 0):
        raise ValueError(f"{key}.group: expected a positive int (rows of the kernel per scale), got {group!r}")
    if entry.get("activations", "float32") not in ACTIVATIONS:
        raise ValueError(f"{key}.activations: expected one of {', '.join(ACTIVATIONS)}, got {entry['activations']!r}")
    if entry.get("layout", "kn") not in LAYOUTS:
        raise ValueError(f"{key}.layout: expected one of {', '.join(LAYOUTS)}, got {entry['layout']!r}")
    if entry.get("layout") == "vnni" and entry.get("activations") != "int8":
        raise ValueError(f"{key}.layout: 'vnni' is the W8A8 kernel's layout; it needs activations: int8")
    return entry


def _resolve(model: nnx.Module, path: str, dense: dict[str, str], what: str = "Linear layer"
             ) -> tuple[Any, str | int, Any]:
    """(parent, attribute or index, module) of the still-dense module at dotted `path` (`dense`: path → kind)."""
    if path not in dense:
        near = difflib.get_close_matches(path, list(dense), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ValueError(f"model.compressed[{path!r}]: not a {what} of this model{hint}")
    if dense[path] != "dense":
        raise ValueError(f"model.compressed[{path!r}]: the {what} is already {dense[path]}")
    parent: Any = model
    parts = path.split(".")
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, nnx.List) else getattr(parent, part)
    last: str | int = int(parts[-1]) if isinstance(parent, nnx.List) else parts[-1]
    layer = parent[last] if isinstance(last, int) else getattr(parent, last)
    return parent, last, layer


def apply_structure(model: nnx.Module, structure: dict[str, dict], rngs: nnx.Rngs | None = None) -> nnx.Module:
    """Swaps the `Linear` at each dotted path (e.g. "layers.3.mlp.gate") for its compressed variant, in place.

    structure: path → {"kind": "lowrank", "rank": r} | {"kind": "int8"[, "group": g]}. The new layers keep the dense layer's
    logical axes, bias, dtype and param dtype. Their initial values (a fresh model) are random factors whose product
    has the dense kernel's spread, or the int8 quantization of the dense kernel; the params of a transformed model
    replace them (fastserve.transforms). Returns the model.
    """
    if not structure:
        return model
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    layers, tables = linear_layers(model), embedding_tables(model)
    for path, entry in structure.items():
        validate_entry(path, entry)
        if path in tables:
            _quantize_table(model, path, entry, tables)
            continue
        parent, last, layer = _resolve(model, path, layers)
        m, n, axes, pdt = _kernel_info(layer)
        kernel = layer.kernel.get_value()
        kw = dict(use_bias=layer.bias is not None, dtype=layer.dtype, param_dtype=pdt)
        if entry["kind"] == "lowrank":
            rank = entry["rank"]
            if rank > min(m, n):
                raise ValueError(f"model.compressed[{path!r}].rank={rank} exceeds min{(m, n)} of the layer's kernel")
            # the product u @ v starts with the dense kernel's spread (init_std may be traced: jnp, not math)
            new = LowRankLinear(m, n, rank, axes, rngs=rngs, init_std=jnp.std(kernel.astype(jnp.float32)), **kw)
        else:
            _check_packable(path, entry, m, n)
            new = QuantizedLinear(m, n, axes, kernel=kernel, group=entry.get("group"),
                                  activations=entry.get("activations", "float32"),
                                  layout=entry.get("layout", "kn"), **kw)
        if layer.bias is not None:
            new.bias.set_value(layer.bias.get_value())
        if isinstance(last, int):
            parent[last] = new
        else:
            setattr(parent, last, new)
        layers[path] = entry["kind"]
    return model


def _check_packable(path: str, entry: dict, k: int, n: int) -> None:
    if entry.get("layout") == "vnni" and not packable(k, n, entry.get("group")):
        raise ValueError(f"model.compressed[{path!r}].layout: 'vnni' needs the output dimension a multiple of 64 and "
                         f"the input (and group) of 32; this kernel is {k} × {n}, group {entry.get('group')}")


def _quantize_table(model: nnx.Module, path: str, entry: dict, tables: dict[str, str]) -> None:
    """Swaps the Embed at `path` for a QuantizedEmbed (per-row scales only: a row is one output channel of the
    tied head)."""
    if entry["kind"] != "int8" or entry.get("group") is not None:
        raise ValueError(f"model.compressed[{path!r}]: an embedding table takes only {{kind: int8}} (per-row scales; "
                         f"optionally activations), got {entry!r}")
    parent, last, table = _resolve(model, path, tables, "token embedding table")
    value = table.embedding.get_value()
    _check_packable(path, entry, value.shape[1], value.shape[0])   # the head is (dim, vocab)
    quantized = QuantizedEmbed(value.shape[0], value.shape[1], table=value, dtype=table.dtype,
                               activations=entry.get("activations", "float32"), layout=entry.get("layout", "kn"))
    if isinstance(last, int):
        parent[last] = quantized
    else:
        setattr(parent, last, quantized)
    tables[path] = "int8"

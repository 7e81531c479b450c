"""Weight-only int8 quantization: symmetric, per output channel or per group of input rows, of the dense Linear
kernels selected by pattern.

kernel (in, out) float → int8 codes (in, out) + float32 scale (out,): scale[j] = max_i |W[i, j]| / 127 and
q = round(W / scale); with `group: g` one scale per block of g rows of each column, scale (ceil(in / g), out) —
finer scales, lower error, 4·out bytes more per block. The model multiplies by the int8 codes directly
(fastserve.models.compressed → fastserve.kernels.int8_matmul: a C++ kernel on CPU).
Quantized layers are for inference and export only: there is no gradient through an int8 kernel, so fine-tune
(e.g. a low-rank model) before quantizing. Low-rank factors are left in float.

The output projection (`head`, default true) is quantized too, whatever `include` says: it is the largest single
matrix of a small LM (SmolLM2-135M: 49152 × 576, 113 MB in float32 read at every decoded token, more than the whole
int8 body). A separate `lm_head` Linear is quantized like any layer; a tied embedding table (`embed`) becomes a
QuantizedEmbed whose per-row scales are the per-output-channel scales of the logits matvec, so the head runs
through the int8 kernel and a lookup reads int8 rows × scale. `head: false` (or an `exclude` naming the head)
keeps it in float.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from fastserve.kernels.int8 import ACTIVATIONS, dequantize, pack_vnni, packable
from fastserve.models.compressed import quantize_int8
from fastserve.models.layer_stack import as_per_layer
from fastserve.transforms.common import (TransformError, check_params, compile_pattern, describe, get_node,
                                         rel_error, replace_node, select, to_host)

OPTIONS = ("bits", "group", "include", "exclude", "head", "activations")


def quantize(model_cfg: Any, params: dict, *, bits: int = 8, group: int | None = None, include: Any = "*",
             exclude: Any = None, head: bool = True, activations: str = "float32") -> tuple[Any, dict, list[dict]]:
    """int8 quantization of the selected dense kernels, per output channel or (`group`) per block of `group` input
    rows, and (`head`) of the output projection, tied or not (per output channel). `activations: int8` makes them
    W8A8: their inputs rounded to int8 per block of 32, integer products in the CPU kernel (decoding; prefill too
    where the CPU has VNNI; fastserve.models.compressed). Pure: (new cfg, new params,
    report)."""
    if bits != 8 or isinstance(bits, bool):
        raise TransformError(f"quantize.bits: only 8 is supported, got {bits!r}")
    if group is not None and (not isinstance(group, int) or isinstance(group, bool) or group <= 0):
        raise TransformError(f"quantize.group: expected a positive int (input rows per scale), got {group!r}")
    if not isinstance(head, bool):
        raise TransformError(f"quantize.head: expected true or false (quantize the output projection), got {head!r}")
    if activations not in ACTIVATIONS:
        raise TransformError(f"quantize.activations: expected one of {', '.join(ACTIVATIONS)} (int8: inputs rounded to "
                             f"int8, W8A8), got {activations!r}")
    extra = {} if activations == "float32" else {"activations": activations}
    model_cfg, params = as_per_layer(model_cfg, params)   # scanned weights unstacked: paths name one layer
    abstract, layers = describe(model_cfg)
    check_params(abstract, params, "quantize (input)")
    new_params, compressed, report = params, dict(model_cfg.compressed), []
    selected = select(layers, include, exclude, "quantize")
    head_path = _head_path(model_cfg, abstract, layers, exclude) if head else None
    if not head:
        selected = [p for p in selected if p != "lm_head"]
    elif head_path == "lm_head" and head_path not in selected:
        selected.append(head_path)
    elif head_path is not None and head_path not in layers:   # a tied embedding table
        new_params, row = _quantize_table(new_params, head_path)
        compressed[head_path] = {"kind": "int8", **extra}
        report.append(row)
    for path in selected:
        if layers[path] != "dense":
            report.append({"layer": path, "action": f"skipped: {layers[path]} (only dense kernels are quantized)"})
            continue
        node = get_node(params, path)
        kernel = node["kernel"]
        w = to_host(kernel)
        q, scale = quantize_int8(w, group)
        deq = np.asarray(dequantize(q, scale, group))
        m, n = w.shape
        itemsize = np.dtype(kernel.dtype).itemsize
        new_params = replace_node(new_params, path, {**node, "kernel": q, "scale": scale})
        compressed[path] = {"kind": "int8", **({} if group is None else {"group": group}), **extra}
        report.append({"layer": path, "action": "quantized int8", "shape": [m, n], "bits": 8, "group": group,
                       "bytes_before": m * n * itemsize, "bytes_after": m * n + 4 * int(np.prod(scale.shape)),
                       "rel_error": rel_error(w, deq), "max_abs_error": float(np.max(np.abs(w - deq)))})
    new_cfg = dataclasses.replace(model_cfg, compressed=compressed)
    check_params(describe(new_cfg)[0], new_params, "quantize (output)")
    return new_cfg, new_params, report


def vnni_layout(model_cfg: Any, params: dict) -> tuple[Any, dict, list[str]]:
    """The W8A8 int8 kernels (and a W8A8 tied int8 head) of a quantized model stored as the CPU kernel's VNNI panels
    (`layout: vnni`, fastserve.models.compressed; `fastserve.kernels.int8.pack_vnni`), where their shapes allow it.
    The same codes and scales in another order: the same integer sums per block of 32 (a tied head's blocks are
    added in another order than its row-wise kernel's: equal up to float rounding). Pure: (new cfg, new params, the
    paths repacked). The serving engine applies it at start-up on a CPU with VNNI (serve.pack_int8)."""
    compressed, new_params, packed = dict(model_cfg.compressed), params, []
    for path, entry in model_cfg.compressed.items():
        if entry.get("kind") != "int8" or entry.get("activations") != "int8" or entry.get("layout", "kn") != "kn":
            continue
        node = get_node(params, path)
        name = "embedding" if "embedding" in node else "kernel"
        k, n = node[name].shape[::-1] if name == "embedding" else node[name].shape   # a table is the head (k, n)ᵀ
        if not packable(k, n, entry.get("group")):
            continue
        pack = jax.jit(lambda w, table=name == "embedding": pack_vnni(w.T if table else w))
        new_params = replace_node(new_params, path, {**node, name: pack(node[name])})
        compressed[path] = {**entry, "layout": "vnni"}
        packed.append(path)
    return dataclasses.replace(model_cfg, compressed=compressed), new_params, packed


def _head_path(model_cfg: Any, abstract: dict, layers: dict[str, str], exclude: Any) -> str | None:
    """The output projection to quantize: "lm_head" (a Linear), "embed" (a tied float table), or None (no head,
    already quantized, or excluded)."""
    if "lm_head" in layers:
        path = "lm_head" if layers["lm_head"] == "dense" else None
    elif getattr(model_cfg, "tie_embeddings", False) and "embedding" in abstract.get("embed", {}):
        path = "embed"
    else:
        path = None
    patterns = [exclude] if isinstance(exclude, str) else list(exclude or [])
    if path and any(compile_pattern(p, "quantize.exclude").fullmatch(path) for p in patterns):
        return None
    return path


def _quantize_table(params: dict, path: str) -> tuple[dict, dict]:
    """The tied table (vocab, dim) → int8 table (vocab, dim) + scale (vocab,), one per row (fastserve.models.
    compressed.QuantizedEmbed); (new params, report row)."""
    table = to_host(get_node(params, path)["embedding"])
    itemsize = np.dtype(get_node(params, path)["embedding"].dtype).itemsize
    q, scale = quantize_int8(table.T)
    deq = np.asarray(dequantize(q, scale)).T
    vocab, dim = table.shape
    row = {"layer": path, "action": "quantized int8 (tied embedding + LM head)", "shape": [vocab, dim], "bits": 8,
           "group": None, "bytes_before": vocab * dim * itemsize, "bytes_after": vocab * dim + 4 * vocab,
           "rel_error": rel_error(table, deq), "max_abs_error": float(np.max(np.abs(table - deq)))}
    return replace_node(params, path, {"embedding": np.asarray(q).T, "scale": scale}), row

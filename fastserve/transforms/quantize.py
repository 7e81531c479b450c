"""Weight-only int8 quantization: symmetric, per output channel or per group of input rows, of the dense Linear
kernels selected by pattern.

kernel (in, out) float → int8 codes (in, out) + float32 scale (out,): scale[j] = max_i |W[i, j]| / 127 and
q = round(W / scale); with `group: g` one scale per block of g rows of each column, scale (ceil(in / g), out) —
finer scales, lower error, 4·out bytes more per block. The model multiplies by the int8 codes directly
(fastserve.models.compressed → fastserve.kernels.int8_matmul: a C++ kernel on CPU).
Quantized layers are for inference and export only: there is no gradient through an int8 kernel, so fine-tune
(e.g. a low-rank model) before quantizing. Low-rank factors and embedding tables are left in float.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from fastserve.kernels.int8 import dequantize
from fastserve.models.compressed import quantize_int8
from fastserve.models.layer_stack import as_per_layer
from fastserve.transforms.common import (TransformError, check_params, describe, get_node, rel_error, replace_node,
                                         select, to_host)

OPTIONS = ("bits", "group", "include", "exclude")


def quantize(model_cfg: Any, params: dict, *, bits: int = 8, group: int | None = None, include: Any = "*",
             exclude: Any = None) -> tuple[Any, dict, list[dict]]:
    """int8 quantization of the selected dense kernels, per output channel or (`group`) per block of `group` input
    rows. Pure: (new cfg, new params, report)."""
    if bits != 8 or isinstance(bits, bool):
        raise TransformError(f"quantize.bits: only 8 is supported, got {bits!r}")
    if group is not None and (not isinstance(group, int) or isinstance(group, bool) or group <= 0):
        raise TransformError(f"quantize.group: expected a positive int (input rows per scale), got {group!r}")
    model_cfg, params = as_per_layer(model_cfg, params)   # scanned weights unstacked: paths name one layer
    abstract, layers = describe(model_cfg)
    check_params(abstract, params, "quantize (input)")
    new_params, compressed, report = params, dict(model_cfg.compressed), []
    for path in select(layers, include, exclude, "quantize"):
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
        compressed[path] = {"kind": "int8"} if group is None else {"kind": "int8", "group": group}
        report.append({"layer": path, "action": "quantized int8", "shape": [m, n], "bits": 8, "group": group,
                       "bytes_before": m * n * itemsize, "bytes_after": m * n + 4 * int(np.prod(scale.shape)),
                       "rel_error": rel_error(w, deq), "max_abs_error": float(np.max(np.abs(w - deq)))})
    new_cfg = dataclasses.replace(model_cfg, compressed=compressed)
    check_params(describe(new_cfg)[0], new_params, "quantize (output)")
    return new_cfg, new_params, report

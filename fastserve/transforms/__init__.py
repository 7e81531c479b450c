"""Parameter transforms applied before export: low-rank SVD factorization, int8 quantization, magnitude pruning.

Each transform is a pure function `(model_cfg, params, **options) -> (new_model_cfg, new_params, report)`: params
are the pure nested dict of fastserve.core.state, the report a list of one dict per layer touched. A transform that
changes a layer's structure records it in `model_cfg.compressed`, so the result is an ordinary model (config +
params) that shards, checkpoints, trains (not int8 layers), generates and exports like any other.

    cfg, params, report = apply_transforms(cfg, params, [
        {"lowrank": {"include": "layers.*.mlp.*", "rank_ratio": 0.25}},
        {"quantize": {"bits": 8}},
    ])

Paths are dotted (`layers.0.mlp.gate`); a pattern is a glob (`layers.*.mlp.*`) or, when it holds any of
( ) | + ^ $ \\ { } or starts with `re:`, a regular expression (`attn.(q|k|v|o)`); it matches a whole path or a tail
of it starting at a segment. Inputs are gathered to the host (single-process meshes); place the result with the
new config's shardings (fastserve.core.state.abstract_model + fastserve.parallel.tree_shardings).
"""
from __future__ import annotations

import difflib
from typing import Any, Callable

from fastserve.transforms import lowrank as _lowrank_mod, prune as _prune_mod, quantize as _quantize_mod
from fastserve.transforms.common import TransformError, check_options
from fastserve.transforms.lowrank import choose_rank, factorize, lowrank
from fastserve.transforms.prune import prune
from fastserve.transforms.quantize import quantize

TRANSFORMS: dict[str, tuple[Callable[..., tuple[Any, dict, list[dict]]], tuple[str, ...]]] = {
    "lowrank": (lowrank, _lowrank_mod.OPTIONS),
    "quantize": (quantize, _quantize_mod.OPTIONS),
    "prune": (prune, _prune_mod.OPTIONS),
}


def apply_transforms(model_cfg: Any, params: dict, specs: list[dict], calibrate: Callable | None = None
                     ) -> tuple[Any, dict, list[dict]]:
    """Applies `specs` in order, each `{name: {options}}`; the report rows carry `step` and `transform`.
    `calibrate(paths, options)` gives activation-aware transforms (lowrank `method: whitened`) their data.

    Errors name the offending key, e.g. "unknown option 'transforms[0].lowrank.rnak'; did you mean ...".
    """
    if not isinstance(specs, (list, tuple)):
        raise TransformError(f"transforms: expected a list of {{name: options}} items, got {type(specs).__name__}")
    report: list[dict] = []
    for i, spec in enumerate(specs):
        where = f"transforms[{i}]"
        if not isinstance(spec, dict) or len(spec) != 1:
            raise TransformError(f"{where}: expected one {{name: options}} mapping (name one of "
                                 f"{', '.join(TRANSFORMS)}), got {spec!r}")
        ((name, options),) = spec.items()
        if name not in TRANSFORMS:
            near = difflib.get_close_matches(str(name), list(TRANSFORMS), n=1, cutoff=0.5)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise TransformError(f"{where}: unknown transform '{name}'{hint} (choose from {', '.join(TRANSFORMS)})")
        fn, allowed = TRANSFORMS[name]
        try:
            options = check_options(name, options, allowed)
            if name == "lowrank":
                options["calibrate"] = calibrate
            model_cfg, params, rows = fn(model_cfg, params, **options)
        except TransformError as e:
            msg = str(e)
            if msg.startswith("unknown option"):
                msg = msg.replace(f"'{name}.", f"'{where}.{name}.")
            else:
                msg = f"{where}.{msg}"
            raise TransformError(msg) from None
        report.extend({"step": i, "transform": name, **row} for row in rows)
    return model_cfg, params, report


__all__ = ["TRANSFORMS", "TransformError", "apply_transforms", "choose_rank", "factorize", "lowrank", "prune",
           "quantize"]

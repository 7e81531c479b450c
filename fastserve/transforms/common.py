"""What the parameter transforms share: option checking, layer discovery, path patterns, copy-on-write params."""
from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from flax import nnx

from fastserve.models import build_model
from fastserve.models.compressed import linear_layers

# A pattern holding any of these is a regular expression; otherwise it is a glob (`*`, `?`, `[...]`).
_REGEX_CHARS = set("()|+^$\\{}")


class TransformError(ValueError):
    """A transform spec or its input that cannot be applied; the message names the offending key."""


def check_options(where: str, options: Any, allowed: Sequence[str]) -> dict:
    """`options` must be a mapping whose keys are all in `allowed`; the error names the bad key and the nearest one."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TransformError(f"{where}: expected a mapping of options, got {type(options).__name__} {options!r}")
    for key in options:
        if key not in allowed:
            near = difflib.get_close_matches(str(key), list(allowed), n=1, cutoff=0.5)
            hint = f"; did you mean '{where}.{near[0]}'?" if near else ""
            raise TransformError(f"unknown option '{where}.{key}'{hint} (valid: {', '.join(allowed)})")
    return dict(options)


# ------------------------------------------------------------------------------------------- the model

def describe(model_cfg: Any) -> tuple[dict, dict[str, str]]:
    """(abstract params as a pure dict, dotted path → "dense" | "lowrank" | "int8" of each Linear), no allocation."""
    model = nnx.eval_shape(lambda: build_model(model_cfg, nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model)), linear_layers(model)


def _flat(tree: Any) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf for path, leaf in leaves}


def check_params(abstract: Any, params: Any, what: str) -> None:
    """`params` must have exactly the paths and shapes of `abstract` (integer leaves where it has integers)."""
    want, got = _flat(abstract), _flat(params)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise TransformError(f"{what}: the params do not match the model config (missing {missing[:5]}, "
                             f"unexpected {extra[:5]})")
    for path, a in want.items():
        x = got[path]
        if tuple(np.shape(x)) != tuple(a.shape):
            raise TransformError(f"{what}: param {path} has shape {tuple(np.shape(x))}, "
                                 f"the config says {tuple(a.shape)}")
        dtype = getattr(x, "dtype", None) or np.asarray(x).dtype
        if np.issubdtype(a.dtype, np.integer) != np.issubdtype(dtype, np.integer):
            raise TransformError(f"{what}: param {path} has dtype {dtype}, the config says {a.dtype}")


# --------------------------------------------------------------------------------------------- patterns

def _as_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TransformError(f"{where}: expected a pattern or a list of patterns, got {value!r}")


def compile_pattern(pattern: str, where: str) -> re.Pattern:
    """A path pattern as an anchored regex. `re:...` or any of ( ) | + ^ $ \\ { } → a regular expression;
    otherwise a glob. Either must match the whole dotted path or a tail of it that starts at a segment
    (`mlp.*` matches `layers.3.mlp.gate`; `attn.(q|k|v|o)` matches `layers.0.attn.q`)."""
    body = pattern[3:] if pattern.startswith("re:") else pattern
    is_regex = pattern.startswith("re:") or any(c in _REGEX_CHARS for c in pattern)
    if not is_regex:
        body = fnmatch.translate(body)[4:-3]  # '(?s:...)\\Z' → '...'
    try:
        return re.compile(rf"(?:^|.*\.)(?:{body})")
    except re.error as e:
        raise TransformError(f"{where}: '{pattern}' is not a valid pattern ({e})") from None


def select(layers: Iterable[str], include: Any, exclude: Any, where: str, required: bool = True) -> list[str]:
    """The paths matched by any `include` pattern and by no `exclude` pattern; an include that matches nothing fails."""
    layers = list(layers)
    inc = [(p, compile_pattern(p, f"{where}.include")) for p in _as_list(include, f"{where}.include")]
    exc = [compile_pattern(p, f"{where}.exclude") for p in _as_list(exclude, f"{where}.exclude")]
    if required and not inc:
        raise TransformError(f"{where}.include: required (a path pattern such as 'layers.*.mlp.*')")
    for p, rx in inc:
        if not any(rx.fullmatch(path) for path in layers):
            shown = ", ".join(layers[:8]) + (", ..." if len(layers) > 8 else "")
            raise TransformError(f"{where}.include: '{p}' matches no Linear layer (they are: {shown})")
    return [path for path in layers
            if any(rx.fullmatch(path) for _, rx in inc) and not any(rx.fullmatch(path) for rx in exc)]


# ------------------------------------------------------------------------------------ pure-dict params

def _key(node: dict, part: str) -> Any:
    if part in node:
        return part
    if part.isdigit() and int(part) in node:
        return int(part)
    raise KeyError(part)


def get_node(params: dict, path: str) -> Any:
    node = params
    for part in path.split("."):
        node = node[_key(node, part)]
    return node


def replace_node(params: dict, path: str, new: Any) -> dict:
    """A copy of `params` with the node at `path` replaced; every untouched subtree is shared, not copied."""
    def go(node: dict, parts: list[str]) -> dict:
        k = _key(node, parts[0])
        out = dict(node)
        out[k] = new if len(parts) == 1 else go(node[k], parts[1:])
        return out
    return go(params, path.split("."))


def to_host(x: Any) -> np.ndarray:
    """A float32 numpy copy of a parameter (gathered to the host: single-process meshes)."""
    return np.asarray(jax.device_get(x)).astype(np.float32)


def rel_error(w: np.ndarray, approx: np.ndarray) -> float:
    w64 = w.astype(np.float64)
    norm = np.linalg.norm(w64)
    return float(np.linalg.norm(w64 - approx.astype(np.float64)) / norm) if norm > 0 else 0.0

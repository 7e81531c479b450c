"""The machinery behind `fastserve.config`: YAML and `key=value` overrides validated into dataclasses.

- Fields are checked against their annotations; the only conversions are the lossless ones (int → float, YAML's
  `1e-3` string → float).
- A field annotated `Annotated[Any, Tagged(kind, tag)]` is a tagged union: the value's `tag` key (`model.name`,
  `data.source`, `train.task`'s `name`) selects a dataclass registered in `fastserve.registry`; a bare string is
  shorthand for `{tag: string}`.
- A dataclass may define `checks()` yielding `(field, problem)` pairs: ranges, divisibility, names. The first
  problem becomes `ConfigError("<section>.<field>: <problem>")`, so a bad value fails when the config loads, before
  any work.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from fastserve import registry

_PROMOTED = "__tag__"  # a tagged value written as a string, then given more keys by an override


class ConfigError(ValueError):
    """A config file or override that does not match the schema."""


@dataclass(frozen=True)
class Tagged:
    """Marks a field as a tagged union over `registry.KINDS[kind]`, selected by the value's `tag` key."""
    kind: str
    tag: str
    default: str


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _tagged_class(value: dict, meta: Tagged, key: str) -> type:
    table = registry.KINDS[meta.kind]
    name = value.get(meta.tag, meta.default)
    if not isinstance(name, str) or name not in table:
        near = difflib.get_close_matches(str(name), list(table), n=1, cutoff=0.5)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(f"{key}.{meta.tag}: unknown {meta.kind} '{name}'{hint} (registered: {', '.join(table)})")
    return registry.resolve(table[name])


def _coerce_tagged(value: Any, meta: Tagged, key: str) -> Any:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, str):
        value = {meta.tag: value}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a {meta.kind} name or a mapping with '{meta.tag}', "
                          f"got {type(value).__name__} {value!r}")
    value = dict(value)
    if _PROMOTED in value:
        value.setdefault(meta.tag, value.pop(_PROMOTED))
    cls = _tagged_class(value, meta, key)
    return _build(cls, value, key)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against the annotation `tp`; the only conversions are the lossless ones (int → float)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *metas = typing.get_args(tp)
        tagged = [m for m in metas if isinstance(m, Tagged)]
        return _coerce_tagged(value, tagged[0], key) if tagged else _coerce(value, base, key)
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {_type_name(tp)} fields, got {type(value).__name__} {value!r}")
        return _build(tp, value, key)
    if origin in (list, Sequence):
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str) and item_tp is str:
            value = [value]  # `data.paths=a.txt` means a one-element list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            what = "" if tp is dict else f" of {_type_name(key_tp)} to {_type_name(val_tp)}"
            raise ConfigError(f"{key}: expected a mapping{what}, got {type(value).__name__} {value!r}")
        return {_coerce(k, key_tp, f"{key} (key {k!r})"): _coerce(v, val_tp, f"{key}[{k!r}]") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads `1e-3` (no dot) as a string; users mean a number
            return float(value)
        except ValueError:
            pass
    if tp is type(None) and value is None:
        return None
    if isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _unknown_key(cls: type, name: str, key: str) -> ConfigError:
    valid = [f.name for f in dataclasses.fields(cls)]
    near = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{(key.rsplit('.', 1)[0] + '.' if '.' in key else '') + near[0]}'?" if near else ""
    return ConfigError(f"unknown config key '{key}'{hint} (valid keys here: {', '.join(valid)})")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls, include_extras=True)
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in hints:
            raise _unknown_key(cls, str(name), key)
        kwargs[name] = _coerce(value, hints[name], key)
    obj = cls(**kwargs)
    for fname, problem in getattr(obj, "checks", lambda: ())():
        raise ConfigError(f"{prefix + '.' if prefix else ''}{fname}: {problem}")
    return obj


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, recursively; a string (a tagged name) given more keys becomes a mapping."""
    out = dict(base)
    for k, v in extra.items():
        old = out.get(k)
        if isinstance(v, dict) and _PROMOTED in v:   # `train.task=distill train.task.teacher=…`: a name given anew
            out[k] = v                                # starts that value afresh, as `train.task=distill` alone does
            continue
        if isinstance(v, dict) and isinstance(old, str):
            old = {_PROMOTED: old}
        out[k] = merge(old, v) if isinstance(v, dict) and isinstance(old, dict) else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (['a','b','c'], value parsed as YAML so numbers, bools and lists get their types)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. train.steps=50)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({e})") from None
    return key.split("."), value


def override_dict(overrides: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if isinstance(child, str):  # `train.task=distill train.task.teacher=runs/q`
                child = node[part] = {_PROMOTED: child}
            node = node.setdefault(part, {}) if child is None else child
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}' conflicts with an earlier override of '{part}'")
        old = node.get(path[-1])
        node[path[-1]] = merge(old, value) if isinstance(value, dict) and isinstance(old, dict) else value
    return out


def config_from_dict(values: dict[str, Any] | None, cls: type) -> Any:
    """Validates a plain mapping into `cls`."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(values).__name__}")
    return _build(cls, values)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return values

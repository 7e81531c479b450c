"""Low-rank factorization: W (m×n) → u (m×r) · v (r×n) from a truncated SVD, chosen per layer by path pattern.

Rank rules (exactly one per rule): `rank` (fixed; capped at min(m, n)), `rank_ratio` (r = ceil(ratio · min(m, n))),
or `energy` (the smallest r whose singular values keep that fraction of Σσ², i.e. of ‖W‖²_F). The singular
values are split evenly into the factors: u = U_r·√Σ_r, v = √Σ_r·V_rᵀ. By Eckart–Young the relative error
‖W − uv‖_F / ‖W‖_F equals √(Σ_{i>r} σ_i²) / ‖W‖_F, the best any rank-r matrix can do.

A layer stays dense when r·(m + n) ≥ m·n (the factors would not store fewer parameters) unless the rule says
`force: true`; the report says so. The factorized model is a config change (`model.compressed[path] =
{kind: lowrank, rank: r}`) plus the new params: it shards on the `rank` logical axis, checkpoints and trains.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from fastserve.transforms.common import (TransformError, check_options, check_params, describe, get_node,
                                         rel_error, replace_node, select, to_host)

RULE_KEYS = ("include", "exclude", "rank", "rank_ratio", "energy", "force")
OPTIONS = RULE_KEYS + ("rules",)


def _number(rule: dict, name: str, where: str, lo: float, hi: float) -> float:
    x = rule[name]
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not (lo < x <= hi):
        raise TransformError(f"{where}.{name}: expected a number in ({lo}, {hi}], got {x!r}")
    return float(x)


def _check_rule(rule: dict, where: str) -> dict:
    rule = check_options(where, rule, RULE_KEYS)
    given = [k for k in ("rank", "rank_ratio", "energy") if rule.get(k) is not None]
    if len(given) != 1:
        raise TransformError(f"{where}: give exactly one of rank, rank_ratio, energy "
                             f"(got {', '.join(given) or 'none'})")
    if "rank" in given and (isinstance(rule["rank"], bool) or not isinstance(rule["rank"], int) or rule["rank"] <= 0):
        raise TransformError(f"{where}.rank: expected a positive int, got {rule['rank']!r}")
    if "rank_ratio" in given:
        _number(rule, "rank_ratio", where, 0.0, 1.0)
    if "energy" in given:
        _number(rule, "energy", where, 0.0, 1.0)
    if not isinstance(rule.get("force", False), bool):
        raise TransformError(f"{where}.force: expected true or false, got {rule['force']!r}")
    return rule


def choose_rank(s: np.ndarray, m: int, n: int, rule: dict) -> int:
    """The rank a rule asks for, given the kernel's singular values `s` (descending)."""
    k = min(m, n)
    if rule.get("rank") is not None:
        return min(int(rule["rank"]), k)
    if rule.get("rank_ratio") is not None:
        return max(1, min(k, math.ceil(float(rule["rank_ratio"]) * k - 1e-9)))
    e = np.asarray(s, np.float64) ** 2
    total = e.sum()
    if total <= 0:
        return 1
    kept = np.cumsum(e) / total
    return max(1, min(k, int(np.searchsorted(kept, float(rule["energy"]) - 1e-12) + 1)))


def factorize(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u, v, all singular values): the truncated SVD with √σ folded into each factor."""
    U, s, Vt = np.linalg.svd(np.asarray(w, np.float32), full_matrices=False)
    root = np.sqrt(s[:rank])
    return U[:, :rank] * root[None, :], root[:, None] * Vt[:rank], s


def lowrank(model_cfg: Any, params: dict, *, include: Any = None, exclude: Any = None, rank: int | None = None,
            rank_ratio: float | None = None, energy: float | None = None, force: bool = False,
            rules: list[dict] | None = None) -> tuple[Any, dict, list[dict]]:
    """Factorizes the dense Linear kernels selected by path patterns. Pure: returns (new cfg, new params, report).

    Either one rule as keyword arguments (`include`, `exclude`, one of `rank` / `rank_ratio` / `energy`, `force`)
    or `rules=[{...}, ...]`, the first matching rule deciding each layer.
    """
    single = dict(include=include, exclude=exclude, rank=rank, rank_ratio=rank_ratio, energy=energy, force=force)
    if rules is not None:
        if any(v not in (None, False) for v in single.values()):
            raise TransformError("lowrank: give either `rules` or one rule's keys (include, rank, ...), not both")
        if not isinstance(rules, list) or not rules:
            raise TransformError(f"lowrank.rules: expected a non-empty list of rules, got {rules!r}")
        rules = [_check_rule(r, f"lowrank.rules[{i}]") for i, r in enumerate(rules)]
        wheres = [f"lowrank.rules[{i}]" for i in range(len(rules))]
    else:
        rules = [_check_rule({k: v for k, v in single.items() if v is not None}, "lowrank")]
        wheres = ["lowrank"]

    abstract, layers = describe(model_cfg)
    check_params(abstract, params, "lowrank (input)")
    chosen: dict[str, int] = {}
    for i, (rule, where) in enumerate(zip(rules, wheres)):
        for path in select(layers, rule.get("include"), rule.get("exclude"), where):
            chosen.setdefault(path, i)

    new_params, compressed, report = params, dict(model_cfg.compressed), []
    for path in layers:  # model order
        if path not in chosen:
            continue
        rule = rules[chosen[path]]
        node = get_node(params, path)
        if layers[path] != "dense":
            report.append({"layer": path, "action": f"skipped: already {layers[path]}"})
            continue
        kernel = node["kernel"]
        w = to_host(kernel)
        m, n = w.shape
        u, v, s = factorize(w, min(m, n))
        r = choose_rank(s, m, n, rule)
        row = {"layer": path, "shape": [m, n], "rank": r, "params_before": m * n}
        if r * (m + n) >= m * n and not rule.get("force", False):
            row.update(action="kept dense: no saving (rank·(m+n) ≥ m·n)", rank=min(m, n), params_after=m * n,
                       rel_error=0.0, would_be=r * (m + n))
            report.append(row)
            continue
        u, v = u[:, :r], v[:r]
        discarded = float(np.sqrt(np.sum(np.asarray(s[r:], np.float64) ** 2)) / max(np.linalg.norm(s), 1e-30))
        dtype = kernel.dtype
        new_node = {k: x for k, x in node.items() if k != "kernel"}
        new_node.update(u=jnp.asarray(u, dtype), v=jnp.asarray(v, dtype))
        new_params = replace_node(new_params, path, new_node)
        compressed[path] = {"kind": "lowrank", "rank": r}
        row.update(action="factorized", params_after=r * (m + n), rel_error=rel_error(w, u @ v),
                   energy_kept=float(1.0 - discarded ** 2), discarded_rel_norm=discarded)
        report.append(row)

    new_cfg = dataclasses.replace(model_cfg, compressed=compressed)
    check_params(describe(new_cfg)[0], new_params, "lowrank (output)")
    return new_cfg, new_params, report

"""Low-rank factorization: W (m×n) → u (m×r) · v (r×n) from a truncated SVD, chosen per layer by path pattern.

Methods (`method`, per rule):
- `svd` (default): the SVD of W itself. By Eckart–Young the relative error ‖W − uv‖_F / ‖W‖_F equals
  √(Σ_{i>r} σ_i²) / ‖W‖_F, the best any rank-r matrix can do — for the weights, not for what the layer outputs.
- `whitened`: truncation-aware data whitening (SVD-LLM, Wang et al. 2024). With the layer's calibration inputs X
  and XᵀX = S·Sᵀ (Cholesky), take the SVD of Sᵀ·W = U Σ Vᵀ and map back: u = S⁻ᵀ·U_r·√Σ_r, v = √Σ_r·V_rᵀ. Then
  ‖X·W − X·u·v‖²_F = Σ_{i>r} σ_i² exactly: each dropped singular value is output error on the calibration data,
  and the report gives that loss per layer. Needs calibration (`fastserve.transforms.calibration`), which
  `fastserve.compress` supplies from the training split of `data` (`calibration: {sequences: N}`).

Rank rules (exactly one per rule): `rank` (fixed; capped at min(m, n)), `rank_ratio` (r = ceil(ratio · min(m, n))),
`energy` (the smallest r whose singular values keep that fraction of Σσ²), or `params_ratio` (one budget for all
the layers the rule selects: their factors hold at most that fraction of their dense parameters). How a
`params_ratio` budget is shared (`allocation`): `uniform` (default) gives every layer the same fraction of its own
parameters; `loss` first gives every layer `allocation_floor` (default 0.5) of its uniform rank, then shares out
the rest greedily by truncation loss — each further singular value buys the largest share of its own layer's Σσ²
(its relative output error) per parameter it costs. Without the floor (`allocation_floor: 0`) the greedy left some
SmolLM2 layers at rank 1 and did worse than uniform (perplexity 2.32× dense vs 1.51× at 0.8,
experiments/results/bench_lowrank_real.md): a layer's relative error says little about what its error costs the
model once its rank is tiny, so the floor bounds how far the allocation may move from uniform (whether a floored
allocation beats uniform is measured by `bench_lowrank_real.py --calibration`). The singular values are split
evenly into the two factors.

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

from fastserve.models.layer_stack import as_per_layer
from fastserve.transforms.common import (TransformError, check_options, check_params, describe, get_node,
                                         rel_error, replace_node, select, to_host)

RANK_RULES = ("rank", "rank_ratio", "energy", "params_ratio")
RULE_KEYS = ("include", "exclude", *RANK_RULES, "force", "method", "allocation", "allocation_floor")
DEFAULT_FLOOR = 0.5  # allocation: loss — the fraction of its uniform rank every layer keeps
METHODS = ("svd", "whitened")
ALLOCATIONS = ("uniform", "loss")
CALIBRATION_KEYS = ("sequences",)
OPTIONS = RULE_KEYS + ("rules", "calibration")


def _number(rule: dict, name: str, where: str, lo: float, hi: float) -> float:
    x = rule[name]
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not (lo < x <= hi):
        raise TransformError(f"{where}.{name}: expected a number in ({lo}, {hi}], got {x!r}")
    return float(x)


def _check_rule(rule: dict, where: str) -> dict:
    rule = check_options(where, rule, RULE_KEYS)
    given = [k for k in RANK_RULES if rule.get(k) is not None]
    if len(given) != 1:
        raise TransformError(f"{where}: give exactly one of {', '.join(RANK_RULES)} "
                             f"(got {', '.join(given) or 'none'})")
    if "rank" in given and (isinstance(rule["rank"], bool) or not isinstance(rule["rank"], int) or rule["rank"] <= 0):
        raise TransformError(f"{where}.rank: expected a positive int, got {rule['rank']!r}")
    if "rank_ratio" in given:
        _number(rule, "rank_ratio", where, 0.0, 1.0)
    if "energy" in given:
        _number(rule, "energy", where, 0.0, 1.0)
    if "params_ratio" in given:
        _number(rule, "params_ratio", where, 0.0, 1.0)
    if rule.get("allocation", "uniform") not in ALLOCATIONS:
        raise TransformError(f"{where}.allocation: expected one of {', '.join(ALLOCATIONS)}, "
                             f"got {rule['allocation']!r}")
    if rule.get("allocation") is not None and rule.get("params_ratio") is None:
        raise TransformError(f"{where}.allocation: only applies to a params_ratio budget")
    if rule.get("allocation_floor") is not None:
        floor = rule["allocation_floor"]
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0.0 <= floor <= 1.0:
            raise TransformError(f"{where}.allocation_floor: expected a number in [0, 1] (the fraction of its uniform "
                                 f"rank every layer keeps), got {floor!r}")
        if rule.get("allocation") != "loss":
            raise TransformError(f"{where}.allocation_floor: only applies to allocation: loss")
    if rule.get("method", "svd") not in METHODS:
        raise TransformError(f"{where}.method: expected one of {', '.join(METHODS)}, got {rule['method']!r}")
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


class _Spectrum:
    """One layer's SVD — of W (`svd`) or of Sᵀ·W (`whitened`) — from which any rank's factors follow."""

    def __init__(self, w: np.ndarray, gram: np.ndarray | None = None, damping: float = 1e-6):
        w64 = np.asarray(w, np.float64)
        self.inv_st = None
        if gram is not None:
            from fastserve.transforms.calibration import whitening

            s_low, s_inv, self.damping = whitening(gram, damping)
            w64 = s_low.T @ w64
            self.inv_st = s_inv.T  # (Sᵀ)⁻¹ = (S⁻¹)ᵀ
        self.U, self.s, self.Vt = np.linalg.svd(w64, full_matrices=False)

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        root = np.sqrt(self.s[:rank])
        u = self.U[:, :rank] * root[None, :]
        if self.inv_st is not None:
            u = self.inv_st @ u
        return u, root[:, None] * self.Vt[:rank]

    def dropped(self, rank: int) -> float:
        """Σ_{i>rank} σ_i²: the squared error the truncation costs (of W, or of X·W on the calibration data)."""
        return float(np.sum(self.s[rank:].astype(np.float64) ** 2))


def uniform_rank(m: int, n: int, params_ratio: float) -> int:
    """The rank whose factors hold `params_ratio` of an m×n kernel's parameters: r·(m + n) ≤ ratio·m·n."""
    return max(1, int(params_ratio * m * n / (m + n)))


def allocate_ranks(spectra: dict[str, np.ndarray], shapes: dict[str, tuple[int, int]], params_ratio: float,
                   floor: float = DEFAULT_FLOOR) -> dict[str, int]:
    """Ranks for layers sharing one budget: Σ_l r_l·(m_l + n_l) ≤ params_ratio · Σ_l m_l·n_l. Every layer first
    keeps ceil(floor · its uniform rank) singular values (at least one); then singular values are kept in order of
    (σ² / the layer's Σσ²) / (m + n) — the share of its own layer's energy each buys per parameter — while they
    fit. A layer whose factors would not be smaller than its dense kernel is capped below that point."""
    budget = params_ratio * sum(m * n for m, n in shapes.values())
    ranks = {p: max(1, math.ceil(floor * uniform_rank(*shapes[p], params_ratio))) for p in spectra}
    spent = sum(ranks[p] * (m + n) for p, (m, n) in shapes.items())
    candidates = []
    for p, s in spectra.items():
        m, n = shapes[p]
        energy = float(np.sum(np.asarray(s, np.float64) ** 2)) or 1.0
        cap = min(len(s), max(1, (m * n - 1) // (m + n)))  # r·(m+n) < m·n
        candidates += [(float(s[i]) ** 2 / energy / (m + n), p, i) for i in range(ranks[p], cap)]
    for _, p, i in sorted(candidates, key=lambda c: -c[0]):
        cost = sum(shapes[p])
        if i == ranks[p] and spent + cost <= budget:  # values fall within a layer: its ranks grow in order
            ranks[p] += 1
            spent += cost
    return ranks


def lowrank(model_cfg: Any, params: dict, *, include: Any = None, exclude: Any = None, rank: int | None = None,
            rank_ratio: float | None = None, energy: float | None = None, params_ratio: float | None = None,
            force: bool = False, method: str | None = None, allocation: str | None = None,
            allocation_floor: float | None = None, rules: list[dict] | None = None,
            calibration: dict | None = None, calibrate: Any = None) -> tuple[Any, dict, list[dict]]:
    """Factorizes the dense Linear kernels selected by path patterns. Pure: returns (new cfg, new params, report).

    Either one rule as keyword arguments (`include`, `exclude`, one of `rank` / `rank_ratio` / `energy` /
    `params_ratio`, `force`, `method`, `allocation`, `allocation_floor`) or `rules=[{...}, ...]`, the first
    matching rule deciding each layer.
    `method: whitened` needs `calibrate(paths, calibration) -> {path: (XᵀX, tokens)}` (fastserve.compress gives it;
    `calibration` holds its options, e.g. {sequences: 32}).
    """
    single = dict(include=include, exclude=exclude, rank=rank, rank_ratio=rank_ratio, energy=energy,
                  params_ratio=params_ratio, force=force, method=method, allocation=allocation,
                  allocation_floor=allocation_floor)
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
    calibration = check_options("lowrank.calibration", calibration, CALIBRATION_KEYS)

    model_cfg, params = as_per_layer(model_cfg, params)   # scanned weights unstacked: paths name one layer
    abstract, layers = describe(model_cfg)
    check_params(abstract, params, "lowrank (input)")
    chosen: dict[str, int] = {}
    for i, (rule, where) in enumerate(zip(rules, wheres)):
        for path in select(layers, rule.get("include"), rule.get("exclude"), where):
            chosen.setdefault(path, i)

    report: dict[str, dict] = {}
    todo = [p for p in layers if p in chosen]  # model order
    for path in todo:
        if layers[path] != "dense":
            report[path] = {"layer": path, "action": f"skipped: already {layers[path]}"}
    todo = [p for p in todo if p not in report]
    grams = _calibrate(todo, rules, chosen, calibration, calibrate)
    spectra = {p: _Spectrum(to_host(get_node(params, p)["kernel"]), grams.get(p, (None,))[0]) for p in todo}
    ranks = _ranks(todo, rules, chosen, spectra)

    new_params, compressed = params, dict(model_cfg.compressed)
    for path in todo:
        rule, spectrum, r = rules[chosen[path]], spectra[path], ranks[path]
        kernel = get_node(params, path)["kernel"]
        w = to_host(kernel)
        m, n = w.shape
        row = {"layer": path, "shape": [m, n], "method": rule.get("method", "svd"), "rank": r,
               "params_before": m * n}
        if r * (m + n) >= m * n and not rule.get("force", False):
            row.update(action="kept dense: no saving (rank·(m+n) ≥ m·n)", rank=min(m, n), params_after=m * n,
                       rel_error=0.0, would_be=r * (m + n))
            report[path] = row
            continue
        u, v = spectrum.factors(r)
        kept = 1.0 - spectrum.dropped(r) / max(spectrum.dropped(0), 1e-300)
        node = {k: x for k, x in get_node(new_params, path).items() if k != "kernel"}
        node.update(u=jnp.asarray(u, kernel.dtype), v=jnp.asarray(v, kernel.dtype))
        new_params = replace_node(new_params, path, node)
        compressed[path] = {"kind": "lowrank", "rank": r}
        row.update(action="factorized", params_after=r * (m + n), rel_error=rel_error(w, u @ v),
                   energy_kept=kept, discarded_rel_norm=float(np.sqrt(max(0.0, 1.0 - kept))))
        if path in grams:
            tokens = grams[path][1]
            row.update(calibration_tokens=tokens, truncation_loss=spectrum.dropped(r) / max(tokens, 1.0),
                       output_rel_error=float(np.sqrt(max(0.0, 1.0 - kept))))
        report[path] = row

    new_cfg = dataclasses.replace(model_cfg, compressed=compressed)
    check_params(describe(new_cfg)[0], new_params, "lowrank (output)")
    return new_cfg, new_params, [report[p] for p in layers if p in report]


def _calibrate(todo: list[str], rules: list[dict], chosen: dict[str, int], options: dict, calibrate: Any) -> dict:
    """{path: (XᵀX, tokens)} for the layers whose rule says `method: whitened`."""
    paths = [p for p in todo if rules[chosen[p]].get("method", "svd") == "whitened"]
    if not paths:
        return {}
    if calibrate is None:
        raise TransformError("lowrank.method: whitened needs calibration data: run it through `python -m "
                             "fastserve.compress` (which calibrates on the training split of `data`), or pass "
                             "calibrate= to the transform")
    return calibrate(paths, options)


def _ranks(todo: list[str], rules: list[dict], chosen: dict[str, int], spectra: dict[str, _Spectrum]) -> dict[str, int]:
    ranks, shared = {}, {}
    for path in todo:
        rule, spectrum = rules[chosen[path]], spectra[path]
        m, n = spectrum.U.shape[0], spectrum.Vt.shape[1]
        if rule.get("params_ratio") is not None:
            shared.setdefault(chosen[path], []).append(path)
        else:
            ranks[path] = choose_rank(spectrum.s, m, n, rule)
    for i, paths in shared.items():
        shapes = {p: (spectra[p].U.shape[0], spectra[p].Vt.shape[1]) for p in paths}
        ratio = float(rules[i]["params_ratio"])
        if rules[i].get("allocation", "uniform") == "loss":
            floor = float(rules[i].get("allocation_floor", DEFAULT_FLOOR))
            ranks.update(allocate_ranks({p: spectra[p].s for p in paths}, shapes, ratio, floor))
        else:  # the same fraction of every layer's own parameters
            ranks.update({p: uniform_rank(m, n, ratio) for p, (m, n) in shapes.items()})
    return ranks

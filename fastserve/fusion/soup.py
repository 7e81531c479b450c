"""Weight averaging ("model soups") of work dirs that share an architecture and a tokenizer:

- uniform: the mean of every model's variables;
- greedy: models sorted by held-out metric, each added to the soup only when the soup's held-out metric improves
  (so the soup is never worse than its best model on that split);
- ema: an exponential moving average over one run's kept checkpoints, oldest first (as sparse as
  `checkpoint.every`, as long as `checkpoint.max_to_keep` allows).

The result is written as an ordinary work dir (config.yaml, tokenizer, step-0 checkpoint with a fresh optimizer
state: fastserve.transforms.report.write_workdir), so evaluate / compress / export / serve / train take it as is.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from fastserve.config import Config
from fastserve.fusion.members import (FusionError, Member, check_compatible, checkpoint_steps, load_step,
                                      write_fused_workdir)



def average(trees: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
    """The weighted mean of variable trees of one structure (float32 sums, cast back to each leaf's dtype);
    non-float leaves (counters, integer buffers) are taken from the first tree."""
    weights = [1.0 / len(trees)] * len(trees) if weights is None else [float(w) for w in weights]
    total = sum(weights)

    def mean(*xs):
        if not jnp.issubdtype(xs[0].dtype, jnp.floating):
            return xs[0]
        acc = sum(w * x.astype(jnp.float32) for w, x in zip(weights, xs)) / total
        return acc.astype(xs[0].dtype)

    return jax.jit(lambda ts: jax.tree.map(mean, *ts))(list(trees))


class HeldOut:
    """Held-out metrics of variable trees of one model definition on a config's held-out split (the training
    pipeline's: `data`, `data.eval_fraction`, `train.seed`), by the config's task; compiled once for all trees."""

    def __init__(self, cfg: Config, member: Member):
        from fastserve.core.steps import make_eval_step
        from fastserve.tasks import make_task

        self.task = make_task(cfg.train.task)
        cfg = self.task.configure(cfg)
        self.cfg, self.data = cfg, cfg.data.load(cfg)
        if not self.data.eval:
            raise FusionError("there is no held-out split to score on (data.eval_fraction is 0?)")
        loaded = member.loaded
        self.graphdef, self.mesh = loaded.graphdef, loaded.mesh
        self.task_state, task_shardings = self.task.init_state(dataclasses.replace(cfg, model=loaded.model_cfg),
                                                               loaded.mesh)
        self.step = make_eval_step(loaded.graphdef, self.task, jax.tree.map(lambda x: x.sharding, loaded.params),
                                   loaded.mesh, task_shardings)

    def __call__(self, variables: Any) -> dict[str, float]:
        from fastserve.core.trainer import evaluate_params
        return evaluate_params(self.step, variables, self.data.eval, self.task, self.mesh, self.task_state)


def _better(metric: str, maximize: bool) -> Callable[[dict, dict], bool]:
    def better(a: dict[str, float], b: dict[str, float]) -> bool:
        if metric not in a:
            raise FusionError(f"held-out metric '{metric}' is not reported by this task (it reports {sorted(a)})")
        return a[metric] > b[metric] if maximize else a[metric] < b[metric]
    return better


def uniform_soup(members: list[Member], heldout: HeldOut | None = None) -> tuple[Any, dict[str, Any]]:
    """(the mean of every member's variables, a report with held-out metrics of members and soup when scored)."""
    check_compatible(members, same_weights=True)
    soup = average([m.params for m in members])
    report: dict[str, Any] = {"method": "uniform", "members": [{"model": m.label} for m in members],
                              "used": [m.label for m in members]}
    if heldout is not None:
        for row, m in zip(report["members"], members):
            row["heldout"] = heldout(m.params)
        report["soup"] = heldout(soup)
    return soup, report


def greedy_soup(members: list[Member], heldout: HeldOut, metric: str = "loss",
                maximize: bool = False) -> tuple[Any, dict[str, Any]]:
    """Greedy soup: members ranked by held-out `metric`; starting from the best, each next one is kept only when
    the uniform average of the kept ones scores better than without it."""
    check_compatible(members, same_weights=True)
    better = _better(metric, maximize)
    scored = [(heldout(m.params), m) for m in members]
    order = sorted(range(len(scored)), key=lambda i: scored[i][0][metric], reverse=maximize)
    best_metrics, best = scored[order[0]]
    kept, soup, soup_metrics = [best], best.params, best_metrics
    steps = []
    for i in order[1:]:
        candidate = average([m.params for m in kept] + [scored[i][1].params])
        cand_metrics = heldout(candidate)
        added = better(cand_metrics, soup_metrics)
        steps.append({"model": scored[i][1].label, "soup_with_it": cand_metrics, "added": added})
        if added:
            kept.append(scored[i][1])
            soup, soup_metrics = candidate, cand_metrics
    report = {"method": "greedy", "metric": metric, "maximize": maximize,
              "members": [{"model": m.label, "heldout": s} for s, m in scored],
              "order": [scored[i][1].label for i in order], "steps": steps,
              "used": [m.label for m in kept], "soup": soup_metrics}
    return soup, report


def ema_of_checkpoints(member: Member, decay: float, heldout: HeldOut | None = None,
                       steps: Sequence[int] | None = None) -> tuple[Any, dict[str, Any]]:
    """ema ← decay·ema + (1 − decay)·checkpoint over the run's kept checkpoints, oldest first."""
    if not 0.0 <= decay < 1.0:
        raise FusionError(f"--decay {decay}: must be in [0, 1)")
    steps = list(steps) if steps is not None else checkpoint_steps(member.workdir)
    if len(steps) < 2:
        raise FusionError(f"{member.workdir} keeps {len(steps)} checkpoint(s) ({steps}): an average over a run "
                          "needs at least 2 (raise checkpoint.max_to_keep, lower checkpoint.every)")
    ema = load_step(member, steps[0])
    for step in steps[1:]:
        ema = average([ema, load_step(member, step)], [decay, 1.0 - decay])
    report: dict[str, Any] = {"method": "ema", "decay": decay, "steps": steps, "used": [member.workdir]}
    if heldout is not None:
        report["members"] = [{"model": member.label, "heldout": heldout(member.params)}]
        report["soup"] = heldout(ema)
    return ema, report


def write_soup(members: list[Member], variables: Any, out_dir: str, report: dict[str, Any]) -> Config:
    """Writes `out_dir` as a work dir holding `variables` (config and tokenizer of the first member) and
    fusion_report.json; returns the new config."""
    return write_fused_workdir(members, out_dir, members[0].loaded.model_cfg, variables, report,
                               f"{report['method']} soup", report["used"])

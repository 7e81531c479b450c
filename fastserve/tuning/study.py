"""A tuning study: Optuna samples the space, each trial trains an ordinary work dir (TUNE_DIR/trial_NNNN) and is
scored by a held-out metric.

Pruning: a trial trains in slices of `train.eval_every` steps (`train.run_steps`, the trainer's resumable stop), its
held-out metric at each slice's end is reported to Optuna, and the pruner (median or successive halving) may stop
it there. Resuming: the study lives in TUNE_DIR/study.db (sqlite); a second invocation loads it, counts finished
(complete or pruned) trials against the budget, and re-runs the parameters of a trial an interruption left
unfinished (in a new work dir). Outputs, rewritten after every trial: trials.jsonl, trials.md, best.yaml (a config
`python -m fastserve.train` runs) and objective.png (when matplotlib is installed).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from fastserve.config import Config, apply_overrides, dump_config
from fastserve.tuning.space import TuneError, TuneSpec, override

STUDY_NAME = "fastserve-tune"
FINISHED = ("COMPLETE", "PRUNED")


def _optuna():
    try:
        import optuna
    except ImportError:
        raise TuneError("fastserve.tune needs Optuna: pip install 'fastserve[tune]' (or pip install optuna)") from None
    return optuna


def config_value(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def trial_config(base: Config, params: dict[str, Any], workdir: str, slice_steps: int) -> Config:
    return apply_overrides(base, [*(override(k, v) for k, v in params.items()), override("train.workdir", workdir),
                                  override("train.run_steps", slice_steps)])


def open_study(tune_dir: str, spec: TuneSpec, seed: int) -> Any:
    optuna = _optuna()
    pruner = {"median": optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=spec.prune_from_step),
              "halving": optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, spec.prune_from_step)),
              "none": optuna.pruners.NopPruner()}[spec.pruner]
    os.makedirs(tune_dir, exist_ok=True)
    storage = f"sqlite:///{os.path.abspath(os.path.join(tune_dir, 'study.db'))}"
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction=spec.direction,
                                sampler=optuna.samplers.TPESampler(seed=seed), pruner=pruner, load_if_exists=True)
    if study.direction.name.lower() != spec.direction:
        raise TuneError(f"{tune_dir} holds a study that {study.direction.name.lower()}s; this space says "
                        f"{spec.direction}: use another --out")
    return study


def requeue_interrupted(study: Any) -> int:
    """Trials an interruption left RUNNING are marked failed and their parameters queued again; how many."""
    optuna = _optuna()
    stale = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    for t in stale:
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"rerun_of": t.number}, skip_if_exists=False)
    return len(stale)


def finished_count(study: Any) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state.name in FINISHED)


def make_objective(base: Config, spec: TuneSpec, tune_dir: str):
    """The Optuna objective: sample, train slice by slice with pruning, return the final held-out metric."""
    from fastserve.core.trainer import train

    optuna = _optuna()
    slice_steps = max(1, base.train.eval_every)

    def objective(trial: Any) -> float:
        params = {p.key: p.suggest(trial) for p in spec.params}
        workdir = os.path.join(tune_dir, f"trial_{trial.number:04d}")
        trial.set_user_attr("workdir", workdir)
        cfg = trial_config(base, params, workdir, slice_steps)
        t0, cpu0 = time.time(), time.process_time()
        while True:
            results = train(cfg)
            metrics = results.get("eval") or {}
            if spec.objective not in metrics:
                raise TuneError(f"objective '{spec.objective}' is not a held-out metric of this task (it reports "
                                f"{sorted(metrics) or 'none: is data.eval_fraction 0?'})")
            value = float(metrics[spec.objective])
            trial.report(value, results["step"])
            trial.set_user_attr("step", int(results["step"]))
            trial.set_user_attr("heldout", {k: float(v) for k, v in metrics.items()})
            trial.set_user_attr("seconds", round(time.time() - t0, 1))
            # CPU seconds of all threads: on a shared machine wall time overstates what the trial costs
            trial.set_user_attr("cpu_seconds", round(time.process_time() - cpu0, 1))
            if not math.isfinite(value):
                raise optuna.TrialPruned(f"{spec.objective} is {value}")
            if not results["stopped_early"]:
                return value
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {results['step']}")

    return objective


def trial_rows(study: Any, spec: TuneSpec) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        rows.append({"trial": t.number, "state": t.state.name, "value": t.value if t.value is not None else last,
                     "step": t.user_attrs.get("step"), "params": t.params, "heldout": t.user_attrs.get("heldout"),
                     "seconds": t.user_attrs.get("seconds"), "cpu_seconds": t.user_attrs.get("cpu_seconds"),
                     "workdir": t.user_attrs.get("workdir"),
                     "baseline": bool(t.user_attrs.get("baseline")), "rerun_of": t.user_attrs.get("rerun_of")})
    return rows


def write_outputs(study: Any, spec: TuneSpec, base: Config, tune_dir: str) -> dict[str, Any]:
    """trials.jsonl, trials.md, best.yaml, objective.png; returns a summary (best trial, paths)."""
    rows = trial_rows(study, spec)
    with open(os.path.join(tune_dir, "trials.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    keys = [p.key for p in spec.params]
    lines = [f"| trial | state | {spec.objective} | step | " + " | ".join(keys) + " | s | CPU s |",
             "|---" * (len(keys) + 6) + "|"]
    for r in rows:
        value = f"{r['value']:.4f}" if isinstance(r["value"], float) else ""
        params = " | ".join(_short(r["params"].get(k)) for k in keys)
        tag = " (baseline)" if r["baseline"] else ""
        lines.append(f"| {r['trial']}{tag} | {r['state']} | {value} | {r['step'] or ''} | {params} | "
                     f"{r['seconds'] or ''} | {r['cpu_seconds'] or ''} |")
    with open(os.path.join(tune_dir, "trials.md"), "w") as f:
        f.write(f"# {spec.direction} held-out {spec.objective}\n\n" + "\n".join(lines) + "\n")
    summary: dict[str, Any] = {"trials": len(rows), "finished": finished_count(study)}
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    if complete:
        best = study.best_trial
        best_cfg = apply_overrides(base, [*(override(k, v) for k, v in best.params.items()),
                                          override("train.workdir", os.path.join(tune_dir, "best"))])
        best_path = os.path.join(tune_dir, "best.yaml")
        with open(best_path, "w") as f:
            f.write(f"# best of {len(complete)} complete trials of fastserve.tune ({spec.direction} held-out "
                    f"{spec.objective} = {best.value:.4f}, trial {best.number}: {json.dumps(best.params)})\n"
                    f"#   python -m fastserve.train --config {best_path}\n")
            f.write(dump_config(best_cfg))
        summary.update(best_trial=best.number, best_value=best.value, best_params=best.params, best_config=best_path)
        baseline = [r for r in complete if r["baseline"]]
        if baseline:
            summary["baseline_value"] = baseline[0]["value"]
    summary["plot"] = plot_objective(rows, spec, tune_dir)
    return summary


def plot_objective(rows: list[dict[str, Any]], spec: TuneSpec, tune_dir: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("tune: matplotlib is not installed; skipping objective.png (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
        pts = [(r["trial"], r["value"]) for r in rows if r["state"] == state and isinstance(r["value"], float)]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, label=state.lower())
    ax.set_xlabel("trial")
    ax.set_ylabel(f"held-out {spec.objective}")
    ax.legend()
    path = os.path.join(tune_dir, "objective.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def tune(base: Config, spec: TuneSpec, tune_dir: str, seed: int = 0) -> dict[str, Any]:
    """Runs (or resumes) the study until it holds `spec.trials` finished trials or `spec.timeout_s` passes."""
    _optuna()  # a clear error before any work when optuna is not installed
    cpu0 = time.process_time()
    study = open_study(tune_dir, spec, seed)
    requeued = requeue_interrupted(study)
    if spec.baseline and not study.get_trials(deepcopy=False):
        study.enqueue_trial({p.key: config_value(base, p.key) for p in spec.params}, user_attrs={"baseline": True},
                            skip_if_exists=True)
    remaining = spec.trials - finished_count(study)
    if remaining > 0:
        def after_trial(study, frozen):
            write_outputs(study, spec, base, tune_dir)
        study.optimize(make_objective(base, spec, tune_dir), n_trials=remaining,
                       timeout=spec.timeout_s or None, callbacks=[after_trial], catch=())
    summary = write_outputs(study, spec, base, tune_dir)
    return {**summary, "requeued": requeued, "ran": max(remaining, 0), "dir": tune_dir,
            "cpu_seconds": round(time.process_time() - cpu0, 1)}


__all__ = ["tune", "open_study", "write_outputs", "trial_config"]

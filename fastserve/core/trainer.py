"""Training, run by `python -m fastserve.train --config configs/quickstart.yaml [key=value ...]`.

Reads top to bottom, for every model family and task: task → data → mesh and state (resuming the work dir's latest
checkpoint) → the task's state → compiled steps → the loop (train, log, evaluate, checkpoint; stop cleanly on
SIGTERM/Ctrl-C, refuse to go on after a NaN) → what the task shows at the end.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Sequence

import jax
import numpy as np

from fastserve import cli, parallel
from fastserve.config import Config, dump_config
from fastserve.core.checkpoint import CheckpointError
from fastserve.core.monitor import Monitor
from fastserve.core.perf import PeakFlops
from fastserve.core.setup import prepare_state
from fastserve.core.state import merge_trees
from fastserve.core.steps import make_eval_step, make_train_step, split_micro_batches
from fastserve.data.dataset import fill_model_config
from fastserve.tasks import make_task

log = logging.getLogger("fastserve.train")


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; nothing was saved after the last good checkpoint."""


class _StopFlag:
    """SIGTERM / Ctrl-C ask the loop to save and stop at the next step boundary instead of dying mid-write."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C: stop waiting for the step boundary
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def evaluate_params(eval_step, variables, batches, task, mesh, task_state) -> dict[str, float]:
    """Metric sums over every held-out batch, summarized by the task."""
    total: dict[str, Any] = {}
    for batch in batches:
        sums = jax.device_get(eval_step(variables, parallel.host_to_global(batch, mesh), task_state))
        for k, v in sums.items():  # float64 on the host: long evaluations add up exactly enough
            total[k] = total.get(k, 0.0) + np.asarray(v, np.float64)
    return task.summarize(total) if total else {}


def format_metrics(metrics: dict[str, float], names: Sequence[str]) -> str:
    return ", ".join(f"{n} {metrics[n]:.4f}" for n in names if n in metrics)


def train(cfg: Config) -> dict[str, Any]:
    """Runs (or resumes) the training described by `cfg`; returns the final metrics."""
    parallel.initialize_distributed(cfg.distributed)
    parallel.enable_compilation_cache()
    os.makedirs(cfg.train.workdir, exist_ok=True)
    task = make_task(cfg.train.task)
    cfg = task.configure(cfg)

    # 1. Data: the configured source's resumable batches and held-out split; it fills what it determines in the
    #    model config (vocabulary size, number of classes).
    data = cfg.data.load(cfg)
    cfg = dataclasses.replace(cfg, model=fill_model_config(cfg.model, data.model_fields))
    if jax.process_index() == 0:
        with open(os.path.join(cfg.train.workdir, "config.yaml"), "w") as f:
            f.write(dump_config(cfg))

    # 2. Mesh, model state and optimizer state; resume from the newest readable checkpoint; the task's state.
    setup = prepare_state(cfg)
    mesh, state, ckpt = setup.mesh, setup.state, setup.checkpointer
    if setup.data_state is not None:
        data.train.set_state(setup.data_state)
    task_state, task_shardings = task.init_state(cfg, mesh)

    # 3. Compiled steps.
    train_step = make_train_step(setup.graphdef, task, setup.tx, setup.schedule, setup.shardings, mesh, task_shardings)
    variable_shardings = merge_trees(setup.shardings["params"], setup.shardings["model_state"])
    eval_step = make_eval_step(setup.graphdef, task, variable_shardings, mesh, task_shardings)

    def variables(state):
        return merge_trees(state["params"], state["model_state"])

    # 4. Accounting: the task's throughput unit and FLOPs per unit; the matmul peak MFU is stated against.
    flops_per_unit = task.flops_per_unit(cfg)
    peak = PeakFlops(cfg.log.peak_flops, getattr(cfg.model, "dtype", "float32")) if flops_per_unit else None
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    monitor = Monitor(cfg.train.workdir, cfg.train.steps, setup.start_step, cfg.log.progress, cfg.log.tensorboard)
    monitor.print(f"fastserve: {n_params / 1e6:.2f}M parameters, mesh {dict(mesh.shape)}, task {task.name}, "
                  f"{data.description}, " + (f"resuming at step {setup.start_step}" if setup.start_step else "fresh start")
                  + (f"; {peak.describe()}" if peak else "") + (f"; {setup.init_note}" if setup.init_note else ""))

    # 5. The loop (a fresh run first measures the held-out metrics of the untrained model: the baseline to beat).
    step = setup.start_step
    last_eval: dict[str, float] = {}
    if step == 0 and data.eval:
        initial_eval = evaluate_params(eval_step, variables(state), data.eval, task, mesh, task_state)
        initial_eval.update(task.heldout_extra(setup.graphdef, variables(state), data, mesh, cfg))
        monitor.write(0, "eval", initial_eval)
        monitor.print(f"step 0: held-out {format_metrics(initial_eval, task.report)}")
    last: dict[str, float] = {}
    window_time, window_units = 0.0, 0
    stopped_early = False
    unit_rate = f"{task.unit}_per_s"
    try:
        with _StopFlag() as stop:
            while step < cfg.train.steps:
                host_batch = next(data.train)
                if step == setup.start_step:
                    task.check_batch(host_batch)
                batch = parallel.host_to_global(split_micro_batches(host_batch, cfg.train.grad_accum), mesh, leading=1)
                t0 = time.perf_counter()
                state, metrics = train_step(state, batch, task_state)
                metrics = jax.device_get(metrics)
                window_time += time.perf_counter() - t0
                window_units += task.units(host_batch) * jax.process_count()
                step += 1
                loss = float(metrics["loss_sum"]) / max(float(metrics["weight"]), 1e-9)
                grad_norm = float(metrics["grad_norm"])
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    raise TrainingDiverged(
                        f"loss became {loss} (grad norm {grad_norm}) at step {step}; stopped without saving. The last "
                        f"good checkpoint (step {ckpt.latest_step()}) in {ckpt.directory} is intact: lower "
                        f"optimizer.learning_rate or raise optimizer.warmup_steps, then re-run to resume from it.")
                last = {"loss": loss, "grad_norm": grad_norm, "learning_rate": float(metrics["learning_rate"])}
                if step % cfg.log.every == 0 or step == cfg.train.steps:
                    rate = window_units / max(window_time, 1e-9)
                    last[unit_rate] = rate
                    shown = {"loss": f"{loss:.3f}", f"{task.unit}/s": f"{rate:,.0f}"}
                    if flops_per_unit:
                        last["mfu"] = peak.mfu(rate * flops_per_unit, mesh.size)
                        shown["mfu"] = f"{last['mfu']:.0%}"
                    if "perplexity" in task.report:
                        last["perplexity"] = math.exp(min(loss, 80.0))
                    monitor.write(step, "train", last)
                    monitor.progress(step, shown)
                    window_time, window_units = 0.0, 0
                if data.eval and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
                    last_eval = evaluate_params(eval_step, variables(state), data.eval, task, mesh, task_state)
                    last_eval.update(task.heldout_extra(setup.graphdef, variables(state), data, mesh, cfg))
                    monitor.write(step, "eval", last_eval)
                    monitor.print(f"step {step}: held-out {format_metrics(last_eval, task.report)}")
                slice_done = cfg.train.run_steps > 0 and step - setup.start_step >= cfg.train.run_steps
                if step % cfg.checkpoint.every == 0 or step == cfg.train.steps or stop.requested or slice_done:
                    ckpt.save(step, state, {"data": data.train.get_state()})
                if (stop.requested or slice_done) and step < cfg.train.steps:
                    monitor.print(f"{'stop requested' if stop.requested else 'train.run_steps reached'}: saved step "
                                  f"{step} to {ckpt.directory}; re-run the same command to resume")
                    stopped_early = True
                    break
    finally:
        ckpt.close()  # waits for async saves: the run never exits with a half-written checkpoint
        monitor.close()

    results: dict[str, Any] = {"step": step, "train": last, "eval": last_eval, "stopped_early": stopped_early,
                               "params": n_params, "report": list(task.report)}
    # 6. Whatever the task shows once training ends (LM: sampled continuations; every process computes them).
    if not stopped_early:
        extra = task.after_training(setup.graphdef, variables(state), data, mesh, cfg)
        results.update(extra)
        if jax.process_index() == 0:
            for prompt, completion in extra.get("samples", []):
                print(f"\n>>> {prompt!r}\n{prompt}{completion}", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    cfg = cli.parse(argv, "Train a model described by a config file.")
    try:
        results = train(cfg)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, CheckpointError) as e:  # bad data, work dir or teacher: a message
        log.debug("training refused", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return 2
    ev = results.get("eval") or {}
    if ev and jax.process_index() == 0:
        print(f"\nfinal held-out {format_metrics(ev, results['report'])} at step {results['step']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

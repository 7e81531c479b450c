"""Training, run by `python -m fastserve.train --config configs/quickstart.yaml [key=value ...]`.

Reads top to bottom: data → mesh and state (resuming the work dir's latest checkpoint) → compiled steps → the loop
(train, log, evaluate, checkpoint; stop cleanly on SIGTERM/Ctrl-C, refuse to go on after a NaN) → final samples.
`train.task: distill` also loads the teacher work dir (`distill.teacher`) onto the same mesh; its params are an
argument of the compiled steps (the task's `task_state`).
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
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fastserve import cli, parallel
from fastserve.config import Config, SourceConfig, dump_config
from fastserve.generation import decoding as infer
from fastserve.core.steps import make_eval_step, make_train_step, split_micro_batches
from fastserve.tasks import make_task
from fastserve.models import count_flops_per_token
from fastserve.core.monitor import Monitor
from fastserve.core.perf import measure_matmul_peak
from fastserve.core.setup import prepare_lm_data, prepare_state, with_vocab

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


def evaluate_params(eval_step, params, batches, task, mesh, task_state=None) -> dict[str, float]:
    """Metric sums over every held-out batch, summarized by the task (loss, perplexity, accuracy)."""
    total: dict[str, float] = {}
    extra = () if task_state is None else (task_state,)
    for batch in batches:
        sums = jax.device_get(eval_step(params, parallel.host_to_global(batch, mesh), *extra))
        for k, v in sums.items():
            total[k] = total.get(k, 0.0) + float(v)
    return task.summarize(total) if total else {}


def sample_continuations(graphdef, params, tokenizer, texts: list[str], mesh, n: int, max_new: int,
                         temperature: float, seed: int) -> list[tuple[str, str]]:
    """A few continuations of held-out text openings: a human-readable check of what the model learned."""
    prompts = [p for p in (tokenizer.encode(t)[:12] for t in texts) if p][:n]
    if not prompts:
        return []
    if tokenizer.bos_id >= 0:
        prompts = [[tokenizer.bos_id] + p for p in prompts]
    tokens, lengths = infer.pad_prompts(prompts, pad_id=max(tokenizer.pad_id, 0))
    b = len(prompts)
    stop = np.array([tokenizer.eos_id], np.int32)

    @jax.jit
    def run(params, tokens, lengths, rng):
        model = nnx.merge(graphdef, params)
        return infer.generate(model, tokens, lengths, rng, max_new_tokens=max_new,
                              temperature=jnp.full((b,), temperature), top_k=jnp.full((b,), 40, jnp.int32),
                              top_p=jnp.full((b,), 0.95), stop_tokens=stop)

    rep = parallel.replicated(mesh)
    args = [jax.make_array_from_process_local_data(rep, x) for x in (tokens, lengths)]
    with jax.set_mesh(mesh):
        out, count = jax.device_get(run(params, *args, jax.random.key(seed)))
    results = []
    for p, row, c in zip(prompts, out, count):
        p = [t for t in p if t != tokenizer.bos_id]
        results.append((tokenizer.decode(p), tokenizer.decode([int(t) for t in row[:c] if t != tokenizer.eos_id])))
    return results


def _check_trainable_workdir(cfg: Config) -> Config:
    """Refuses work dirs the data pipeline cannot feed; a distilled student shares the teacher's tokenizer."""
    from fastserve.workdir import BPE_TOKENIZER_FILE

    if os.path.isfile(os.path.join(cfg.train.workdir, BPE_TOKENIZER_FILE)):
        raise ValueError(f"{cfg.train.workdir} holds an imported byte-level BPE model ({BPE_TOKENIZER_FILE}): the "
                         "training data pipeline reads sentencepiece tokenizers only, so it cannot be fine-tuned "
                         "here (generate / export / serve it instead)")
    if cfg.train.task == "distill":
        if not cfg.distill.teacher:
            raise ValueError("train.task=distill needs distill.teacher (a trained fastserve work dir)")
        teacher_tok = os.path.join(cfg.distill.teacher, "tokenizer.model")
        if not cfg.tokenizer.path and os.path.isfile(teacher_tok):
            cfg = dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, path=teacher_tok))
    return cfg


def load_teacher(cfg: Config, student_tokenizer: Any) -> Any:
    """The `distill.teacher` work dir's model (inference.load_model, on the mesh of `cfg.mesh`), checked against
    the student's vocabulary and tokenizer."""
    from fastserve.workdir import load_model

    teacher = load_model(dataclasses.replace(cfg, source=SourceConfig(kind="checkpoint", path=cfg.distill.teacher)))
    if teacher.model_cfg.vocab_size != cfg.model.vocab_size:
        raise ValueError(f"distill.teacher {cfg.distill.teacher}: vocabulary {teacher.model_cfg.vocab_size} differs "
                         f"from the student's model.vocab_size={cfg.model.vocab_size}")
    same = getattr(teacher.tokenizer, "model_proto", None) == getattr(student_tokenizer, "model_proto", None)
    if not same:
        raise ValueError(f"distill.teacher {cfg.distill.teacher}: its tokenizer differs from the student's "
                         f"(leave tokenizer.path empty to use the teacher's)")
    return teacher


def train(cfg: Config) -> dict[str, Any]:
    """Runs (or resumes) the training described by `cfg`; returns the final metrics."""
    parallel.initialize_distributed(cfg.distributed)
    parallel.enable_compilation_cache()
    os.makedirs(cfg.train.workdir, exist_ok=True)
    cfg = _check_trainable_workdir(cfg)

    # 1. Data: corpus, held-out split, tokenizer (cached), packed sequences.
    data = prepare_lm_data(cfg)
    cfg = with_vocab(cfg, data.tokenizer)
    if jax.process_index() == 0:
        with open(os.path.join(cfg.train.workdir, "config.yaml"), "w") as f:
            f.write(dump_config(cfg))

    # 2. Mesh, model and optimizer state; resume from the newest readable checkpoint.
    setup = prepare_state(cfg)
    mesh, state, ckpt = setup.mesh, setup.state, setup.checkpointer
    if setup.data_state is not None:
        data.train.set_state(setup.data_state)
    task_state = task_state_shardings = None
    if cfg.train.task == "distill":
        teacher = load_teacher(cfg, data.tokenizer)
        task = make_task("distill", teacher_graphdef=teacher.graphdef, temperature=cfg.distill.temperature,
                         alpha=cfg.distill.alpha)
        task_state = teacher.params
        task_state_shardings = jax.tree.map(lambda x: x.sharding, task_state)
    else:
        task = make_task(cfg.train.task)
    extra = () if task_state is None else (task_state,)

    # 3. Compiled steps.
    train_step = make_train_step(setup.graphdef, task, setup.tx, setup.schedule, setup.shardings, mesh,
                                 task_state_shardings)
    eval_step = make_eval_step(setup.graphdef, task, setup.shardings["params"], mesh, task_state_shardings)

    # 4. Accounting: tokens per step, FLOPs per token, and the matmul peak MFU is stated against (measured now).
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    flops_per_token = count_flops_per_token(cfg.model, cfg.data.seq_len)
    peak = cfg.log.peak_flops or measure_matmul_peak()
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    monitor = Monitor(cfg.train.workdir, cfg.train.steps, setup.start_step, cfg.log.progress, cfg.log.tensorboard)
    monitor.print(f"fastserve: {n_params / 1e6:.2f}M parameters, mesh {dict(mesh.shape)}, "
                  f"{data.train_rows} train / {data.eval_rows} held-out sequences of {cfg.data.seq_len} tokens, "
                  f"vocab {cfg.model.vocab_size}, "
                  + (f"resuming at step {setup.start_step}" if setup.start_step else "fresh start"))

    # 5. The loop (a fresh run first measures the held-out loss of the untrained model: the baseline it must beat).
    step = setup.start_step
    last_eval: dict[str, float] = {}
    if step == 0 and data.eval:
        initial_eval = evaluate_params(eval_step, state["params"], data.eval, task, mesh, task_state)
        monitor.write(0, "eval", initial_eval)
        monitor.print(f"step 0: held-out loss {initial_eval['loss']:.4f}, perplexity {initial_eval['perplexity']:.2f}")
    last: dict[str, float] = {}
    window_time, window_steps = 0.0, 0
    stopped_early = False
    try:
        with _StopFlag() as stop:
            while step < cfg.train.steps:
                batch = parallel.host_to_global(split_micro_batches(next(data.train), cfg.train.grad_accum),
                                                mesh, leading=1)
                t0 = time.perf_counter()
                state, metrics = train_step(state, batch, *extra)
                metrics = jax.device_get(metrics)
                window_time += time.perf_counter() - t0
                window_steps += 1
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
                    tps = tokens_per_step * window_steps / max(window_time, 1e-9)
                    last.update(perplexity=math.exp(min(loss, 80.0)), tokens_per_s=tps,
                                mfu=tps * flops_per_token / (peak * mesh.size))
                    monitor.write(step, "train", last)
                    monitor.progress(step, {"loss": f"{loss:.3f}", "tok/s": f"{tps:,.0f}", "mfu": f"{last['mfu']:.0%}"})
                    window_time, window_steps = 0.0, 0
                if data.eval and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
                    last_eval = evaluate_params(eval_step, state["params"], data.eval, task, mesh, task_state)
                    monitor.write(step, "eval", last_eval)
                    monitor.print(f"step {step}: held-out loss {last_eval['loss']:.4f}, "
                                  f"perplexity {last_eval['perplexity']:.2f}")
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
                               "params": n_params}
    # 6. A few sampled continuations of held-out openings (every process computes, process 0 prints).
    if not stopped_early and cfg.train.samples > 0:
        samples = sample_continuations(setup.graphdef, state["params"], data.tokenizer, data.eval_texts or ["The"],
                                       mesh, cfg.train.samples, cfg.train.sample_tokens, cfg.train.sample_temperature,
                                       cfg.train.seed)
        results["samples"] = samples
        if jax.process_index() == 0:
            for prompt, completion in samples:
                print(f"\n>>> {prompt!r}\n{prompt}{completion}", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    cfg = cli.parse(argv, "Train a model described by a config file.")
    try:
        results = train(cfg)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    ev = results.get("eval") or {}
    if ev and jax.process_index() == 0:
        print(f"\nfinal held-out loss {ev['loss']:.4f}, perplexity {ev['perplexity']:.2f} at step {results['step']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

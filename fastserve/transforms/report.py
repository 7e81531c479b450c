"""Compress a trained or imported model into a new work dir, and measure what it cost:

    python -m fastserve.compress --config FILE --checkpoint WORKDIR --out NEW_WORKDIR [key=value ...]
    python -m fastserve.compress --checkpoint WORKDIR --out NEW 'transforms=[{lowrank: {include: "layers.*.mlp.*", rank_ratio: 0.25}}]'
    python -m fastserve.compress --config configs/smollm2_135m.yaml --out NEW 'transforms=[{quantize: {bits: 8}}]'

Loads `source` (a fastserve work dir given by --checkpoint, or a GGUF / HF import), applies the config's
`transforms` (fastserve.transforms: lowrank / quantize / prune, in order) and writes NEW_WORKDIR as an ordinary work
dir: `config.yaml` (model.compressed and vocab_size filled, train.workdir = NEW_WORKDIR, source = that work dir,
transforms = [] since they are applied), the tokenizer (`tokenizer.model`, or `tokenizer.bpe.json` for an imported
byte-level BPE), and an orbax checkpoint at step 0 holding the full train state (the compressed params, a fresh
optimizer state of `create_train_state`'s layout, step 0). So

    python -m fastserve.train --config NEW_WORKDIR/config.yaml train.steps=200    # recovery fine-tune, from step 0
    python -m fastserve.generate --checkpoint NEW_WORKDIR --prompt ...             # and export, serve

work on it directly. int8 layers are inference-only: their work dir holds the params without an optimizer state
and the trainer refuses it. It then prints parameters, bytes, held-out loss / perplexity (the pipeline's held-out
split: `data`, `train.seed`; by default for sentencepiece work dirs) and greedy batch-1 decode tokens/s (median
step of a fixed prompt), each before, after and as a ratio, and writes them with the per-layer transform report to
NEW_WORKDIR/compression_report.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fastserve import cli, parallel
from fastserve.core.checkpoint import CheckpointError, Checkpointer
from fastserve.config import Config, ConfigError, SourceConfig, dump_config, load_config
from fastserve.generation import decoding as infer
from fastserve.core.optim import make_optimizer
from fastserve.core.state import abstract_model_split, opt_state_shardings, split_like
from fastserve.core.steps import make_eval_step
from fastserve.generation.program import model_program
from fastserve.tasks.lm import LanguageModeling


REPORT_FILE = "compression_report.json"
DECODE_PROMPT = "The following section of the documentation describes how"
DECODE_REPEATS = 3
RATIO_KEYS = ("parameters", "bytes", "loss", "perplexity", "accuracy", "decode_step_s", "decode_tokens_per_s")


class CompressError(ValueError):
    """Options, a source or an output directory that cannot be compressed as asked."""


# ----------------------------------------------------------------------------------------------- measuring

def param_stats(params: Any) -> dict[str, int]:
    leaves = jax.tree.leaves(params)
    return {"parameters": int(sum(int(np.prod(x.shape)) for x in leaves)),
            "bytes": int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves))}


def heldout_batches(cfg: Config, tokenizer: Any, max_batches: int = 0) -> list[dict[str, np.ndarray]]:
    """The training pipeline's held-out split (`data.source`, `data.eval_fraction`, `train.seed`), tokenized with
    `tokenizer` and packed to `data.seq_len` rows, as fastserve.data.text.prepare_lm_data builds it; [] if none."""
    from fastserve.data import load_texts, split_documents
    from fastserve.data.text import heldout_lm_batches

    docs = load_texts(cfg.data.source, cfg.data.paths)
    _, held_out = split_documents(docs, cfg.data.eval_fraction, cfg.train.seed)
    return heldout_lm_batches(cfg, tokenizer, held_out, max_batches)[0]


def heldout_metrics(graphdef: Any, params: Any, batches: list, mesh: Any) -> dict[str, float]:
    """Held-out loss / perplexity / token accuracy of a model (the lm task's eval step)."""
    from fastserve.core.trainer import evaluate_params

    task = LanguageModeling()
    step = make_eval_step(graphdef, task, jax.tree.map(lambda x: x.sharding, params), mesh)
    m = evaluate_params(step, params, batches, task, mesh, {})
    return {"loss": m["loss"], "perplexity": m["perplexity"], "accuracy": m["accuracy"]}


def decode_speed(graphdef: Any, params: Any, prompt_ids: Sequence[int], new_tokens: int, mesh: Any,
                 max_seq_len: int) -> dict[str, float]:
    """Greedy decoding at batch 1 of a fixed prompt: the median decode step (seconds) over `new_tokens` steps,
    median again over a few rounds; tokens/s = 1 / that. One host transfer per step, as a serving loop has."""
    prompt = np.asarray([list(prompt_ids)], np.int32)
    lengths = np.asarray([prompt.shape[1]], np.int32)
    new_tokens = max(2, min(new_tokens, max_seq_len - prompt.shape[1]))
    cache_len = prompt.shape[1] + new_tokens

    prefill = model_program(graphdef, lambda model, tokens, lengths: infer.prefill(
        model, tokens, lengths, model.init_cache(tokens.shape[0], cache_len)))
    decode = model_program(graphdef, infer.decode, donate_argnums=3)

    def run(n):
        logits, cache = prefill(params, prompt, lengths)
        tok = np.asarray(jnp.argmax(logits, axis=-1).astype(jnp.int32))
        pos, times = lengths.copy(), []
        for _ in range(n - 1):
            t = time.perf_counter()
            logits, cache = decode(params, tok, pos, cache)
            tok = np.asarray(jnp.argmax(logits, axis=-1).astype(jnp.int32))
            times.append(time.perf_counter() - t)
            pos = pos + 1
        return statistics.median(times)

    with jax.set_mesh(mesh):
        run(3)  # compile + warm up
        step = statistics.median(run(new_tokens) for _ in range(DECODE_REPEATS))
    return {"decode_step_s": step, "decode_tokens_per_s": 1.0 / step, "decode_new_tokens": new_tokens,
            "decode_prompt_tokens": int(prompt.shape[1])}


def measure(graphdef: Any, params: Any, model_cfg: Any, mesh: Any, batches: list, prompt_ids: Sequence[int],
            decode_tokens: int) -> dict[str, Any]:
    """parameters, bytes, held-out loss/perplexity (when `batches`), decode tokens/s (when decode_tokens > 0)."""
    out: dict[str, Any] = dict(param_stats(params))
    if batches:
        out.update(heldout_metrics(graphdef, params, batches, mesh))
    if decode_tokens > 0:
        out.update(decode_speed(graphdef, params, prompt_ids, decode_tokens, mesh, model_cfg.max_seq_len))
    return out


# ------------------------------------------------------------------------------------------- the work dir

def _is_sentencepiece(tokenizer: Any) -> bool:
    return getattr(tokenizer, "export_file", lambda: ("",))()[0] == "sentencepiece"


def write_workdir(cfg: Config, out_dir: str, model_cfg: Any, params: Any, tokenizer: Any, mesh: Any,
                  provenance: dict[str, Any]) -> Config:
    """Writes `out_dir` as a work dir (config.yaml, tokenizer, step-0 checkpoint); returns its config."""
    from fastserve.workdir import BPE_TOKENIZER_FILE

    os.makedirs(out_dir, exist_ok=True)
    if _is_sentencepiece(tokenizer):
        tok_path = os.path.join(out_dir, "tokenizer.model")
        with open(tok_path, "wb") as f:
            f.write(tokenizer.model_proto)
    else:  # an imported byte-level BPE: its whole definition as one JSON (inference._load_checkpoint reads it)
        tok_path = os.path.join(out_dir, BPE_TOKENIZER_FILE)
        with open(tok_path, "w", encoding="utf-8") as f:
            f.write(tokenizer.to_json())
    new_cfg = dataclasses.replace(
        cfg, model=model_cfg, train=dataclasses.replace(cfg.train, workdir=out_dir),
        # the trainer reads exactly this tokenizer (never retrains one over it)
        tokenizer=dataclasses.replace(cfg.tokenizer, path=tok_path, vocab_size=int(tokenizer.vocab_size)),
        source=SourceConfig(kind="checkpoint", path="", dtype=cfg.source.dtype),
        # the mesh it ran on when the configured one does not fit this machine (make_tool_mesh fell back)
        mesh=cfg.mesh if parallel.mesh_fits(cfg.mesh) else dataclasses.replace(
            cfg.mesh, **{axis: int(mesh.shape[axis]) for axis in parallel.MESH_AXES}),
        transforms=[])  # applied: recorded in model.compressed (and compression_report.json)
    with open(os.path.join(out_dir, "config.yaml"), "w") as f:
        f.write(f"# written by fastserve.compress from {provenance.get('source')}: transforms "
                f"{json.dumps(provenance.get('transforms'))} (applied; see {REPORT_FILE})\n")
        f.write(dump_config(new_cfg))

    seed = new_cfg.train.seed
    params, model_state = split_like(params, abstract_model_split(model_cfg)[1])
    state: dict[str, Any] = {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": model_state,
                             "rng": jax.random.key_data(jax.random.key(seed + 1))}
    int8 = [p for p, e in model_cfg.compressed.items() if e.get("kind") == "int8"]
    if not int8:  # the layout create_train_state gives a fresh run, so `fastserve.train` resumes it at step 0
        tx, _ = make_optimizer(new_cfg.optimizer, new_cfg.train.steps, new_cfg.model)   # the layout train resumes
        p_shard = jax.tree.map(lambda x: x.sharding, params)
        with jax.set_mesh(mesh):
            state["opt_state"] = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params, p_shard, mesh))(params)
        state = {k: state[k] for k in ("step", "params", "model_state", "opt_state", "rng")}
    ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"), max_to_keep=new_cfg.checkpoint.max_to_keep,
                        async_save=False)
    ckpt.save(0, state, {"compressed_from": provenance})
    ckpt.close()
    return new_cfg


# ------------------------------------------------------------------------------------------------ compress

def transform_loaded(loaded: Any, specs: list[dict], cfg: Config | None = None) -> tuple[Any, Any, Any, list[dict]]:
    """(new model config, graphdef, params placed on the loaded model's mesh, per-layer report) of a loaded model.
    `cfg` (its `data` section) supplies calibration text to activation-aware transforms."""
    from fastserve.workdir import place_params
    from fastserve.transforms import TransformError, apply_transforms
    from fastserve.transforms.calibration import lm_calibration

    try:
        calibrate = lm_calibration(cfg, loaded) if cfg is not None else None
        new_model_cfg, new_params, layers = apply_transforms(loaded.model_cfg, loaded.params, specs, calibrate)
    except (TransformError, ValueError) as e:
        raise CompressError(str(e)) from None
    graphdef, placed = place_params(new_params, new_model_cfg, loaded.mesh)
    return new_model_cfg, graphdef, placed, layers


def transformed(loaded: Any, cfg: Config) -> Any:
    """`loaded` (a LoadedModel) with `cfg.transforms` applied in memory, or `loaded` itself when there are none:
    what `python -m fastserve.serve` does at load, so a config can serve e.g. a W8A8 model straight from its
    GGUF (configs/serve_smollm2_w8a8.yaml)."""
    if not cfg.transforms:
        return loaded
    model_cfg, graphdef, params, _ = transform_loaded(loaded, cfg.transforms, cfg)
    return dataclasses.replace(loaded, model_cfg=model_cfg, graphdef=graphdef, params=params)


def decode_prompt_ids(tokenizer: Any) -> list[int]:
    ids = tokenizer.encode(DECODE_PROMPT)
    return [tokenizer.bos_id] + ids if tokenizer.bos_id >= 0 and getattr(tokenizer, "add_bos", True) else ids


def compress(cfg: Config, out_dir: str, *, heldout: bool | None = None, decode_tokens: int = 32,
             eval_batches: int = 0, loaded: Any = None, before: dict[str, Any] | None = None) -> dict[str, Any]:
    """Loads `cfg.source`, applies `cfg.transforms`, writes `out_dir` (see the module doc); returns the report.

    heldout: measure held-out loss before and after (None: when the source is a sentencepiece work dir).
    decode_tokens: greedy steps timed at batch 1 (0: skip). eval_batches: cap on held-out batches (0: all).
    loaded / before: an already loaded source (inference.load_model) and its measurements, to reuse (benchmarks).
    """
    from fastserve.workdir import load_model

    if not cfg.transforms:
        raise CompressError("no transforms to apply: set `transforms` in the config or as an override, e.g. "
                            "'transforms=[{lowrank: {include: \"layers.*.mlp.*\", rank_ratio: 0.25}}]'")
    source_dir = os.path.abspath(cfg.source.path or cfg.train.workdir) if cfg.source.kind == "checkpoint" else None
    if source_dir and os.path.abspath(out_dir) in (source_dir, os.path.join(source_dir, "checkpoints")):
        raise CompressError(f"--out {out_dir} is the source work dir: write the compressed model to a new one")
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise CompressError(f"--out {out_dir} already holds checkpoints: choose a new directory (training would "
                            "resume the newest of them)")

    t0 = time.perf_counter()
    loaded = loaded if loaded is not None else load_model(cfg)
    new_model_cfg, graphdef, placed, layers = transform_loaded(loaded, cfg.transforms, cfg)
    transform_s = time.perf_counter() - t0
    source = {"kind": cfg.source.kind, "path": source_dir or cfg.source.path, "step": loaded.step}
    provenance = {"source": source, "transforms": cfg.transforms}
    new_cfg = write_workdir(cfg, out_dir, new_model_cfg, placed, loaded.tokenizer, loaded.mesh, provenance)

    if heldout is None:
        heldout = cfg.source.kind == "checkpoint" and _is_sentencepiece(loaded.tokenizer)
    batches = heldout_batches(cfg, loaded.tokenizer, eval_batches) if heldout else []
    prompt_ids = decode_prompt_ids(loaded.tokenizer)
    if before is None:
        before = measure(loaded.graphdef, loaded.params, loaded.model_cfg, loaded.mesh, batches, prompt_ids,
                         decode_tokens)
    after = measure(graphdef, placed, new_model_cfg, loaded.mesh, batches, prompt_ids, decode_tokens)
    ratio = {k: after[k] / before[k] for k in RATIO_KEYS if k in before and k in after and before[k]}
    report = {
        "source": source, "out": os.path.abspath(out_dir), "transforms": cfg.transforms,
        "model": {"compressed": new_model_cfg.compressed},
        "heldout": ({"batches": len(batches), "tokens": int(sum(float(b["weights"].sum()) for b in batches)),
                     "data": cfg.data.source, "seq_len": cfg.data.seq_len} if batches else None),
        "decode": ({"batch": 1, "greedy": True, "prompt": DECODE_PROMPT} if decode_tokens > 0 else None),
        "before": before, "after": after, "ratio": ratio, "transform_s": round(transform_s, 2),
        "inference_only": any(e.get("kind") == "int8" for e in new_model_cfg.compressed.values()),
        "layers": layers,
        "config": os.path.join(out_dir, "config.yaml"),
    }
    with open(os.path.join(out_dir, REPORT_FILE), "w") as f:
        json.dump(report, f, indent=1, default=_jsonable)
        f.write("\n")
    report["new_config"] = new_cfg
    return report


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def format_table(report: dict[str, Any]) -> str:
    """The before / after / ratio table printed by the CLI."""
    b, a, r = report["before"], report["after"], report["ratio"]
    rows = [("parameters", "parameters", lambda v: f"{v / 1e6:.3f}M"),
            ("bytes", "bytes", lambda v: f"{v / 1e6:.2f} MB"),
            ("held-out loss", "loss", lambda v: f"{v:.4f}"),
            ("held-out perplexity", "perplexity", lambda v: f"{v:.2f}"),
            ("decode tokens/s (b=1)", "decode_tokens_per_s", lambda v: f"{v:.1f}")]
    lines = [f"{'':24}{'before':>14}{'after':>14}{'ratio':>9}"]
    for label, key, fmt in rows:
        if key in b and key in a:
            ratio = f"{r[key]:.3f}" if key in r else ""
            lines.append(f"{label:24}{fmt(b[key]):>14}{fmt(a[key]):>14}{ratio:>9}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    from fastserve.artifacts.writer import load_training_config

    p = argparse.ArgumentParser(prog="python -m fastserve.compress",
                                description="Apply the config's `transforms` (low-rank, int8, pruning) to a model "
                                            "and write the result as a new work dir, with a before/after report.")
    p.add_argument("--config", help="YAML config (default: CHECKPOINT/config.yaml of a work dir)")
    p.add_argument("--checkpoint", help="the source work dir (sets source.path; source.kind=checkpoint)")
    p.add_argument("--out", required=True, help="the new work dir to write")
    p.add_argument("--heldout", choices=("auto", "on", "off"), default="auto",
                   help="held-out loss before/after (auto: for sentencepiece work dirs)")
    p.add_argument("--eval-batches", type=int, default=0, help="cap on held-out batches (0: train.eval_batches)")
    p.add_argument("--decode-tokens", type=int, default=32, help="greedy batch-1 decode steps timed (0: skip)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. 'transforms=[{quantize: {bits: 8}}]'")
    args = p.parse_args(argv)
    cli.quiet_logs()
    try:
        overrides = list(args.overrides)
        if args.checkpoint:
            overrides += ["source.kind=checkpoint", f"source.path={args.checkpoint}"]
        if args.config is None and args.checkpoint is None:  # e.g. source.kind=gguf source.path=... on the line
            cfg = load_config(None, overrides)
        else:
            cfg = load_training_config(args.config, args.checkpoint, overrides)
        heldout = {"auto": None, "on": True, "off": False}[args.heldout]
        report = compress(cfg, args.out, heldout=heldout, decode_tokens=args.decode_tokens,
                          eval_batches=args.eval_batches)
    except (ConfigError, CompressError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    factorized = sum(1 for row in report["layers"] if row.get("action") == "factorized")
    quantized = sum(1 for row in report["layers"] if str(row.get("action", "")).startswith("quantized"))
    print(f"compressed {report['source']['kind']} {report['source']['path']} → {args.out}: {factorized} layers "
          f"factorized, {quantized} quantized int8")
    print(format_table(report))
    print(f"report: {os.path.join(args.out, REPORT_FILE)}")
    if report["inference_only"]:
        print("int8 layers: inference-only (generate / export / serve); fine-tune before quantizing")
    else:
        # imported pretrained weights: the optimizer defaults (3e-3, 50 warm-up steps) are for training from scratch
        # and would wreck them; the rate that recovered SmolLM2-135M is in docs/compression.md
        gentle = (" optimizer.learning_rate=3e-5 optimizer.warmup_steps=2 optimizer.schedule=constant"
                  if report["source"]["kind"] in ("gguf", "hf") else "")
        print(f"recover: python -m fastserve.train --config {os.path.join(args.out, 'config.yaml')} "
              f"train.steps=N{gentle}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

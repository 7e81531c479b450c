"""Export serving functions with `jax.export`: StableHLO + weights + tokenizer + manifest, runnable without model code.

    python -m fastserve.export --config FILE --checkpoint WORKDIR_OR_CKPT_DIR --out DIR \
        [--platforms cpu,cuda,tpu] [--buckets 32,64,128] [--max-new-tokens 128] [key=value ...]

What lands in DIR (read back by `fastserve.artifacts.loader.load_exported`, which imports neither flax nor the model code):

    prefill_{T}.jax_exported    (params..., tokens [B, T] i32, lengths [B] i32) → (last logits [B, V] f32, cache)
    decode.jax_exported         (params..., tokens [B] i32, positions [B] i32, cache) → (logits [B, V] f32, cache)
    generate_{T}.jax_exported   (params..., tokens [B, T], lengths [B], seed u32, temperature [B] f32, top_k [B] i32,
                                 top_p [B] f32, max_new [B] i32, stop_tokens [S] i32) → (tokens [B, N] i32, counts [B])
    forward[_{T}]               encoders, classifiers, CNNs: (params..., the model's inputs) → its outputs; an
                                encoder's once per length T (the buckets below max_seq_len, and max_seq_len)
    weights.safetensors         every parameter leaf, named by its tree path (`layers.0.attn.q.kernel`)
    tokenizer.model             the sentencepiece model
    manifest.json               shapes/dtypes of every argument and result, platforms, buckets, model config,
                                tokenizer ids, versions, and the sha256 of every file

B is a symbolic dimension ("b": any batch size, one compile per size at load time) unless fixed batch sizes are
asked for, in which case each function is exported once per size (`prefill_{T}_b{B}`, `decode_b{B}`, ...).
The KV cache is the model's own layout: for the decoder a list with one {"k", "v"} per layer, each
[B, max_cache_len, K, D]; for an ensemble the tuple of its members' caches (any pytree of [B, max_cache_len, ...]
arrays: the exported decode's own argument tree says which).
Weights are arguments, never constants: `params` is the flat list `jax.tree.leaves(params)` (the order of
`manifest["params"]["names"]`), unflattened inside each function with a treedef rebuilt from the model config.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from fastserve import cli
from fastserve.core.checkpoint import CheckpointError
from fastserve.config import Config, ConfigError, load_config
from fastserve.core.state import abstract_model
from fastserve.data.tokenizer import Tokenizer
from fastserve.artifacts.functions import batch_variants, build_functions, describe, export_one, plan_exports
from fastserve.artifacts.options import ExportError, ExportOptions
from fastserve.models import build_model
from fastserve.models import capabilities as caps
from fastserve.models.capabilities import capability
from fastserve.models.layer_stack import as_per_layer
from fastserve.artifacts.manifest import EXPORTED_SUFFIX, FORMAT_VERSION, WEIGHTS_FILE
# the files every export writes (fusion/ensemble.py writes its own export with them too)
from fastserve.artifacts.files import (check_params as _check_params, finish as _finish, param_names,
                                      params_entry as _params_entry, prepare_dir as _prepare_dir, save_weights,
                                      tokenizer_entry as _tokenizer_entry, write_tokenizer as _write_tokenizer)

log = logging.getLogger("fastserve.export")



# ------------------------------------------------------------------------------------------------ helpers

# --------------------------------------------------------------------------------------------- the export

def model_capability(model_cfg: Any) -> tuple[str, Any, Any]:
    """(capability, graphdef, abstract module) of a model config, without allocating any weight."""
    model = nnx.eval_shape(lambda: build_model(model_cfg, nnx.Rngs(0)))
    return capability(model_cfg, model), nnx.graphdef(model), model


def export_params(model_cfg: Any, params: Any, tokenizer: Tokenizer | None, out_dir: str,
                  options: ExportOptions = ExportOptions(), *, source: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """Exports the model described by `model_cfg` with `params` (its variables: a pure nested dict) into `out_dir`,
    with the serving functions its capability allows (fastserve.models.capabilities).

    A scanned decoder's weights may come in either layout (stacked `layers.mlp.up.kernel` [L, d, f] as training
    holds them, or per-layer): the export is always of the per-layer model (one KV cache entry per layer), so stacked
    weights are unstacked and the manifest's config has `scan_layers: false`.

    Returns the manifest (also written to `out_dir/manifest.json`, last, so a half-written export has none).
    """
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    model_cfg, params = as_per_layer(model_cfg, params)
    kind, _, model = model_capability(model_cfg)
    opts = options.resolve(model_cfg, kind)
    if kind == "forward":
        return export_forward(model_cfg, params, tokenizer, out_dir, opts, source=source)
    if kind == "seq2seq":
        from fastserve.artifacts.seq2seq_export import export_seq2seq
        return export_seq2seq(model_cfg, params, tokenizer, out_dir, opts, source=source)
    if tokenizer is None or tokenizer.vocab_size > model_cfg.vocab_size:
        raise ExportError(f"tokenizer has {getattr(tokenizer, 'vocab_size', 'no')} pieces but model.vocab_size="
                          f"{model_cfg.vocab_size}")
    graphdef, abstract, _ = abstract_model(model_cfg)
    _check_params(params, abstract)
    leaves, treedef = jax.tree.flatten(params)
    leaf_specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    fns = build_functions(graphdef, treedef, opts, model_cfg.max_seq_len)

    def cache_spec(b):  # the model's own cache layout (a list of {"k", "v"} per layer for the decoder)
        return caps.cache_spec(model, b, opts.max_cache_len)

    cache_info, cache_entry = describe_cache(cache_spec(1))

    plan = plan_exports(opts, leaf_specs, cache_spec)

    manifest_path = _prepare_dir(out_dir)
    functions = {name: _write_function(out_dir, fns[kind], args, opts.platforms, name, kind, bucket, b, len(leaves),
                                       arg_names, result_names, cache_info)
                 for name, kind, bucket, b, args, arg_names, result_names in plan}
    save_weights(os.path.join(out_dir, WEIGHTS_FILE), param_names(params), leaves)
    tok_file = _write_tokenizer(out_dir, tokenizer)
    manifest = {
        "capability": "causal_lm",
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "jax_version": jax.__version__,
        "platforms": list(opts.platforms),
        "model": dataclasses.asdict(model_cfg),
        "max_seq_len": model_cfg.max_seq_len,
        "vocab_size": model_cfg.vocab_size,
        "buckets": list(opts.buckets),
        "batch": {"prefill_decode": list(opts.batch_sizes) or "symbolic",
                  "generate": list(opts.generate_batch_sizes) or "symbolic"},
        "max_cache_len": opts.max_cache_len,
        "max_new_tokens": opts.max_new_tokens,
        "max_stop_tokens": opts.max_stop_tokens,
        "cache": cache_entry,
        "params": _params_entry(params, leaves),
        "tokenizer": _tokenizer_entry(tokenizer, tok_file),
        "functions": functions,
        "source": source or {},
    }
    return _finish(out_dir, manifest_path, manifest, [WEIGHTS_FILE, tok_file])


def export_forward(model_cfg: Any, params: Any, tokenizer: Tokenizer | None, out_dir: str, opts: ExportOptions, *,
                   source: dict[str, Any] | None = None) -> dict[str, Any]:
    """A `forward_{b}` function per batch variant: (params..., the model's inputs) → its outputs, in eval mode.
    The inputs are what `model_cfg.forward_inputs(batch)` names (e.g. tokens + mask, or images). A model of token
    sequences (`forward_lengths`: encoders) gets one `forward_{T}_{b}` per length bucket, so a short input runs at
    a short length instead of max_seq_len; the manifest lists the `buckets` and which outputs are per token."""
    graphdef, abstract, _ = abstract_model(model_cfg)
    _check_params(params, abstract)
    leaves, treedef = jax.tree.flatten(params)
    leaf_specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    manifest_path = _prepare_dir(out_dir)
    lengths = model_cfg.forward_lengths(opts.buckets) if hasattr(model_cfg, "forward_lengths") else [None]
    functions, inputs = {}, {}
    for b, suffix in batch_variants(opts.batch_sizes):
        for t in lengths:
            specs = model_cfg.forward_inputs(b) if t is None else model_cfg.forward_inputs(b, t)
            input_names = list(specs)

            def forward(leaves, *args, input_names=input_names):
                model = nnx.merge(graphdef, jax.tree.unflatten(treedef, list(leaves)))
                named = dict(zip(input_names[1:], args[1:]))
                return model(args[0], **named)

            name = f"forward{suffix}" if t is None else f"forward_{t}{suffix}"
            functions[name] = _write_function(out_dir, forward, (leaf_specs, *specs.values()), opts.platforms, name,
                                              "forward", t, b, len(leaves), input_names, ["outputs"], None)
            inputs = {k: {"shape": [str(d) for d in v.shape], "dtype": str(np.dtype(v.dtype))}
                      for k, v in specs.items()}
            if t is not None:   # the sequence axis is the bucket's: any length up to the longest bucket
                inputs = {k: {**v, "shape": [v["shape"][0], "t", *v["shape"][2:]]} for k, v in inputs.items()}
    save_weights(os.path.join(out_dir, WEIGHTS_FILE), param_names(params), leaves)
    files = [WEIGHTS_FILE]
    manifest = {"capability": "forward", "format_version": FORMAT_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "jax_version": jax.__version__,
                "platforms": list(opts.platforms), "model": dataclasses.asdict(model_cfg), "inputs": inputs,
                "batch": {"forward": list(opts.batch_sizes) or "symbolic"}, "params": _params_entry(params, leaves),
                "functions": functions, "source": source or {}}
    if lengths != [None]:
        manifest["buckets"] = lengths
        manifest["per_token_outputs"] = list(model_cfg.per_token_outputs)
    if tokenizer is not None:
        tok_file = _write_tokenizer(out_dir, tokenizer)
        manifest["tokenizer"] = _tokenizer_entry(tokenizer, tok_file)
        files.append(tok_file)
    return _finish(out_dir, manifest_path, manifest, files)


def describe_cache(spec: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the cache fields of a function's manifest entry, the manifest's `cache` entry) of a model's cache at batch
    1. The decoder's list of {"k", "v"} per layer keeps its compact entry (layers, shape, dtype); any other pytree
    (an ensemble's tuple of its members' caches) lists its leaves, in the order the exported functions take them."""
    leaves = jax.tree.leaves(spec)
    garbage = "positions >= a row's length hold garbage that the attention mask hides"
    if isinstance(spec, list) and all(isinstance(c, dict) and sorted(c) == ["k", "v"] for c in spec):
        one = spec[0]["k"]
        return ({"leaves": len(leaves), "layers": len(spec), "entries": ["k", "v"]},
                {"layout": f"list with one {{'k', 'v'}} per layer (the model's KVCache); {garbage}",
                 "layers": len(spec), "shape": ["b", one.shape[1], one.shape[2], one.shape[3]],
                 "dtype": str(np.dtype(one.dtype))})
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(spec)[0]]
    return ({"leaves": len(leaves)},
            {"layout": f"the model's own cache pytree (the exported decode's argument tree); {garbage}",
             "leaves": [{"path": p, "shape": ["b", *x.shape[1:]], "dtype": str(np.dtype(x.dtype))}
                        for p, x in zip(paths, leaves)]})


def _write_function(out_dir, fn, args, platforms, name, kind, bucket, b, n_leaves, arg_names, result_names,
                    cache_info) -> dict[str, Any]:
    t0 = time.perf_counter()
    exp = export_one(fn, args, platforms)
    blob = exp.serialize()
    fname = name + EXPORTED_SUFFIX
    with open(os.path.join(out_dir, fname), "wb") as f:
        f.write(blob)
    log.info("exported %s (%d bytes, %.1f s)", fname, len(blob), time.perf_counter() - t0)
    return describe(exp, fname, kind, bucket, b, n_leaves, arg_names, result_names, cache_info)


# ----------------------------------------------------------------------------------------------- sources

def load_training_config(config_path: str | None, checkpoint: str | None, overrides: Sequence[str] = ()) -> Config:
    """--config FILE, or the work dir's own `config.yaml` (written by training) when only --checkpoint is given."""
    if config_path is None:
        candidate = os.path.join(checkpoint or "", "config.yaml")
        if not checkpoint or not os.path.isfile(candidate):
            raise ConfigError(f"no --config given and no config.yaml in {checkpoint}")
        config_path = candidate
    return load_config(config_path, overrides)


def export_from_config(cfg: Config, out_dir: str | None = None, options: ExportOptions | None = None) -> dict[str, Any]:
    """Loads `cfg.source` (a trained work dir, a GGUF file or a HF directory), applies `cfg.transforms` when there
    are any (the manifest's model config and weights are then the compressed ones), and exports with `cfg.export`."""
    from fastserve.workdir import load_model

    options = options or options_from_config(cfg.export)
    out_dir = out_dir or cfg.export.out
    if cfg.source.kind == "checkpoint" and getattr(cfg.model, "vocab_size", 1):  # bad options fail before restoring
        options.resolve(cfg.model, model_capability(cfg.model)[0])
    loaded = load_model(cfg)
    source = {"kind": cfg.source.kind, "path": os.path.abspath(cfg.source.path or cfg.train.workdir),
              "step": loaded.step}
    model_cfg, params = loaded.model_cfg, loaded.params
    if cfg.transforms:  # low-rank / int8 / prune before writing (fastserve.transforms)
        from fastserve.transforms import TransformError, apply_transforms
        try:
            model_cfg, params, _ = apply_transforms(model_cfg, params, cfg.transforms)
        except TransformError as e:
            raise ExportError(str(e)) from None
        source["transforms"] = cfg.transforms
    return export_params(model_cfg, params, loaded.tokenizer, out_dir, options, source=source)


# ---------------------------------------------------------------------------------------------------- CLI

def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _str_tuple(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


_OPTION_FLAGS = {  # ExportOptions field → (flag, parser, help)
    "platforms": ("--platforms", _str_tuple, "comma-separated; default cpu,cuda,tpu"),
    "buckets": ("--buckets", _int_tuple, "prompt lengths; default 32,64,128,256 (capped by max_cache_len)"),
    "batch_sizes": ("--batch-sizes", _int_tuple, "fixed prefill/decode batch sizes; default: a symbolic batch"),
    "generate_batch_sizes": ("--generate-batch-sizes", _int_tuple, "fixed generate batch sizes; default: symbolic"),
    "max_cache_len": ("--max-cache-len", int, "KV cache positions of prefill/decode; default 0 = model.max_seq_len"),
    "max_new_tokens": ("--max-new-tokens", int, "generate loop length; default 128"),
    "max_stop_tokens": ("--max-stop-tokens", int, "stop-token slots of generate; default 4"),
    "functions": ("--functions", _str_tuple, "subset of prefill,decode,generate; default all"),
}


def options_from_config(section: Any = None, **overrides: Any) -> ExportOptions:
    """ExportOptions from a config section with the same field names (e.g. a future `cfg.export`), then overrides
    (None values are ignored). Lists become tuples."""
    values = {}
    for f in dataclasses.fields(ExportOptions):
        if section is not None and hasattr(section, f.name):
            values[f.name] = getattr(section, f.name)
        if overrides.get(f.name) is not None:
            values[f.name] = overrides[f.name]
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return ExportOptions(**values)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastserve.export", description="Export serving functions (jax.export) with weights, tokenizer and "
                                            "manifest; run them with fastserve.artifacts.loader.load_exported.")
    p.add_argument("--config", help="training YAML (default: CHECKPOINT/config.yaml of a work dir)")
    p.add_argument("--checkpoint", help="training work dir or its checkpoints/ directory (sets source.path)")
    p.add_argument("--out", help="output directory (default: the config's export.out, when it has one)")
    for field_name, (flag, parse, help_text) in _OPTION_FLAGS.items():
        p.add_argument(flag, dest=field_name, type=parse, default=None, help=help_text)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.dtype=bfloat16")
    args = p.parse_args(argv)
    cli.quiet_logs()
    try:
        overrides = list(args.overrides) + ([f"source.path={args.checkpoint}"] if args.checkpoint else [])
        cfg = load_training_config(args.config, args.checkpoint, overrides)
        options = options_from_config(cfg.export, **{k: getattr(args, k) for k in _OPTION_FLAGS})
        manifest = export_from_config(cfg, args.out, options)
        out = args.out or cfg.export.out
    except (ConfigError, ExportError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = sum(f["bytes"] for f in manifest["files"].values())
    print(f"exported {len(manifest['functions'])} functions for {', '.join(manifest['platforms'])} "
          f"(step {manifest['source'].get('step')}) to {out}: {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

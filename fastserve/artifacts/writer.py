"""Export serving functions with `jax.export`: StableHLO + weights + tokenizer + manifest, runnable without model code.

    python -m fastserve.export --config FILE --checkpoint WORKDIR_OR_CKPT_DIR --out DIR \
        [--platforms cpu,cuda,tpu] [--buckets 32,64,128] [--max-new-tokens 128] [key=value ...]

What lands in DIR (read back by `fastserve.artifacts.loader.load_exported`, which imports neither flax nor the model code):

    prefill_{T}.jax_exported    (params..., tokens [B, T] i32, lengths [B] i32) → (last logits [B, V] f32, cache)
    decode.jax_exported         (params..., tokens [B] i32, positions [B] i32, cache) → (logits [B, V] f32, cache)
    generate_{T}.jax_exported   (params..., tokens [B, T], lengths [B], seed u32, temperature [B] f32, top_k [B] i32,
                                 top_p [B] f32, max_new [B] i32, stop_tokens [S] i32) → (tokens [B, N] i32, counts [B])
    weights.safetensors         every parameter leaf, named by its tree path (`layers.0.attn.q.kernel`)
    tokenizer.model             the sentencepiece model
    manifest.json               shapes/dtypes of every argument and result, platforms, buckets, model config,
                                tokenizer ids, versions, and the sha256 of every file

B is a symbolic dimension ("b": any batch size, one compile per size at load time) unless fixed batch sizes are
asked for, in which case each function is exported once per size (`prefill_{T}_b{B}`, `decode_b{B}`, ...).
The KV cache is the model's own layout: a list with one {"k", "v"} per layer, each [B, max_cache_len, K, D].
Weights are arguments, never constants: `params` is the flat list `jax.tree.leaves(params)` (the order of
`manifest["params"]["names"]`), unflattened inside each function with a treedef rebuilt from the model config.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import numpy as np
import safetensors
from flax import nnx

from fastserve import cli
from fastserve.core.checkpoint import CheckpointError
from fastserve.config import Config, ConfigError, ModelConfig, load_config
from fastserve.core.state import abstract_model
from fastserve.data.tokenizer import Tokenizer
from fastserve.artifacts.functions import FUNCTION_KINDS, build_functions, describe, export_one, plan_exports
from fastserve.artifacts.loader import (EXPORTED_SUFFIX, FORMAT_VERSION, MANIFEST_FILE, SAFETENSORS_DTYPES,
                                WEIGHTS_FILE, sha256_file)
from fastserve.models.layers import dtype_of

log = logging.getLogger("fastserve.export")

KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


class ExportError(ValueError):
    """Export options, parameters or a checkpoint that cannot be exported as asked."""


@dataclass(frozen=True)
class ExportOptions:
    """What gets exported. Empty batch-size tuples mean a symbolic batch dimension (any size)."""

    platforms: tuple[str, ...] = ("cpu", "cuda", "tpu")
    buckets: tuple[int, ...] = (32, 64, 128, 256)   # prompt lengths; those above max_cache_len are dropped
    batch_sizes: tuple[int, ...] = ()               # prefill/decode: () → symbolic "b"; else one export per size
    generate_batch_sizes: tuple[int, ...] = ()      # generate: () → symbolic "b"; else one export per size
    max_cache_len: int = 0                          # KV positions of prefill/decode caches; 0 → model.max_seq_len
    max_new_tokens: int = 128                       # length of the generate loop (callers may ask for fewer per row)
    max_stop_tokens: int = 4                        # stop-token slots of generate (padded with -1)
    functions: tuple[str, ...] = FUNCTION_KINDS     # a subset of prefill / decode / generate

    def resolve(self, model_cfg: ModelConfig) -> ExportOptions:
        """Checks every field and returns the options with defaults filled in and buckets capped."""
        platforms = tuple(dict.fromkeys(p.strip().lower() for p in self.platforms if p.strip()))
        if not platforms:
            raise ExportError("export.platforms: at least one platform is required")
        bad = [p for p in platforms if p not in KNOWN_PLATFORMS]
        if bad:
            raise ExportError(f"export.platforms: unknown platform(s) {bad} (choose from {', '.join(KNOWN_PLATFORMS)})")
        functions = tuple(dict.fromkeys(self.functions))
        bad = [f for f in functions if f not in FUNCTION_KINDS]
        if bad or not functions:
            raise ExportError(f"export.functions: {bad or 'empty'} (choose from {', '.join(FUNCTION_KINDS)})")
        max_cache = self.max_cache_len or model_cfg.max_seq_len
        if max_cache <= 0:
            raise ExportError(f"export.max_cache_len={self.max_cache_len}: must be positive (or 0 for model.max_seq_len)")
        if max_cache > model_cfg.max_seq_len:
            raise ExportError(f"export.max_cache_len={max_cache} exceeds model.max_seq_len={model_cfg.max_seq_len}")
        for name in ("buckets", "batch_sizes", "generate_batch_sizes"):
            vals = getattr(self, name)
            if any((not isinstance(v, (int, np.integer))) or isinstance(v, bool) or v <= 0 for v in vals):
                raise ExportError(f"export.{name}={list(vals)}: every entry must be a positive integer")
        buckets = tuple(sorted({int(b) for b in self.buckets if b <= max_cache}))
        if not buckets:
            raise ExportError(f"export.buckets={list(self.buckets)}: none fits max_cache_len={max_cache} "
                              f"(model.max_seq_len={model_cfg.max_seq_len})")
        if self.max_new_tokens <= 0:
            raise ExportError(f"export.max_new_tokens={self.max_new_tokens}: must be positive")
        if self.max_stop_tokens <= 0:
            raise ExportError(f"export.max_stop_tokens={self.max_stop_tokens}: must be positive")
        return dataclasses.replace(
            self, platforms=platforms, functions=functions, max_cache_len=max_cache, buckets=buckets,
            batch_sizes=tuple(sorted({int(b) for b in self.batch_sizes})),
            generate_batch_sizes=tuple(sorted({int(b) for b in self.generate_batch_sizes})))


# ------------------------------------------------------------------------------------------------ helpers

def param_names(params: Any) -> list[str]:
    """Dotted tree paths of the leaves, in `jax.tree.leaves` order: `layers.0.attn.q.kernel`."""
    return [jax.tree_util.keystr(path, simple=True, separator=".")
            for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def save_weights(path: str, names: Sequence[str], leaves: Sequence[Any]) -> None:
    """Writes the leaves as safetensors (bfloat16 and float8 included), keyed by their tree-path names."""
    arrays = {}
    for name, leaf in zip(names, leaves):
        arr = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        if arr.dtype.name not in SAFETENSORS_DTYPES:
            raise ExportError(f"parameter {name}: dtype {arr.dtype} cannot be stored in safetensors")
        arrays[name] = arr.astype(arr.dtype.newbyteorder("<"), copy=False)  # safetensors is little-endian
    if hasattr(safetensors, "TensorSpec"):  # safetensors >= 0.8: raw pointers; `arrays` keeps the buffers alive
        specs = {name: safetensors.TensorSpec(dtype=a.dtype.name, shape=list(a.shape), data_ptr=a.ctypes.data,
                                              data_len=a.nbytes) for name, a in arrays.items()}
    else:  # older releases take the bytes themselves
        specs = {name: {"dtype": a.dtype.name, "shape": list(a.shape), "data": a.tobytes()}
                 for name, a in arrays.items()}
    blob = safetensors.serialize(specs, metadata={"format": "fastserve", "order": "manifest.params.names"})
    with open(path, "wb") as f:
        f.write(bytes(blob))


def _check_params(params: Any, abstract: Any) -> None:
    """The parameters must have the model config's tree structure and shapes (dtypes may differ, e.g. bfloat16)."""
    got, want = jax.tree_util.tree_structure(params), jax.tree_util.tree_structure(abstract)
    if got != want:
        have, need = set(param_names(params)), set(param_names(abstract))
        raise ExportError(f"parameters do not match the model config: missing {sorted(need - have)[:8]}, "
                          f"unexpected {sorted(have - need)[:8]}")
    bad = [f"{n}: {tuple(p.shape)} (config wants {tuple(a.shape)})"
           for n, p, a in zip(param_names(abstract), jax.tree.leaves(params), jax.tree.leaves(abstract))
           if tuple(p.shape) != tuple(a.shape)]
    if bad:
        raise ExportError("parameter shapes do not match the model config: " + "; ".join(bad[:8]))


# --------------------------------------------------------------------------------------------- the export

def export_params(model_cfg: ModelConfig, params: Any, tokenizer: Tokenizer, out_dir: str,
                  options: ExportOptions = ExportOptions(), *, source: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """Exports the model described by `model_cfg` with `params` (a pure nested dict) into `out_dir`.

    Returns the manifest (also written to `out_dir/manifest.json`, last, so a half-written export has none).
    """
    if model_cfg.name != "decoder":
        raise ExportError(f"model.name '{model_cfg.name}': only decoder LMs have serving functions to export")
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ExportError(f"tokenizer has {tokenizer.vocab_size} pieces but model.vocab_size={model_cfg.vocab_size}")
    opts = options.resolve(model_cfg)
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    graphdef, abstract, _ = abstract_model(model_cfg)
    _check_params(params, abstract)
    leaves, treedef = jax.tree.flatten(params)
    names = param_names(params)
    leaf_specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    fns = build_functions(graphdef, treedef, opts, model_cfg.max_seq_len)
    n_layers = model_cfg.n_layers
    kv_heads = model_cfg.n_kv_heads or model_cfg.n_heads
    head_dim = model_cfg.head_dim or model_cfg.d_model // model_cfg.n_heads
    cache_dtype = np.dtype(dtype_of(model_cfg.dtype))

    def cache_spec(b):
        a = jax.ShapeDtypeStruct((b, opts.max_cache_len, kv_heads, head_dim), cache_dtype)
        return [{"k": a, "v": a} for _ in range(n_layers)]

    plan = plan_exports(opts, leaf_specs, cache_spec)

    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, MANIFEST_FILE)
    if os.path.exists(manifest_path):
        os.unlink(manifest_path)  # an interrupted re-export must not leave the old manifest vouching for new files
    for stale in os.listdir(out_dir):  # functions of an earlier export into the same directory
        if stale.endswith(EXPORTED_SUFFIX):
            os.unlink(os.path.join(out_dir, stale))
    functions: dict[str, Any] = {}
    for name, kind, bucket, b, args, arg_names, result_names in plan:
        t0 = time.perf_counter()
        exp = export_one(fns[kind], args, opts.platforms)
        blob = exp.serialize()
        fname = name + EXPORTED_SUFFIX
        with open(os.path.join(out_dir, fname), "wb") as f:
            f.write(blob)
        functions[name] = describe(exp, fname, kind, bucket, b, len(leaves), arg_names, result_names, n_layers)
        log.info("exported %s (%d bytes, %.1f s)", fname, len(blob), time.perf_counter() - t0)

    save_weights(os.path.join(out_dir, WEIGHTS_FILE), names, leaves)
    tok_kind, tok_file, tok_bytes = tokenizer.export_file()
    with open(os.path.join(out_dir, tok_file), "wb") as f:
        f.write(tok_bytes)

    files = [WEIGHTS_FILE, tok_file] + [fn["file"] for fn in functions.values()]
    manifest = {
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
        "cache": {
            "layout": "list with one {'k', 'v'} per layer (the model's KVCache); positions >= a row's length "
                      "hold garbage that the attention mask hides",
            "layers": n_layers, "shape": ["b", opts.max_cache_len, kv_heads, head_dim],
            "dtype": str(cache_dtype),
        },
        "params": {
            "file": WEIGHTS_FILE,
            "order": "every function takes the weights as its first argument: a list of arrays in this order",
            "names": names,
            "shapes": [list(map(int, x.shape)) for x in leaves],
            "dtypes": [str(np.dtype(x.dtype)) for x in leaves],
            "num_leaves": len(leaves),
            "num_parameters": int(sum(int(np.prod(x.shape)) for x in leaves)),
        },
        "tokenizer": {
            "file": tok_file, "kind": tok_kind, "vocab_size": tokenizer.vocab_size, "pad_id": tokenizer.pad_id,
            "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "add_bos": bool(tokenizer.add_bos),
            "stop_ids": [int(i) for i in tokenizer.stop_ids],
            "chat_template": getattr(tokenizer, "chat_template", None),
        },
        "functions": functions,
        "source": source or {},
        "files": {f: {"sha256": sha256_file(os.path.join(out_dir, f)), "bytes": os.path.getsize(os.path.join(out_dir, f))}
                  for f in files},
    }
    _atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
    return manifest


def _atomic_write_text(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a manifest is as readable as the files beside it
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    if cfg.source.kind == "checkpoint" and cfg.model.vocab_size:
        options.resolve(cfg.model)  # bad options fail before the (possibly long) restore
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

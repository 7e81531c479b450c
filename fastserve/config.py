"""Typed configuration: YAML files validated into dataclasses, with dotted `key=value` overrides.

Defaults live here, recipes live in `configs/`. Every error names the offending key: an unknown key
also names the nearest valid one, a wrong type names the expected type.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml


class ConfigError(ValueError):
    """A config file or override that does not match the schema."""


@dataclass
class ModelConfig:
    name: str = "decoder"          # registry key: see fastserve.models
    vocab_size: int = 0            # 0: take it from the tokenizer
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0            # 0: same as n_heads (multi-head); fewer: grouped-query attention
    head_dim: int = 0              # 0: d_model // n_heads
    d_ff: int = 688                # SwiGLU hidden width
    max_seq_len: int = 2048        # longest position the model (and its KV cache) supports
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dtype: str = "float32"         # compute dtype: float32 | bfloat16 (parameters stay float32)
    param_dtype: str = "float32"
    remat: bool = False            # recompute layer activations in the backward pass (saves memory)
    init_std: float = 0.02
    # Compressed layers (written by fastserve.transforms): dotted path → {kind: lowrank, rank: R} | {kind: int8}.
    # int8 layers are inference-only (no gradient through an int8 kernel).
    compressed: dict[str, dict] = field(default_factory=dict)


@dataclass
class DataConfig:
    source: str = "pydoc"          # pydoc: CPython's embedded docs (no download) | text: files in `paths`
    paths: list[str] = field(default_factory=list)
    seq_len: int = 128
    batch_size: int = 16           # global batch (sequences per optimizer step, all hosts together)
    eval_fraction: float = 0.1     # documents held out for evaluation
    shuffle: bool = True


@dataclass
class TokenizerConfig:
    path: str = ""                 # an existing sentencepiece model; empty: train one, cached in the work dir
    vocab_size: int = 4000
    model_type: str = "bpe"        # bpe | unigram


@dataclass
class OptimizerConfig:
    name: str = "adamw"            # adamw | adam | sgd | lion | adafactor
    learning_rate: float = 3e-3
    schedule: str = "cosine"       # cosine | linear | constant (each after a linear warmup)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1      # final learning rate as a fraction of the peak
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.9          # sgd only
    clip_norm: float = 1.0         # global-norm clipping; 0 turns it off


@dataclass
class TrainConfig:
    task: str = "lm"               # registry key: see fastserve.tasks
    steps: int = 500
    run_steps: int = 0             # stop (saving a checkpoint) after this many steps in one invocation: time-sliced jobs
    grad_accum: int = 1            # micro-batches per optimizer step (batch_size must divide evenly)
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 0          # 0: the whole held-out set
    workdir: str = "runs/default"
    samples: int = 3               # continuations printed at the end (0: none)
    sample_tokens: int = 48
    sample_temperature: float = 0.8


@dataclass
class MeshConfig:
    data: int = -1                 # -1: all devices left over by the other axes
    fsdp: int = 1
    tensor: int = 1


@dataclass
class CheckpointConfig:
    every: int = 100               # steps between saves (a final save always happens)
    max_to_keep: int = 3
    async_save: bool = True


@dataclass
class LogConfig:
    every: int = 10                # steps between metric records
    progress: bool = True          # progress bar on the terminal
    tensorboard: bool = True
    peak_flops: float = 0.0        # FLOP/s per device for MFU; 0: measure a float32 matmul at start-up


@dataclass
class DistributedConfig:
    # Multi-host: jax.distributed.initialize with these, or from the environment when `auto` (TPU pods, SLURM).
    enabled: bool = False
    coordinator: str = ""          # host:port of process 0
    num_processes: int = 1
    process_id: int = 0
    auto: bool = False
    timeout_s: int = 300


@dataclass
class SourceConfig:
    """Where inference, export and serving take their weights from."""
    kind: str = "checkpoint"       # checkpoint: a fastserve work dir | gguf: a llama.cpp file | hf: a HF Llama directory
                                   # | exported: a `fastserve.export` directory (serving only)
    path: str = ""                 # checkpoint: the work dir (empty: train.workdir); gguf / hf: a file or directory;
                                   # "package:NAME/FILE" finds FILE inside the installed Python package NAME
    dtype: str = "float32"         # parameter dtype after import (float32 | bfloat16)


@dataclass
class GenerateConfig:
    prompts: list[str] = field(default_factory=list)
    prompts_file: str = ""         # one prompt per line
    chat: bool = False             # wrap each prompt in the model's chat template (imported chat models)
    max_new_tokens: int = 64
    temperature: float = 0.0       # 0: greedy
    top_k: int = 0                 # 0: off
    top_p: float = 1.0             # 1.0: off
    seed: int = 0
    batch_size: int = 8            # prompts per compiled batch
    buckets: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # prompt lengths padded to these


@dataclass
class ExportConfig:
    out: str = "exports/default"
    platforms: list[str] = field(default_factory=lambda: ["cpu", "cuda", "tpu"])
    buckets: list[int] = field(default_factory=lambda: [32, 64, 128, 256])  # prompt lengths; capped by max_cache_len
    batch_sizes: list[int] = field(default_factory=list)           # []: a symbolic batch (prefill / decode)
    generate_batch_sizes: list[int] = field(default_factory=list)  # []: a symbolic batch (generate)
    max_cache_len: int = 0         # 0: model.max_seq_len
    max_new_tokens: int = 128
    max_stop_tokens: int = 4
    functions: list[str] = field(default_factory=lambda: ["prefill", "decode", "generate"])


@dataclass
class ServeConfig:
    """The serving engine (fastserve.serve): decode slots, prompt buckets, the scheduler, and the HTTP front."""
    slots: int = 8                 # decode slots: requests decoded together in one step (the KV cache's batch)
    buckets: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # prompt lengths (compiled at start)
    max_cache_len: int = 0         # KV positions per slot (prompt + generated); 0: model.max_seq_len
    scheduler: str = "mlfq"        # fcfs: run to completion in arrival order | static: whole batches | mlfq: skip-join
                                   # | gittins: Gittins index over the learned job-size distribution
    mlfq_levels: int = 0           # priority levels K; level i has the quantum q0 * 2**i. 0: enough levels that
                                   # the longest job (max_new_tokens_limit steps) never sinks to the last one
    mlfq_base_quantum_s: float = 0.0  # q0 in seconds; 0: the profiled decode step time (gittins: its index's grid)
    starvation_s: float = 10.0     # a job that has waited this long is promoted to the top level (0: never)
    starvation_quanta: float = 0.0  # mlfq: also promote a job that has waited this many quanta of its level (0: off;
                                   # off by default: measured, K = 2 thrashes into round-robin, K = 8 never fires)
    iteration_cost: str = "measured"  # what the scheduler is charged per iteration: measured wall time | profiled
                                   # (the start-up profile of prefill per bucket and of the decode step: deterministic)
    batch_timeout_s: float = 0.05  # static: start a partial batch once its oldest request waited this long
    host_kv_slots: int = 256       # preempted jobs whose KV may live in host memory (beyond: recompute on resume);
                                   # each holds up to max_cache_len positions of k and v, all layers
    max_queue: int = 256           # requests waiting or running; more are refused
    max_new_tokens_limit: int = 1024  # the largest max_new_tokens a request may ask for
    host: str = "127.0.0.1"        # HTTP server
    port: int = 8000
    api_key: str = ""              # empty: no authentication
    max_body_bytes: int = 1_000_000


@dataclass
class DistillConfig:
    """`train.task: distill`: the student (this config's model) learns from a trained teacher's logits."""
    teacher: str = ""              # the teacher's fastserve work dir (same tokenizer / vocabulary as the student)
    temperature: float = 2.0       # T: both distributions are softened by T; the KL term is scaled by T²
    alpha: float = 0.5             # loss = alpha · T² · KL(teacher ‖ student) + (1 − alpha) · CE(data)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    # Parameter transforms (fastserve.transforms), in order: applied by `fastserve.compress` and by
    # `fastserve.export` before writing, e.g. [{lowrank: {include: "layers.*.mlp.*", rank_ratio: 0.25}},
    # {quantize: {bits: 8}}].
    transforms: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------- validation

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against the annotation `tp`; the only conversions are the lossless ones (int → float)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
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
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in hints:
            raise _unknown_key(cls, str(name), key)
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
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


def _override_dict(overrides: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}' conflicts with an earlier override of '{part}'")
        node[path[-1]] = value
    return out


def config_from_dict(values: dict[str, Any], cls: type = Config) -> Any:
    """Validates a plain mapping into `cls` (default: the training `Config`)."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(values).__name__}")
    return _build(cls, values)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), cls: type = Config) -> Any:
    """Loads a YAML file (or only the defaults when `path` is None), applies `key=value` overrides, validates."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    values = _merge(values, _override_dict(overrides))
    return config_from_dict(values, cls)


def apply_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
    """A copy of a validated config with `key=value` overrides applied (and validated)."""
    if not overrides:
        return cfg
    return config_from_dict(_merge(dataclasses.asdict(cfg), _override_dict(overrides)), type(cfg))


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)

"""Typed configuration: YAML files validated into dataclasses, with dotted `key=value` overrides.

Defaults live here and in each registered family's config dataclass (`fastserve.registry`); recipes live in
`configs/`. Every error names the offending key: an unknown key also names the nearest valid one, a wrong type
names the expected type, and a value out of range says what would be valid — all when the config loads, before any
work is done. The parsing machinery is in `fastserve.config_parsing`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Sequence

import yaml

from fastserve import registry
from fastserve.checks import at_least, fraction, one_of, positive, positive_list
from fastserve.config_parsing import ConfigError, Tagged, config_from_dict as _from_dict, merge, override_dict, parse_override, read_yaml

OPTIMIZERS = ("adamw", "adam", "sgd", "lion", "adafactor")
SCHEDULES = ("cosine", "linear", "constant")
SOURCE_KINDS = ("checkpoint", "gguf", "hf", "exported")
SCHEDULERS = ("fcfs", "static", "mlfq", "gittins")


def _default(kind: str, name: str) -> Any:
    return registry.resolve(registry.KINDS[kind][name])()


# ---------------------------------------------------------------------------------------------- sections

@dataclass
class TokenizerConfig:
    path: str = ""                 # an existing sentencepiece model, or an imported byte-level BPE (a work dir's
                                   # tokenizer.bpe.json, a .gguf file); empty: train one, cached in the work dir.
                                   # kind wordpiece: a vocab.txt, a tokenizer.json or a HF model directory
                                   # ("package:NAME/FILE" finds FILE inside the installed Python package NAME)
    vocab_size: int = 4000
    model_type: str = "bpe"        # bpe | unigram
    kind: str = "sentencepiece"    # sentencepiece | wordpiece (an imported BERT vocabulary: path required)
    specials: str = ""             # sentencepiece trained here: "bert" adds [CLS] [SEP] [MASK] pieces (encoders)

    def checks(self):
        if self.vocab_size < 8:
            yield "vocab_size", f"must be at least 8, got {self.vocab_size}"
        if self.model_type not in ("bpe", "unigram"):
            yield "model_type", f"expected bpe or unigram, got {self.model_type!r}"
        if self.kind not in ("sentencepiece", "wordpiece"):
            yield "kind", f"expected sentencepiece or wordpiece, got {self.kind!r}"
        if self.kind == "wordpiece" and not self.path:
            yield "path", "tokenizer.kind=wordpiece needs a path (a vocab.txt, tokenizer.json or model directory)"
        if self.specials not in ("", "bert"):
            yield "specials", f"expected bert or empty, got {self.specials!r}"


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

    def checks(self):
        yield from one_of(self, "name", OPTIMIZERS, "optimizer")
        yield from one_of(self, "schedule", SCHEDULES, "schedule")
        yield from positive(self, "learning_rate", "eps")
        yield from at_least(self, 0, "warmup_steps", "weight_decay", "clip_norm", "momentum")
        yield from fraction(self, "min_lr_ratio", "b1", "b2", closed=True)


@dataclass
class TrainConfig:
    # the task (registry.TASKS), by name (`task: lm`) or with its options (`task: {name: distill, teacher: RUN}`)
    task: Annotated[Any, Tagged("task", "name", "lm")] = field(default_factory=lambda: _default("task", "lm"))
    steps: int = 500
    run_steps: int = 0             # stop (saving a checkpoint) after this many steps in one invocation: time-sliced jobs
    grad_accum: int = 1            # micro-batches per optimizer step (batch_size must divide evenly)
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 0          # 0: the whole held-out set
    workdir: str = "runs/default"
    init_from: str = ""            # a fresh run starts from these weights where path and shape match (the rest, e.g. a
                                   # new head, keep their init): a work dir, a HF directory, a .gguf, "package:NAME/DIR"

    def checks(self):
        yield from positive(self, "steps", "grad_accum", "eval_every")
        yield from at_least(self, 0, "run_steps", "eval_batches", "seed")
        if not self.workdir:
            yield "workdir", "must not be empty"


@dataclass
class MeshConfig:
    data: int = -1                 # -1: all devices left over by the other axes
    fsdp: int = 1
    tensor: int = 1

    def checks(self):
        for name in ("data", "fsdp", "tensor"):
            if getattr(self, name) == 0 or getattr(self, name) < -1:
                yield name, f"must be a positive size or -1 (all remaining devices), got {getattr(self, name)}"


@dataclass
class CheckpointConfig:
    every: int = 100               # steps between saves (a final save always happens)
    max_to_keep: int = 3
    async_save: bool = True

    def checks(self):
        yield from positive(self, "every", "max_to_keep")


@dataclass
class LogConfig:
    every: int = 10                # steps between metric records
    progress: bool = True          # progress bar on the terminal
    tensorboard: bool = True
    peak_flops: float = 0.0        # FLOP/s per device for MFU; 0: the published peak of an accelerator for
                                   # model.dtype, or on CPU the best of several measured matmuls

    def checks(self):
        yield from positive(self, "every")
        yield from at_least(self, 0, "peak_flops")


@dataclass
class DistributedConfig:
    # Multi-host: jax.distributed.initialize with these, or from the environment when `auto` (TPU pods, SLURM).
    enabled: bool = False
    coordinator: str = ""          # host:port of process 0
    num_processes: int = 1
    process_id: int = 0
    auto: bool = False
    timeout_s: int = 300

    def checks(self):
        yield from positive(self, "num_processes", "timeout_s")
        if not 0 <= self.process_id < self.num_processes:
            yield "process_id", f"must be in [0, num_processes={self.num_processes}), got {self.process_id}"


@dataclass
class SourceConfig:
    """Where inference, export and serving take their weights from."""
    kind: str = "checkpoint"       # checkpoint: a fastserve work dir | gguf: a llama.cpp file | hf: a HF Llama directory
                                   # | exported: a `fastserve.export` directory (serving only)
    path: str = ""                 # checkpoint: the work dir (empty: train.workdir); gguf / hf: a file or directory;
                                   # "package:NAME/FILE" finds FILE inside the installed Python package NAME
    dtype: str = "float32"         # parameter dtype after import (float32 | bfloat16)

    def checks(self):
        yield from one_of(self, "kind", SOURCE_KINDS, "source kind")
        if self.dtype not in ("float32", "bfloat16"):
            yield "dtype", f"expected float32 or bfloat16, got {self.dtype!r}"


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

    def checks(self):
        yield from positive(self, "max_new_tokens", "batch_size")
        yield from at_least(self, 0, "temperature", "top_k")
        if not 0 < self.top_p <= 1:
            yield "top_p", f"must be in (0, 1], got {self.top_p}"
        yield from positive_list(self, "buckets")


@dataclass
class EmbedConfig:
    """Encoders (`python -m fastserve.embed`, `fastserve.infer`): texts in, embeddings / class predictions out."""
    texts: list[str] = field(default_factory=list)
    texts_file: str = ""           # one text per line
    out: str = ""                  # a JSONL file (one object per text); empty: standard output
    batch_size: int = 32           # texts per compiled batch (sorted by length first, so batches pad little)
    buckets: list[int] = field(default_factory=lambda: [16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224,
                                                        256, 320, 384, 448, 512])  # input lengths padded to
                                   # these (generation/encoders.py DEFAULT_BUCKETS: why so many; each compiles on use)
    max_len: int = 0               # tokens per input with [CLS] and [SEP]; longer inputs are cut; 0: model.max_seq_len

    def checks(self):
        yield from positive(self, "batch_size")
        yield from at_least(self, 0, "max_len")
        yield from positive_list(self, "buckets")
        if 0 < self.max_len < 3:
            yield "max_len", f"must leave room for text between [CLS] and [SEP] (>= 3), got {self.max_len}"


@dataclass
class ExportConfig:
    out: str = "exports/default"
    platforms: list[str] = field(default_factory=lambda: ["cpu", "cuda", "tpu"])
    buckets: list[int] = field(default_factory=lambda: [32, 64, 128, 256])  # prompt / encoder input lengths (capped)
    batch_sizes: list[int] = field(default_factory=list)           # []: a symbolic batch (prefill / decode)
    generate_batch_sizes: list[int] = field(default_factory=list)  # []: a symbolic batch (generate)
    max_cache_len: int = 0         # 0: model.max_seq_len
    max_new_tokens: int = 128
    max_stop_tokens: int = 4
    functions: list[str] = field(default_factory=list)  # []: all the model can do (LM: prefill, decode, generate; encoders, classifiers, CNNs: forward)

    def checks(self):
        yield from positive(self, "max_new_tokens", "max_stop_tokens")
        yield from at_least(self, 0, "max_cache_len")
        yield from positive_list(self, "buckets", "batch_sizes", "generate_batch_sizes")


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
    mlfq_size_quantile: float = 0.8  # learned K: the last level (FCFS) starts where this quantile of finished
                                   # jobs' service ended, so long jobs run oldest-first, not round-robin (0: off)
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
    prefill_chunk: int = 0         # prompt tokens written per iteration while streams decode, as extra columns of
                                   # their decode step (chunked prefill; an export: extend calls, one of buckets);
                                   # 0: a whole prompt in one iteration
    prefix_cache: bool = False     # reuse the KV of prompt prefixes cached from earlier requests (a shared system
                                   # prompt, a chat history): only the rest of a prompt is prefilled
    prefix_cache_block: int = 16   # tokens per cached block (a block's key covers every token before it)
    prefix_cache_bytes: int = 0    # device memory of cached blocks, least recently used evicted beyond it; 0: as
                                   # much as the slots' KV cache (slots x max_cache_len positions)
    kv_cache_bytes: int = 0        # paged KV: device memory of the KV pool (k and v, all layers), cut into blocks of
                                   # kv_block positions that requests hold as they grow, so concurrency is bounded by
                                   # tokens held, not slots x max_cache_len; raise `slots` with it. 0: the slot layout
                                   # (every slot reserves max_cache_len positions). With prefix_cache: the
                                   # prefix blocks are KV blocks (prefix_cache_block must equal kv_block)
    kv_cache_memory_fraction: float = 0.0  # paged KV sized as this fraction of the device memory free at start-up
                                   # (per device; on a mesh times its `tensor` size, which splits the KV heads) instead
                                   # of kv_cache_bytes; needs a backend reporting memory (GPU / TPU, not CPU). 0: off
    kv_block: int = 16             # positions per paged KV block (with kv_cache_bytes)
    decode_widths: list[int] | str = "auto"  # batch widths of the decode step compiled at start-up: each step
                                   # computes only the running jobs' cache rows, at the narrowest width holding them.
                                   # auto: powers of two up to slots; [] or [slots]: every slot every step
    pack_int8: bool = True         # on one CPU device with AVX-512 VNNI, store W8A8 layers' int8 weights as the
                                   # kernel's panels at start-up (~2x its speed at decode); false: as loaded
    mesh: dict[str, int] = field(default_factory=dict)  # the serving mesh, e.g. {tensor: 2}: replaces those axes
                                   # of the `mesh:` section when serving (empty: serve on the `mesh:` section as it is)

    def checks(self):
        yield from positive(self, "slots", "max_queue", "max_new_tokens_limit", "max_body_bytes", "prefix_cache_block",
                            "kv_block")
        for axis, size in self.mesh.items():
            if axis not in ("data", "fsdp", "tensor"):
                yield "mesh", f"unknown mesh axis {axis!r}: choose from data, fsdp, tensor"
            elif not isinstance(size, int) or isinstance(size, bool) or size == 0 or size < -1:
                yield "mesh", f"mesh.{axis} must be a positive size or -1 (all remaining devices), got {size!r}"
        yield from at_least(self, 0, "max_cache_len", "mlfq_levels", "mlfq_base_quantum_s", "mlfq_size_quantile",
                             "starvation_s", "starvation_quanta", "batch_timeout_s", "host_kv_slots",
                             "prefix_cache_bytes", "prefill_chunk", "kv_cache_bytes",
                             "kv_cache_memory_fraction")
        yield from positive_list(self, "buckets")
        yield from one_of(self, "scheduler", SCHEDULERS, "scheduler")
        if self.mlfq_size_quantile >= 1:
            yield "mlfq_size_quantile", f"must be below 1 (a quantile; 0: off), got {self.mlfq_size_quantile}"
        if self.iteration_cost not in ("measured", "profiled"):
            yield "iteration_cost", f"expected measured or profiled, got {self.iteration_cost!r}"
        if self.kv_cache_memory_fraction > 1:
            yield "kv_cache_memory_fraction", f"must be at most 1 (0: off), got {self.kv_cache_memory_fraction}"
        if self.kv_cache_bytes and self.kv_cache_memory_fraction:
            yield "kv_cache_memory_fraction", "set serve.kv_cache_bytes or serve.kv_cache_memory_fraction, not both"
        if (self.kv_cache_bytes or self.kv_cache_memory_fraction) and self.prefix_cache and \
                self.prefix_cache_block != self.kv_block:
            yield "prefix_cache_block", (f"with paged KV a cached prefix block is copied into one KV block: "
                                         f"serve.prefix_cache_block={self.prefix_cache_block} must equal "
                                         f"serve.kv_block={self.kv_block}")
        widths = self.decode_widths
        if isinstance(widths, str) and widths != "auto":
            yield "decode_widths", f"expected auto or a list of batch widths, got {widths!r}"
        elif isinstance(widths, list) and any(not 1 <= w <= self.slots for w in widths):
            yield "decode_widths", f"every width must be in [1, slots={self.slots}], got {widths}"
        if not 0 <= self.port < 65536:
            yield "port", f"must be in 0..65535 (0: any free port), got {self.port}"


@dataclass
class Config:
    # the model family (registry.MODELS), selected by `model.name`; its fields are that family's
    model: Annotated[Any, Tagged("model", "name", "decoder")] = field(default_factory=lambda: _default("model", "decoder"))
    # the data source (registry.DATA_SOURCES), selected by `data.source`
    data: Annotated[Any, Tagged("data", "source", "pydoc")] = field(default_factory=lambda: _default("data", "pydoc"))
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    # Parameter transforms (fastserve.transforms), in order: applied by `fastserve.compress` and by
    # `fastserve.export` before writing, and by `fastserve.serve` at load (a decoder or encoder in process), e.g.
    # [{lowrank: {include: "layers.*.mlp.*", rank_ratio: 0.25}}, {quantize: {bits: 8}}].
    transforms: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def checks(self):
        """Checks across sections (each section checked its own fields already)."""
        batch = getattr(self.data, "batch_size", 0)
        if batch and batch % self.train.grad_accum:
            yield "train.grad_accum", (f"data.batch_size={batch} does not divide into {self.train.grad_accum} "
                                       f"micro-batches; choose a divisor of the batch size")
        for i, spec in enumerate(self.transforms):
            if not isinstance(spec, dict) or len(spec) != 1:
                yield f"transforms[{i}]", f"expected a one-key mapping like {{lowrank: {{...}}}}, got {spec!r}"


def __getattr__(name: str) -> Any:
    # `ModelConfig` is the decoder family's config (kept importable here; it lives with its model)
    if name == "ModelConfig":
        return registry.resolve(registry.MODELS["decoder"])
    raise AttributeError(name)


def config_from_dict(values: dict[str, Any] | None, cls: type = Config) -> Any:
    """Validates a plain mapping into `cls` (default: the full `Config`)."""
    return _from_dict(values, cls)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), cls: type = Config) -> Any:
    """Loads a YAML file (or only the defaults when `path` is None), applies `key=value` overrides, validates."""
    values = read_yaml(path) if path is not None else {}
    return _from_dict(merge(values, override_dict(overrides)), cls)


def apply_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
    """A copy of a validated config with `key=value` overrides applied (and validated)."""
    if not overrides:
        return cfg
    return _from_dict(merge(dataclasses.asdict(cfg), override_dict(overrides)), type(cfg))


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


__all__ = ["Config", "ConfigError", "apply_overrides", "config_from_dict", "dump_config", "load_config",
           "parse_override"]

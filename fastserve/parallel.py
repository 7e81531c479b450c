"""Parallelism in one place: the mesh, THE logical-axis rules table, and the shardings derived from it.

Models name the axes of every parameter and activation logically ("embed", "mlp", "heads", ...). The table below
maps each logical name onto mesh axes; data parallelism, FSDP and tensor parallelism are then only a matter of the
mesh shape in the config (`mesh.data`, `mesh.fsdp`, `mesh.tensor`).
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# THE rules table: logical axis name → mesh axes (None: replicated). Every logical name a model uses must be here;
# `logical_to_spec` refuses unknown names rather than letting them pass through as mesh-axis names.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),   # activations and data: split over every data-parallel replica
    ("seq", None),
    ("embed", "fsdp"),              # FSDP shards the model dimension of every weight
    ("mlp", "tensor"),              # tensor parallelism: FFN hidden units ...
    ("heads", "tensor"),            # ... attention heads
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),            # ... and the vocabulary (embedding rows, logits)
    ("norm", None),                 # norm scales are small: replicate
    ("rank", None),                 # low-rank factor inner dimension
    ("cache_batch", ("data", "fsdp")),
    ("cache_seq", None),
    ("cache_blocks", None),         # paged KV blocks: unsplit, any decode slot may point at any block (a split block
                                    # axis would gather across devices in every layer); kv_heads still split on tensor
    ("layers", None),
    # encoder family (fastserve/models/encoder.py): small tables and the classifier output, replicated
    ("positions", None),            # rows of a learned position-embedding table
    ("token_types", None),          # rows of the token-type (segment) embedding table
    ("classes", None),              # classifier outputs / class logits
    # image family (fastserve/models/cnn.py): a conv kernel is [kh, kw, conv_in, conv_out] (its taps unnamed)
    ("conv_in", "fsdp"),            # input channels: FSDP shards them, as it does `embed`
    ("conv_out", "tensor"),         # output channels: a conv's column-parallel split, like `mlp`
    # recurrent family (fastserve/models/recurrent.py): kernel [F, G·H] is ("embed", "rnn_gates"), recurrent kernel
    # [H, G·H] ("rnn_hidden", "rnn_gates"). Both replicated: each scan step splits the fused gate axis into its gates
    # (a sharded fused axis that is split rematerializes, like a fused QKV) and needs the whole hidden vector, so
    # sharding either would put a collective inside every time step.
    ("rnn_gates", None),            # the fused gate axis G·H (LSTM 4H: i,f,c,o; GRU 3H: z,r,h; SimpleRNN H)
    ("rnn_hidden", None),           # the hidden-state rows of a recurrent kernel
    # sequential family (fastserve/models/sequential.py): a Keras Dense kernel is [dense_in, dense_out]
    ("dense_in", "fsdp"),           # input features: FSDP shards them, as it does `embed`
    ("dense_out", "tensor"),        # output units (and the bias): column-parallel, like `mlp`
)
_RULES = dict(LOGICAL_RULES)
assert len(_RULES) == len(LOGICAL_RULES), "duplicate logical name in LOGICAL_RULES"


# ------------------------------------------------------------------------------------------ multi-host

def initialize_distributed(cfg: Any) -> None:
    """Joins a multi-process JAX job when the config (or `auto`, from the environment) asks for it.

    `cfg` is a `DistributedConfig`. Must run before any JAX array exists. Single-process runs do nothing.
    """
    if not (cfg.enabled or cfg.auto):
        return
    if jax.distributed.is_initialized():
        return
    if cfg.auto:  # TPU pods, SLURM, Open MPI: JAX reads everything from the environment
        jax.distributed.initialize(initialization_timeout=cfg.timeout_s)
    else:
        if not cfg.coordinator:
            raise ValueError("distributed.enabled is set but distributed.coordinator (host:port) is empty")
        jax.distributed.initialize(coordinator_address=cfg.coordinator, num_processes=cfg.num_processes,
                                   process_id=cfg.process_id, initialization_timeout=cfg.timeout_s)
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


# ------------------------------------------------------------------------------------------------ mesh

def mesh_shape(data: int, fsdp: int, tensor: int, n_devices: int) -> tuple[int, int, int]:
    """Resolves one `-1` entry to the devices left over; checks the product equals the device count."""
    dims = [data, fsdp, tensor]
    if sum(d == -1 for d in dims) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    for name, d in zip(MESH_AXES, dims):
        if d == 0 or d < -1:
            raise ValueError(f"mesh.{name}={d}: must be a positive size or -1")
    known = math.prod(d for d in dims if d != -1)
    if -1 in dims:
        if n_devices % known:
            raise ValueError(f"mesh: {n_devices} devices do not divide by the fixed axes (product {known})")
        dims[dims.index(-1)] = n_devices // known
    if math.prod(dims) != n_devices:
        raise ValueError(f"mesh data={dims[0]} × fsdp={dims[1]} × tensor={dims[2]} = {math.prod(dims)} "
                         f"devices, but {n_devices} are available")
    return tuple(dims)


def make_mesh(cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh from a `MeshConfig`; Auto axis types (Explicit breaks nnx.Embed)."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(cfg.data, cfg.fsdp, cfg.tensor, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def mesh_fits(cfg: Any, n_devices: int | None = None) -> bool:
    """Whether a `MeshConfig` can be laid on `n_devices` (default: this process's) or on the first few of them."""
    n = jax.local_device_count() if n_devices is None else n_devices
    dims = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(d for d in dims if d != -1)
    return known <= n and (n % known == 0 if -1 in dims else True)


def make_tool_mesh(cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh a single-process tool (evaluate, generate, compress, export, serve) restores a work dir onto.

    `cfg` is the mesh the work dir was trained on, often for another machine. When it fits here it is used (on the
    first devices if it needs fewer than there are); when it does not, the tool runs on one device and says so in
    one line: checkpoints restore onto any mesh, so only speed and memory change. A multi-process run keeps
    `make_mesh` (its processes must agree on one global mesh).
    """
    if jax.process_count() > 1:
        return make_mesh(cfg, devices)
    devices = list(devices) if devices is not None else jax.local_devices()
    if mesh_fits(cfg, len(devices)):
        dims = [cfg.data, cfg.fsdp, cfg.tensor]
        n = len(devices) if -1 in dims else math.prod(dims)
        if n < len(devices):
            log.info("mesh data=%d fsdp=%d tensor=%d uses %d of the %d devices here", *dims, n, len(devices))
        return make_mesh(cfg, devices[:n])
    log.info("mesh data=%d fsdp=%d tensor=%d (from the config) does not fit the %d device(s) here: running on "
             "1 device", cfg.data, cfg.fsdp, cfg.tensor, len(devices))
    return jax.make_mesh((1, 1, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices[:1])


# ------------------------------------------------------------------------------------------- shardings

def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None) -> P:
    """Maps logical axis names to a PartitionSpec through THE rules table.

    With `shape` and `mesh`, a dimension that the mapped mesh axes do not divide is replicated instead (e.g. 3 KV
    heads on tensor=2): correct, only less sharded. A mesh axis is used at most once per array.
    """
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical):
        if name is None:
            spec.append(None)
            continue
        if name not in _RULES:
            raise KeyError(f"logical axis '{name}' is not in fastserve.parallel.LOGICAL_RULES")
        axes = _RULES[name]
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None and axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
                axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def named_sharding(mesh: Mesh, logical: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical, shape, mesh))


def tree_shardings(mesh: Mesh, abstract: Any, logical: Any) -> Any:
    """Shardings for a tree of arrays given a same-structured tree of logical-axis tuples."""
    return jax.tree.map(lambda x, names: named_sharding(mesh, names, x.shape), abstract, logical,
                        is_leaf=lambda n: isinstance(n, tuple))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, leading: int = 0) -> NamedSharding:
    """Data sharding for an array whose axis `leading` is the batch (earlier axes, e.g. micro-batches, unsharded)."""
    names: list[str | None] = [None] * ndim
    names[leading] = "batch"
    return NamedSharding(mesh, logical_to_spec(names))


def host_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh, leading: int = 0) -> dict[str, jax.Array]:
    """Assembles each process's slice of the global batch into globally sharded arrays (works on 1 host too)."""
    out = {}
    for key, local in batch.items():
        sharding = batch_sharding(mesh, local.ndim, leading)
        out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(local))
    return out


def set_host_device_count(n: int) -> None:
    """Simulates `n` CPU devices (tests, laptops). Must run before JAX creates its first array."""
    jax.config.update("jax_num_cpu_devices", n)


def enable_compilation_cache(path: str | None = None) -> None:
    """Persistent XLA compilation cache: a second run of the same step compiles in a fraction of the time."""
    path = path or os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.expanduser("~/.cache/fastserve/jax")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

"""The work-dir format and loading a model from any source.

A work dir holds `config.yaml` (the full config it was trained with), the tokenizer (`tokenizer.model`, or
`tokenizer.bpe.json` for an imported byte-level BPE) and `checkpoints/` (orbax). `load_model` reads weights from
`source`: a work dir, a llama.cpp GGUF file or a Hugging Face directory, and places them on the config's mesh.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import yaml

from fastserve import parallel
from fastserve.data.packages import resolve_path  # noqa: F401  (re-exported: `package:` paths)
from fastserve.config import Config, config_from_dict
from fastserve.core.checkpoint import CheckpointError, CheckpointMismatch, Checkpointer
from fastserve.core.state import abstract_model, abstract_model_split, merge_trees

log = logging.getLogger(__name__)

# An imported byte-level BPE tokenizer stored in a work dir (written by fastserve.compress from a GGUF / HF source);
# not `tokenizer.json`, which is the sentencepiece training record there.
BPE_TOKENIZER_FILE = "tokenizer.bpe.json"

@dataclass
class LoadedModel:
    model_cfg: Any              # the family's config dataclass (`model` section)
    graphdef: Any
    params: Any                 # the model's variables (params ∪ model state): a pure nested dict on `mesh`
    tokenizer: Any              # encode / decode / bos_id / eos_id / pad_id (sentencepiece or imported BPE); None
                                # for models without text
    mesh: Any
    chat_template: str | None = None
    step: int | None = None     # the checkpoint step, when loaded from a work dir

    @property
    def stop_ids(self) -> list[int]:
        ids = getattr(self.tokenizer, "stop_ids", None)
        return list(ids) if ids else [self.tokenizer.eos_id]

def hf_model_type(path: str) -> str:
    """`model_type` of a HF directory's config.json ("" when it has none): picks the importer for source.kind=hf."""
    conf = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")
    if not os.path.isfile(conf):
        return ""
    with open(conf, encoding="utf-8") as f:
        return str(json.load(f).get("model_type", ""))

def place_params(params: Any, model_cfg: Any, mesh) -> tuple[Any, Any]:
    """(graphdef, `params` cast and placed with `model_cfg`'s shardings on `mesh`); a clear error when the weights'
    structure is not the config's."""
    graphdef, abstract, logical = abstract_model(model_cfg)
    shardings = parallel.tree_shardings(mesh, abstract, logical)
    try:
        placed = jax.tree.map(lambda x, a, s: jax.device_put(jnp.asarray(x, a.dtype), s), params, abstract, shardings)
    except ValueError as e:
        raise ValueError(f"the weights do not match the model config's structure: {e}") from None
    return graphdef, placed

def _load_checkpoint(cfg: Config, mesh) -> LoadedModel:
    from fastserve.data import Tokenizer

    workdir = cfg.source.path or cfg.train.workdir
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir) and os.path.basename(os.path.normpath(workdir)) == "checkpoints":
        workdir, ckpt_dir = os.path.dirname(os.path.normpath(workdir)), workdir
    trained_cfg = os.path.join(workdir, "config.yaml")
    if not os.path.isfile(trained_cfg):
        raise FileNotFoundError(f"{workdir} is not a fastserve work dir (no config.yaml): train a model there first")
    with open(trained_cfg) as f:
        trained = config_from_dict(yaml.safe_load(f))
    model_cfg = trained.model
    bpe_file = os.path.join(workdir, BPE_TOKENIZER_FILE)
    if trained.tokenizer.kind == "wordpiece":   # an imported BERT vocabulary, read where the run read it
        from fastserve.data.wordpiece import load_wordpiece
        tokenizer = load_wordpiece(trained.tokenizer.path)
    elif os.path.isfile(bpe_file):
        from fastserve.interop.tokenizer import BPETokenizer
        with open(bpe_file, encoding="utf-8") as f:
            tokenizer = BPETokenizer.from_json(f.read())
    elif os.path.isfile(os.path.join(workdir, "tokenizer.model")):
        tokenizer = Tokenizer.from_file(os.path.join(workdir, "tokenizer.model"))
    elif trained.tokenizer.path and os.path.exists(resolve_path(trained.tokenizer.path)):
        # a run that read an existing tokenizer (`tokenizer.path`) from where it read it
        from fastserve.data.tokenizer import load_or_train_tokenizer
        tokenizer = load_or_train_tokenizer(resolve_path(trained.tokenizer.path), [], 0, "", workdir)
    else:  # a family without text (images) or a source that brings its own vocabulary
        tokenizer = None
    ckpt = Checkpointer(ckpt_dir)
    steps = ckpt.all_steps()
    if not steps:
        raise CheckpointError(f"no checkpoint in {ckpt_dir}")
    from fastserve.models.layer_stack import other_layout, per_layer_config, unstack_layers

    def restore(model_cfg):
        graphdef, params, p_axes, state, s_axes = abstract_model_split(model_cfg)
        def target(abstract, logical):
            shardings = parallel.tree_shardings(mesh, abstract, logical)
            return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        entries = {"params": target(params, p_axes), "model_state": target(state, s_axes)}
        # checked against the save's checksums; a corrupt or unreadable step is reported and the previous one used
        step, restored = ckpt.restore_entries_latest(entries)
        return graphdef, step, merge_trees(restored["params"], restored["model_state"])
    try:
        try:
            graphdef, step, params = restore(model_cfg)
        except CheckpointMismatch as mismatch:  # saved with the other layer layout (stacked ↔ per-layer)?
            twin = other_layout(model_cfg)
            if twin is None:
                raise
            try:
                graphdef, step, params = restore(twin)
            except CheckpointMismatch:
                raise mismatch from None   # not a layout change: the error for the config's own layout says why
            model_cfg = twin
    finally:
        ckpt.close()
    if getattr(model_cfg, "scanned", False):  # tools address single layers (transforms, KV cache): per-layer weights
        model_cfg = per_layer_config(model_cfg)
        graphdef, params = place_params(unstack_layers(params), model_cfg, mesh)
    return LoadedModel(model_cfg, graphdef, params, tokenizer, mesh,
                       chat_template=getattr(tokenizer, "chat_template", None), step=step)

# Fields of a `model:` section that choose how a model runs, not what its weights are: an imported model (GGUF, HF)
# takes them from the config, the rest from the weights' metadata.
RUN_CHOICES = ("attention", "remat")


def with_run_choices(imported_cfg: Any, cfg_model: Any) -> Any:
    """`imported_cfg` with the config's RUN_CHOICES, when the config's `model:` is of the same family."""
    if type(cfg_model) is not type(imported_cfg):
        return imported_cfg
    chosen = {f: getattr(cfg_model, f) for f in RUN_CHOICES if hasattr(imported_cfg, f)}
    return dataclasses.replace(imported_cfg, **chosen) if chosen else imported_cfg


def load_model(cfg: Config, mesh: Any = None) -> LoadedModel:
    """Weights (params ∪ model state), tokenizer and model definition from `cfg.source`, placed on `mesh` (default:
    the config's when it fits the devices here, else one device: `parallel.make_tool_mesh`)."""
    mesh = mesh if mesh is not None else parallel.make_tool_mesh(cfg.mesh)
    kind = cfg.source.kind
    if kind == "checkpoint":
        return _load_checkpoint(cfg, mesh)
    if kind in ("gguf", "hf"):
        from fastserve import interop
        path = resolve_path(cfg.source.path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"source.path: {path} does not exist")
        if kind == "gguf":
            imported = interop.load_gguf(path, cfg.source.dtype)
        elif hf_model_type(path) == "bert":
            imported = interop.load_hf_bert(path, cfg.source.dtype)
        else:
            imported = interop.load_hf_llama(path, cfg.source.dtype)
        model_cfg = with_run_choices(imported.model_cfg, cfg.model)
        graphdef, params = place_params(imported.params, model_cfg, mesh)
        return LoadedModel(model_cfg, graphdef, params, imported.tokenizer, mesh, imported.chat_template)
    raise ValueError(f"unknown source.kind '{kind}' (choose from checkpoint, gguf, hf)")

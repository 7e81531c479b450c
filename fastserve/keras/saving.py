"""Saving a Sequential model as a fastserve work dir (config.yaml, checksummed orbax checkpoints, keras.json with
the compile arguments) and loading it back; the fastserve tools (evaluate, export) read the same work dir."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import yaml

from fastserve.config import Config, MeshConfig, TrainConfig, config_from_dict, dump_config
from fastserve.core.checkpoint import Checkpointer
from fastserve.core.state import abstract_train_state, merge_trees, split_like
from fastserve.data.arrays import ArraysDataConfig
from fastserve.keras.optimizers import Optimizer
from fastserve.models.sequential import SequentialConfig
from fastserve.tasks.keras_loss import KerasLossConfig

COMPILE_FILE = "keras.json"


def save_model(model: Any, path: str) -> None:
    """A fastserve work dir at `path`: config.yaml (model, optimizer, task), checkpoints/ (orbax, checksummed:
    weights, batch-norm statistics, optimizer state when trained) and keras.json (the compile arguments)."""
    os.makedirs(path, exist_ok=True)
    c = model._compiled
    cfg = Config(model=model.config, data=ArraysDataConfig(),
                 train=TrainConfig(task=c.task_cfg if c else KerasLossConfig(), workdir=os.path.abspath(path)),
                 mesh=MeshConfig(data=-1))
    if c is not None and c.optimizer is not None and c.optimizer.name in ("adam", "adamw", "sgd", "lion",
                                                                          "adafactor"):
        cfg = dataclasses.replace(cfg, optimizer=c.optimizer.optimizer_config())
    with open(os.path.join(path, "config.yaml"), "w") as f:
        f.write(dump_config(cfg))
    trained = model._state is not None
    if trained:
        state = model._state
    else:
        params, model_state = split_like(model._variables(), model._abstract_params())
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": model_state}
    meta = {"name": model.name, "seed": model.seed, "optimizer_state": trained and c.optimizer is not None,
            "epoch": model.epochs_done,
            "compile": None if c is None else {
                "optimizer": None if c.optimizer is None else {"name": c.optimizer.name,
                                                               "options": c.optimizer.options},
                "loss": c.task_cfg.loss if c.loss_fn is None else None, "from_logits": c.task_cfg.from_logits,
                "metrics": c.task_cfg.metrics}}
    with open(os.path.join(path, COMPILE_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    ckpt_dir = os.path.join(path, "checkpoints")
    shutil.rmtree(ckpt_dir, ignore_errors=True)   # Keras overwrites a saved model
    with Checkpointer(ckpt_dir, max_to_keep=1, async_save=False) as ckpt:
        ckpt.save(int(jax.device_get(state["step"])), state, {})


def read_saved(path: str) -> tuple[Any, dict]:
    """(the model config, the keras.json record) of a model saved by `save_model`."""
    cfg_path, meta_path = os.path.join(path, "config.yaml"), os.path.join(path, COMPILE_FILE)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path} is not a saved model (no config.yaml)")
    with open(cfg_path) as f:
        cfg = config_from_dict(yaml.safe_load(f))
    if not isinstance(cfg.model, SequentialConfig):
        raise ValueError(f"{path} holds a '{cfg.model.name}' model, not a sequential one")
    meta = {}
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
    return cfg.model, meta


def compile_as_saved(model: Any, meta: dict) -> None:
    """Compiles `model` with the optimizer, loss and metrics recorded in keras.json (when there are)."""
    spec = meta.get("compile")
    if spec and spec.get("optimizer") and spec.get("loss"):
        opt = spec["optimizer"]
        model.compile(optimizer=Optimizer(opt["name"], opt["options"]), loss=spec["loss"], metrics=spec["metrics"])
        model._compiled.task_cfg = dataclasses.replace(model._compiled.task_cfg, from_logits=spec["from_logits"])


def restore_weights(model: Any, path: str, meta: dict) -> None:
    """The saved weights and batch-norm statistics into `model` (and the optimizer state when it was trained with a
    named optimizer and is compiled), on this machine's devices."""
    with Checkpointer(os.path.join(path, "checkpoints")) as ckpt:
        if meta.get("optimizer_state") and model._compiled is not None:
            model._ensure_train_state(1)
            found = ckpt.restore_latest(abstract_train_state(model._state, model._shardings))
            if found is None:
                raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
            model._state = found[1]
        else:
            model._init_weights()
            abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), model._vars,
                                    model._var_shardings)
            params, state = split_like(abstract, model._abstract_params())
            found = ckpt.restore_entries_latest({"params": params, "model_state": state})
            if found is None:
                raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
            model._vars = merge_trees(found[1]["params"], found[1]["model_state"])


# Keras's order in a layer (Bidirectional: the forward layer's weights, then the backward one's)
_WEIGHT_ORDER = {"kernel": 0, "embedding": 0, "recurrent_kernel": 1, "scale": 1, "bias": 2, "mean": 3, "var": 4}
_SUBLAYER_ORDER = {"forward_layer": 0, "backward_layer": 1}


def flat_variables(planned: list, variables: dict) -> list[tuple[tuple[str, ...], Any]]:
    """(path, array) for every variable, layer by layer in Keras's `get_weights` order (kernel, bias; batch norm:
    scale, bias, mean, var)."""
    out = []
    for p in planned:
        layer = variables.get("layers", {}).get(p.name)
        if not layer:
            continue
        leaves = jax.tree_util.tree_flatten_with_path(layer)[0]
        keyed = [((p.name, *[str(getattr(k, "key", k)) for k in path]), v) for path, v in leaves]
        keyed.sort(key=lambda kv: (_SUBLAYER_ORDER.get(kv[0][1], 0) if len(kv[0]) > 2 else 0,
                                   _WEIGHT_ORDER.get(kv[0][-1], 9)))
        out += [(("layers", *path), v) for path, v in keyed]
    return out

"""The models a fusion combines: work dirs loaded with their config, and the checks that they can be combined
(same parameter structure for weight averaging; the same tokenizer always)."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

import jax
import yaml

from fastserve import parallel
from fastserve.config import Config, SourceConfig, config_from_dict
from fastserve.core.checkpoint import Checkpointer
from fastserve.core.state import abstract_model_split, merge_trees


class FusionError(ValueError):
    """Work dirs that cannot be fused as asked (different architectures or tokenizers, bad options)."""


@dataclass
class Member:
    """One model of a fusion: its work dir, the config it was trained with and its loaded weights."""
    workdir: str
    cfg: Config
    loaded: Any          # fastserve.workdir.LoadedModel
    label: str = ""      # e.g. "runs/a" or "runs/a@step200"

    @property
    def params(self) -> Any:
        return self.loaded.params


def read_workdir_config(workdir: str) -> Config:
    path = os.path.join(workdir, "config.yaml")
    if not os.path.isfile(path):
        raise FusionError(f"{workdir} is not a fastserve work dir (no config.yaml)")
    with open(path) as f:
        return config_from_dict(yaml.safe_load(f))


def load_member(workdir: str, mesh: Any = None) -> Member:
    """The newest readable checkpoint of `workdir`, placed on `mesh` (default: a one-device tool mesh)."""
    from fastserve.workdir import load_model

    cfg = read_workdir_config(workdir)
    cfg = dataclasses.replace(cfg, source=SourceConfig(kind="checkpoint", path=workdir))
    loaded = load_model(cfg, mesh if mesh is not None else parallel.make_tool_mesh(cfg.mesh))
    if loaded.tokenizer is None and cfg.tokenizer.path.endswith(".model") and os.path.isfile(cfg.tokenizer.path):
        # a run trained with an existing tokenizer (`tokenizer.path`) keeps it there, not in its work dir
        from fastserve.data import Tokenizer
        loaded.tokenizer = Tokenizer.from_file(cfg.tokenizer.path)
    return Member(workdir, cfg, loaded, f"{workdir}@step{loaded.step}")


def checkpoint_steps(workdir: str) -> list[int]:
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        return sorted(ckpt.all_steps())
    finally:
        ckpt.close()


def load_step(member: Member, step: int) -> Any:
    """The variables (params ∪ model state) of `member`'s work dir at checkpoint `step`, placed like its params (in
    its loaded layout: a checkpoint saved with stacked decoder layers is unstacked, as `load_model` does)."""
    from fastserve.core.checkpoint import CheckpointMismatch
    from fastserve.models.layer_stack import other_layout, unstack_layers
    from fastserve.workdir import place_params

    mesh = member.loaded.mesh

    def restore(model_cfg):
        _, params, p_axes, state, s_axes = abstract_model_split(model_cfg)

        def target(abstract, logical):
            shardings = parallel.tree_shardings(mesh, abstract, logical)
            return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

        restored = ckpt.restore_entries(step, {"params": target(params, p_axes),
                                               "model_state": target(state, s_axes)})
        return merge_trees(restored["params"], restored["model_state"])

    ckpt = Checkpointer(os.path.join(member.workdir, "checkpoints"))
    try:
        try:
            return restore(member.loaded.model_cfg)
        except CheckpointMismatch:  # saved with the other layer layout (scanned training, per-layer tools)
            twin = other_layout(member.loaded.model_cfg)
            if twin is None:
                raise
            variables = restore(twin)
    finally:
        ckpt.close()
    if getattr(twin, "scanned", False):
        variables = unstack_layers(variables)
    return place_params(variables, member.loaded.model_cfg, mesh)[1]


def _tokenizer_bytes(tokenizer: Any) -> bytes | None:
    if tokenizer is None:
        return None
    export = getattr(tokenizer, "export_file", None)
    if export is not None:
        return export()[2]
    return tokenizer.to_json().encode()


def tokenizer_difference(a: Any, b: Any) -> str | None:
    """None when the two tokenizers are the same; else what differs first (vocabulary size or a piece)."""
    if _tokenizer_bytes(a) == _tokenizer_bytes(b):
        return None
    if (a is None) != (b is None):
        return "one model has a tokenizer and the other has none"
    if a.vocab_size != b.vocab_size:
        return f"vocabulary sizes differ ({a.vocab_size} vs {b.vocab_size})"
    for i in range(a.vocab_size):
        pa, pb = a.decode([i]), b.decode([i])
        if pa != pb:
            return f"token id {i} is {pa!r} in one and {pb!r} in the other"
    return "the tokenizer files differ (same pieces, different settings: normalization or special tokens)"


def param_difference(a: Any, b: Any) -> str | None:
    """None when the two variable trees have the same paths, shapes and dtypes; else the first parameter that
    differs, by path."""
    def flat(tree):
        return {jax.tree_util.keystr(p, simple=True, separator="."): x
                for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    flat_a, flat_b = flat(a), flat(b)
    for path in [*flat_a, *(p for p in flat_b if p not in flat_a)]:
        if path not in flat_b:
            return f"parameter {path} exists only in the first"
        if path not in flat_a:
            return f"parameter {path} exists only in the second"
        xa, xb = flat_a[path], flat_b[path]
        if xa.shape != xb.shape or xa.dtype != xb.dtype:
            return (f"parameter {path} is {xa.dtype}{list(xa.shape)} in the first and {xb.dtype}{list(xb.shape)} "
                    "in the second")
    return None


def check_compatible(members: list[Member], same_weights: bool) -> None:
    """Raises FusionError naming the first difference: the tokenizer always; with `same_weights` (weight
    averaging) also the first parameter whose path, shape or dtype differs, and int8-quantized layers."""
    if not members:
        raise FusionError("no work dirs to fuse")
    first = members[0]
    for m in members[1:]:
        diff = tokenizer_difference(first.loaded.tokenizer, m.loaded.tokenizer)
        if diff:
            raise FusionError(f"{first.workdir} and {m.workdir} have different tokenizers: {diff}")
    if not same_weights:
        return
    for m in members:
        int8 = [p for p, e in getattr(m.loaded.model_cfg, "compressed", {}).items() if e.get("kind") == "int8"]
        if int8:
            raise FusionError(f"{m.workdir} has int8-quantized layers ({int8[0]}, …): average the float models, "
                              "then quantize the soup")
    for m in members[1:]:
        diff = param_difference(first.params, m.params)
        if diff:
            raise FusionError(f"{first.workdir} and {m.workdir} cannot be averaged: {diff}")


REPORT_FILE = "fusion_report.json"


def write_fused_workdir(members: list[Member], out_dir: str, model_cfg: Any, variables: Any, report: dict[str, Any],
                        method: str, fused: list[str]) -> Config:
    """Writes `out_dir` as a work dir holding `variables` of `model_cfg` (the first member's config, tokenizer and
    mesh; provenance and the config header name `method` and the `fused` members) plus fusion_report.json; returns
    the new config. Refuses an `out_dir` that is one of the members or already holds checkpoints."""
    from fastserve.transforms.report import write_workdir

    if os.path.abspath(out_dir) in {os.path.abspath(m.workdir) for m in members}:
        raise FusionError(f"--out {out_dir} is one of the fused work dirs: write the result to a new one")
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise FusionError(f"--out {out_dir} already holds checkpoints: choose a new directory")
    first = members[0]
    provenance = {"source": {"fused": list(fused), "method": method}, "transforms": []}
    new_cfg = write_workdir(first.cfg, out_dir, model_cfg, variables, first.loaded.tokenizer, first.loaded.mesh,
                            provenance)
    config_path = os.path.join(out_dir, "config.yaml")
    with open(config_path) as f:
        body = f.read().split("\n", 1)[1]  # write_workdir's header names compress; this one says what was done
    with open(config_path, "w") as f:
        f.write(f"# written by fastserve.fuse ({method} of {len(fused)}: {', '.join(fused)}; see {REPORT_FILE})\n{body}")
    with open(os.path.join(out_dir, REPORT_FILE), "w") as f:
        json.dump({**report, "out": os.path.abspath(out_dir)}, f, indent=1)
        f.write("\n")
    return new_cfg

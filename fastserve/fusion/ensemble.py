"""Ensembles of work dirs: N models (of possibly different sizes) sharing a tokenizer / label set, combined by
averaging their probabilities, as one model (`model.name: ensemble`, fastserve/fusion/model.py).

`ensemble_member` builds it in memory from loaded members (their weights under `members.<i>`); `write_ensemble`
writes it as an ordinary work dir (config.yaml with the members' model sections, the shared tokenizer, a step-0
checkpoint), so `python -m fastserve.evaluate / generate / export / serve --checkpoint DIR` take it like any model:
for causal LMs the KV-cached prefill / decode / generate and the serving engine run every member's cache.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from fastserve.fusion.members import FusionError, Member, check_compatible
from fastserve.fusion.model import EnsembleConfig, combine_logits

REPORT_FILE = "fusion_report.json"


def ensemble_config(members: list[Member]) -> EnsembleConfig:
    """The `model:` section of the ensemble of `members` (their own model sections, in order)."""
    vocabs = {int(getattr(m.loaded.model_cfg, "vocab_size", 0) or 0) for m in members}
    if len(vocabs) > 1:
        raise FusionError(f"the members' vocab_size differ ({sorted(vocabs)}): an ensemble needs one vocabulary / "
                          "label set")
    nested = [m.workdir for m in members if m.loaded.model_cfg.name == "ensemble"]
    if nested:
        raise FusionError(f"{nested[0]} is already an ensemble: list its members' work dirs instead")
    return EnsembleConfig(members=[dataclasses.asdict(m.loaded.model_cfg) for m in members])


def ensemble_member(members: list[Member]) -> Member:
    """The ensemble of `members` as one in-memory Member (config and tokenizer of the first; weights not copied)."""
    from fastserve.core.state import abstract_model

    check_compatible(members, same_weights=False)
    first = members[0]
    model_cfg = ensemble_config(members)
    graphdef, _, _ = abstract_model(model_cfg)
    variables = {"members": {i: m.params for i, m in enumerate(members)}}
    loaded = dataclasses.replace(first.loaded, model_cfg=model_cfg, graphdef=graphdef, params=variables, step=0)
    cfg = dataclasses.replace(first.cfg, model=model_cfg)
    return Member(first.workdir, cfg, loaded, "ensemble(" + ", ".join(m.label for m in members) + ")")


def write_ensemble(members: list[Member], out_dir: str, report: dict[str, Any]) -> Any:
    """Writes the ensemble of `members` into `out_dir` as a work dir (plus fusion_report.json); returns its config."""
    from fastserve.transforms.report import write_workdir

    if os.path.abspath(out_dir) in {os.path.abspath(m.workdir) for m in members}:
        raise FusionError(f"--out {out_dir} is one of the ensembled work dirs: write the ensemble to a new one")
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise FusionError(f"--out {out_dir} already holds checkpoints: choose a new directory")
    ens = ensemble_member(members)
    provenance = {"source": {"fused": [m.label for m in members], "method": "ensemble"}, "transforms": []}
    new_cfg = write_workdir(members[0].cfg, out_dir, ens.loaded.model_cfg, ens.params, ens.loaded.tokenizer,
                            ens.loaded.mesh, provenance)
    config_path = os.path.join(out_dir, "config.yaml")
    with open(config_path) as f:
        body = f.read().split("\n", 1)[1]  # write_workdir's header names compress; this one says what was done
    with open(config_path, "w") as f:
        f.write(f"# written by fastserve.fuse (ensemble of {len(members)}: {', '.join(m.label for m in members)}; "
                f"log of the members' mean probabilities; see {REPORT_FILE})\n{body}")
    with open(os.path.join(out_dir, REPORT_FILE), "w") as f:
        json.dump({**report, "out": os.path.abspath(out_dir)}, f, indent=1)
        f.write("\n")
    return new_cfg


__all__ = ["combine_logits", "ensemble_config", "ensemble_member", "write_ensemble"]

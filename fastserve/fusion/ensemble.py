"""Ensembles of work dirs: N models (of possibly different sizes) sharing a tokenizer / label set, combined by
averaging their probabilities, as one model (`model.name: ensemble`, fastserve/fusion/model.py).

`ensemble_member` builds it in memory from loaded members (their weights under `members.<i>`); `write_ensemble`
writes it as an ordinary work dir (config.yaml with the members' model sections, the shared tokenizer, a step-0
checkpoint), so `python -m fastserve.evaluate / generate / export / serve --checkpoint DIR` take it like any model:
for causal LMs the KV-cached prefill / decode / generate and the serving engine run every member's cache.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from fastserve.fusion.members import FusionError, Member, check_compatible, write_fused_workdir
from fastserve.fusion.model import EnsembleConfig, combine_logits



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
    """Writes the ensemble of `members` into `out_dir` as a work dir (plus fusion_report.json); returns its config.
    The output is the log of the members' mean probabilities."""
    ens = ensemble_member(members)
    return write_fused_workdir(members, out_dir, ens.loaded.model_cfg, ens.params, report, "ensemble",
                               [m.label for m in members])


__all__ = ["combine_logits", "ensemble_config", "ensemble_member", "write_ensemble"]

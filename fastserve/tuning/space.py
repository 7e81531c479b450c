"""The search-space file of `python -m fastserve.tune --space FILE`:

    space:                                   # any config key: a distribution
      optimizer.learning_rate: loguniform(1e-4, 1e-2)
      optimizer.warmup_steps: int(0, 100)    # int(a, b[, step]); logint(a, b) samples on a log scale
      model.d_ff: choice(256, 512, 688)      # any YAML values
      model.dropout: uniform(0.0, 0.2)
    objective: loss                          # a held-out metric the task reports (loss, perplexity, accuracy, …)
    direction: minimize                      # or maximize
    trials: 8                                # finished trials (complete or pruned) the study should hold
    timeout_s: 900                           # wall time of one invocation (0: none)
    pruner: median                           # median | halving | none (checked at each train.eval_every)
    prune_from_step: 100                     # no pruning before this step (warmups differ early on)
    baseline: true                           # trial 0 is the config as given, measured in the same study

Every problem (an unknown key, a malformed distribution, a value the config refuses) names the key.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from fastserve.config import Config, ConfigError, apply_overrides

KINDS = ("loguniform", "uniform", "int", "logint", "choice")
PRUNERS = ("median", "halving", "none")
_CALL = re.compile(r"^\s*(\w+)\s*\((.*)\)\s*$", re.S)


class TuneError(ValueError):
    """A search-space file, key or option that cannot be tuned as written."""


@dataclass
class Param:
    key: str                 # dotted config key, e.g. optimizer.learning_rate
    kind: str                # one of KINDS
    args: list[Any]          # (low, high[, step]) or the choices

    def suggest(self, trial: Any) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, self.args)
        if self.kind in ("int", "logint"):
            step = int(self.args[2]) if len(self.args) > 2 else 1
            return trial.suggest_int(self.key, int(self.args[0]), int(self.args[1]), step=step,
                                     log=self.kind == "logint")
        return trial.suggest_float(self.key, float(self.args[0]), float(self.args[1]), log=self.kind == "loguniform")

    def example(self) -> Any:
        """A value of the space (its first choice or its low end), to check the config accepts the key."""
        return self.args[0] if self.kind == "choice" else (int(self.args[0]) if "int" in self.kind
                                                           else float(self.args[0]))


@dataclass
class TuneSpec:
    params: list[Param]
    objective: str = "loss"
    direction: str = "minimize"
    trials: int = 8
    timeout_s: float = 0.0
    pruner: str = "median"
    baseline: bool = True
    prune_from_step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def override(key: str, value: Any) -> str:
    """`key=value` with the value written so the config's YAML reading gives it back unchanged."""
    return f"{key}={json.dumps(value)}"


def parse_param(key: str, text: Any) -> Param:
    m = _CALL.match(str(text))
    if not m:
        raise TuneError(f"space.{key}: '{text}' is not a distribution; write one of "
                        f"{', '.join(k + '(...)' for k in KINDS)}")
    kind, raw = m.group(1), m.group(2)
    if kind not in KINDS:
        raise TuneError(f"space.{key}: unknown distribution '{kind}' (choose from {', '.join(KINDS)})")
    try:
        args = yaml.safe_load(f"[{raw}]")
    except yaml.YAMLError as e:
        raise TuneError(f"space.{key}: cannot read the arguments of {kind}({raw}): {e}") from None
    if kind == "choice":
        if not args:
            raise TuneError(f"space.{key}: choice() needs at least one value")
        return Param(key, kind, args)
    if len(args) not in (2, 3) or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise TuneError(f"space.{key}: {kind}(low, high) takes two numbers, got {kind}({raw})")
    low, high = args[0], args[1]
    if not low < high:
        raise TuneError(f"space.{key}: {kind}({raw}) needs low < high")
    if kind in ("loguniform", "logint") and low <= 0:
        raise TuneError(f"space.{key}: {kind} needs low > 0, got {low}")
    if kind in ("int", "logint") and not all(float(a).is_integer() for a in args):
        raise TuneError(f"space.{key}: {kind}({raw}) takes integers")
    if len(args) == 3 and kind != "int":
        raise TuneError(f"space.{key}: only int(low, high, step) takes a step")
    return Param(key, kind, args)


def load_spec(path: str, base: Config) -> TuneSpec:
    """Reads and checks a search-space file against the config it tunes."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict) or not isinstance(raw.get("space"), dict) or not raw["space"]:
        raise TuneError(f"{path}: needs a `space:` mapping of config keys to distributions")
    known = {"space", "objective", "direction", "trials", "timeout_s", "pruner", "baseline", "prune_from_step"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise TuneError(f"{path}: unknown field(s) {unknown} (known: {sorted(known)})")
    params = [parse_param(str(k), v) for k, v in raw["space"].items()]
    for p in params:
        if p.key.startswith("train.workdir"):
            raise TuneError(f"space.{p.key}: the tuner chooses each trial's work dir")
        try:
            apply_overrides(base, [override(p.key, p.example())])
        except ConfigError as e:
            raise TuneError(f"space.{p.key}: the config does not take it: {e}") from None
    spec = TuneSpec(params, str(raw.get("objective", "loss")), str(raw.get("direction", "minimize")),
                    int(raw.get("trials", 8)), float(raw.get("timeout_s", 0) or 0), str(raw.get("pruner", "median")),
                    bool(raw.get("baseline", True)), int(raw.get("prune_from_step", 0) or 0))
    if spec.direction not in ("minimize", "maximize"):
        raise TuneError(f"direction: '{spec.direction}' (choose minimize or maximize)")
    if spec.pruner not in PRUNERS:
        raise TuneError(f"pruner: '{spec.pruner}' (choose from {', '.join(PRUNERS)})")
    if spec.prune_from_step < 0:
        raise TuneError(f"prune_from_step: {spec.prune_from_step} (at least 0)")
    if spec.trials < 1:
        raise TuneError(f"trials: {spec.trials} (at least 1)")
    return spec

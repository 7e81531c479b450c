"""Hyper-parameter tuning of any config key with Optuna (`python -m fastserve.tune`): the search-space file in
`fastserve.tuning.space`, the study (trials as work dirs, pruning, resuming, outputs) in `fastserve.tuning.study`."""
from fastserve.tuning.space import Param, TuneError, TuneSpec, load_spec

__all__ = ["Param", "TuneError", "TuneSpec", "load_spec"]

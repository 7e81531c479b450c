"""Model fusion: weight averaging of work dirs (uniform / greedy soups, EMA of a run's checkpoints) in
`fastserve.fusion.soup`, and probability-averaging ensembles in `fastserve.fusion.ensemble` (the model itself,
`model.name: ensemble`, in `fastserve.fusion.model`: served, generated and exported like one model). The command
line is `python -m fastserve.fuse`."""
from fastserve.fusion.members import FusionError, Member, check_compatible, load_member

__all__ = ["FusionError", "Member", "check_compatible", "load_member"]

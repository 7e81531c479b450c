"""The one task interface: what a step computes from a model and a batch, and how the loop reports it.

A task's `loss` returns the *sum* of its per-example losses and a dict of metric sums that includes `weight`
(the number of examples/tokens counted). Sums, not means, so that gradient accumulation over micro-batches and
evaluation over many batches average exactly; `summarize` turns the sums into reported metrics.

Anything a task needs beyond the model and the batch (a distillation teacher's weights) is its `task_state`: a
pytree (`{}` for most tasks) that `init_state` builds on the mesh and the steps take as a jit *argument* — one
signature for every task, nothing baked into the program as constants.
"""
from __future__ import annotations

import abc
import inspect
from typing import Any

import jax
import numpy as np
from flax import nnx


class Task(abc.ABC):
    """Defaults every task may override. Subclasses set `name`, `unit` and `report` and define `loss` and
    `summarize`."""

    name: str = ""
    unit: str = "examples"                 # what throughput counts: tokens | examples | images | pairs
    report: tuple[str, ...] = ("loss",)    # eval metrics the console line and the progress bar show
    batch_keys: tuple[str, ...] = ()       # keys every batch must carry (checked on the first batch)

    def configure(self, cfg: Any) -> Any:
        """The run's config as this task needs it, before any data is read (default: unchanged)."""
        return cfg

    def init_state(self, cfg: Any, mesh: Any) -> tuple[Any, Any]:
        """(task_state, its shardings) on `mesh`."""
        return {}, {}

    @abc.abstractmethod
    def loss(self, model: nnx.Module, batch: dict[str, jax.Array], rngs: nnx.Rngs | None,
             task_state: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(loss sum, metric sums incl. `weight` and `loss_sum`). `rngs` (dropout streams) is None in eval mode."""

    @abc.abstractmethod
    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        """Reported metrics from summed metric sums."""

    def units(self, batch: dict[str, np.ndarray]) -> int:
        """Throughput units in one (host) batch: examples by default."""
        return int(len(next(iter(batch.values()))))

    def flops_per_unit(self, cfg: Any) -> float | None:
        """Training FLOPs (forward + backward) per unit, for MFU; None where no formula is known. Default: the
        model config's `flops_per_example(...)`, given the data fields its signature names (e.g. seq_len)."""
        per_example = getattr(cfg.model, "flops_per_example", None)
        if per_example is None or self.unit not in ("examples", "images"):
            return None
        names = inspect.signature(per_example).parameters
        return per_example(**{n: getattr(cfg.data, n) for n in names if hasattr(cfg.data, n)})

    def check_batch(self, batch: dict[str, np.ndarray]) -> None:
        missing = [k for k in self.batch_keys if k not in batch]
        if missing:
            raise ValueError(f"train.task={self.name} needs batches with {', '.join(self.batch_keys)}; the data "
                             f"source gives {', '.join(batch)} (missing {', '.join(missing)})")

    def heldout_extra(self, graphdef: Any, variables: Any, data: Any, mesh: Any, cfg: Any) -> dict[str, float]:
        """Held-out metrics beyond the eval step's sums (seq2seq: BLEU / chrF of decoded translations), merged
        into every held-out evaluation of the trainer and of `fastserve.evaluate`. Default: none."""
        return {}

    def after_training(self, graphdef: Any, variables: Any, data: Any, mesh: Any, cfg: Any) -> dict[str, Any]:
        """Anything to show once training ends (LM: sampled continuations); printed and returned by the trainer."""
        return {}


def weighted_mean(sums: dict[str, float], key: str) -> float:
    return float(sums[key]) / max(float(sums["weight"]), 1e-9)


def real_tokens(batch: dict) -> int:
    """Tokens of a padded batch of sequences that are not padding (the unit of per-token encoder tasks)."""
    return int(batch["mask"].sum())


def flops_per_token(cfg: Any) -> float | None:
    """Training FLOPs per token of a model that states its FLOPs per example of `data.seq_len` tokens."""
    per_example = getattr(cfg.model, "flops_per_example", None)
    seq_len = getattr(cfg.data, "seq_len", 0)
    if per_example is None or not seq_len:
        return None
    return per_example(seq_len) / seq_len

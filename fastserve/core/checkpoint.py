"""Checkpoints with orbax: async saves, `max_to_keep`, restore onto any mesh, and a fallback past a corrupt save.

A checkpoint holds the train state (model, optimizer, step, RNG) and, beside it as JSON, the data iterator's
position, so that a resumed run sees exactly the batches an uninterrupted one would have seen.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No readable checkpoint where one was required."""


class Checkpointer:
    def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, extra: dict | None = None) -> None:
        """Starts an (async) save of `state` and the JSON-serializable `extra` (e.g. the data position)."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         extra=ocp.args.JsonSave(extra or {})), force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                  extra=ocp.args.JsonRestore()))
        return out["state"], dict(out["extra"] or {})

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the model parameters of a saved train state (no optimizer memory): for inference and export."""
        target = {"params": abstract_params}
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), target)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True)))
        return out["state"]["params"]

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """Restores the newest readable checkpoint; an unreadable one is reported and the previous one is tried.

        Returns None when the directory holds no checkpoint at all.
        """
        steps = self.all_steps()
        for step in reversed(steps):
            try:
                state, extra = self.restore(step, abstract_state)
                return step, state, extra
            except Exception as e:  # orbax raises many types for truncated/corrupt files
                log.warning("checkpoint at step %d in %s is unreadable (%s: %s); trying the previous one",
                            step, self.directory, type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
        if steps:
            raise CheckpointError(f"none of the checkpoints in {self.directory} (steps {steps}) could be read")
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

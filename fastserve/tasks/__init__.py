"""Tasks: what a step computes from a model and a batch. The step builders in fastserve.core are task-agnostic.

A task is selected by `train.task` (its name, or a mapping with its options); the names are registered in
`fastserve.registry.TASKS`, each pointing at the task's config dataclass, whose `build()` makes the task.
"""
from __future__ import annotations

from typing import Any

from fastserve.tasks.base import Task


def make_task(task_cfg: Any) -> Task:
    """The task a `train.task` config section describes (or, given a registered name, that task's defaults)."""
    if isinstance(task_cfg, str):
        from fastserve import registry
        if task_cfg not in registry.TASKS:
            raise ValueError(f"unknown task '{task_cfg}' (registered: {', '.join(registry.TASKS)})")
        task_cfg = registry.resolve(registry.TASKS[task_cfg])()
    return task_cfg.build()


__all__ = ["Task", "make_task"]

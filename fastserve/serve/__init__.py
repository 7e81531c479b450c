"""Serving: the engine (decode slots over a preallocated KV cache, host KV offload) and its schedulers
(fcfs, static, skip-join MLFQ). The schedulers are pure Python; the engine is imported on first use."""
from __future__ import annotations

from typing import Any

from fastserve.serve.scheduler import (FCFSScheduler, MLFQScheduler, Scheduler, StaticScheduler, make_scheduler)

_ENGINE = ("Engine", "Request", "QueueFull", "summarize")


def __getattr__(name: str) -> Any:
    if name in _ENGINE:
        from fastserve.serve import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'fastserve.serve' has no attribute '{name}'")


__all__ = ["Engine", "Request", "QueueFull", "summarize", "Scheduler", "FCFSScheduler", "StaticScheduler",
           "MLFQScheduler", "make_scheduler"]

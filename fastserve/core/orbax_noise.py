"""Orbax's noise after a handled failure, sent to the debug log: a corrupt step that `Checkpointer` falls back from
otherwise printed 12-60 asyncio tracebacks around its one warning, and a full disk four absl tracebacks around its
one CheckpointError."""
from __future__ import annotations

import errno
import gc
import logging
import os
import sys
import traceback
import warnings
from typing import Any

log = logging.getLogger("fastserve.core.checkpoint")

# Disk errors that free space (or another disk) fixes: the message says so instead of showing orbax's traceback.
DISK_ERRNOS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only"}

_ORBAX_DIRS = (f"{os.sep}orbax{os.sep}", f"{os.sep}tensorstore")
_quieted = False
_failed_dirs: set[str] = set()   # step directories whose restore failed and was reported


def _about_failed_restore(exc: BaseException | None) -> bool:
    """Raised in orbax / tensorstore code, or (tensorstore futures carry no traceback) naming a reported step dir."""
    tb = exc.__traceback__ if exc is not None else None
    return (any(d in f.f_code.co_filename for f, _ in traceback.walk_tb(tb) for d in _ORBAX_DIRS)
            or any(d in str(exc) for d in tuple(_failed_dirs)))  # a snapshot: hooks run on other threads


def _is_orbax_leftover(u: Any) -> bool:
    """An unraisable exception left by an abandoned orbax restore: a tensorstore callback reaching the event loop
    orbax already closed, or a half-run orbax read coroutine being collected."""
    frames = [f.f_code.co_filename for f, _ in traceback.walk_tb(u.exc_traceback)]
    if (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"
            and frames and frames[-1].endswith(os.path.join("asyncio", "base_events.py"))):
        return True
    code = getattr(u.object, "cr_code", None)
    return code is not None and any(d in code.co_filename for d in _ORBAX_DIRS)


class _AsyncioLeftovers(logging.Filter):
    """'Task/Future exception was never retrieved' about an orbax/tensorstore error: to the debug log."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if "was never retrieved" in str(record.msg) and _about_failed_restore(exc):
            log.debug("after a failed restore (asyncio): %s: %s", type(exc).__name__, str(exc)[:300])
            return False
        return True


class _DiskErrorsReported(logging.Filter):
    """Orbax logs a full disk four times with tracebacks from its save threads; `Checkpointer` raises it once as a
    CheckpointError naming the disk, so those records go to the debug log."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
            log.debug("orbax: %s (%s)", record.getMessage()[:300], exc)
            return False
        return True


DISK_FILTER = _DiskErrorsReported()


def quiet_orbax_leftovers(step_dir: str) -> None:
    """Called when a restore from `step_dir` failed. Orbax leaves that failure's asyncio work behind, and it then
    printed 12-60 tracebacks around our one warning ("Event loop is closed", "Exception ignored in <coroutine>",
    "... exception was never retrieved"), some later from tensorstore's threads or the garbage collector, so a scoped
    filter would miss them: these narrow filters stay for the process's life and log those at debug level."""
    global _quieted
    _failed_dirs.add(step_dir + os.sep)
    if _quieted:
        return
    previous = sys.unraisablehook

    def hook(u: Any) -> None:
        if _is_orbax_leftover(u):
            log.debug("after a failed restore (unraisable): %s: %s", type(u.exc_value).__name__, str(u.exc_value)[:300])
            return
        previous(u)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_AsyncioLeftovers())
    _quieted = True


def collect_orbax_leftovers() -> None:
    """Collects a failed restore's abandoned read coroutines now, while their 'never awaited' warning is ignored."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning)
        gc.collect()

"""Checkpoints with orbax: async saves, `max_to_keep`, restore onto any mesh, checksums, a fallback past a bad save.

A checkpoint holds the train state (any pytree of arrays: model, optimizer, step, RNG, ...), beside it as JSON the
data iterator's position (so a resumed run sees exactly the batches an uninterrupted one would have seen), and a
CRC32 of every array it stores (item `checksums`). The checksums are computed on the host by a worker thread and
written by orbax's background save as part of the same atomic commit, so `max_to_keep` deletes them with their step.
Every restore checks the arrays it read against them: orbax does not notice flipped bytes inside an array's data.
`restore_latest` / `restore_entries_latest` fall back past an unreadable or corrupt step with one warning.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import os
import shutil
import traceback
import zlib
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_args
from orbax.checkpoint._src.handlers.json_checkpoint_handler import JsonCheckpointHandler

from fastserve.core.orbax_noise import DISK_ERRNOS, DISK_FILTER, collect_orbax_leftovers, quiet_orbax_leftovers

log = logging.getLogger(__name__)

CHECKSUM_ITEM = "checksums"          # the orbax item (a directory inside the step directory)
CHECKSUM_FILE = "checksums.json"     # {"algorithm": "crc32", "arrays": {path: {"crc32", "dtype", "shape"}}}


class CheckpointError(RuntimeError):
    """No readable checkpoint where one was required, or a save that failed."""


class CheckpointCorrupt(CheckpointError):
    """A checkpoint's arrays differ from the checksums recorded when it was saved (or those are unreadable)."""

    def __init__(self, step: int, detail: str):
        super().__init__(f"checkpoint step {step} is corrupt: {detail}")
        self.detail = detail


class CheckpointMismatch(CheckpointError):
    """A checkpoint saved by another model config (other shapes or parameters): no older step would fit either."""


# ------------------------------------------------------------------------------------------------ checksums

def _crc32(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8))  # releases the GIL on large buffers


def _key(path: tuple) -> str:
    """'opt_state.1.0.mu.embed.embedding': orbax's own name for a leaf, the same whether a level restores as a
    namedtuple, a list or a dict (jax's keystr is not)."""
    parts = (getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
    return ".".join(str(p) for p in parts)


def _host_leaves(tree: Any) -> list[tuple[str, np.ndarray]] | None:
    """(path, host array) of every leaf, or None when some array is not all in this process (multi-host).

    On CPU the host arrays alias the device buffers (no copy; JAX then does not donate those buffers, so they stay
    valid); on accelerators this is the one device-to-host copy the checksums need.
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not all(getattr(x, "is_fully_addressable", True) for _, x in flat):
        return None
    values = [jax.random.key_data(x) if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key) else x
              for _, x in flat]
    return [(_key(p), np.asarray(v)) for (p, _), v in zip(flat, jax.device_get(values))]


def _checksums(host: list[tuple[str, np.ndarray]] | None) -> dict:
    if host is None:
        return {"algorithm": "crc32", "arrays": None, "reason": "arrays span several processes: not recorded"}
    return {"algorithm": "crc32",
            "arrays": {k: {"crc32": _crc32(a), "dtype": str(a.dtype), "shape": list(a.shape)} for k, a in host}}


class _ChecksumHandler(JsonCheckpointHandler):
    """Writes the checksums JSON once the worker thread has computed them (in orbax's commit thread, not the step)."""

    def __init__(self, filename: str | None = None, **kwargs):
        super().__init__(filename or CHECKSUM_FILE, **kwargs)

    async def _save_fn(self, x, directory):
        if isinstance(x, concurrent.futures.Future):
            x = await asyncio.wrap_future(x)
        await super()._save_fn(x, directory)


@checkpoint_args.register_with_handler(_ChecksumHandler, for_save=True)
@dataclasses.dataclass
class _ChecksumSave(checkpoint_args.CheckpointArgs):
    item: Any  # a concurrent.futures.Future of the checksums dict (or the dict)


@checkpoint_args.register_with_handler(_ChecksumHandler, for_restore=True)
@dataclasses.dataclass
class _ChecksumRestore(checkpoint_args.CheckpointArgs):  # orbax requires one; `verify` reads the file itself
    item: Any = None


def _reason(e: BaseException) -> str:
    """One short line for the warning (tensorstore appends kilobytes of spec): the rest goes to the debug log."""
    if isinstance(e, CheckpointCorrupt):
        return e.detail
    text = str(e).split(" See full TensorStore details")[0].strip().splitlines()
    return f"{type(e).__name__}: {text[0][:240] if text else ''}"


# ------------------------------------------------------------------------------------------- the manager

class Checkpointer:
    def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        logging.getLogger("absl").addFilter(DISK_FILTER)  # idempotent: a logger holds a filter once
        self._hasher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint-crc32")
        self._saving: int | None = None      # the step whose async save may still be running
        self._failed = False                 # a save failure was raised: close() does not raise another

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -------------------------------------------------------------------------------------------- saving

    def save(self, step: int, state: Any, extra: dict | None = None) -> None:
        """Starts an (async) save of `state` and the JSON-serializable `extra` (e.g. the data position).

        The step pays only for taking host views of the arrays; CRC32s are computed by a worker thread and written
        by orbax's commit thread. Raises CheckpointError (e.g. disk full) for this save or the previous async one.
        """
        self.wait()  # orbax waits for the previous save here anyway; waiting first names the step that failed
        checksums = self._hasher.submit(_checksums, _host_leaves(state))
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra or {}),
                **{CHECKSUM_ITEM: _ChecksumSave(checksums)}), force=True)
        except Exception as e:
            raise self._save_error(e, step) from e
        self._saving = step

    def wait(self) -> None:
        """Waits for the async save in flight; CheckpointError if it failed."""
        step, self._saving = self._saving, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_error(e, step) from e

    def close(self) -> None:
        reported = self._failed
        try:
            self.wait()
        except CheckpointError:
            if not reported:
                raise
            log.debug("a further checkpoint save failure after the one already raised", exc_info=True)
        finally:
            self.manager.close()
            self._hasher.shutdown(wait=True)

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _save_error(self, e: BaseException, step: int | None) -> CheckpointError:
        """A CheckpointError that says what failed and what is left; a full disk is named as such."""
        self._failed = True
        cause, seen = e, set()
        while cause is not None and not isinstance(cause, OSError) and id(cause) not in seen:
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
        what = f"saving checkpoint step {step}" if step is not None else "saving a checkpoint"
        good = [s for s in self.all_steps() if s != step]
        kept = f"the previous checkpoint (step {good[-1]}) is intact" if good else "no earlier checkpoint exists"
        if isinstance(cause, OSError) and cause.errno in DISK_ERRNOS:
            try:
                usage = shutil.disk_usage(self.directory)
                space = f" ({usage.free / 2**20:.0f} MiB free of {usage.total / 2**30:.1f} GiB)"
            except OSError:
                space = ""
            err = CheckpointError(f"{what} failed: {DISK_ERRNOS[cause.errno]} on the disk holding {self.directory}"
                                  f"{space}; {kept}. Free space (or lower checkpoint.max_to_keep), then re-run the "
                                  "same command to resume.")
        else:
            err = CheckpointError(f"{what} to {self.directory} failed ({_reason(e)}); {kept}")
        return err

    # ------------------------------------------------------------------------------------------ restoring

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state, extra) of `step`, checked against its checksums (CheckpointCorrupt names the arrays that differ)."""
        def read():
            self.check_layout(step, abstract_state)
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()))
            self.verify(step, out["state"])
            return out["state"], dict(out["extra"] or {})
        return self._reading(step, read)

    def restore_entries(self, step: int, entries: dict[str, Any]) -> dict[str, Any]:
        """Some top-level entries of a saved train state (e.g. {"params", "model_state"}: no optimizer memory, for
        inference and export), placed as `entries`' ShapeDtypeStructs say; checked against the checksums."""
        wanted = {k: v for k, v in entries.items() if jax.tree.leaves(v)}
        out = {k: v for k, v in entries.items() if k not in wanted}  # empty: nothing to read (older saves lack it)

        def read():
            self.check_layout(step, wanted)
            if wanted:
                restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), wanted)
                got = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                    item=wanted, restore_args=restore_args, partial_restore=True)))["state"]
                got = {k: got[k] for k in wanted}
                self.verify(step, got)
                out.update(got)
            return out
        return self._reading(step, read)

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the model parameters of a saved train state."""
        return self.restore_entries(step, {"params": abstract_params})["params"]

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """(step, state, extra) of the newest readable, uncorrupted checkpoint; a bad one is reported and the previous
        one tried. None when the directory holds no checkpoint at all."""
        found = self._newest_good(lambda step: self.restore(step, abstract_state))
        return None if found is None else (found[0], *found[1])

    def restore_entries_latest(self, entries: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
        """(step, entries) of the newest readable, uncorrupted checkpoint (see `restore_latest`)."""
        return self._newest_good(lambda step: self.restore_entries(step, entries))

    def _reading(self, step: int, read: Callable[[], Any]) -> Any:
        try:
            return read()
        except Exception:
            quiet_orbax_leftovers(os.path.join(self.directory, str(step)))  # the caller may fall back: no noise
            raise

    def _newest_good(self, attempt: Callable[[int], Any]) -> tuple[int, Any] | None:
        steps = self.all_steps()
        reason = ""
        for i, step in enumerate(reversed(steps)):
            try:
                found = step, attempt(step)
                log.debug("restored step %d of %s", step, self.directory)
                return found
            except CheckpointMismatch:  # another config's checkpoint: falling back to older steps cannot help
                raise
            except Exception as e:  # orbax raises many types for truncated / corrupt files
                reason = _reason(e)
                if log.isEnabledFor(logging.DEBUG):  # text, not exc_info: a kept record would keep orbax's tasks alive
                    log.debug("restoring step %d of %s failed:\n%s", step, self.directory,
                              "".join(traceback.format_exception(e)))
            collect_orbax_leftovers()  # outside `except`, where the failure's traceback (and orbax's tasks) is freed
            older = steps[-2 - i] if i + 1 < len(steps) else None
            log.warning("checkpoint step %d in %s is unreadable (%s); %s", step, self.directory, reason,
                        f"trying step {older}" if older is not None else "no older checkpoint to fall back to")
        if steps:
            raise CheckpointError(f"none of the checkpoints in {self.directory} (steps {steps}) could be read; the "
                                  f"oldest failed with: {reason}")
        return None

    def check_layout(self, step: int, abstract: Any) -> None:
        """CheckpointMismatch when the model variables the step recorded (names and shapes, from its checksum file)
        are not the ones `abstract` expects: the config changed since the save. Steps without a record pass."""
        path = os.path.join(self.directory, str(step), CHECKSUM_ITEM, CHECKSUM_FILE)
        try:
            with open(path, "rb") as f:
                saved = json.loads(f.read()).get("arrays")
        except (OSError, ValueError, AttributeError):
            return  # no record (an older save) or an unreadable one: `verify` reports the latter
        if not isinstance(saved, dict):
            return
        model_keys = ("params.", "model_state.")
        want = {_key(p): list(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
        want = {k: v for k, v in want.items() if k.startswith(model_keys)}
        have = {k: list(e.get("shape", ())) for k, e in saved.items() if k.startswith(model_keys)}
        tops = {k.split(".")[0] for k in want}
        have = {k: v for k, v in have.items() if k.split(".")[0] in tops}
        shapes = [f"{k} has shape {have[k]} there, {v} in this config" for k, v in want.items()
                  if k in have and have[k] != v]
        missing = sorted(k for k in want if k not in have)
        extra = sorted(k for k in have if k not in want)
        if not (shapes or missing or extra):
            return
        parts = shapes[:3] + ([f"not saved: {', '.join(missing[:3])}"] if missing else []) + \
            ([f"saved but not in this config: {', '.join(extra[:3])}"] if extra else [])
        raise CheckpointMismatch(
            f"checkpoint step {step} in {self.directory} was saved by a different model config ({'; '.join(parts)}). "
            f"Use the config it was trained with (the work dir's config.yaml), or a new train.workdir")

    def verify(self, step: int, tree: Any) -> None:
        """Checks restored arrays (a prefix-matching part of the saved tree) against the step's checksums."""
        path = os.path.join(self.directory, str(step), CHECKSUM_ITEM, CHECKSUM_FILE)
        if not os.path.exists(path):  # saved before checksums existed
            log.debug("checkpoint step %d in %s has no checksums: restored unverified", step, self.directory)
            return
        try:
            with open(path, "rb") as f:
                record = json.loads(f.read())
            saved = record["arrays"]
            if not (saved is None or isinstance(saved, dict)) or record.get("algorithm") != "crc32":
                raise ValueError(f"unexpected content (algorithm {record.get('algorithm')!r})")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointCorrupt(step, f"its checksum file {path} is unreadable ({e})") from None
        host = _host_leaves(tree) if saved is not None else None
        if host is None:
            log.debug("checkpoint step %d not verified: %s", step, record.get("reason", "arrays span processes"))
            return
        bad, unchecked = [], 0
        for key, a in host:
            entry = saved.get(key)
            if entry is None or entry.get("dtype") != str(a.dtype) or list(entry.get("shape", ())) != list(a.shape):
                unchecked += 1  # not recorded, or cast on restore: nothing to compare with
            elif _crc32(a) != entry.get("crc32"):
                bad.append(key)
        if unchecked:
            log.debug("checkpoint step %d: %d restored arrays had no comparable checksum", step, unchecked)
        if bad:
            more = f" and {len(bad) - 3} more arrays" if len(bad) > 3 else ""
            verb = "differs" if len(bad) == 1 else "differ"
            raise CheckpointCorrupt(step, f"{', '.join(bad[:3])}{more} {verb} from the checksum recorded when it "
                                          "was saved")

"""Cross-request batching for servers without a decode engine (embeddings, translation).

One worker thread runs the items of the oldest waiting request and of the later ones that share its key in one call
of `run` (`run(key, items) -> results`, one result per item, sliceable), in arrival order and at most `max_items`
per call (a larger request runs alone); a request is never split, a request of the key that does not fit ends the
run (no overtaking), and requests with another key wait, in arrival order, for a later run. Concurrent small requests so share
padded batches instead of each filling its own.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, Callable, Hashable, Sequence

_STOP = object()             # the worker's stop signal, queued behind the waiting requests


class Batcher:
    def __init__(self, run: Callable[[Hashable, list], Sequence], max_items: int, name: str = "fastserve-batch"):
        self._run, self.max_items = run, max_items
        self._queue: queue.Queue = queue.Queue()
        self._held: list = []                    # taken from the queue, left for a later run (other key, no room)
        self.calls = 0                           # runs made (for /metrics and tests)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    async def submit(self, items: list, key: Hashable = None) -> Sequence:
        """The results of `items`, computed with whatever other requests of the same `key` are waiting."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((key, items, loop, future))
        return await future

    def _take(self) -> list | None:
        """The next run's requests: the oldest waiting one and every later one of its key that fits (None: stop)."""
        while True:   # drain the queue into the held list, in arrival order
            try:
                self._held.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if not self._held:
            self._held.append(self._queue.get())
        first = self._held[0]
        if first is _STOP:
            return None
        batch, rest, count = [], [], 0
        for i, item in enumerate(self._held):
            full = item is not _STOP and item[0] == first[0] and batch and count + len(item[1]) > self.max_items
            if item is _STOP or full:             # nothing after the stop signal, or after a request of this key
                rest.extend(self._held[i:])       # that does not fit, joins this run (no overtaking within a key)
                break
            if item[0] == first[0]:
                batch.append(item)
                count += len(item[1])
            else:
                rest.append(item)
        self._held = rest
        return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            try:
                out = self._run(batch[0][0], [x for _, items, _, _ in batch for x in items])
                self.calls += 1
                start, results = 0, []
                for _, items, _, _ in batch:
                    results.append(out[start:start + len(items)])
                    start += len(items)
            except Exception as e:                # every request of the run gets the error
                results = [e] * len(batch)
            for (_, _, loop, future), result in zip(batch, results):
                setter = future.set_exception if isinstance(result, Exception) else future.set_result
                loop.call_soon_threadsafe(_settle, future, setter, result)

    def close(self) -> None:
        """Finishes the waiting requests, then stops the worker."""
        self._queue.put(_STOP)
        self._thread.join()


def _settle(future: asyncio.Future, setter: Any, value: Any) -> None:
    if not future.done():                         # a client that went away cancelled it
        setter(value)

"""Dynamic batching: items of concurrent requests grouped into one model call.

Policy, per kind of model call (image embeddings, text embeddings, captions, zero-shot classifiers):

* a call starts when ``max_batch`` items of one group are waiting, or when the oldest waiting item has waited
  ``max_wait`` seconds, or when no other request is on its way (``pending()``, the requests the server is
  handling, is no more than the items waiting: a lone client never waits for company), whichever comes first.
  While a call runs, new items queue; when it ends they are taken at once if the oldest has already waited
  ``max_wait`` (under load the wait costs nothing: batches fill while the model is busy). ``max_batch=1`` is
  one model call per item.
* items carry a group key; one call takes only items of the oldest item's group (caption requests with
  different generation settings cannot share a call), in arrival order;
* the queue is bounded: ``submit`` of more items than there is room for raises :class:`QueueFull` at once
  (the app answers 503 with Retry-After), so overload never turns into unbounded memory or waiting;
* each submission has a deadline: an item whose request has given up (timed out, or the client went away) is
  dropped before it reaches the model;
* the call runs in ``executor`` (one thread, shared by every kind: the model runs off the event loop and
  one call at a time, so calls do not fight over the cores).

``run(payloads)`` returns one result per payload, in order; an ``Exception`` in place of a result fails that
item alone.
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from .metrics import Metrics


class QueueFull(Exception):
    """No room for the items in the queue; try again later."""


class Timeout(Exception):
    """The items were not done before the request's deadline."""


@dataclass
class _Item:
    payload: Any
    key: Hashable
    arrived: float
    future: asyncio.Future = field(repr=False)


class Batcher:
    def __init__(self, kind: str, run: Callable[[list[Any]], Sequence[Any]], executor: Executor, *,
                 max_batch: int, max_wait: float, max_queue: int, metrics: Metrics | None = None,
                 pending: Callable[[], int] | None = None):
        if max_batch < 1 or max_queue < 1 or max_wait < 0:
            raise ValueError(f"{kind}: max_batch and max_queue must be >= 1 and max_wait >= 0")
        self.kind, self.run, self.executor = kind, run, executor
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait, max_queue
        self.metrics = metrics or Metrics()
        self.pending = pending
        self.metrics.queue_depth[kind] = self.depth
        self._queue: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None

    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.kind}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(QueueFull(f"{self.kind}: server shutting down"))
        self._queue.clear()

    async def submit(self, payloads: Sequence[Any], key: Hashable = None, timeout: float | None = None) -> list[Any]:
        """Results of ``payloads`` (all queued together, or none: QueueFull), within ``timeout`` seconds
        (Timeout). The first failed item's exception is raised."""
        if len(self._queue) + len(payloads) > self.max_queue:
            self.metrics.reject(self.kind, "queue_full", len(payloads))
            raise QueueFull(f"{self.kind}: {len(self._queue)} items waiting, room for {self.max_queue}")
        loop = asyncio.get_running_loop()
        now = loop.time()
        items = [_Item(p, key, now, loop.create_future()) for p in payloads]
        self._queue.extend(items)
        self._wakeup.set()
        futures = [i.future for i in items]
        try:
            return await asyncio.wait_for(asyncio.gather(*futures), timeout)
        except asyncio.TimeoutError:
            self.metrics.reject(self.kind, "timeout", len(payloads))
            raise Timeout(f"{self.kind}: not done within {timeout:g} s") from None
        finally:
            for f in futures:
                f.cancel()
            if any(f.cancelled() for f in futures):  # gave up (timeout, error, client gone): free its places
                self._queue = deque(i for i in self._queue if not i.future.done())

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            head = self._queue[0]
            if head.future.done():  # its request gave up
                self._queue.popleft()
                continue
            while (waiting := self._waiting(head.key)) < self.max_batch:
                left = head.arrived + self.max_wait - loop.time()
                if left <= 0 or (self.pending is not None and self.pending() <= waiting):
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = self._take(head.key)
            if batch:
                await self._call(batch)

    def _waiting(self, key: Hashable) -> int:
        return sum(1 for i in self._queue if i.key == key and not i.future.done())

    def _take(self, key: Hashable) -> list[_Item]:
        batch, rest = [], deque()
        while self._queue:
            item = self._queue.popleft()
            if item.future.done():
                continue
            if item.key == key and len(batch) < self.max_batch:
                batch.append(item)
            else:
                rest.append(item)
        self._queue = rest
        return batch

    async def _call(self, batch: list[_Item]) -> None:
        self.metrics.batch_size(self.kind, len(batch))
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.run, [i.payload for i in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{self.kind}: {len(results)} results for {len(batch)} items")
        except Exception as e:  # noqa: BLE001 - the call failed as a whole: every item of it fails
            results = [e] * len(batch)
        for item, result in zip(batch, results):
            if item.future.done():
                continue
            if isinstance(result, Exception):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

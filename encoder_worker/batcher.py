"""Single-flight and dynamic batching for encodes.

``SingleFlightBatcher.submit(key, item)`` returns the result for ``key``: concurrent submits of
the same key share one computation (single-flight), and items submitted close together run as
one batch (up to ``max_batch`` items, waiting at most ``max_wait_ms`` for company). The batch
function runs in a worker thread so the event loop keeps serving while a model runs.

Which queued items go next is the ``schedule``:
- ``fcfs``: in the order they were submitted.
- ``sjf``: shortest job first. Items are submitted on behalf of a ``Job`` (the misses of one
  encode request); the next item is from the job with the fewest items still to finish (ties:
  the older job), so a request that waits for one image is not queued behind another's five.
  An item queued longer than ``max_queue_delay_ms`` goes first, oldest first, so that a large
  job is delayed, never starved.

The queue is bounded: ``enqueue_many`` takes a request's new items all or none, and refuses them
(``QueueFull``) when they would take the queue past ``max_queued`` items. A request that joins
items already in flight adds nothing; one larger than ``max_queued`` is taken on an empty queue
(so the queue never holds more than ``max_queued`` or one request's items).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Hashable, Sequence

logger = logging.getLogger(__name__)

SCHEDULES = ("fcfs", "sjf")
"""Orders misses may be taken in: arrival order, or the request with the fewest misses left first."""

BatchFn = Callable[[Sequence[Any]], Sequence[Any]]
"""Blocking: items → results, same order and length."""
AfterFn = Callable[[Hashable, Any], Awaitable[None]]
"""Async hook run once per computed result before waiters see it (e.g. a cache put)."""
RETRY_AFTER_S = 1.0
"""What a refused request is told to wait: about one batch's time."""


class QueueFull(RuntimeError):
    """The queue cannot take a request's items now: nothing was queued; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float = RETRY_AFTER_S):
        super().__init__(message)
        self.retry_after_s = retry_after_s

_job_seq = itertools.count()


class Job:
    """The items one request waits for: ``sjf`` ranks a queued item by its jobs' ``remaining``."""

    __slots__ = ("remaining", "seq")

    def __init__(self, num_items: int) -> None:
        if num_items < 1:
            raise ValueError(f"{num_items=} must be >= 1")
        self.remaining = num_items
        """Items of this job not yet finished (queued or running)."""
        self.seq = next(_job_seq)
        """Arrival order: an older job wins a tie."""

    def rank(self) -> tuple[int, int]:
        return self.remaining, self.seq


@dataclass
class _Pending:
    item: Any
    since: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class BatchStats:
    size: int
    run_ms: float
    wait_ms: float = 0.0
    """The mean time the batch's items waited in the queue before the batch began."""


class SingleFlightBatcher:
    """Lifecycle: ``start()`` on the running loop → ``submit`` from any task → ``close()``."""

    FINISHED_MEMORY = 4096
    """Keys ``finished_since`` remembers: far more than finish during one cache lookup."""

    def __init__(self, batch_fn: BatchFn, *, max_batch: int = 8, max_wait_ms: float = 5.0,
                 after: AfterFn | None = None, on_batch: Callable[[BatchStats], None] | None = None,
                 schedule: str = "fcfs", max_queue_delay_ms: float = 10_000.0, max_queued: int = 1024):
        if max_batch < 1:
            raise ValueError(f"{max_batch=} must be >= 1")
        if max_wait_ms < 0:
            raise ValueError(f"{max_wait_ms=} must be >= 0")
        if schedule not in SCHEDULES:
            raise ValueError(f"{schedule=} must be one of {SCHEDULES}")
        if max_queue_delay_ms < 0:
            raise ValueError(f"{max_queue_delay_ms=} must be >= 0")
        if max_queued < 1:
            raise ValueError(f"{max_queued=} must be >= 1")
        self.batch_fn = batch_fn
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.after = after
        self.on_batch = on_batch
        self.schedule = schedule
        self.max_queue_delay_ms = max_queue_delay_ms
        self.max_queued = max_queued
        """Most items waiting for the model (running ones not counted); see the module docstring."""
        self.refused = 0
        """Items refused because the queue was full."""
        self._inflight: dict[Hashable, asyncio.Future] = {}
        self._jobs: dict[Hashable, list[Job]] = {}  # in-flight key -> the jobs waiting for it
        self._pending: dict[Hashable, _Pending] = {}  # queued, not yet running; submit order
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._finished: OrderedDict[Hashable, int] = OrderedDict()  # key -> when it last succeeded, newest last
        self._num_finished = 0
        self.joins = 0
        """Submits that joined an encode already in flight instead of starting one."""
        self.overtakes = 0
        """Items ``sjf`` ran before an item queued earlier."""

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="encode-batcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for fut in self._inflight.values():
            if not fut.done():
                fut.set_exception(RuntimeError("encoder is shutting down"))
        self._inflight.clear()
        self._jobs.clear()
        self._pending.clear()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    @property
    def queued(self) -> int:
        """Items waiting for the model (in flight, not yet running)."""
        return len(self._pending)

    def oldest_wait_s(self) -> float:
        """Seconds the oldest queued item has waited for the model (0 when none waits)."""
        if not self._pending:
            return 0.0
        return time.monotonic() - next(iter(self._pending.values())).since

    def in_flight(self, key: Hashable) -> bool:
        """Whether ``key`` is being computed (queued or running) now: a submit of it joins."""
        return key in self._inflight

    def mark(self) -> int:
        """A point in time for ``finished_since``: take it before looking a key up elsewhere."""
        return self._num_finished

    def finished_since(self, key: Hashable, mark: int) -> bool:
        """Whether a computation of ``key`` succeeded (``after`` included) since ``mark``.

        The race it closes: a request looks ``key`` up in the cache, another request's computation
        of it ends (its ``after`` stores it) while that answer is on its way, and the first request,
        reading a miss, would compute it again. Remembers the last ``FINISHED_MEMORY`` keys."""
        return self._finished.get(key, -1) >= mark

    def enqueue(self, key: Hashable, item: Any, job: Job | None = None) -> asyncio.Future:
        """``submit`` without waiting: registered (or joined) before this returns; ``QueueFull``
        when the queue has no room for it."""
        return self.enqueue_many([(key, item)], job)[0]

    def enqueue_many(self, items: Sequence[tuple[Hashable, Any]], job: Job | None = None) -> list[asyncio.Future]:
        """``enqueue`` each ``(key, item)`` for one ``job``, all or none: ``QueueFull`` (nothing
        queued) when the new keys would take the queue past ``max_queued``."""
        if not items:
            return []
        new = {key for key, _ in items if key not in self._inflight}
        if new and self._pending and len(self._pending) + len(new) > self.max_queued:
            self.refused += len(new)
            raise QueueFull(f"the encode queue is full: {len(self._pending)} images wait for the model, "
                            f"{len(new)} more would pass max_queued={self.max_queued}; retry later")
        job = job or Job(len(items))
        futures = []
        for key, item in items:
            fut = self._inflight.get(key)
            if fut is not None:
                self.joins += 1
                self._jobs[key].append(job)
            else:
                fut = asyncio.get_running_loop().create_future()
                self._inflight[key] = fut
                self._jobs[key] = [job]
                self._pending[key] = _Pending(item)
                self._wakeup.set()
            futures.append(fut)
        return futures

    async def submit(self, key: Hashable, item: Any, job: Job | None = None) -> Any:
        """The result for ``key``; joins an in-flight computation of the same key if any.
        ``job``: the request this item is one of (``sjf`` ranks by it); None: a job of one."""
        # NOTE: shield: one waiter giving up (client disconnect) must not cancel the shared work.
        return await asyncio.shield(self.enqueue(key, item, job))

    def _pop(self) -> tuple[Hashable, Any, float]:
        """The next queued item by the schedule, with when it was queued; the queue must not be empty."""
        head = next(iter(self._pending))
        key = head
        if self.schedule == "sjf" and len(self._pending) > 1 and \
                (time.monotonic() - self._pending[head].since) * 1000 < self.max_queue_delay_ms:
            # NOTE: an item shared by several requests ranks by its shortest; first of equals: submit order
            key = min(self._pending, key=lambda k: min(job.rank() for job in self._jobs[k]))
            self.overtakes += key != head
        pending = self._pending.pop(key)
        return key, pending.item, pending.since

    async def _wait_pending(self, timeout: float | None) -> bool:
        """Whether something is queued, waiting up to ``timeout`` seconds (None: forever) for it."""
        while not self._pending:
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except asyncio.TimeoutError:
                return False
        return True

    async def _next_batch(self) -> list[tuple[Hashable, Any, float]]:
        await self._wait_pending(None)
        batch = [self._pop()]
        deadline = time.monotonic() + self.max_wait_ms / 1000
        while len(batch) < self.max_batch and await self._wait_pending(max(0.0, deadline - time.monotonic())):
            batch.append(self._pop())
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            keys = [k for k, _, _ in batch]
            now = time.monotonic()
            wait_ms = sum(now - since for _, _, since in batch) * 1000 / len(batch)
            t0 = time.perf_counter()
            try:
                results = await asyncio.to_thread(self.batch_fn, [item for _, item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
            except Exception as e:  # every waiter of this batch gets the error; the loop goes on
                logger.exception("batch of %s failed", len(batch))
                for key in keys:
                    self._finish(key, error=e)
                continue
            if self.on_batch is not None:
                self.on_batch(BatchStats(len(batch), (time.perf_counter() - t0) * 1000, wait_ms))
            for key, result in zip(keys, results):
                try:
                    if self.after is not None:
                        await self.after(key, result)
                except Exception as e:
                    logger.exception("post-processing %s failed", key)
                    self._finish(key, error=e)
                else:
                    self._finish(key, result=result)

    def _finish(self, key: Hashable, *, result: Any = None, error: BaseException | None = None) -> None:
        for job in self._jobs.pop(key, ()):
            job.remaining -= 1
        fut = self._inflight.pop(key, None)
        if error is None:
            self._finished[key] = self._num_finished
            self._finished.move_to_end(key)
            self._num_finished += 1
            if len(self._finished) > self.FINISHED_MEMORY:
                self._finished.popitem(last=False)
        if fut is None or fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

"""Single-flight and dynamic batching for encodes.

``SingleFlightBatcher.submit(key, item)`` returns the result for ``key``: concurrent submits of
the same key share one computation (single-flight), and items submitted close together run as
one batch (up to ``max_batch`` items, waiting at most ``max_wait_ms`` for company). The batch
function runs in a worker thread so the event loop keeps serving while a model runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Hashable, Sequence

logger = logging.getLogger(__name__)

BatchFn = Callable[[Sequence[Any]], Sequence[Any]]
"""Blocking: items → results, same order and length."""
AfterFn = Callable[[Hashable, Any], Awaitable[None]]
"""Async hook run once per computed result before waiters see it (e.g. a cache put)."""


@dataclass(frozen=True)
class BatchStats:
    size: int
    run_ms: float


class SingleFlightBatcher:
    """Lifecycle: ``start()`` on the running loop → ``submit`` from any task → ``close()``."""

    def __init__(self, batch_fn: BatchFn, *, max_batch: int = 8, max_wait_ms: float = 5.0,
                 after: AfterFn | None = None, on_batch: Callable[[BatchStats], None] | None = None):
        if max_batch < 1:
            raise ValueError(f"{max_batch=} must be >= 1")
        if max_wait_ms < 0:
            raise ValueError(f"{max_wait_ms=} must be >= 0")
        self.batch_fn = batch_fn
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.after = after
        self.on_batch = on_batch
        self._inflight: dict[Hashable, asyncio.Future] = {}
        self._queue: asyncio.Queue[tuple[Hashable, Any]] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self.joins = 0
        """Submits that joined an encode already in flight instead of starting one."""

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

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def submit(self, key: Hashable, item: Any) -> Any:
        """The result for ``key``; joins an in-flight computation of the same key if any."""
        fut = self._inflight.get(key)
        if fut is not None:
            self.joins += 1
        else:
            fut = asyncio.get_running_loop().create_future()
            self._inflight[key] = fut
            self._queue.put_nowait((key, item))
        # NOTE: shield: one waiter giving up (client disconnect) must not cancel the shared work.
        return await asyncio.shield(fut)

    async def _next_batch(self) -> list[tuple[Hashable, Any]]:
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait_ms / 1000
        while len(batch) < self.max_batch:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                while len(batch) < self.max_batch and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), timeout))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            keys = [k for k, _ in batch]
            t0 = time.perf_counter()
            try:
                results = await asyncio.to_thread(self.batch_fn, [item for _, item in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
            except Exception as e:  # every waiter of this batch gets the error; the loop goes on
                logger.exception("batch of %s failed", len(batch))
                for key in keys:
                    self._finish(key, error=e)
                continue
            if self.on_batch is not None:
                self.on_batch(BatchStats(len(batch), (time.perf_counter() - t0) * 1000))
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
        fut = self._inflight.pop(key, None)
        if fut is None or fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

"""``DecodeLoop``: continuous batching as a service. One background task steps one ``DecodeBatch``
off the event loop; requests join and leave between steps, so concurrent requests share each
batched forward.

Bounded: at most ``max_batch`` requests step together and ``max_waiting`` more wait to join;
``submit`` refuses the next one with ``QueueFull`` (503 + Retry-After) instead of queueing it.
A request whose KV cannot be allocated as it joins fails alone (``KVAllocationError``).

Per request: ``submit`` a started ``DecodeState`` (its prompt KV may view a cache entry) → before
the next step its KV is copied into the batch and ``release`` runs (the entry may close, the KV
entry may go) → one ``TokenEvent`` per generated token, the last one with a ``finish_reason``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from llm_worker.engine.sequence import DecodeState
from llm_worker.engine.slab import KVAllocationError

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1.0
"""What a refused request is told to wait: about the time a few requests take to finish."""


class ShuttingDown(RuntimeError):
    """The loop is closing (or died): no new requests, and those left end with this error."""


class QueueFull(RuntimeError):
    """``max_waiting`` requests already wait to join: not started, retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float = RETRY_AFTER_S):
        super().__init__(message)
        self.retry_after_s = retry_after_s


RunForward = Callable[..., Awaitable[Any]]
"""``await run_forward(fn, *args)`` runs ``fn(*args)`` on the thread that owns the engine's forwards."""


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token of a request, as seen between two steps."""

    token_id: int
    text: str
    """``readable_text()`` after this token: the output so far less a tail that could still turn
    into a stop string. It only grows, so ``text[len(sent):]`` is the next delta to stream."""
    num_tokens: int
    """Tokens generated so far (the prefill's first one included)."""
    finish_reason: str | None


class DecodeJob:
    """One request in a ``DecodeLoop``: ``async with job: async for event in job: ...``.

    Leaving the block before the last event (an error, a cancelled handler, a client gone)
    abandons the request: its batch row is freed before the next step. The last event (or the
    error) comes only after ``release`` has run: once a request is answered its KV entry is gone.
    """

    def __init__(self, loop: "DecodeLoop", state: DecodeState, release: Callable[[], Awaitable[None]] | None):
        self.state = state
        self.abandoned = False
        self.done = False
        """No more events will come (finished, failed or abandoned)."""
        self._loop = loop
        self._events: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        self._release = release
        self._released: asyncio.Task | None = None
        self.submitted_at = time.monotonic()
        """When it was submitted: its wait to join the batch is measured from here."""

    def _publish(self) -> None:
        s = self.state
        self._events.put_nowait(TokenEvent(s.token_ids[-1], s.readable_text(), len(s.token_ids), s.finish_reason))
        self.done = s.finished

    def _fail(self, exc: BaseException) -> None:
        if not self.done:
            self._events.put_nowait(exc)
            self.done = True

    def _start_release(self) -> asyncio.Task:
        if self._released is None:
            self._released = asyncio.ensure_future(_run_release(self._release, self.state.request_id))
        return self._released

    async def __aenter__(self) -> "DecodeJob":
        return self

    async def __aexit__(self, *exc) -> None:
        self._loop.abandon(self)  # NOTE: a no-op once the last event was published

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while True:
            event = await self._events.get()
            if isinstance(event, TokenEvent) and event.finish_reason is None:
                yield event
                continue
            if self._released is not None:
                await self._released
            if isinstance(event, BaseException):
                raise event
            yield event
            return


async def _run_release(release: Callable[[], Awaitable[None]] | None, request_id: str) -> None:
    if release is None:
        return
    try:
        await release()
    except Exception:  # NOTE: nobody to report to: the request goes on; a KV entry left behind is evictable
        logger.warning("releasing the KV of request %s failed", request_id, exc_info=True)


class DecodeLoop:
    """The batch and its stepping task.

    Lifecycle: ``start()`` on the running event loop; ``submit`` per request; ``close()`` waits
    for the step in progress, then fails what is left. Every batch mutation (join, leave, step)
    runs through ``run_forward``; states are read (``TokenEvent``) only between steps.
    """

    def __init__(self, engine: Any, run_forward: RunForward, max_batch: int,
                 on_step: Callable[[int, float], None] | None = None, max_waiting: int = 256,
                 on_join: Callable[[float], None] | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"{max_batch=} must be >= 1")
        if max_waiting < 0:
            raise ValueError(f"{max_waiting=} must be >= 0")
        self._engine = engine
        self._run_forward = run_forward
        self.max_batch = max_batch
        """Most requests per step; more wait in arrival order."""
        self.max_waiting = max_waiting
        """Most requests waiting to join; ``submit`` refuses more (``QueueFull``)."""
        self._on_step = on_step
        self._on_join = on_join
        """Called with each request's wait to join the batch, in seconds, as it joins."""
        self._batch = engine.new_batch()
        self._waiting: deque[DecodeJob] = deque()
        self._running: list[DecodeJob] = []
        self._joining: list[DecodeJob] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self._releases: set[asyncio.Task] = set()
        """Releases in flight (strong references: a job may be dropped before its release ends)."""
        self.steps = 0
        self.max_batch_size = 0
        """The largest batch stepped so far."""
        self.batched_tokens = 0
        """Tokens generated by steps (the prefills' first tokens not included)."""

    @property
    def num_running(self) -> int:
        """Requests in the batch, those joining in the step under way included."""
        return len(self._running) + len(self._joining)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def oldest_wait_s(self) -> float:
        """Seconds the oldest request waiting to join has waited (0 when none waits)."""
        return time.monotonic() - self._waiting[0].submitted_at if self._waiting else 0.0

    def check_room(self) -> None:
        """Raise ``QueueFull`` unless one more request may wait to join (call before leasing its KV)."""
        if self._closing:
            raise ShuttingDown("the worker is shutting down")
        if len(self._waiting) >= self.max_waiting:
            raise QueueFull(f"the decode worker is full: {self.num_running} requests decoding and "
                            f"{len(self._waiting)} waiting to join (max_waiting={self.max_waiting}); retry later")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="decode-loop")
        self._task.add_done_callback(self._on_exit)

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await asyncio.wait([self._task])
        self._fail_all(ShuttingDown("the worker is shutting down"))
        await asyncio.gather(*self._releases)

    def _on_exit(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:  # NOTE: a bug; fail fast, not hang
            logger.error("the decode loop died", exc_info=task.exception())
            self._closing = True
            self._fail_all(ShuttingDown(f"the decode loop died: {task.exception()!r}"))

    def _fail_all(self, error: Exception) -> None:
        for job in [*self._running, *self._joining, *self._waiting]:
            job._fail(error)
        for job in self._waiting:
            self._release(job)
        self._running, self._joining = [], []
        self._waiting.clear()

    async def submit(self, state: DecodeState, release: Callable[[], Awaitable[None]] | None = None) -> DecodeJob:
        """Queue ``state`` (from ``LLMEngine.start``) to join the batch; ``release`` runs once its KV
        is copied in (or it is dropped). A state that has already finished never joins.

        Raises ``QueueFull`` or ``ShuttingDown`` before anything runs (``release`` included)."""
        if not state.finished:
            self.check_room()
        elif self._closing:
            raise ShuttingDown("the worker is shutting down")
        job = DecodeJob(self, state, release)
        job._publish()  # NOTE: the prefill's token goes out before the request waits for a step
        if state.finished:
            await job._start_release()
        else:
            self._waiting.append(job)
            self._wake.set()
        return job

    def abandon(self, job: DecodeJob) -> None:
        """Drop ``job`` before the next step (its consumer is gone)."""
        if not job.done:
            job.abandoned = True
            job.done = True
            self._wake.set()

    async def _run(self) -> None:
        while not self._closing:
            for job in [j for j in self._waiting if j.abandoned]:
                self._waiting.remove(job)
                self._release(job)
            if not self._running and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            leaving = [j for j in self._running if j.abandoned]
            room = self.max_batch - len(self._running) + len(leaving)
            joining = self._joining = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            if self._on_join is not None:
                now = time.monotonic()
                for job in joining:
                    self._on_join(now - job.submitted_at)
            refused: list[tuple[DecodeJob, Exception]] = []
            size = 0
            try:
                refused, size, step_ms = await self._run_forward(self._step, leaving, joining)
            except Exception as e:
                logger.exception("decode step failed; failing the %d requests in the batch",
                                 len(self._running) + len(joining))
                for job in self._running:
                    job._fail(e)
                self._running, refused = [], [(job, e) for job in joining]
                self._batch = self._engine.new_batch()
            for job in joining:  # NOTE: the KV was copied in (or refused): its entry may go
                self._release(job)
            for job, exc in refused:
                job._fail(exc)
            refused_jobs = {id(job) for job, _ in refused}
            # NOTE: a job abandoned during the step is still in the batch: it leaves next time.
            self._running = [j for j in self._running if j not in leaving]
            self._running += [j for j in joining if id(j) not in refused_jobs]
            self._joining = []
            if size:
                self.steps += 1
                self.batched_tokens += size
                self.max_batch_size = max(self.max_batch_size, size)
                if self._on_step is not None:
                    self._on_step(size, step_ms)
            for job in self._running:
                if not job.abandoned:
                    job._publish()
            self._running = [j for j in self._running if not j.state.finished]  # step dropped them

    def _release(self, job: DecodeJob) -> None:
        task = job._start_release()
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    def _step(self, leaving: list[DecodeJob], joining: list[DecodeJob]):
        """On the forward thread: leave, join, one step. Returns (refused joins, batch size, ms)."""
        for job in leaving:
            self._batch.remove(job.state)
        failed: list[tuple[DecodeJob, Exception]] = []
        for job in joining:
            try:
                self._batch.add(job.state)
            except ValueError as e:  # NOTE: a KV that does not fit this model fails its request alone
                failed.append((job, e))
            except KVAllocationError as e:  # NOTE: so does one whose reservation finds no memory
                logger.warning("request %s cannot join the decode batch: %s", job.state.request_id, e)
                failed.append((job, e))
        size = len(self._batch)
        t0 = time.perf_counter()
        self._batch.step()
        return failed, size, (time.perf_counter() - t0) * 1e3

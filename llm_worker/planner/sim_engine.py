"""The simulator's machinery: a discrete-event clock (``Engine``), devices shared by processor
sharing (``Device``), and worker processes with one forward thread each (``Worker``), their
queues and load meters. ``llm_worker.planner.simulator`` runs the stack's stages on them."""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass
from typing import Callable

from llm_worker.elastic.load import LoadMeter
from llm_worker.planner.sim_types import RequestResult, SimRequest


class Engine:
    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list = []
        self._seq = 0

    def at(self, t: float, fn: Callable, *args) -> None:
        heapq.heappush(self._heap, (t, self._seq, fn, args))
        self._seq += 1

    def after(self, dt: float, fn: Callable, *args) -> None:
        self.at(self.now + dt, fn, *args)

    def run(self) -> None:
        while self._heap:
            t, _, fn, args = heapq.heappop(self._heap)
            self.now = t
            fn(*args)


class Device:
    """Processor sharing among the forwards running on it."""

    def __init__(self, engine: Engine, capacity: float):
        self.engine, self.capacity = engine, capacity
        self.jobs: dict[int, list] = {}  # id -> [remaining work s, on_done]
        self._t = 0.0
        self._version = 0
        self._ids = 0

    def _rate(self) -> float:
        k = len(self.jobs)
        return 1.0 if k <= self.capacity else self.capacity / k

    def _advance(self) -> None:
        done = (self.engine.now - self._t) * self._rate()
        for job in self.jobs.values():
            job[0] -= done
        self._t = self.engine.now

    def _schedule(self) -> None:
        self._version += 1
        rate = self._rate()
        for jid, (remaining, _) in self.jobs.items():
            self.engine.after(max(remaining, 0.0) / rate, self._finish, jid, self._version)

    def start(self, work_s: float, on_done: Callable[[], None]) -> None:
        self._advance()
        self._ids += 1
        self.jobs[self._ids] = [work_s, on_done]
        self._schedule()

    def _finish(self, jid: int, version: int) -> None:
        if version != self._version:
            return
        self._advance()
        _, on_done = self.jobs.pop(jid)
        self._schedule()
        on_done()


# -- the pipeline -----------------------------------------------------------------------------


@dataclass
class Req:
    spec: SimRequest
    result: RequestResult
    prompt_tokens: int
    output_tokens: int
    pending_calls: int = 0
    generated: int = 0
    decode_start: float = 0.0


class Worker:
    """One worker process: a role, a device, one forward at a time (a FIFO of tasks)."""

    def __init__(self, engine: Engine, index: int, role: str, device: Device,
                 after_task: Callable[["Worker"], None] = lambda worker: None):
        """``after_task``: called with the worker after each of its tasks (the simulation's
        check for a role switch that was waiting for the worker to drain)."""
        self.engine, self.index, self.role, self.device = engine, index, role, device
        self._after_task = after_task
        self.tasks: deque = deque()
        self.busy = False
        self.busy_s = 0.0
        self._since = 0.0
        self.calls = 0  # router-side: calls in flight to it
        # encode
        self.items: deque = deque()  # (image id, size, enqueued at)
        self.encoding: dict[int, list[Callable]] = {}  # single flight: image id -> waiters
        self.batch_timer = False
        self.free_at = 0.0
        # decode
        self.waiting: deque = deque()
        self.running: list[Req] = []
        self.stepping = False
        self.prefill_since: deque = deque()  # when each queued prefill arrived
        # role switching
        self.draining_to: str | None = None
        self.meter: LoadMeter | None = None
        self._run = 0

    # -- the forward thread ------------------------------------------------------------------

    def submit(self, work: Callable[[], tuple[float, float]], done: Callable[[], None]) -> None:
        """``work()`` (called when the task starts) → (device seconds, seconds blocked after)."""
        self.tasks.append((work, done))
        self._kick()

    def _kick(self) -> None:
        if self.busy or not self.tasks:
            return
        work, done = self.tasks.popleft()
        self.busy = True
        self._since = self.engine.now
        if self.meter is not None:
            self._run = self.meter.begin()
        device_s, tail_s = work()
        self.device.start(device_s, lambda: self.engine.after(tail_s, self._done, done))

    def _done(self, done: Callable[[], None]) -> None:
        self.busy_s += self.engine.now - self._since
        if self.meter is not None:
            self.meter.end(self._run)
        self.busy = False
        self.free_at = self.engine.now
        done()
        self._kick()
        self._after_task(self)

    def idle(self) -> bool:
        return not self.busy and not self.tasks and not self.items and not self.running and not self.waiting \
            and not self.encoding and self.calls == 0

    def waited(self, wait_s: float) -> None:
        if self.meter is not None:
            self.meter.observe_wait(wait_s)

    def oldest_wait(self) -> float:
        """What the worker's queue of its role has waited longest (the meter's ``oldest_wait``)."""
        now = self.engine.now
        since = {"encode": self.items[0][2] if self.items else None,
                 "prefill": self.prefill_since[0] if self.prefill_since else None,
                 "decode": self.waiting[0].decode_start if self.waiting else None}.get(self.role)
        return now - since if since is not None else 0.0

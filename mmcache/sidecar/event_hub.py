"""The sidecar's HTTP event streams (``GET /v1/events``): one broadcaster for all followers.

One task reads the ``EventBus`` (one wake-up per batch of events, whatever the number of
followers), renders each batch once per kind of follower (its tenant and scope), and writes it to
every follower. A follower's transport is given a deep buffer, so a write never waits; a follower
whose unread bytes pass ``max_buffer_bytes`` (it stopped reading) is closed and counted
(``lagging``), never buffered without bound. A follower that joins with an older ``since`` is
caught up from the bus's ring the first time the broadcaster serves it.

Followers are capped (``EventBus.admit``: ``--max-event-followers``, in all and per tenant), and
their connections do not count against ``--max-connections`` (``http_limits.HttpCounters.streams``),
so streams never take the connections ordinary requests need.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from mmcache.core.events import Event, EventBus

logger = logging.getLogger(__name__)

FOLLOWER_MAX_BUFFER_BYTES = 1 << 20
"""Unread bytes a follower may have at most; past it the follower is closed (it stopped reading)."""
BATCH_WINDOW_S = 0.005
"""After a wake-up, the broadcaster waits this long for more events to come with the batch."""


@dataclass(eq=False)
class Follower:
    response: Any
    """The prepared ``web.StreamResponse``."""
    transport: Any
    tenant: str | None
    """A tenant's follower sees its own keys, named as it names them; None: every key."""
    local_only: bool
    seq: int
    """The newest event it was sent (or chose not to see)."""
    lost: bool = False
    """Tell it ``lost`` first (it asked from before this sidecar's ring)."""
    sent_at: float = field(default_factory=time.monotonic)
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class EventHub:
    """Lifecycle: ``start`` (a task on the app's loop) → ``add`` / followers leave → ``stop``."""

    def __init__(self, bus: EventBus, heartbeat_s: float, *, max_buffer_bytes: int = FOLLOWER_MAX_BUFFER_BYTES):
        self.bus, self.heartbeat_s, self.max_buffer_bytes = bus, heartbeat_s, max_buffer_bytes
        self._followers: list[Follower] = []
        self._task: asyncio.Task | None = None
        self._kick = asyncio.Event()
        self.lagging = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="mmcache-event-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for f in self._followers:
            if not f.done.done():
                f.done.set_result(None)
        self._followers.clear()

    def add(self, follower: Follower) -> None:
        # NOTE: writes never wait (a follower past max_buffer_bytes is closed before one could)
        follower.transport.set_write_buffer_limits(high=2 * self.max_buffer_bytes + (8 << 20))
        self._followers.append(follower)
        self._kick.set()

    async def _run(self) -> None:
        seq = self.bus.seq
        while True:
            try:
                events, lost = await self._next(seq)
                if events:
                    seq = events[-1].seq
                await self._serve(events, lost, seq)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the streams must outlive any one bad write
                logger.exception("event hub: a batch failed; the streams go on")
                await asyncio.sleep(0.1)

    async def _next(self, seq: int) -> tuple[list[Event], bool]:
        """The next batch after ``seq`` (or none within a heartbeat, or a new follower's kick)."""
        kicked = asyncio.ensure_future(self._kick.wait())
        waiting = asyncio.ensure_future(self.bus.wait_async(seq, min(self.heartbeat_s, 1.0)))
        try:
            await asyncio.wait((kicked, waiting), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            waiting.cancel()  # NOTE: the hub stops: leave no task pending on a loop about to close
            raise
        finally:
            kicked.cancel()
        self._kick.clear()
        events, lost = await waiting
        if events and BATCH_WINDOW_S:
            await asyncio.sleep(BATCH_WINDOW_S)
            more, more_lost = self.bus.since(events[-1].seq)
            events, lost = events + more, lost or more_lost
        return events, lost

    async def _serve(self, events: list[Event], lost: bool, seq: int) -> None:
        rendered: dict[tuple[str | None, bool], list[tuple[int, str]]] = {}
        first = events[0].seq if events else seq + 1
        now = time.monotonic()
        keep: list[Follower] = []
        for f in self._followers:
            if f.done.done() or f.transport is None or f.transport.is_closing():
                self._finish(f)
                continue
            parts = []
            if lost or f.lost:
                parts.append("event: lost\ndata: {}\n\n")
                f.lost = False
            if f.seq + 1 < first:  # NOTE: joined with an older since (or just now): catch it up
                behind, gone = self.bus.since(f.seq)
                if gone and not lost:
                    parts.append("event: lost\ndata: {}\n\n")
                batch = [(e.seq, self._render(e, f.tenant, f.local_only)) for e in behind if e.seq <= seq]
            else:
                key = (f.tenant, f.local_only)
                if key not in rendered:
                    rendered[key] = [(e.seq, self._render(e, f.tenant, f.local_only)) for e in events]
                batch = rendered[key]
            parts.extend(text for s, text in batch if s > f.seq and text)
            f.seq = max(f.seq, seq)
            if not parts and now - f.sent_at >= self.heartbeat_s:
                parts.append(": heartbeat\n\n")
            if parts:
                if f.transport.get_write_buffer_size() > self.max_buffer_bytes:
                    self.lagging += 1
                    logger.info("event follower %s stopped reading (%d bytes unread): closed",
                                f.transport.get_extra_info("peername"), f.transport.get_write_buffer_size())
                    f.transport.abort()
                    self._finish(f)
                    continue
                try:
                    # NOTE: never waits: the transport's high-water mark is far above the cap checked above
                    await f.response.write("".join(parts).encode())
                except (ConnectionResetError, RuntimeError):  # the follower left
                    self._finish(f)
                    continue
                f.sent_at = now
            keep.append(f)
        self._followers = keep

    @staticmethod
    def _finish(f: Follower) -> None:
        if not f.done.done():
            f.done.set_result(None)

    def _render(self, event: Event, tenant: str | None, local_only: bool) -> str:
        if local_only and event.node != self.bus.node:
            return ""
        doc = event.as_dict()
        if tenant is not None:
            if not event.key.startswith(tenant + "@"):
                return ""
            doc["key"] = event.key[len(tenant) + 1:]
        return f"id: {event.seq}\nevent: {event.kind}\ndata: {json.dumps(doc)}\n\n"

    def stats(self) -> dict:
        return {"streams": len(self._followers), "lagging_closed": self.lagging}

"""Inventory events: what a sidecar stored, evicted and deleted, for routers and waiting encoders.

Every sidecar has one ``EventBus``. The store publishes to it (``stored`` when a tier comes to
hold a key, ``evicted`` when a tier drops one to make room, ``deleted`` when a client removes
one), and readers follow it by sequence number:

- ``GET /v1/events`` streams it as server-sent events (``mmcache.sidecar.server``), and the local socket's
  ``events`` op turns a connection into a push stream of it (``mmcache.sidecar.local_server``);
- with a remote tier, this sidecar's own events are appended to the Redis stream
  ``mmc:v1:events`` and the other sidecars' events read from it are published here too, marked
  with their node (``mmcache.tiers.remote``), so an encoder waiting on this node for a key another
  node's encoder owns is woken when that one is stored.

The bus is a bounded ring (``capacity`` events): a reader that falls behind by more than that
is told so (``lost``), never blocks a publisher, and resynchronises by asking the cache again
(a router re-reads lookups; a waiting encoder re-claims). Publishing costs an append and a
notify, so it may be called under a tier's lock; subscribers never call back into the store.
"""

from __future__ import annotations

import asyncio
import collections
import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable

from mmcache_client.errors import TooManyRequests

KINDS = ("stored", "evicted", "deleted")


@dataclass(frozen=True)
class Event:
    seq: int
    kind: str
    key: str
    """The store's key (``ns/hash``, or ``tenant@ns/hash``)."""
    tier: str
    node: str
    """The sidecar that emitted it."""
    bytes: int
    ts: float

    def as_dict(self) -> dict:
        return {"seq": self.seq, "kind": self.kind, "key": self.key, "tier": self.tier, "node": self.node,
                "bytes": self.bytes, "ts": self.ts}


class EventBus:
    """Thread-safe publish/follow of ``Event``s; see the module docstring."""

    def __init__(self, node: str, capacity: int = 8192, *, max_followers: int = 256,
                 max_followers_per_tenant: int = 64):
        for name, value in (("max_followers", max_followers), ("max_followers_per_tenant", max_followers_per_tenant)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be an integer > 0")
        self.node = node
        self._ring: collections.deque[Event] = collections.deque(maxlen=capacity)
        self._seq = 0
        self._cond = threading.Condition()
        self._loops: dict[asyncio.AbstractEventLoop, _LoopWake] = {}
        """One wake-up per event loop with readers, however many readers it has (see ``publish``)."""
        self.sink: Callable[[Event], None] | None = None
        """Called with each of this node's own events (the remote tier forwards them)."""
        self.published = 0
        self.max_followers, self.max_followers_per_tenant = max_followers, max_followers_per_tenant
        self._followers: dict[str | None, int] = {}
        """Live followers (HTTP streams and local ones) by tenant (None: the default)."""
        self.refused_followers = 0

    @property
    def seq(self) -> int:
        """The newest event's sequence number (0 before any): follow from here for what comes next."""
        with self._cond:
            return self._seq

    def publish(self, kind: str, key: str, tier: str, nbytes: int, *, node: str | None = None,
                ts: float | None = None) -> Event:
        """Append one event (``node`` None: this sidecar's own; else relayed from that node)."""
        with self._cond:
            self._seq += 1
            event = Event(self._seq, kind, key, tier, node or self.node, int(nbytes), ts or time.time())
            self._ring.append(event)
            self.published += 1
            self._cond.notify_all()
            wakes = [w for w in self._loops.values() if not w.pending]
            for wake in wakes:
                wake.pending = True  # NOTE: coalesced: one wake-up per loop per batch of events
        for wake in wakes:
            try:
                wake.loop.call_soon_threadsafe(wake.fire)
            except RuntimeError:  # that loop is closed; its readers are gone with it
                with self._cond:
                    self._loops.pop(wake.loop, None)
        sink = self.sink
        if sink is not None and node is None:
            sink(event)
        return event

    def since(self, seq: int) -> tuple[list[Event], bool]:
        """Events after ``seq`` and whether some were already dropped from the ring (``lost``)."""
        with self._cond:
            return self._since(seq)

    def _since(self, seq: int) -> tuple[list[Event], bool]:
        if seq > self._seq:
            return [], True  # NOTE: a number from before this sidecar (re)started: resynchronise
        if not self._ring or seq >= self._seq:
            return [], False
        first = self._ring[0].seq
        lost = seq + 1 < first
        start = max(0, seq + 1 - first)
        return [self._ring[i] for i in range(start, len(self._ring))], lost

    def wait(self, seq: int, timeout: float) -> tuple[list[Event], bool]:
        """``since(seq)``, waiting up to ``timeout`` seconds for one to come."""
        with self._cond:
            self._cond.wait_for(lambda: self._seq > seq, timeout)
            return self._since(seq)

    async def wait_async(self, seq: int, timeout: float) -> tuple[list[Event], bool]:
        """``wait`` for an asyncio reader, without a thread. All the readers of one loop wait on
        one ``asyncio.Event`` per batch, so publishing costs one wake-up per loop, not per reader."""
        loop = asyncio.get_running_loop()
        with self._cond:
            wake = self._loops.get(loop)
            if wake is None:
                wake = self._loops[loop] = _LoopWake(loop, self._cond)
            gate = wake.event  # NOTE: taken before the check below: a publish after it sets this one
            events, lost = self._since(seq)
        if events or lost:
            return events, lost
        try:
            await asyncio.wait_for(gate.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return self.since(seq)

    # ------------------------------------------------------------ followers, bounded
    def admit(self, tenant: str | None) -> None:
        """Count one more follower of ``tenant``; ``TooManyRequests`` past either cap."""
        with self._cond:
            total, mine = sum(self._followers.values()), self._followers.get(tenant, 0)
            if total >= self.max_followers or mine >= self.max_followers_per_tenant:
                self.refused_followers += 1
                which = (f"{total} event followers (at most {self.max_followers}, --max-event-followers)"
                         if total >= self.max_followers else
                         f"{mine} event followers of this tenant (at most {self.max_followers_per_tenant}, "
                         "--max-event-followers-per-tenant)")
                raise TooManyRequests(f"refused: {which}; retry later", 5.0)
            self._followers[tenant] = mine + 1

    def leave(self, tenant: str | None) -> None:
        with self._cond:
            left = self._followers.get(tenant, 0) - 1
            if left > 0:
                self._followers[tenant] = left
            else:
                self._followers.pop(tenant, None)

    def stats(self) -> dict:
        with self._cond:
            return {"node": self.node, "seq": self._seq, "published": self.published,
                    "followers": sum(self._followers.values()), "max_followers": self.max_followers,
                    "refused_followers": self.refused_followers}


class _LoopWake:
    """One event loop's readers' wake-up: an ``asyncio.Event`` for the current batch, replaced
    (on the loop) each time it fires; ``pending`` while a ``fire`` is scheduled."""

    __slots__ = ("loop", "event", "pending", "_lock")

    def __init__(self, loop: asyncio.AbstractEventLoop, lock: threading.Condition):
        self.loop, self._lock = loop, lock
        self.event = asyncio.Event()
        self.pending = False

    def fire(self) -> None:
        with self._lock:
            self.pending = False
            event, self.event = self.event, asyncio.Event()
        event.set()


_STORED_KEY = re.compile(r"(?:[A-Za-z0-9._-]{1,64}@)?[A-Za-z0-9._-]{1,128}/[0-9a-f]{64}")
_EVENT_TIERS = frozenset({"host", "disk", "remote", "device", "all"})
MAX_EVENT_BYTES = 1 << 40


def relayed_event(doc: dict) -> tuple[str, str, str, int, str, float | None] | None:
    """``(kind, key, tier, bytes, node, ts)`` of a well-formed event from the remote's stream, or
    None: a known kind and tier, a key as the store names keys, 0 <= bytes <= 1 TiB, a printable
    node name of at most 128 characters, a finite non-negative time."""
    kind, key, tier, node = doc.get("kind"), doc.get("key"), doc.get("tier"), doc.get("node")
    if kind not in ("stored", "evicted", "deleted") or tier not in _EVENT_TIERS:
        return None
    if not isinstance(key, str) or len(key) > 260 or not _STORED_KEY.fullmatch(key):
        return None
    if not isinstance(node, str) or not 0 < len(node) <= 128 or not node.isprintable():
        return None
    try:
        nbytes, ts = int(doc.get("bytes", 0)), float(doc.get("ts", 0))
    except (TypeError, ValueError):
        return None
    if not 0 <= nbytes <= MAX_EVENT_BYTES or not math.isfinite(ts) or ts < 0:
        return None
    return kind, key, tier, nbytes, node, ts or None

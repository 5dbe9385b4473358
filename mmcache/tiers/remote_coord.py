"""The remote tier's coordination of sidecars (``RemoteCoordination``, owned by ``RemoteTier``):
cluster-wide claims (``mmcache.core.claims``: a ``SET PX`` Lua script, renewed by its owner, ended
once every sidecar can read the entry) and inventory events (``mmcache.core.events``: this node's
appended to the stream ``mmc:v1:events`` write-behind, the other nodes' followed by a thread
that outlives any remote trouble)."""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any, Callable


logger = logging.getLogger("mmcache.tiers.remote")

CLAIM_PREFIX = "mmc:v1:claim:"
"""Claim keys (``mmcache.core.claims``); no entry key has this form (a namespace has no colon)."""
EVENTS_STREAM = "mmc:v1:events"
"""The inventory stream every sidecar on the store appends its events to (``mmcache.core.events``)."""
EVENTS_MAXLEN = 10_000
_CLAIM_RETRY_MS = 50
"""What a claim the remote could not answer (breaker still closed) is told to wait."""
WAKE = object()
"""Queued to wake the writer for events alone."""

_CLAIM_LUA = """
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1, tonumber(ARGV[2])}
end
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, tonumber(ARGV[2])}
end
return {0, redis.call('PTTL', KEYS[1])}
"""
"""Claim or renew: won (1) with the TTL, or held by another (0) with what is left of its TTL."""
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def close_quietly(client: Any) -> None:
    try:
        client.close()
    except Exception:  # noqa: BLE001 - closing a broken client must not fail shutdown
        pass


class RemoteDown(ConnectionError):
    """The circuit breaker is open: the call was not tried."""


class RemoteCoordination:
    """Claims and events over the remote tier's connection. What it uses of the tier, given in
    its constructor: ``call`` (run a function on the live client, through the breaker:
    ``RemoteDown`` when open), ``errors`` (what a call may raise), ``new_client`` (a client of
    its own, for the stream follower), ``is_up``, ``wake`` (have the writer thread send what is
    queued here), ``node`` (this sidecar), ``on_event`` (another node's event), ``retry_s`` and
    ``timeout_s``, and ``stop`` (set when the tier closes)."""

    def __init__(self, *, call: Callable[[Callable[[Any], Any]], Any], errors: tuple[type[BaseException], ...],
                 new_client: Callable[[float], tuple[Any, bool]], is_up: Callable[[], bool], wake: Callable[[], None],
                 node: str, on_event: Callable[[dict], None] | None, retry_s: float, timeout_s: float,
                 stop: threading.Event):
        self._call, self._errors, self._new_client, self._is_up, self._wake = call, errors, new_client, is_up, wake
        self.node, self._on_event, self._retry_s, self._timeout_s, self._stop = node, on_event, retry_s, timeout_s, stop
        self._lock = threading.Lock()
        self._scripts: tuple[Any, Any] | None = None
        self._events_out: collections.deque = collections.deque()
        self._claim_ends: collections.deque = collections.deque()
        self.event_counts = dict(sent=0, received=0, dropped=0)

    def forget_scripts(self) -> None:
        """A new connection: its scripts are registered again on first use."""
        with self._lock:
            self._scripts = None

    def events_queued(self) -> int:
        with self._lock:
            return len(self._events_out)

    # ------------------------------------------------------------ claims (mmcache.core.claims)
    def _script(self, client: Any, which: int) -> Any:
        with self._lock:
            if self._scripts is None:
                self._scripts = (client.register_script(_CLAIM_LUA), client.register_script(_RELEASE_LUA))
            return self._scripts[which]

    def claim(self, key: str, owner: str, ttl_ms: int) -> tuple[bool, int] | None:
        """Claim (or renew) ``key`` for ``owner`` on the remote: (won, ttl left in ms), or None
        when the remote cannot answer now (the caller falls back to its own table)."""
        try:
            won, left = self._call(lambda c: self._script(c, 0)(keys=[CLAIM_PREFIX + key], args=[owner, ttl_ms],
                                                                client=c))
        except RemoteDown:
            return None
        except self._errors as e:
            # NOTE: one slow call is not the remote down: a local "won" now would encode it twice
            # across nodes. The caller waits a moment and claims again (the breaker decides).
            logger.debug("remote claim of %s failed: %s", key, e)
            return False, _CLAIM_RETRY_MS
        return bool(won), max(1, int(left))

    def end_claim(self, key: str) -> None:
        """``key`` is readable on this node but will not be written to the remote (a drop, a
        host-only entry): end its remote claim anyway, so other nodes' waiters take over now
        instead of at its deadline (they cannot read the entry; encoding it there is right)."""
        with self._lock:
            if len(self._claim_ends) >= EVENTS_MAXLEN:
                return  # NOTE: the claim's TTL is the backstop
            self._claim_ends.append(key)
        self._wake()

    def release_claim(self, key: str, owner: str) -> int:
        try:
            return int(self._call(lambda c: self._script(c, 1)(keys=[CLAIM_PREFIX + key], args=[owner], client=c)))
        except (RemoteDown, *self._errors):
            return 0

    # ------------------------------------------------------------ events (mmcache.core.events)
    def emit(self, event: Any) -> None:
        """Append one of this node's events to the stream, write-behind (bounded: drops when full)."""
        with self._lock:
            if len(self._events_out) >= EVENTS_MAXLEN:
                self.event_counts["dropped"] += 1
                return
            self._events_out.append(event)
        self._wake()

    def send_events(self, stored: list[str]) -> None:
        """After a batch of ``SET``s: end those keys' claims (only now can every sidecar read them),
        and append the queued events to the stream; one pipeline."""
        with self._lock:
            events, self._events_out = list(self._events_out), collections.deque()
            stored = stored + list(self._claim_ends)
            self._claim_ends.clear()
        if not stored and not events:
            return

        def run(client):
            pipe = client.pipeline(transaction=False)
            for key in stored:
                pipe.delete(CLAIM_PREFIX + key)
            for ev in events:
                pipe.xadd(EVENTS_STREAM, {"kind": ev.kind, "key": ev.key, "tier": ev.tier, "node": ev.node,
                                          "bytes": ev.bytes, "ts": ev.ts}, maxlen=EVENTS_MAXLEN, approximate=True)
            return pipe.execute(raise_on_error=False)
        try:
            results = self._call(run)
        except (RemoteDown, *self._errors) as e:
            logger.debug("remote claim ends / events failed: %s", e)
            results = [e] * (len(stored) + len(events))
        sent = sum(not isinstance(r, BaseException) for r in results[len(stored):])
        with self._lock:
            self.event_counts["sent"] += sent
            self.event_counts["dropped"] += len(events) - sent

    def read_loop(self) -> None:
        """Follow the stream from now on; hand each other node's event to ``on_event``."""
        block_ms = 1000
        client = None
        last = "$"
        while not self._stop.is_set():
            if client is None:
                if not self._is_up():
                    self._stop.wait(self._retry_s)
                    continue
                try:
                    client, _ = self._new_client(self._timeout_s + block_ms / 1000)
                    if last == "$":
                        newest = client.xrevrange(EVENTS_STREAM, count=1)
                        last = newest[0][0] if newest else "0-0"
                except Exception as e:  # noqa: BLE001 - the follower must outlive any remote trouble
                    logger.debug("remote events: cannot follow the stream: %s", e)
                    client = None
                    self._stop.wait(self._retry_s)
                    continue
            try:
                answer = client.xread({EVENTS_STREAM: last}, count=512, block=block_ms)
            except Exception as e:  # noqa: BLE001 - as above
                logger.debug("remote events: read failed: %s", e)
                close_quietly(client)
                client = None
                self._stop.wait(self._retry_s)
                continue
            for _stream, entries in answer or []:
                for entry_id, fields in entries:
                    last = entry_id
                    try:
                        ev = {_text(k): _text(v) for k, v in fields.items()}
                        if ev.get("node") == self.node:
                            continue
                        with self._lock:
                            self.event_counts["received"] += 1
                        self._on_event(ev)
                    except Exception:  # noqa: BLE001 - a bad event must not stop the follower
                        logger.exception("remote events: handling %r failed", ev)
        if client is not None:
            close_quietly(client)

"""Bounds on what one HTTP client can hold: file descriptors, connections, time, pinned memory.

- ``raise_nofile_limit``: at start, the soft RLIMIT_NOFILE goes up to the hard limit, so idle
  sockets do not run the process out of descriptors (and lock out its Unix socket too).
- ``ConnectionGate``: the protocol factory of the listening socket. It caps open connections
  (at the cap the oldest idle one is closed to make room; with none idle, a 503) and closes a
  connection that has not sent a whole request head within ``header_timeout_s`` (slowloris).
  Idle keep-alive connections are aiohttp's ``keepalive_timeout``.
- ``read_body`` / ``read_json``: a request body read under a per-route limit, chunked uploads
  included (413 with a JSON message as soon as it passes the limit, before parsing).
- ``PinnedWriter``: streams a response whose chunks view leased memory; each write returns once
  the kernel holds every byte (the transport keeps no reference into the lease), and a reader
  slower than ``timeout_s`` has its connection aborted, so that it cannot pin an entry forever.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from dataclasses import dataclass, field
from typing import Any, Iterable

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

logger = logging.getLogger(__name__)

LISTEN_BACKLOG = 1024
"""Pending connections the kernel queues before ``accept``."""
HEADER_TIMEOUT_S = 5.0
"""Seconds a new connection has to send its first whole request head."""
KEEPALIVE_TIMEOUT_S = 30.0
"""Seconds an idle keep-alive connection stays open (above aiohttp's client default of 15 s, so a
client does not reuse a connection the server is closing)."""
RESERVED_FDS = 64
"""Descriptors kept for everything but HTTP connections (LMDB, arena, Unix-socket clients, logs)."""

_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
         b"Connection: close\r\nContent-Length: 47\r\n\r\n"
         b'{"error": "too many connections; retry later"}\n')


@dataclass
class HttpCounters:
    """What the bounds did, for ``/v1/stats``: connections refused at the cap (503), idle ones
    closed to make room, ones closed for a late request head, responses aborted at the write timeout."""

    refused: int = 0
    evicted_idle: int = 0
    header_timeouts: int = 0
    write_timeouts: int = 0
    streams: set = field(default_factory=set, repr=False, compare=False)
    """Connections serving a long-lived stream (``GET /v1/events``): they have a cap of their own
    and do not count against the connection cap (streams never take what requests need)."""

    def as_dict(self) -> dict[str, int]:
        return {"refused": self.refused, "evicted_idle": self.evicted_idle, "header_timeouts": self.header_timeouts,
                "write_timeouts": self.write_timeouts, "streams": len(self.streams)}


HTTP_COUNTERS = web.AppKey("http_counters", HttpCounters)
"""Where an app keeps its ``HttpCounters``; ``serving.run_app`` hands the same object to the gate."""


def _too_large(limit: int, what: str, size: int | None) -> web.HTTPRequestEntityTooLarge:
    said = f" of {size} bytes" if size is not None else ""
    return web.HTTPRequestEntityTooLarge(
        max_size=limit, actual_size=size or limit + 1, content_type="application/json",
        text=json.dumps({"error": f"{what}{said} exceeds this route's {limit}-byte limit"}))


async def read_body(request: web.BaseRequest, limit: int, what: str = "request body") -> bytearray:
    """The whole body, refused (413) as soon as it passes ``limit`` (declared or streamed)."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit, what, request.content_length)
    body = bytearray()
    async for chunk in request.content.iter_chunked(1 << 20):
        if len(body) + len(chunk) > limit:
            raise _too_large(limit, what, None)
        body += chunk
    return body


async def read_json(request: web.BaseRequest, limit: int, example: str) -> Any:
    """The body parsed as JSON under ``limit`` bytes; ``ValueError`` (400) naming ``example``."""
    body = await read_body(request, limit, "JSON body")
    try:
        return json.loads(body)
    except ValueError:
        raise ValueError(f"body must be JSON: {example}") from None


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:  # e.g. above fs.nr_open: keep the old limit
            logger.warning("could not raise RLIMIT_NOFILE from %s to %s: %s", soft, target, e)
    return soft


def connection_cap(max_connections: int | None, nofile_soft: int) -> int:
    """``max_connections`` (None: no cap of its own), never more than the descriptors allow."""
    by_fds = max(1, nofile_soft - RESERVED_FDS)
    if max_connections is not None and max_connections > by_fds:
        logger.warning("max_connections=%s exceeds what RLIMIT_NOFILE=%s allows; capping at %s",
                       max_connections, nofile_soft, by_fds)
    return by_fds if max_connections is None else min(max_connections, by_fds)


class _Refuse(asyncio.Protocol):
    """Answers 503 and closes: the server is at its connection cap with none idle."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(_BUSY)  # type: ignore[attr-defined]
        transport.close()


class ConnectionGate:
    """Protocol factory for ``loop.create_server``: hands out ``server``'s request handlers.

    Lifecycle of a connection: accepted (a handler from ``server()``); if no request head has
    arrived after ``header_timeout_s`` it is closed; while a request is in its handler it is
    busy; otherwise idle. At ``max_connections`` an accept first closes the oldest idle
    connection (``server.connections`` is in accept order); when every one is busy the new
    connection gets a 503. A connection counts from the moment its handler is handed out until
    it is closed by the gate or lost.
    """

    def __init__(self, server: web.Server, max_connections: int, header_timeout_s: float = HEADER_TIMEOUT_S,
                 counters: HttpCounters | None = None):
        if max_connections <= 0:
            raise ValueError(f"{max_connections=} must be > 0")
        if header_timeout_s <= 0:
            raise ValueError(f"{header_timeout_s=} must be > 0")
        self._server = server
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.counters = counters if counters is not None else HttpCounters()
        self._busy: dict[object, int] = {}
        self._started: set[object] = set()
        """Handlers that got a request head before their header deadline (cleared at it)."""
        # NOTE: each RequestHandler reads server.request_handler when created, so wrapping it here,
        # before the first connection, sees every request.
        self._inner = server.request_handler
        server.request_handler = self._handle
        self._live: dict[object, None] = {}
        """Handlers handed out and not yet lost, oldest first. Counted here, not from
        ``server.connections``: asyncio accepts a burst of connections (up to the backlog) before
        any of them is ``connection_made``, so the server's own list lags by a whole burst."""
        self._closing: set[object] = set()
        """Live handlers this gate closed; their ``connection_lost`` is still to come."""
        self._lost = server.connection_lost
        server.connection_lost = self._connection_lost  # type: ignore[method-assign]

    def _connection_lost(self, handler, exc: BaseException | None = None) -> None:
        self._live.pop(handler, None)
        self._closing.discard(handler)
        self._started.discard(handler)
        self._lost(handler, exc)

    @property
    def open_connections(self) -> int:
        """Connections that count against the cap (handed out, not closed by the gate)."""
        return len(self._live) - len(self._closing) - len(self.counters.streams)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        protocol = request.protocol
        self._started.add(protocol)
        self._busy[protocol] = self._busy.get(protocol, 0) + 1
        try:
            return await self._inner(request)
        finally:
            left = self._busy.pop(protocol) - 1
            if left:
                self._busy[protocol] = left

    def __call__(self) -> asyncio.BaseProtocol:
        if self.open_connections >= self.max_connections and not self._make_room():
            self.counters.refused += 1
            return _Refuse()
        handler = self._server()
        self._live[handler] = None
        asyncio.get_running_loop().call_later(self.header_timeout_s, self._header_deadline, handler)
        return handler

    def _make_room(self) -> bool:
        for handler in self._live:
            # NOTE: a handler of this very burst has no transport yet; it cannot be closed (and is new).
            if handler not in self._busy and handler not in self._closing and handler.transport is not None:
                self._close(handler)
                self.counters.evicted_idle += 1
                return True
        return False

    def _close(self, handler) -> None:
        self._closing.add(handler)
        handler.force_close()

    def _header_deadline(self, handler) -> None:
        if handler in self._started:
            self._started.discard(handler)
        elif handler in self._live and handler not in self._closing and handler.transport is not None:
            self.counters.header_timeouts += 1
            self._close(handler)


class WriteTimeout(ConnectionResetError):
    """The reader took longer than the write timeout; its connection was aborted."""


class PinnedWriter:
    """Writes ``response`` from chunks that view leased memory, each batch within ``timeout_s``.

    ``write`` returns only once the transport's buffer is empty (its high-water mark is 0 while
    this response is written), so the lease behind the chunks may be released right after; a
    reader that does not take the bytes within ``timeout_s`` gets its connection aborted (which
    drops the buffered bytes) and ``WriteTimeout``. Disconnects raise ``ConnectionResetError``.
    """

    def __init__(self, request: web.BaseRequest, response: web.StreamResponse, timeout_s: float,
                 counters: HttpCounters | None = None):
        self._request = request
        self._counters = counters
        self._response = response
        self.timeout_s = timeout_s
        self._writer: AbstractStreamWriter | None = None
        self._limits: tuple[int, int] | None = None

    @property
    def _transport(self) -> asyncio.Transport:
        transport = self._request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client left")
        return transport  # type: ignore[return-value]

    async def write(self, chunks: Iterable[bytes | memoryview], *, eof: bool = False) -> None:
        transport = self._transport
        if self._writer is None:
            self._limits = transport.get_write_buffer_limits()
            transport.set_write_buffer_limits(high=0)
            self._writer = await self._response.prepare(self._request)
        try:
            await asyncio.wait_for(self._write(chunks, eof), self.timeout_s)
        except asyncio.TimeoutError:
            transport.abort()
            if self._counters is not None:
                self._counters.write_timeouts += 1
            raise WriteTimeout(f"the reader took more than {self.timeout_s} s; connection aborted") from None

    async def _write(self, chunks: Iterable[bytes | memoryview], eof: bool) -> None:
        for chunk in chunks:
            await self._response.write(chunk)
        if eof:
            await self._response.write_eof()
            transport = self._request.transport
            if transport is not None and self._limits is not None:
                low, high = self._limits
                transport.set_write_buffer_limits(high=high, low=low)
        assert self._writer is not None
        await self._writer.drain()

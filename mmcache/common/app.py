"""Running an aiohttp app as a command: bind, print the ready line, serve until SIGINT/SIGTERM.

Every server of the stack (sidecar, encoder, LLM worker, router) starts through ``run_app``, so
they share one contract that scripts and ``mmcache up`` rely on: once the socket listens, one
line ``"<name> ready: http://HOST:PORT[ extra]"`` goes to stdout, with the port actually bound
(``--port 0`` picks a free one and the line says which).

They also share the bounds of ``mmcache.common.http_limits``: the soft descriptor limit raised to the
hard one, a listen backlog of ``LISTEN_BACKLOG`` (aiohttp's own ``run_app`` re-listens at 128),
a cap on open connections (the oldest idle one makes room, else a 503) and a deadline for a new
connection's first request head.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

from aiohttp import web

from mmcache.common.http_limits import (HEADER_TIMEOUT_S, HTTP_COUNTERS, KEEPALIVE_TIMEOUT_S, LISTEN_BACKLOG,
                                 ConnectionGate, connection_cap, raise_nofile_limit)

logger = logging.getLogger(__name__)


def bind(host: str, port: int, backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0 = any free port); ``OSError`` when taken."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class GatedSite(web.SockSite):
    """A ``SockSite`` whose connections go through a ``ConnectionGate`` (see ``http_limits``)."""

    __slots__ = ("gate", "_max_connections", "_header_timeout_s")

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, *, max_connections: int,
                 header_timeout_s: float = HEADER_TIMEOUT_S, backlog: int = LISTEN_BACKLOG):
        super().__init__(runner, sock, backlog=backlog)
        self.gate: ConnectionGate | None = None
        self._max_connections = max_connections
        self._header_timeout_s = header_timeout_s

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        app = getattr(self._runner, "app", None)
        counters = app.get(HTTP_COUNTERS) if app is not None else None
        self.gate = ConnectionGate(server, self._max_connections, self._header_timeout_s, counters)
        # NOTE: SockSite.start with the gate as protocol factory; create_server re-listens with backlog.
        self._server = await asyncio.get_running_loop().create_server(
            self.gate, sock=self._sock, ssl=self._ssl_context, backlog=self._backlog)


async def _serve(app: web.Application, sock: socket.socket, ready: str, *, shutdown_timeout: float,
                 max_connections: int, header_timeout_s: float, keepalive_timeout_s: float,
                 runner_kwargs: dict[str, Any]) -> None:
    runner = web.AppRunner(app, handle_signals=True, shutdown_timeout=shutdown_timeout,
                           keepalive_timeout=keepalive_timeout_s, **runner_kwargs)
    await runner.setup()
    try:
        site = GatedSite(runner, sock, max_connections=max_connections, header_timeout_s=header_timeout_s)
        await site.start()
        print(ready, flush=True)
        await asyncio.Event().wait()  # until SIGINT/SIGTERM raise GracefulExit
    finally:
        await runner.cleanup()


def run_app(app: web.Application, name: str, host: str, port: int, extra: str = "",
            shutdown_timeout: float = 30.0, *, max_connections: int | None = None,
            header_timeout_s: float = HEADER_TIMEOUT_S, keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
            **runner_kwargs: Any) -> None:
    """Serve ``app`` until SIGINT/SIGTERM (in-flight requests get ``shutdown_timeout`` seconds,
    then ``cleanup_ctx`` runs). ``max_connections`` None: as many as the descriptors allow;
    ``runner_kwargs`` (e.g. ``handler_cancellation``) go to ``aiohttp.web.AppRunner``."""
    cap = connection_cap(max_connections, raise_nofile_limit())
    sock = bind(host, port)
    ready = f"{name} ready: {url_of(sock)}" + (f" {extra}" if extra else "")
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    main = loop.create_task(_serve(app, sock, ready, shutdown_timeout=shutdown_timeout, max_connections=cap,
                                   header_timeout_s=header_timeout_s, keepalive_timeout_s=keepalive_timeout_s,
                                   runner_kwargs=runner_kwargs))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        # NOTE: as aiohttp's run_app: cancel the server task (its finally runs the app's cleanup),
        # then whatever else is left, before closing the loop.
        main.cancel()
        with contextlib.suppress(BaseException):
            loop.run_until_complete(main)
        rest = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in rest:
            task.cancel()
        if rest:
            loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        sock.close()


def metrics_response(registry) -> web.Response:
    """A Prometheus registry as ``GET /metrics`` answers it (every server of the stack has one)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

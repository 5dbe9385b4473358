"""Running an aiohttp app as a command: bind, print the ready line, serve until SIGINT/SIGTERM.

Every server of the stack (sidecar, encoder, LLM worker, router) starts through ``run_app``, so
they share one contract that scripts and ``mmcache up`` rely on: once the socket listens, one
line ``"<name> ready: http://HOST:PORT[ extra]"`` goes to stdout, with the port actually bound
(``--port 0`` picks a free one and the line says which).
"""

from __future__ import annotations

import socket
from typing import Any

from aiohttp import web


def bind(host: str, port: int, backlog: int = 1024) -> socket.socket:
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


def run_app(app: web.Application, name: str, host: str, port: int, extra: str = "",
            shutdown_timeout: float = 30.0, **kwargs: Any) -> None:
    """Serve ``app`` until SIGINT/SIGTERM (in-flight requests get ``shutdown_timeout`` seconds,
    then ``cleanup_ctx`` runs). ``kwargs`` go to ``aiohttp.web.run_app``."""
    sock = bind(host, port)
    ready = f"{name} ready: {url_of(sock)}" + (f" {extra}" if extra else "")
    web.run_app(app, sock=sock, print=lambda _msg: print(ready, flush=True), shutdown_timeout=shutdown_timeout,
                **kwargs)

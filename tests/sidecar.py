"""Test helpers: a sidecar in a thread of the test process, and one as a real subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

from aiohttp import web

from mmcache.sidecar.config import ServeConfig
from mmcache.sidecar.server import STORE, create_app


class ThreadedSidecar:
    """``create_app`` served from a background thread; ``start`` returns once it listens."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.port: int | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as e:  # surfaced by start()
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self.app = create_app(self.config)
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port)
        await site.start()
        self.port = runner.addresses[0][1]
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    @property
    def store(self):
        return self.app[STORE]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ThreadedSidecar":
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        return self

    def call(self, fn, *args):
        """Run ``fn`` on the sidecar's event loop thread and return its result."""
        async def wrapper():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(30)

    def stop(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(60)
            self._loop.close()


_HELD: list[socket.socket] = []


def refused_port() -> int:
    """A loopback port that refuses connections for the rest of the session: bound and held by
    this process, never listening, so nothing else can take it (no port is picked and let go)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _HELD.append(s)
    return s.getsockname()[1]


class SidecarProcess:
    """``mmcache serve`` as a subprocess; ``start`` returns when it prints its ready line."""

    def __init__(self, *args: str, env: dict | None = None, preexec_fn=None):
        self.port: int | None = None  # NOTE: --port 0: the sidecar binds a free port and says which
        cmd = [sys.executable, "-m", "mmcache.cli", "serve", "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})}, preexec_fn=preexec_fn)
        self.output: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "SidecarProcess":
        for line in self.proc.stdout:
            self.output.append(line)
            if line.startswith("mmcache ready"):
                self.port = int(line.split()[2].rsplit(":", 1)[1])
                threading.Thread(target=self._drain, daemon=True).start()
                return self
        raise RuntimeError("sidecar exited before it was ready:\n" + "".join(self.output))

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def settled(predicate, timeout: float = 10.0) -> bool:
    """Whether ``predicate`` comes to hold within ``timeout`` (``conftest.wait_until``, as a bool)."""
    from conftest import wait_until

    try:
        return bool(wait_until(predicate, timeout))
    except AssertionError:
        return False


@contextlib.contextmanager
def unix_sidecar(data_dir: str, **settings):
    """A ``ThreadedSidecar`` with a Unix socket (in a short /tmp path: a socket path has at most
    108 bytes) and ``unix_url``; 8 MiB of host and 64 MiB of disk unless ``settings`` say else."""
    sock_dir = f"/tmp/mmc-{os.getpid()}-{random.randrange(1 << 30)}"
    os.makedirs(sock_dir)
    config = ServeConfig(**{"data_dir": data_dir, "port": 0, "socket": os.path.join(sock_dir, "s.sock"),
                            "host_capacity_bytes": 8 << 20, "disk_capacity_bytes": 64 << 20, **settings})
    sc = ThreadedSidecar(config).start()
    sc.unix_url = f"unix://{config.socket}"
    try:
        yield sc
    finally:
        sc.stop()
        os.rmdir(sock_dir)

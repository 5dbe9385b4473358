"""Real ``redis-server`` processes on loopback: one server, or a cluster of masters, started on
free ports and health-checked (by their own log lines and ``CLUSTER INFO``), stopped after. For
``mmcache up --redis-cluster K`` (a demo of the remote tier on one machine) and the tests; a
store users rely on is theirs to run (``--remote URL``)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


class RedisMissing(RuntimeError):
    """``redis-server`` or ``redis-cli`` is not installed."""


def require_redis() -> None:
    missing = [name for name, path in (("redis-server", REDIS_SERVER), ("redis-cli", REDIS_CLI)) if path is None]
    if missing:
        raise RedisMissing(f"{' and '.join(missing)} not found on PATH: install Redis (Debian/Ubuntu: "
                           "apt-get install redis-server) or Valkey, or give --remote URL of a store you run")


def _free_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 55000:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class RedisServer:
    """One ``redis-server`` (``cluster=True``: a cluster-enabled node) in ``workdir``."""

    def __init__(self, workdir: str, *, cluster: bool = False, port: int | None = None):
        self.workdir, self.cluster = workdir, cluster
        self.port = port
        self.proc: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        require_redis()
        for _ in range(5):
            port = self.port or _free_port()
            args = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                    "--dir", self.workdir, "--logfile", "", "--protected-mode", "yes"]
            if self.cluster:
                args += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                         "--cluster-node-timeout", "2000"]
            # NOTE: its own session: a terminal's Ctrl-C reaches the stack, which stops it after the sidecars
            self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                         start_new_session=True)
            for line in self.proc.stdout:
                if "Ready to accept connections" in line:
                    self.port = port
                    # NOTE: keep draining its log so the pipe never fills
                    threading.Thread(target=lambda p=self.proc: [None for _ in p.stdout], daemon=True).start()
                    return self
            self.proc.wait()
            if self.port:  # a fixed port that could not be bound: give up
                break
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def cli(self, *args: str) -> str:
        return subprocess.run([REDIS_CLI, "-p", str(self.port), *args], check=True, capture_output=True,
                              text=True, timeout=30).stdout

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"


class RedisClusterProcs:
    """``masters`` cluster nodes, no replicas, all slots assigned, ``CLUSTER INFO`` ok on each."""

    def __init__(self, workdir: str, masters: int = 3):
        self.nodes = [RedisServer(os.path.join(workdir, f"n{i}"), cluster=True) for i in range(masters)]
        for n in self.nodes:
            os.makedirs(n.workdir, exist_ok=True)

    def start(self) -> "RedisClusterProcs":
        require_redis()
        try:
            for n in self.nodes:
                n.start()
            subprocess.run([REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                            "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True,
                           text=True, timeout=60)
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ok(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            states = []
            for n in self.nodes:
                try:
                    states.append("cluster_state:ok" in n.cli("cluster", "info"))
                except subprocess.CalledProcessError:
                    states.append(False)
            if all(states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the redis cluster did not become ok: {states}")
            time.sleep(delay)  # NOTE: polling a health check, not waiting blind
            delay = min(2 * delay, 0.2)

    @property
    def url(self) -> str:
        return "redis://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def stop(self) -> None:
        for n in self.nodes:
            try:
                n.stop()
            except (OSError, subprocess.SubprocessError):  # NOTE: the others still stop
                pass

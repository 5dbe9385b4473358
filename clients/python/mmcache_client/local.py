"""Client side of the local zero-copy protocol (see ``mmcache.local_server``).

One ``LocalConnection`` = one Unix-socket session with the sidecar plus one read-only mapping of
its arena (and a writable one, mapped on the first put). Leases taken on a connection die with
it, so a process that crashes pins nothing.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
from typing import Any

from mmcache_client.arena import SharedArena
from mmcache_client.errors import CacheUnavailable, raise_for_kind

MAX_LINE_BYTES = 16 << 20
"""Longest answer line accepted from the sidecar."""


class LocalConnection:
    """A blocking, thread-safe connection (requests are serialized on a lock)."""

    def __init__(self, path: str, *, timeout: float | None = 30.0):
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError as e:
            self._sock.close()
            raise CacheUnavailable(f"cannot connect to unix://{path}: {e}") from e
        self._file = self._sock.makefile("rb")
        self._lock = threading.Lock()
        self._ids = itertools.count()
        hello = self.call("hello")
        self.arena_path: str = hello["arena_path"]
        self.arena = SharedArena(self.arena_path)
        self._writable: SharedArena | None = None

    def call(self, op: str, **fields: Any) -> dict:
        """Send one control message and return the answer; errors raise named exceptions."""
        msg_id = next(self._ids)
        data = json.dumps({"id": msg_id, "op": op, **fields}, separators=(",", ":")).encode() + b"\n"
        with self._lock:
            try:
                self._sock.sendall(data)
                line = self._file.readline(MAX_LINE_BYTES)
            except OSError as e:
                raise CacheUnavailable(f"unix://{self.path}: {e}") from e
        if not line:
            raise CacheUnavailable(f"unix://{self.path} closed the connection")
        answer = json.loads(line)
        if "error" in answer:
            raise_for_kind(answer.get("kind", ""), answer["error"])
        return answer

    def writable_arena(self) -> SharedArena:
        """A read-write mapping for in-place puts, made on first use."""
        if self._writable is None:
            self._writable = SharedArena(self.arena_path, writable=True)
        return self._writable

    def close(self) -> None:
        """Close the session: the sidecar drops this connection's leases and reservations."""
        try:
            self._file.close()
            self._sock.close()
        finally:
            self.arena.close()
            if self._writable is not None:
                self._writable.close()

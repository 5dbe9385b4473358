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
from mmcache_client.errors import CacheTimeout, CacheUnavailable, raise_for_kind

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
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        hello = self.call("hello")
        self.arena_path: str = hello["arena_path"]
        self.arena = SharedArena(self.arena_path)
        self._writable: SharedArena | None = None

    def call(self, op: str, **fields: Any) -> dict:
        """Send one control message and return the answer; errors raise named exceptions.

        A timeout raises ``CacheUnavailable`` but keeps the session (and so every lease the
        caller's open entries rely on); the late answer is skipped by id on the next call.
        """
        msg_id = next(self._ids)
        data = json.dumps({"id": msg_id, "op": op, **fields}, separators=(",", ":")).encode() + b"\n"
        with self._lock:
            try:
                self._sock.sendall(data)
                while True:
                    answer = json.loads(self._readline())
                    if answer.get("id") == msg_id:
                        break
                    # NOTE: the answer to a call that timed out earlier. A lease it granted stays
                    # pinned until this connection closes: safe, never a view of reused memory.
            except socket.timeout as e:
                raise CacheTimeout(f"unix://{self.path}: no answer to {op!r} in {self._sock.gettimeout()}s") from e
            except OSError as e:
                raise CacheUnavailable(f"unix://{self.path}: {e}") from e
        if "error" in answer:
            raise_for_kind(answer.get("kind", ""), answer["error"])
        return answer

    def _readline(self) -> bytes:
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[: end + 1])
                del self._buf[: end + 1]
                return line
            if len(self._buf) > MAX_LINE_BYTES:
                raise CacheUnavailable(f"unix://{self.path}: answer longer than {MAX_LINE_BYTES} bytes")
            chunk = self._sock.recv(1 << 16)
            if not chunk:
                raise ConnectionResetError("the sidecar closed the connection")
            self._buf += chunk

    def writable_arena(self) -> SharedArena:
        """A read-write mapping for in-place puts, made on first use."""
        if self._writable is None:
            self._writable = SharedArena(self.arena_path, writable=True)
        return self._writable

    def close(self) -> None:
        """Close the session: the sidecar drops this connection's leases and reservations."""
        try:
            self._sock.close()
        finally:
            self.arena.close()
            if self._writable is not None:
                self._writable.close()

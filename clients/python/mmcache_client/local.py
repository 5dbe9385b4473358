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
from mmcache_client.session import SessionState

MAX_LINE_BYTES = 16 << 20
"""Longest answer line accepted from the sidecar."""


class LocalConnection:
    """A blocking, thread-safe connection (requests are serialized on a lock)."""

    def __init__(self, path: str, *, timeout: float | None = 30.0, token: str | None = None):
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
        self.state = SessionState()
        self._in_flight: dict[int, tuple[str, dict]] = {}
        """Calls whose caller gave up (timeout): what their late answers granted is given back."""
        try:
            hello = self.call("hello", **({"token": token} if token else {}))
        except BaseException:
            self._sock.close()
            raise
        self.tenant: str | None = hello.get("tenant")
        self.lmdb_path: str | None = hello.get("lmdb_path")
        self.arena_path: str = hello["arena_path"]
        self.arena = SharedArena(self.arena_path)
        self._writable: SharedArena | None = None

    def call(self, op: str, **fields: Any) -> dict:
        """Send one control message and return the answer; errors raise named exceptions.

        A timeout raises ``CacheTimeout`` but keeps the session (and so every lease the caller's
        open entries rely on); the late answer is skipped by id on the next call, and the leases
        or reservation it granted are given back then, not pinned for the connection's life.
        """
        with self._lock:
            answer = self._exchange(op, fields)
        if "error" in answer:
            raise_for_kind(answer.get("kind", ""), answer["error"])
        return answer

    def _exchange(self, op: str, fields: dict) -> dict:
        msg_id = next(self._ids)
        data = json.dumps({"id": msg_id, "op": op, **fields}, separators=(",", ":")).encode() + b"\n"
        self._in_flight[msg_id] = (op, fields)
        try:
            self._sock.sendall(data)
            while True:
                answer = json.loads(self._readline())
                late = self._in_flight.pop(answer.get("id"), None)
                if answer.get("id") == msg_id:
                    break
                if late is not None:
                    self._give_back(*late, answer)
        except socket.timeout as e:
            raise CacheTimeout(f"unix://{self.path}: no answer to {op!r} in {self._sock.gettimeout()}s") from e
        except (OSError, ValueError) as e:
            self._in_flight.pop(msg_id, None)
            # NOTE: a stream out of step is unusable but its leases hold while the socket lives;
            # a socket the sidecar closed took them with it: views over it must fail loudly.
            self.state.lost = self.state.lost or isinstance(e, (BrokenPipeError, ConnectionResetError)) \
                or self._socket_dead()
            raise CacheUnavailable(f"unix://{self.path}: {e}") from e
        return answer

    def _socket_dead(self) -> bool:
        try:
            return self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _give_back(self, op: str, fields: dict, answer: dict) -> None:
        """A call whose caller timed out was answered after all: undo what it obtained."""
        if op == "lease" and answer.get("leases"):
            keys = [k for k, loc in zip(fields["keys"], answer["leases"]) if loc is not None]
            if keys:
                self._sock.sendall(json.dumps({"id": next(self._ids), "op": "release", "keys": keys}).encode() + b"\n")
        elif op == "reserve" and answer.get("status") == "reserved":
            self._sock.sendall(json.dumps({"id": next(self._ids), "op": "abort", "key": fields["key"]}).encode() + b"\n")

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
            self.state.close()
        finally:
            self.arena.close()
            if self._writable is not None:
                self._writable.close()

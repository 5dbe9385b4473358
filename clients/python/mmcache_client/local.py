"""Client side of the local zero-copy protocol (see ``mmcache.local_server`` and ``wire``).

One ``LocalConnection`` = one Unix-socket session with the sidecar plus one read-only mapping of
its arena (and a writable one, mapped on the first put). Leases taken on a connection die with
it, so a process that crashes pins nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import threading
from typing import Any

from mmcache_client import wire
from mmcache_client.arena import SharedArena
from mmcache_client.errors import CacheTimeout, CacheUnavailable, raise_for_kind
from mmcache_client.session import SessionState
from mmcache_client.wire import ERROR, HEAD, OP_CODES, LeaseLoc

MAX_LINE_BYTES = wire.MAX_ANSWER_BYTES
"""Longest answer accepted from the sidecar."""
_LEASE, _RELEASE = OP_CODES["lease"], OP_CODES["release"]
_ID_MASK = 0x7FFFFFFF
"""Request ids stay below the sidecar's id for answers to no request (0xFFFFFFFF)."""


def answer_fields(code: int, body: bytes) -> dict:
    """A JSON answer as a dict; an ``ERROR`` raises the named exception."""
    answer = json.loads(body) if body else {}
    if code == ERROR:
        raise_for_kind(answer.get("kind", ""), answer.get("error", "the sidecar gave no reason"))
    return answer


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
        self._in_flight: dict[int, tuple[str, Any]] = {}
        """Calls whose caller gave up (timeout): what their late answers granted is given back."""
        try:
            hello = self.call("hello", **({"token": token} if token else {}))
        except BaseException:
            self._sock.close()
            raise
        self.tenant: str | None = hello.get("tenant")
        self.lmdb_path: str | None = hello.get("lmdb_path")
        self.state.lmdb_map_size = hello.get("lmdb_map_size")
        self.arena_path: str = hello["arena_path"]
        self.arena = SharedArena(self.arena_path)
        self._writable: SharedArena | None = None

    def call(self, op: str, **fields: Any) -> dict:
        """Send one control message and return the answer; errors raise named exceptions.

        A timeout raises ``CacheTimeout`` but keeps the session (and so every lease the caller's
        open entries rely on); the late answer is skipped by id on the next call, and the leases
        or reservation it granted are given back then, not pinned for the connection's life.
        """
        if op == "lease":
            return {"leases": self.lease(fields["keys"])}
        if op == "release":
            self.release(fields["keys"])
            return {}
        with self._lock:
            code, body = self._exchange(OP_CODES[op], wire.json_body(fields), op, fields)
        return answer_fields(code, body)

    def lease(self, keys: list[str]) -> list[LeaseLoc | None]:
        """Lease ``keys`` in one round trip: per key its place (and layout), or None."""
        with self._lock:
            code, body = self._exchange(_LEASE, wire.keys_body(keys), "lease", keys)
        if code == ERROR:
            answer_fields(code, body)
        try:
            return wire.unpack_leases(body, keys)
        except ValueError as e:
            raise CacheUnavailable(f"unix://{self.path}: {e}") from e

    def release(self, keys: list[str]) -> None:
        """Give leases back: one-way, no answer waited for."""
        if not keys:
            return
        with self._lock:
            try:
                self._sock.sendall(wire.frame(next(self._ids) & _ID_MASK, _RELEASE, wire.keys_body(keys)))
            except socket.timeout as e:
                raise CacheTimeout(f"unix://{self.path}: could not send a release in {self._sock.gettimeout()}s") from e
            except OSError as e:
                self.state.lost = self.state.lost or self._socket_dead()
                raise CacheUnavailable(f"unix://{self.path}: {e}") from e

    def _exchange(self, code: int, body: bytes, op: str, what: Any) -> tuple[int, bytes]:
        msg_id = next(self._ids) & _ID_MASK
        self._in_flight[msg_id] = (op, what)
        try:
            self._sock.sendall(wire.frame(msg_id, code, body))
            while True:
                answer_id, answer_code, answer = self._read_frame()
                if answer_id == wire.NO_REQUEST:  # the sidecar hangs up, saying why
                    self.state.lost = True
                    raise CacheUnavailable(f"unix://{self.path}: {json.loads(answer).get('error')}")
                late = self._in_flight.pop(answer_id, None)
                if answer_id == msg_id:
                    return answer_code, answer
                if late is not None:
                    self._give_back(*late, answer_code, answer)
        except socket.timeout as e:
            raise CacheTimeout(f"unix://{self.path}: no answer to {op!r} in {self._sock.gettimeout()}s") from e
        except (OSError, ValueError) as e:
            self._in_flight.pop(msg_id, None)
            # NOTE: a stream out of step is unusable but its leases hold while the socket lives;
            # a socket the sidecar closed took them with it: views over it must fail loudly.
            self.state.lost = self.state.lost or isinstance(e, (BrokenPipeError, ConnectionResetError)) \
                or self._socket_dead()
            raise CacheUnavailable(f"unix://{self.path}: {self._parting_words() or e}") from e

    def _parting_words(self) -> str | None:
        """Why the sidecar hung up, where it said so before closing (a ``NO_REQUEST`` error)."""
        timeout = self._sock.gettimeout()
        try:
            self._sock.settimeout(0)  # NOTE: a socket with a timeout would wait despite MSG_DONTWAIT
            while True:
                chunk = self._sock.recv(1 << 16)
                if not chunk:
                    break
                self._buf += chunk
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                self._sock.settimeout(timeout)
        if len(self._buf) >= HEAD.size:
            blen, msg_id, code = HEAD.unpack_from(self._buf)
            if msg_id == wire.NO_REQUEST and len(self._buf) >= HEAD.size + blen:
                try:
                    return json.loads(bytes(self._buf[HEAD.size:HEAD.size + blen])).get("error")
                except ValueError:
                    return None
        return None

    def _socket_dead(self) -> bool:
        timeout = self._sock.gettimeout()
        try:
            self._sock.settimeout(0)
            return self._sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True
        finally:
            with contextlib.suppress(OSError):
                self._sock.settimeout(timeout)

    def _give_back(self, op: str, what: Any, code: int, body: bytes) -> None:
        """A call whose caller timed out was answered after all: undo what it obtained."""
        if code == ERROR:
            return
        if op == "lease":
            keys = [k for k, loc in zip(what, wire.unpack_leases(body, what)) if loc is not None]
            if keys:
                self._sock.sendall(wire.frame(next(self._ids) & _ID_MASK, _RELEASE, wire.keys_body(keys)))
        elif op == "reserve" and json.loads(body).get("status") == "reserved":
            self._sock.sendall(wire.frame(next(self._ids) & _ID_MASK, OP_CODES["abort"],
                                          wire.json_body({"key": what["key"]})))

    def _read_frame(self) -> tuple[int, int, bytes]:
        """The next answer: ``(id, code, body)``."""
        buf = self._buf
        while True:
            if len(buf) >= HEAD.size:
                blen, msg_id, code = HEAD.unpack_from(buf)
                if blen > MAX_LINE_BYTES:
                    raise CacheUnavailable(f"unix://{self.path}: an answer of {blen} bytes is over {MAX_LINE_BYTES}")
                end = HEAD.size + blen
                if len(buf) >= end:
                    body = bytes(buf[HEAD.size:end])
                    del buf[:end]
                    return msg_id, code, body
            chunk = self._sock.recv(1 << 16)
            if not chunk:
                raise ConnectionResetError("the sidecar closed the connection")
            buf += chunk

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

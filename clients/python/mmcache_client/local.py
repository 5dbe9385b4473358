"""Client side of the local zero-copy protocol (see ``mmcache.sidecar.local_server`` and ``wire``).

One ``LocalConnection`` = one Unix-socket session with the sidecar plus one read-only mapping of
its arena (and a writable one, mapped on the first put). Leases taken on a connection die with
it, so a process that crashes pins nothing.

Two choices keep a get at the socket's floor:

- **Releases ride on the next request.** ``release`` queues its (one-way) frame; the next request
  on the connection carries the queue in the same ``sendall``, so the sidecar wakes once for
  both, not once per release. A queue nobody sends behind is flushed by one process-wide thread
  within ``RELEASE_DELAY_S`` (and at once past ``MAX_QUEUED_RELEASES`` keys), so an idle client
  pins an entry a couple of milliseconds past its ``close`` at most. The sidecar serves a
  connection's frames in order: whatever this connection asks next sees its releases done.
- **The answer is polled for before it is slept on.** The caller spins ``SPIN_S`` (50 µs;
  ``MMCACHE_LOCAL_SPIN_US``, 0 turns it off) on a non-blocking ``recv`` before it blocks, as the
  sidecar's connection thread does for the next request: a thread that slept costs a wake-up,
  on a VM as much as the round trip itself.
- **The socket blocks; timeouts are the kernel's** (``SO_RCVTIMEO`` / ``SO_SNDTIMEO``). A Python
  socket timeout turns every ``recv`` into ``poll`` + ``recv`` on a non-blocking socket, which
  costs about as much again as the round trip itself.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import socket
import struct
import threading
import time
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
RELEASE_DELAY_S = 0.002
"""Longest a queued release waits for a request to ride on before it is sent on its own."""
MAX_QUEUED_RELEASES = 256
"""Keys queued for release on one connection past which they are sent at once."""
SPIN_S = float(os.environ.get("MMCACHE_LOCAL_SPIN_US", "50")) / 1e6
"""How long a caller polls for its answer before it sleeps in ``recv`` (the sidecar answers a
lease in tens of microseconds; waking a thread that slept costs as much again on a VM)."""
SEAL_SPIN_S = max(SPIN_S, 0.0004) if SPIN_S > 0 else 0.0
"""How long a (non-durable) seal's caller polls: the sidecar checks the entry's header and
indexes it, ~70 µs of Python, past the common poll."""


def _set_kernel_timeout(sock: socket.socket, timeout: float | None) -> None:
    """``timeout`` as ``SO_RCVTIMEO`` / ``SO_SNDTIMEO`` on a blocking socket (None: wait forever):
    a stalled ``recv`` / ``send`` then fails with ``EAGAIN`` instead of hanging."""
    if timeout is None:
        return
    sec = int(timeout)
    usec = int((timeout - sec) * 1e6)
    if timeout > 0 and sec == 0 and usec == 0:
        usec = 1  # NOTE: a zero timeval means no timeout at all
    tv = struct.pack("ll", sec, usec)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


class _ReleaseFlusher:
    """One daemon thread per process that sends the queued releases no request carried."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: dict["LocalConnection", float] = {}
        self._thread: threading.Thread | None = None

    def schedule(self, conn: "LocalConnection") -> None:
        with self._cond:
            if conn in self._due:
                return
            self._due[conn] = time.monotonic() + RELEASE_DELAY_S
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mmcache-release-flusher", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due:
                    self._cond.wait()
                now = time.monotonic()
                first = min(self._due.values())
                if first > now:
                    self._cond.wait(first - now)
                    continue
                ready = [c for c, t in self._due.items() if t <= now]
                for c in ready:
                    del self._due[c]
            for c in ready:
                c.flush_releases()

    def _after_fork(self) -> None:  # NOTE: the thread did not cross the fork; the child starts its own
        self._cond = threading.Condition()
        self._due = {}
        self._thread = None


_FLUSHER = _ReleaseFlusher()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_FLUSHER._after_fork)


def answer_fields(code: int, body: bytes) -> dict:
    """A JSON answer as a dict; an ``ERROR`` raises the named exception."""
    answer = json.loads(body) if body else {}
    if code == ERROR:
        raise_for_kind(answer.get("kind", ""), answer.get("error", "the sidecar gave no reason"),
                       answer.get("retry_after_s"))
    return answer


class LocalConnection:
    """A blocking, thread-safe connection (requests are serialized on a lock)."""

    def __init__(self, path: str, *, timeout: float | None = 30.0, token: str | None = None):
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.timeout = timeout
        try:
            self._sock.settimeout(timeout)  # NOTE: for connect only; then blocking, see the module doc
            self._sock.connect(path)
            self._sock.settimeout(None)
            _set_kernel_timeout(self._sock, timeout)
        except OSError as e:
            self._sock.close()
            raise CacheUnavailable(f"cannot connect to unix://{path}: {e}") from e
        self._buf = bytearray()
        self._releases: list[bytes] = []
        """Release frames queued to ride on the next request (see the module doc)."""
        self._queued_keys = 0
        self._orphans: collections.deque[str] = collections.deque()
        """Leases given back by finalizers (``release_soon``), taken into the next release frame."""
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
        self.device_tier: bool = bool(hello.get("device_tier"))
        """The sidecar holds a device tier: ``lease_device`` hands out CUDA IPC handles."""
        self.arena = SharedArena(self.arena_path)
        self._writable: SharedArena | None = None

    def set_timeout(self, timeout: float | None) -> None:
        """The longest wait for one answer (or one send) from now on; None: no limit."""
        self.timeout = timeout
        _set_kernel_timeout(self._sock, timeout if timeout is not None else 0.0)

    def call(self, op: str, **fields: Any) -> dict:
        """Send one control message and return the answer; errors raise named exceptions.

        A timeout raises ``CacheTimeout`` but keeps the session (and so every lease the caller's
        open entries rely on); the late answer is skipped by id on the next call, and the leases
        or reservation it granted are given back then, not pinned for the connection's life.
        """
        if op in wire.LEASE_OPS:
            return {"leases": self.lease(fields["keys"], op)}
        if op == "release":
            self.release(fields["keys"])
            return {}
        spin_s = SEAL_SPIN_S if op == "seal" and not fields.get("durable") else SPIN_S
        with self._lock:
            code, body = self._exchange(OP_CODES[op], wire.json_body(fields), op, fields, spin_s)
        return answer_fields(code, body)

    def lease(self, keys: list[str], op: str = "lease") -> list[LeaseLoc | None]:
        """Lease ``keys`` in one round trip: per key its place (and layout), or None. ``op``
        ``scan``: lower tiers' entries are read where they lie, not promoted."""
        with self._lock:
            code, body = self._exchange(OP_CODES[op], wire.keys_body(keys), op, keys)
        if code == ERROR:
            answer_fields(code, body)
        try:
            return wire.unpack_leases(body, keys)
        except ValueError as e:
            raise CacheUnavailable(f"unix://{self.path}: {e}") from e

    def release(self, keys: list[str]) -> None:
        """Give leases back: one-way, queued to ride on the next request (see the module doc)."""
        if not keys:
            return
        with self._lock:
            first = not self._releases
            self._releases.append(wire.frame(next(self._ids) & _ID_MASK, _RELEASE, wire.keys_body(keys)))
            self._queued_keys += len(keys)
            if self._queued_keys >= MAX_QUEUED_RELEASES:
                self._send_releases()
                return
        if first:
            _FLUSHER.schedule(self)

    def release_soon(self, name: str) -> None:
        """Give one lease back from a finalizer (``mmcache_client.leased_tensors``): no lock and
        no I/O here, since a finalizer may run on any thread, even inside a call on this very
        connection; the flusher sends it within ``RELEASE_DELAY_S``, or the next request does."""
        self._orphans.append(name)
        _FLUSHER.schedule(self)

    def flush_releases(self) -> None:
        """Send the queued releases now (the flusher's, or a caller's that must see them done
        from another connection at once)."""
        with self._lock:
            if (self._releases or self._orphans) and not self.state.lost and self._sock.fileno() != -1:
                with contextlib.suppress(CacheUnavailable, CacheTimeout):
                    self._send_releases()

    def _send_releases(self) -> None:
        data = self._take_releases()
        try:
            self._sock.sendall(data)
        except (BlockingIOError, socket.timeout) as e:
            raise CacheTimeout(f"unix://{self.path}: could not send a release in {self.timeout}s") from e
        except OSError as e:
            self.state.lost = self.state.lost or self._socket_dead()
            raise CacheUnavailable(f"unix://{self.path}: {e}") from e

    def _take_releases(self) -> bytes:
        if self._orphans:
            names = []
            with contextlib.suppress(IndexError):
                while True:
                    names.append(self._orphans.popleft())
            self._releases.append(wire.frame(next(self._ids) & _ID_MASK, _RELEASE, wire.keys_body(names)))
        if not self._releases:
            return b""
        data = b"".join(self._releases)
        self._releases.clear()
        self._queued_keys = 0
        return data

    def _exchange(self, code: int, body: bytes, op: str, what: Any, spin_s: float = SPIN_S) -> tuple[int, bytes]:
        msg_id = next(self._ids) & _ID_MASK
        self._in_flight[msg_id] = (op, what)
        try:
            self._sock.sendall(self._take_releases() + wire.frame(msg_id, code, body))
            while True:
                answer_id, answer_code, answer = self._read_frame(spin_s)
                if answer_id == wire.NO_REQUEST:  # the sidecar hangs up, saying why
                    self.state.lost = True
                    raise CacheUnavailable(f"unix://{self.path}: {json.loads(answer).get('error')}")
                late = self._in_flight.pop(answer_id, None)
                if answer_id == msg_id:
                    return answer_code, answer
                if late is not None:
                    self._give_back(*late, answer_code, answer)
        except (BlockingIOError, socket.timeout) as e:  # NOTE: SO_RCVTIMEO / SO_SNDTIMEO ran out
            raise CacheTimeout(f"unix://{self.path}: no answer to {op!r} in {self.timeout}s") from e
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
        if op in wire.LEASE_OPS:
            keys = [k for k, loc in zip(what, wire.unpack_leases(body, what)) if loc is not None]
            if keys:
                self._releases.append(wire.frame(next(self._ids) & _ID_MASK, _RELEASE, wire.keys_body(keys)))
                self._queued_keys += len(keys)
                _FLUSHER.schedule(self)
        elif op == "reserve" and json.loads(body).get("status") == "reserved":
            self._sock.sendall(wire.frame(next(self._ids) & _ID_MASK, OP_CODES["abort"],
                                          wire.json_body({"key": what["key"]})))

    def _read_frame(self, spin_s: float = SPIN_S) -> tuple[int, int, bytes]:
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
            chunk = self._recv(spin_s)
            if not chunk:
                raise ConnectionResetError("the sidecar closed the connection")
            buf += chunk

    def _recv(self, spin_s: float = SPIN_S) -> bytes:
        if spin_s > 0:
            until = time.perf_counter() + spin_s
            while True:
                try:
                    return self._sock.recv(1 << 16, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    if time.perf_counter() > until:
                        break
        return self._sock.recv(1 << 16)

    def writable_arena(self) -> SharedArena:
        """A read-write mapping for in-place puts, made on first use."""
        if self._writable is None:
            self._writable = SharedArena(self.arena_path, writable=True)
        return self._writable

    def close(self) -> None:
        """Close the session: the sidecar drops this connection's leases and reservations."""
        try:
            self._releases.clear()  # NOTE: closing the socket gives back every lease it held
            self._sock.close()
            self.state.close()
        finally:
            self.arena.close()
            if self._writable is not None:
                self._writable.close()

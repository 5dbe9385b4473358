"""The local zero-copy protocol: control messages over a Unix socket, never tensor bytes.

Framing (``mmcache_client.wire``): length-prefixed binary frames ``<u32 body length, u32 id, u8
op>``; an answer carries the request's id and ``OK`` / ``ERROR``. ``lease`` and ``release`` are
binary (keys joined by newlines; the lease answer is a 32-byte record per key with the entry's
place in the arena *and* where its embeddings lie in it, parsed once by the sidecar, so a client
parses no header per get); ``release`` is one-way (no answer, no round trip). Every other op is
a JSON object in, a JSON object out:

- ``hello {token?}`` → ``arena_path``, ``arena_bytes``, ``lmdb_path``, ``format``, ``pid``,
  ``tenant``, ``protocol``. With ``--tenants`` a token scopes the connection to its tenant (keys
  are then stored as ``tenant@ns/hash``; answers name them as the client did); without one the
  connection is the default tenant (the socket's 0600 mode is its guard), which may name any
  tenant's keys as ``tenant@ns/hash``.
- ``lookup {keys, detail?}`` → ``tiers`` (key → tier or null); with ``detail`` → ``items`` (key →
  ``{"tier", "num_tokens"[, "image_grid_thw"]}`` or null): a hit described without a lease
- ``lease keys`` → a record per key (a miss, or a lease: ``offset`` -1 means host had no room and
  the entry is read in place from LMDB (``lmdb_path``) by its stored key, pinned there until
  released)
- ``scan keys``: as ``lease``, but an entry below host is read where it lies, never promoted
  (a sequential scan such as an export leaves host's hot set be)
- ``release keys`` (one-way)
- ``reserve {key, nbytes, encode_ms, persist}`` → ``offset`` (``status`` ``exists`` /
  ``no_space`` (+ ``retry_after_s``) / ``too_large`` (+ ``capacity_bytes``) instead)
- ``seal {key, durable}`` → ``created``, ``tier``; ``abort {key}``
- ``delete {key}`` → ``deleted``; ``stats`` → the store's stats
- ``lease_device {keys}`` → ``entries``: per key ``{"tensors": {name: CUDA IPC handle as data},
  "metadata"}`` or null (not on the device: read it from host); ``release_device {keys}`` gives
  them back. Only where ``hello`` says ``device_tier`` (``mmcache_client.cuda``).

The socket is served apart from the HTTP event loop: a thread accepts, and each connection has a
thread of its own that reads a frame, runs it against the store and writes the answer (blocking
calls, no coroutine per message; slow ops such as a seal's checksum or a disk read stall only
their own connection).

Leases and reservations belong to the connection: when it closes (or the client dies) every one
of them is dropped, so nothing leaks and nothing stays pinned. A reservation open when its
connection closes while the client process still lives is quarantined until that process exits
(a pidfd says when): its writer may still be filling it, and the space must not be given to the
next writer under its pen.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import threading
import time

from mmcache.core.store import TieredStore
from mmcache.common.tenants import Tenants
from mmcache_client import wire
from mmcache_client.errors import CacheFull, EntryTooLarge, TooManyRequests
from mmcache_client.format import EntryFormatError
from mmcache_client.wire import ERROR, HEAD, OK, OP_CODES, OP_NAMES

from mmcache.sidecar.local_session import LocalSession, ProtocolError, _peer_pidfd

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = wire.MAX_BODY_BYTES
MAX_CONNECTIONS = 512
"""Local connections served at once (a thread each); one more is answered with an error and closed."""

_OPS = wire.OPS
"""The ops, counted per name in ``/v1/stats`` (``"local"``): round trips are what the fast path saves."""
_LEASE, _RELEASE, _EVENTS = OP_CODES["lease"], OP_CODES["release"], OP_CODES["events"]
HEARTBEAT_S = 5.0
"""An event stream with nothing to say sends an empty frame this often (a dead follower shows)."""
FOLLOWER_SEND_TIMEOUT_S = 10.0
SPIN_S = float(os.environ.get("MMCACHE_LOCAL_SPIN_US", "100")) / 1e6
"""How long a connection's thread polls for the next request before it sleeps in ``recv``."""
FILL_BYTES_PER_S = 4e9
"""A writer's fill rate assumed when the thread waits for its seal: well under a memcpy's, so
that the seal of a fill at memory speed finds the thread still polling."""
MAX_FILL_SPIN_S = 0.002
"""Longest the thread polls for a seal after a reservation (a slower writer pays one wake-up)."""


_KINDS = ((CacheFull, "CacheFull"), (EntryTooLarge, "EntryTooLarge"), (PermissionError, "Forbidden"),
          (TooManyRequests, "TooManyRequests"))


def _event_in_scope(event, tenant: str | None) -> dict | None:
    """An event as a follower may see it: all of them for the default tenant; a tenant's own,
    with its keys as it names them, for a tenant."""
    doc = event.as_dict()
    if tenant is None:
        return doc
    prefix = tenant + "@"
    if not event.key.startswith(prefix):
        return None
    doc["key"] = event.key[len(prefix):]
    return doc


def _error_body(e: BaseException) -> bytes:
    kind = next((name for cls, name in _KINDS if isinstance(e, cls)), type(e).__name__)
    doc = {"error": str(e), "kind": kind}
    if isinstance(e, (CacheFull, TooManyRequests)):
        doc["retry_after_s"] = e.retry_after_s
    return wire.json_body(doc)


class _FrameReader:
    """Reads a connection's frames from the socket, spinning ``spin_s`` on a non-blocking
    ``recv`` before it blocks: a client in a get loop sends its next request a few tens of
    microseconds after its answer, and a thread that slept in ``recv`` costs a wake-up (on a VM,
    as much as the round trip itself) to serve it."""

    __slots__ = ("sock", "spin_s", "buf", "spin_once_s", "frame_timeout_s", "frame_started")

    def __init__(self, sock: socket.socket, spin_s: float, frame_timeout_s: float = 5.0):
        self.sock, self.spin_s, self.buf = sock, spin_s, bytearray()
        self.spin_once_s = 0.0
        """A longer poll for the next request only (a seal expected after a fill)."""
        self.frame_timeout_s = frame_timeout_s
        self.frame_started: float | None = None
        """When the frame being read began (its first byte): from then on the rest of it must
        come within ``frame_timeout_s``. An idle connection between frames waits for ever."""

    def read(self, n: int) -> bytes | None:
        """The next ``n`` bytes, or None at the end of the stream; ``FrameStalled`` when a frame
        begun stops coming for ``frame_timeout_s``."""
        buf = self.buf
        while len(buf) < n:
            if buf and self.frame_started is None:
                self.frame_started = time.monotonic()
            chunk = self._recv()
            if not chunk:
                return None
            buf += chunk
        out = bytes(buf[:n])
        del buf[:n]
        return out

    def frame_begun(self) -> None:
        if self.frame_started is None:
            self.frame_started = time.monotonic()

    def frame_done(self) -> None:
        self.frame_started = None

    def _recv(self) -> bytes:
        spin_s, self.spin_once_s = max(self.spin_s, self.spin_once_s), 0.0
        if spin_s > 0:
            until = time.perf_counter() + spin_s
            while True:
                try:
                    return self.sock.recv(1 << 16, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    if time.perf_counter() > until:
                        break
        if self.frame_started is not None:
            left = self.frame_started + self.frame_timeout_s - time.monotonic()
            poller = select.poll()  # NOTE: not select(): descriptors past 1024 are common here
            poller.register(self.sock, select.POLLIN)
            if left <= 0 or not poller.poll(left * 1000):
                raise FrameStalled(f"a frame begun {self.frame_timeout_s:g} s ago is still incomplete "
                                   "(--header-timeout); the connection is closed")
        return self.sock.recv(1 << 16)


class FrameStalled(Exception):
    """A client began a frame and stopped sending it mid-way (a slowloris on the Unix socket)."""


_EXPECTED = (ProtocolError, EntryFormatError, ValueError, CacheFull, EntryTooLarge, PermissionError, TooManyRequests)


class LocalServer:
    """The Unix-socket server: an accept thread, and a thread per connection (see the module doc).

    Lifecycle: ``start()`` binds (mode 0600 from birth) and starts accepting; ``close()`` stops
    accepting, shuts every connection down (their leases and reservations are dropped) and joins
    the threads. ``ops``: where the count of each op served is kept.
    """

    def __init__(self, store: TieredStore, path: str, tenants: Tenants | None = None,
                 ops: dict[str, int] | None = None, max_connections: int = MAX_CONNECTIONS,
                 frame_timeout_s: float = 5.0):
        self.store, self.path, self.tenants = store, path, tenants
        self.frame_timeout_s = frame_timeout_s
        """A frame begun must be whole within this (``--header-timeout``), or the connection goes."""
        self.stalled = 0
        self.ops = ops if ops is not None else {}
        self.max_connections = max_connections
        self.spin_s = SPIN_S
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._sock: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self.refused = 0

    def start(self) -> "LocalServer":
        path = self.path
        try:
            if os.path.lexists(path):
                os.unlink(path)
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old_umask = os.umask(0o177)  # NOTE: bind creates the socket file: never world-accessible
            try:
                sock.bind(path)
            except BaseException:
                sock.close()
                raise
            finally:
                os.umask(old_umask)
            os.chmod(path, 0o600)
            sock.listen(1024)
        except OSError as e:
            why = e.strerror or str(e)
            if e.filename and e.filename != path:  # NOTE: makedirs' EEXIST names a file where a directory must be
                why = f"{e.filename} is not a directory" if os.path.exists(e.filename) else f"{why}: {e.filename}"
            raise OSError(e.errno, f"cannot listen on the Unix socket {path}: {why}") from None
        self._sock = sock
        self._acceptor = threading.Thread(target=self._accept, name="mmcache-local-accept", daemon=True)
        self._acceptor.start()
        return self

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                # NOTE: EMFILE and the like: the connection waits in the backlog; pause instead of spinning
                self._stopping.wait(0.1)
                continue
            with self._lock:
                if self._stopping.is_set() or len(self._conns) >= self.max_connections:
                    self.refused += 1
                    busy = wire.json_body({"error": f"the sidecar serves {self.max_connections} local connections "
                                                    "at most; retry later", "kind": "CacheUnavailable"})
                    with contextlib.suppress(OSError):
                        conn.sendall(wire.frame(wire.NO_REQUEST, ERROR, busy))
                    conn.close()
                    continue
                t = threading.Thread(target=self._serve, args=(conn,), name="mmcache-local", daemon=True)
                self._conns[conn] = t
            try:
                t.start()
            except RuntimeError as e:  # no thread to be had (pids limit): refuse this one, keep accepting
                with self._lock:
                    self._conns.pop(conn, None)
                    self.refused += 1
                logger.warning("cannot start a thread for a local connection: %s", e)
                with contextlib.suppress(OSError):
                    conn.sendall(wire.frame(wire.NO_REQUEST, ERROR, wire.json_body(
                        {"error": "the sidecar cannot serve another local connection now; retry later",
                         "kind": "CacheUnavailable"})))
                conn.close()

    def _serve(self, sock: socket.socket) -> None:
        conn = LocalSession(self.store, _peer_pidfd(sock), self.tenants, self.ops, self._stopping)
        reader = _FrameReader(sock, self.spin_s, self.frame_timeout_s)
        try:
            while True:
                head = reader.read(HEAD.size)
                if head is None:
                    break
                reader.frame_begun()
                blen, msg_id, code = HEAD.unpack(head)
                if blen > MAX_MESSAGE_BYTES:
                    err = wire.json_body({"error": f"message of {blen} bytes is over the {MAX_MESSAGE_BYTES}-byte limit",
                                          "kind": "ProtocolError"})
                    sock.sendall(wire.frame(wire.NO_REQUEST, ERROR, err))
                    break
                body = reader.read(blen) if blen else b""
                if body is None:
                    break
                reader.frame_done()
                if code == _EVENTS:
                    self._follow(sock, conn, msg_id, body)
                    break
                try:
                    status, answer = OK, conn.handle(code, body)
                except _EXPECTED as e:
                    status, answer = ERROR, _error_body(e)
                except Exception as e:  # a bug in the sidecar: answer, log loudly, keep serving
                    logger.exception("local op %s failed", OP_NAMES.get(code, code))
                    status, answer = ERROR, wire.json_body({"error": f"internal error: {e}", "kind": "InternalError"})
                if code == _RELEASE:  # one-way
                    if status == ERROR:
                        logger.debug("connection %s: a release failed: %s", conn.owner, answer[:200])
                    continue
                sock.sendall(wire.frame(msg_id, status, answer))
                if conn.fill_bytes:
                    # NOTE: the writer fills its reservation now and seals at once: a thread that
                    # slept through the fill costs the seal a wake-up (~150 us on a VM, as much as
                    # half the fill of 4.5 MiB), so poll for the length of a fill instead.
                    if self.spin_s > 0:
                        reader.spin_once_s = min(MAX_FILL_SPIN_S, self.spin_s + conn.fill_bytes / FILL_BYTES_PER_S)
                    conn.fill_bytes = 0
        except FrameStalled as e:
            with self._lock:
                self.stalled += 1
            logger.info("local connection %s: %s", conn.owner, e)
            with contextlib.suppress(OSError):
                sock.sendall(wire.frame(wire.NO_REQUEST, ERROR, wire.json_body({"error": str(e), "kind": "ProtocolError"})))
        except OSError:
            logger.debug("connection %s reset", conn.owner)  # its leases go in finally
        finally:
            try:
                conn.close()
            finally:
                sock.close()
                with self._lock:
                    self._conns.pop(sock, None)

    def _follow(self, sock: socket.socket, conn: LocalSession, msg_id: int, body: bytes) -> None:
        """The ``events`` op: this connection becomes a push stream of the store's events (from
        ``since``, default now), in this connection's scope; it ends when the follower goes."""
        bus = self.store.events
        try:
            msg = json.loads(body) if body else {}
            since = msg.get("since") if isinstance(msg, dict) else None
            scope = msg.get("scope", "all") if isinstance(msg, dict) else "all"
            if since is not None and (isinstance(since, bool) or not isinstance(since, int) or since < 0):
                raise ProtocolError(f"events: since={since!r} must be a sequence number >= 0")
            if scope not in ("all", "local"):
                raise ProtocolError(f"events: scope={scope!r} must be all or local")
        except (ValueError, RecursionError) as e:
            sock.sendall(wire.frame(msg_id, ERROR, _error_body(ProtocolError(f"events: {e}"))))
            return
        tenant = None if conn.principal.trusted else conn.principal.tenant
        try:
            bus.admit(tenant)
        except TooManyRequests as e:
            sock.sendall(wire.frame(msg_id, ERROR, _error_body(e)))
            return
        try:
            self._stream(sock, conn, msg_id, bus, since, scope, tenant)
        finally:
            bus.leave(tenant)

    def _stream(self, sock: socket.socket, conn: LocalSession, msg_id: int, bus, since: int | None, scope: str,
                tenant: str | None) -> None:
        seq = bus.seq if since is None else since
        stale = seq > bus.seq  # NOTE: a number from before this sidecar restarted
        seq = min(seq, bus.seq)
        sock.sendall(wire.frame(msg_id, OK, wire.json_body({"seq": seq, "node": bus.node})))
        if stale:
            sock.sendall(wire.frame(wire.EVENT, OK, wire.json_body({"events": [], "lost": True})))
        sock.settimeout(FOLLOWER_SEND_TIMEOUT_S)  # NOTE: a follower that never reads is dropped
        sent = time.monotonic()
        while not self._stopping.is_set():
            events, lost = bus.wait(seq, 0.5)
            if events:
                seq = events[-1].seq
            docs = [d for d in (_event_in_scope(e, tenant) for e in events
                                if scope == "all" or e.node == bus.node) if d is not None]
            if not docs and not lost and time.monotonic() - sent < HEARTBEAT_S:
                continue
            sock.sendall(wire.frame(wire.EVENT, OK, wire.json_body({"events": docs, "lost": lost})))
            sent = time.monotonic()

    def close(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # NOTE: wakes the blocked accept (Linux)
            self._sock.close()
        if self._acceptor is not None:
            self._acceptor.join(timeout_s)
        with self._lock:
            conns = list(self._conns.items())
        for sock, _ in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # the reader sees EOF, drops the leases and ends
        for _, thread in conns:
            thread.join(timeout_s)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)


def start_local_server(store: TieredStore, path: str, tenants: Tenants | None = None,
                       ops: dict[str, int] | None = None, frame_timeout_s: float = 5.0) -> LocalServer:
    """Listen on the Unix socket ``path`` (replacing a stale one); mode 0600 from birth."""
    return LocalServer(store, path, tenants, ops, frame_timeout_s=frame_timeout_s).start()

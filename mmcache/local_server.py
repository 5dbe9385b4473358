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
import itertools
import json
import logging
import os
import select
import socket
import struct
import threading
import time
from typing import Any

from mmcache.claims import DEFAULT_TTL_MS
from mmcache.host import EntryExists, Reservation
from mmcache.store import RETRY_AFTER_S, Lease, TieredStore
from mmcache.serving.tenants import DEFAULT, Principal, Tenants
from mmcache.tier import PutStatus
from mmcache_client import wire
from mmcache_client.errors import CacheFull, EntryTooLarge
from mmcache_client.format import FORMAT_VERSION, EntryFormatError
from mmcache_client.keys import Key
from mmcache_client.wire import ERROR, HEAD, OK, OP_CODES, OP_NAMES, LeaseLoc

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = wire.MAX_BODY_BYTES
MAX_KEYS_PER_MESSAGE = 4096
MAX_CONNECTIONS = 512
"""Local connections served at once (a thread each); one more is answered with an error and closed."""
PROTOCOL = 2
"""The framing's version, in ``hello``: 1 was JSON lines."""
_SCOPE_CACHE_KEYS = 8192

_OPS = wire.OPS
"""The ops, counted per name in ``/v1/stats`` (``"local"``): round trips are what the fast path saves."""
_LEASE, _RELEASE, _EVENTS = OP_CODES["lease"], OP_CODES["release"], OP_CODES["events"]
HEARTBEAT_S = 5.0
"""An event stream with nothing to say sends an empty frame this often (a dead follower shows)."""
FOLLOWER_SEND_TIMEOUT_S = 10.0
_OPS_LOCK = threading.Lock()
_HOST = wire.TIER_CODES["host"]
_MISS_RECORD = wire.LEASE_RECORD.pack(wire.MISS, 0, 0, wire.NO_LAYOUT, 0, 0, 0, 0)
SPIN_S = float(os.environ.get("MMCACHE_LOCAL_SPIN_US", "100")) / 1e6
"""How long a connection's thread polls for the next request before it sleeps in ``recv``."""
FILL_BYTES_PER_S = 4e9
"""A writer's fill rate assumed when the thread waits for its seal: well under a memcpy's, so
that the seal of a fill at memory speed finds the thread still polling."""
MAX_FILL_SPIN_S = 0.002
"""Longest the thread polls for a seal after a reservation (a slower writer pays one wake-up)."""


class ProtocolError(ValueError):
    """A malformed control message."""


def _key_list(keys: Any) -> list:
    if not isinstance(keys, list) or len(keys) > MAX_KEYS_PER_MESSAGE:
        raise ProtocolError(f"'keys' must be a list of at most {MAX_KEYS_PER_MESSAGE} keys")
    return keys


def _peer_pidfd(sock: socket.socket | None) -> int | None:
    """A pidfd of the process at the other end (SO_PEERCRED), or None where Linux has none."""
    if sock is None or not hasattr(os, "pidfd_open") or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        return os.pidfd_open(pid) if pid > 0 else None
    except OSError:
        return None


def _exited(pidfd: int, timeout: float = 0) -> bool:
    return bool(select.select([pidfd], [], [], timeout)[0])


class _Connection:
    """One client's session: its reservations and leases (the store pins them per owner)."""

    _ids = itertools.count()

    def __init__(self, store: TieredStore, pidfd: int | None, tenants: Tenants | None = None,
                 ops: dict[str, int] | None = None, stopping: threading.Event | None = None):
        self.store = store
        self.ops = ops if ops is not None else {}
        self.tenants = tenants
        self.principal: Principal = DEFAULT
        self.owner = ("local", next(self._ids))
        self.pidfd = pidfd
        self.stopping = stopping or threading.Event()
        self.reservations: dict[str, Reservation] = {}
        self.leases: dict[str, list[Lease]] = {}
        """Leases below host (in place in LMDB, ...), per key."""
        self.host_leases: dict[str, list[int]] = {}
        """Host leases, per key their arena offsets (the fast path keeps no ``Lease`` for them)."""
        self._scope: dict[str, str] = {}
        """Key strings this connection named → the store's key (validated once; a hot key repeats)."""
        self.fill_bytes = 0
        """Bytes of the reservation just granted: its writer's seal follows once they are filled."""

    def handle(self, code: int, body: bytes) -> bytes:
        """Run one request; its answer's body (``OK``). Errors raise."""
        op = OP_NAMES.get(code)
        if op is None:
            raise ProtocolError(f"unknown op code {code}")
        with _OPS_LOCK:
            self.ops[op] = self.ops.get(op, 0) + 1
        if code == _LEASE:
            return self._lease_batch([self._scoped(k) for k in _key_list(wire.parse_keys(body))])
        if code == _RELEASE:
            self._release_batch(_key_list(wire.parse_keys(body)))
            return b""
        try:
            msg = json.loads(body) if body else {}
        except RecursionError:
            raise ProtocolError(f"{op}: the body nests too deeply") from None
        except ValueError as e:
            raise ProtocolError(f"{op}: the body is not JSON: {e}") from None
        if not isinstance(msg, dict):
            raise ProtocolError(f"{op}: the body must be a JSON object")
        return wire.json_body(self._json_op(op, msg))

    def _json_op(self, op: str, msg: dict) -> dict:
        store = self.store
        if op == "hello":
            self._hello(msg.get("token"))
            return {"arena_path": store.arena_path, "arena_bytes": store.host.arena.capacity_bytes,
                    "lmdb_path": store.disk.config.path, "lmdb_map_size": store.disk.config.resolved_map_size_bytes,
                    "format": FORMAT_VERSION, "pid": os.getpid(),
                    "tenant": self.principal.tenant, "protocol": PROTOCOL,
                    "device_tier": store.device is not None}
        if op == "lookup":
            keys = {self._scoped(k): k for k in _key_list(msg.get("keys"))}
            if msg.get("detail"):
                return {"items": {keys[k]: d for k, d in store.describe(list(keys)).items()}}
            return {"tiers": {keys[k]: t for k, t in store.lookup(list(keys)).items()}}
        if op == "reserve":
            return self._reserve(msg)
        if op == "seal":
            res = self.reservations.pop(self._scoped(msg.get("key")), None)
            if res is None:
                raise ProtocolError(f"no open reservation for {msg.get('key')!r} on this connection")
            result = store.seal(res, verify=False)  # NOTE: the disk writer verifies (see TieredStore.seal)
            if msg.get("durable") and result.durable is not None:
                result.durable.result()
            return {"created": result.created, "tier": result.tier}
        if op == "abort":
            res = self.reservations.pop(self._scoped(msg.get("key")), None)
            if res is not None:
                store.abort(res)
            return {"aborted": res is not None}
        if op == "delete":
            return {"deleted": store.delete(self._scoped(msg.get("key")))}
        if op in ("lease_device", "release_device"):
            return self._device_op(op, [self._scoped(k) for k in _key_list(msg.get("keys"))])
        if op == "claim":
            keys = {self._scoped(k): k for k in _key_list(msg.get("keys"))}
            ttl = msg.get("ttl_ms", DEFAULT_TTL_MS)
            answer = store.claims.claim(list(keys), msg.get("owner"), ttl)
            return {"claims": {keys[k]: v for k, v in answer.items()}}
        if op == "unclaim":
            keys = [self._scoped(k) for k in _key_list(msg.get("keys"))]
            return {"released": store.claims.release(keys, msg.get("owner"))}
        if op == "stats":
            if not self.principal.trusted:
                usage = store.usage_by_tenant()
                return {"stats": {"tenant": self.principal.tenant, "usage": usage.get(self.principal.tenant, {})}}
            return {"stats": store.stats()}
        raise ProtocolError(f"{op!r} is not a JSON op")

    def _device_op(self, op: str, keys: list[str]) -> dict:
        """``lease_device``: per key a CUDA IPC handle (``DeviceFront.export``) or null (not on
        the device: no tier holds it, or the device has no room now; read it from host).
        ``release_device``: give such leases back (one per key named)."""
        front = self.store.device
        if front is None:
            raise ProtocolError(f"{op}: this sidecar has no device tier (mmcache serve --device-capacity)")
        if op == "release_device":
            return {"released": sum(front.release(k, self.owner) for k in keys)}
        entries: list[dict | None] = []
        try:
            for key in keys:
                entries.append(front.export(key, self.owner))
        except BaseException:  # the client never learns of these: give them back
            for key, doc in zip(keys, entries):
                if doc is not None:
                    front.release(key, self.owner)
            raise
        return {"entries": entries}

    def _hello(self, token: Any) -> None:
        if token is None:
            return  # the default tenant: the socket's file mode is its guard
        if not isinstance(token, str):
            raise ProtocolError("'token' must be a string")
        principal = self.tenants.authenticate(token) if self.tenants is not None else None
        if principal is None and self.tenants is None:
            return  # no tenants: a token (the sidecar's, for HTTP) changes nothing here
        if principal is None:
            raise PermissionError("hello: the token is no tenant's")
        self.principal = principal
        self._scope.clear()

    def _scoped(self, text: Any) -> str:
        """A message's key in this connection's scope, as the store keys it."""
        scoped = self._scope.get(text) if isinstance(text, str) else None
        if scoped is None:
            scoped = self.principal.scope(Key.from_string(text)).to_string()
            if len(self._scope) >= _SCOPE_CACHE_KEYS:
                self._scope.clear()
            self._scope[text] = scoped
        return scoped

    def _lease_batch(self, keys: list[str]) -> bytes:
        """A ``lease`` message (every key already valid): host hits in one go under host's
        lock, each packed straight into its record; the rest leased one by one below."""
        store, owner = self.store, self.owner
        got = store.lease_host_many(keys, owner)
        records: list[bytes] = []
        tail: list[bytes] = []
        below: list[str] = []
        try:
            for key, hit in zip(keys, got):
                if hit is not None:
                    records.append(wire.pack_lease_record(hit[0], hit[1], _HOST, hit[2]))
                    continue
                loc = self._lease(key)
                if loc is None:
                    records.append(_MISS_RECORD)
                    continue
                below.append(f"{key}\t{loc.offset}")
                stored = loc.stored_key.encode() if loc.offset == wire.IN_LMDB else b""
                records.append(wire.pack_lease_record(loc.offset, loc.nbytes, wire.TIER_CODES[loc.tier],
                                                      loc.layout, len(stored)))
                tail.append(stored)
        except BaseException:  # the client never learns of these: give them all back
            store.release_host_many([(k, hit[0]) for k, hit in zip(keys, got) if hit is not None], owner)
            self._release_batch(below, scoped=True)
            raise
        host_leases = self.host_leases
        for key, hit in zip(keys, got):
            if hit is not None:
                host_leases.setdefault(key, []).append(hit[0])
        return b"".join(records) + b"".join(tail)

    def _lease(self, key: str) -> LeaseLoc | None:
        lease = self.store.lease(key, self.owner)
        if lease is None:
            return None
        if lease.served_from == "host":  # NOTE: promoted into host by this read
            self.host_leases.setdefault(key, []).append(lease.offset)
            return LeaseLoc(lease.offset, lease.nbytes, lease.tier, key, self.store.host.layout(lease.tier_lease))
        self.leases.setdefault(key, []).append(lease)
        return LeaseLoc(lease.offset, lease.nbytes, lease.tier, key, None)

    def _release_batch(self, lines: list[str], scoped: bool = False) -> None:
        """A ``release`` message: each line ``key\toffset`` (or a bare key: its newest lease)."""
        host: list[tuple[str, int]] = []
        for line in lines:
            k, _, off = line.partition("\t")
            key = k if scoped else self._scoped(k)
            offset = int(off) if off.lstrip("-").isdigit() else None
            offsets = self.host_leases.get(key)
            if offsets and (offset is None or offset in offsets):
                at = len(offsets) - 1 - offsets[::-1].index(offset) if offset is not None else -1
                host.append((key, offsets.pop(at)))
                if not offsets:
                    del self.host_leases[key]
                continue
            self._release(key, offset)
        if host:
            self.store.release_host_many(host, self.owner)

    def _release(self, key: str, offset: int | None = None) -> bool:
        """Give back this connection's lease below host of ``key`` taken at ``offset`` (None:
        the newest)."""
        leases = self.leases.get(key)
        if not leases:
            return False
        at = next((i for i in range(len(leases) - 1, -1, -1) if leases[i].offset == offset), -1) \
            if offset is not None else -1
        lease = leases.pop(at)
        if not leases:
            del self.leases[key]
        self.store.release(lease)
        return True

    def _reserve(self, msg: dict) -> dict:
        key, nbytes, encode_ms = self._scoped(msg.get("key")), msg.get("nbytes"), msg.get("encode_ms", 0.0)
        persist = msg.get("persist", True)
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes <= 0:
            raise ProtocolError(f"nbytes={nbytes!r} must be a positive int")
        if isinstance(encode_ms, bool) or not isinstance(encode_ms, (int, float)) or not 0 <= encode_ms < float("inf"):
            raise ProtocolError(f"encode_ms={encode_ms!r} must be a finite number >= 0")
        if not isinstance(persist, bool):
            raise ProtocolError(f"persist={persist!r} must be true or false")
        if key in self.reservations:
            raise ProtocolError(f"{key} is already reserved on this connection")
        try:
            res = self.store.reserve(key, nbytes, self.owner, float(encode_ms), persist=persist)
        except EntryExists:
            return {"status": "exists"}
        if res is PutStatus.NO_SPACE:
            return {"status": "no_space", "retry_after_s": RETRY_AFTER_S}
        if res is PutStatus.TOO_LARGE:
            return {"status": "too_large", "capacity_bytes": self.store.host.allocator.capacity_bytes}
        self.reservations[key] = res
        self.fill_bytes = nbytes
        return {"status": "reserved", "offset": res.offset}

    def close(self) -> None:
        for leases in self.leases.values():
            for lease in leases:
                self.store.release(lease)
        self.leases.clear()
        for key, offsets in self.host_leases.items():
            self.store.release_host_many([(key, off) for off in offsets], self.owner)
        self.host_leases.clear()
        quarantine = None
        if self.reservations and self.pidfd is not None and not _exited(self.pidfd):
            quarantine = self.owner  # the writer lives: its pen may still be on the page
        self.reservations.clear()
        dropped = self.store.release_owner(self.owner, quarantine=quarantine)
        if dropped:
            logger.info("connection %s closed holding %s leases/reservations; dropped", self.owner, dropped)
        if quarantine is None:
            self._close_pidfd()
            return
        logger.warning("connection %s closed mid-put while its process lives: its reservations stay "
                       "quarantined until it exits", self.owner)
        threading.Thread(target=self._await_writer_exit, name=f"mmcache-quarantine-{self.owner[1]}",
                         daemon=True).start()

    def _await_writer_exit(self) -> None:
        while not _exited(self.pidfd, 1.0):
            if self.stopping.is_set():  # the sidecar stops: the arena goes with it
                self._close_pidfd()
                return
        freed = self.store.host.free_quarantine(self.owner)
        logger.info("connection %s: its process exited; %s quarantined bytes are free again", self.owner, freed)
        self._close_pidfd()

    def _close_pidfd(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


_KINDS = ((CacheFull, "CacheFull"), (EntryTooLarge, "EntryTooLarge"), (PermissionError, "Forbidden"))


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
    return wire.json_body({"error": str(e), "kind": kind})


class _FrameReader:
    """Reads a connection's frames from the socket, spinning ``spin_s`` on a non-blocking
    ``recv`` before it blocks: a client in a get loop sends its next request a few tens of
    microseconds after its answer, and a thread that slept in ``recv`` costs a wake-up (on a VM,
    as much as the round trip itself) to serve it."""

    __slots__ = ("sock", "spin_s", "buf", "spin_once_s")

    def __init__(self, sock: socket.socket, spin_s: float):
        self.sock, self.spin_s, self.buf = sock, spin_s, bytearray()
        self.spin_once_s = 0.0
        """A longer poll for the next request only (a seal expected after a fill)."""

    def read(self, n: int) -> bytes | None:
        """The next ``n`` bytes, or None at the end of the stream."""
        buf = self.buf
        while len(buf) < n:
            chunk = self._recv()
            if not chunk:
                return None
            buf += chunk
        out = bytes(buf[:n])
        del buf[:n]
        return out

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
        return self.sock.recv(1 << 16)


_EXPECTED = (ProtocolError, EntryFormatError, ValueError, CacheFull, EntryTooLarge, PermissionError)


class LocalServer:
    """The Unix-socket server: an accept thread, and a thread per connection (see the module doc).

    Lifecycle: ``start()`` binds (mode 0600 from birth) and starts accepting; ``close()`` stops
    accepting, shuts every connection down (their leases and reservations are dropped) and joins
    the threads. ``ops``: where the count of each op served is kept.
    """

    def __init__(self, store: TieredStore, path: str, tenants: Tenants | None = None,
                 ops: dict[str, int] | None = None, max_connections: int = MAX_CONNECTIONS):
        self.store, self.path, self.tenants = store, path, tenants
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
        conn = _Connection(self.store, _peer_pidfd(sock), self.tenants, self.ops, self._stopping)
        reader = _FrameReader(sock, self.spin_s)
        try:
            while True:
                head = reader.read(HEAD.size)
                if head is None:
                    break
                blen, msg_id, code = HEAD.unpack(head)
                if blen > MAX_MESSAGE_BYTES:
                    err = wire.json_body({"error": f"message of {blen} bytes is over the {MAX_MESSAGE_BYTES}-byte limit",
                                          "kind": "ProtocolError"})
                    sock.sendall(wire.frame(wire.NO_REQUEST, ERROR, err))
                    break
                body = reader.read(blen) if blen else b""
                if body is None:
                    break
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
        except OSError:
            logger.debug("connection %s reset", conn.owner)  # its leases go in finally
        finally:
            try:
                conn.close()
            finally:
                sock.close()
                with self._lock:
                    self._conns.pop(sock, None)

    def _follow(self, sock: socket.socket, conn: _Connection, msg_id: int, body: bytes) -> None:
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
        seq = bus.seq if since is None else since
        stale = seq > bus.seq  # NOTE: a number from before this sidecar restarted
        seq = min(seq, bus.seq)
        sock.sendall(wire.frame(msg_id, OK, wire.json_body({"seq": seq, "node": bus.node})))
        if stale:
            sock.sendall(wire.frame(wire.EVENT, OK, wire.json_body({"events": [], "lost": True})))
        tenant = None if conn.principal.trusted else conn.principal.tenant
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
                       ops: dict[str, int] | None = None) -> LocalServer:
    """Listen on the Unix socket ``path`` (replacing a stale one); mode 0600 from birth."""
    return LocalServer(store, path, tenants, ops).start()

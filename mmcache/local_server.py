"""The local zero-copy protocol: control messages over a Unix socket, never tensor bytes.

Framing: one JSON object per line. A request is ``{"id": N, "op": NAME, ...}``; the answer is
``{"id": N, ...}`` or ``{"id": N, "error": MESSAGE, "kind": NAME}``. Ops:

- ``hello {token?}`` → ``arena_path``, ``arena_bytes``, ``lmdb_path``, ``format``, ``pid``,
  ``tenant``. With ``--tenants`` a token scopes the connection to its tenant (keys are then
  stored as ``tenant@ns/hash``; answers name them as the client did); without one the
  connection is the default tenant (the socket's 0600 mode is its guard), which may name any
  tenant's keys as ``tenant@ns/hash``.
- ``lookup {keys, detail?}`` → ``tiers`` (key → tier or null); with ``detail`` → ``items`` (key →
  ``{"tier", "num_tokens"[, "image_grid_thw"]}`` or null): a hit described without a lease
- ``lease {keys}`` → ``leases``: per key ``[offset, nbytes, tier, stored_key]`` or null; each is
  a lease. ``offset`` -1: host had no room, the entry is read in place from LMDB (``lmdb_path``)
  by ``stored_key``, pinned on disk until released.
- ``release {keys}`` → ``released`` (count)
- ``reserve {key, nbytes, encode_ms, persist}`` → ``offset`` (``status`` ``exists`` /
  ``no_space`` (+ ``retry_after_s``) / ``too_large`` (+ ``capacity_bytes``) instead)
- ``seal {key, durable}`` → ``created``, ``tier``; ``abort {key}``
- ``delete {key}`` → ``deleted``; ``stats`` → the store's stats

Leases and reservations belong to the connection: when it closes (or the client dies) every one
of them is dropped, so nothing leaks and nothing stays pinned. A reservation open when its
connection closes while the client process still lives is quarantined until that process exits
(a pidfd says when): its writer may still be filling it, and the space must not be given to the
next writer under its pen. Checksums, promotion copies and disk waits run off the event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import select
import socket
import struct
from typing import Any

from mmcache.host import EntryExists, Reservation
from mmcache.store import RETRY_AFTER_S, Lease, TieredStore
from mmcache.tenants import DEFAULT, Principal, Tenants
from mmcache.tier import PutStatus
from mmcache_client.errors import CacheFull, EntryTooLarge
from mmcache_client.format import FORMAT_VERSION, EntryFormatError
from mmcache_client.keys import Key

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 1 << 20
MAX_KEYS_PER_MESSAGE = 4096


_OPS = ("hello", "lookup", "lease", "release", "reserve", "seal", "abort", "delete", "stats")
"""The ops, counted per name in ``/v1/stats`` (``"local"``): round trips are what the fast path saves."""


class ProtocolError(ValueError):
    """A malformed control message."""


def _key_list(msg: dict) -> list:
    keys = msg.get("keys")
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


def _exited(pidfd: int) -> bool:
    return bool(select.select([pidfd], [], [], 0)[0])


class _Connection:
    """One client's session: its reservations and leases (the store pins them per owner)."""

    _ids = itertools.count()

    def __init__(self, store: TieredStore, pidfd: int | None, tenants: Tenants | None = None,
                 ops: dict[str, int] | None = None):
        self.store = store
        self.ops = ops if ops is not None else {}
        self.tenants = tenants
        self.principal: Principal = DEFAULT
        self.owner = ("local", next(self._ids))
        self.pidfd = pidfd
        self.reservations: dict[str, Reservation] = {}
        self.leases: dict[str, list[Lease]] = {}

    async def handle(self, msg: dict) -> dict:
        op = msg.get("op")
        store = self.store
        if isinstance(op, str) and op in _OPS:
            self.ops[op] = self.ops.get(op, 0) + 1
        if op == "hello":
            self._hello(msg.get("token"))
            return {"arena_path": store.arena_path, "arena_bytes": store.host.arena.capacity_bytes,
                    "lmdb_path": store.disk.config.path, "format": FORMAT_VERSION, "pid": os.getpid(),
                    "tenant": self.principal.tenant}
        if op == "lookup":
            keys = {self._scoped(k): k for k in _key_list(msg)}
            if msg.get("detail"):  # NOTE: reads headers (and disk entries): off the loop
                items = await asyncio.to_thread(store.describe, list(keys))
                return {"items": {keys[k]: d for k, d in items.items()}}
            return {"tiers": {keys[k]: t for k, t in store.lookup(list(keys)).items()}}
        if op == "lease":
            return {"leases": [await self._lease(self._scoped(k)) for k in _key_list(msg)]}
        if op == "release":
            return {"released": sum(self._release(self._scoped(k)) for k in _key_list(msg))}
        if op == "reserve":
            return await self._reserve(msg)
        if op == "seal":
            res = self.reservations.pop(self._scoped(msg.get("key")), None)
            if res is None:
                raise ProtocolError(f"no open reservation for {msg.get('key')!r} on this connection")
            result = await asyncio.to_thread(store.seal, res)  # NOTE: a checksum pass over the entry
            if msg.get("durable") and result.durable is not None:
                await asyncio.wrap_future(result.durable)
            return {"created": result.created, "tier": result.tier}
        if op == "abort":
            res = self.reservations.pop(self._scoped(msg.get("key")), None)
            if res is not None:
                store.abort(res)
            return {"aborted": res is not None}
        if op == "delete":
            return {"deleted": await asyncio.to_thread(store.delete, self._scoped(msg.get("key")))}
        if op == "stats":
            if not self.principal.trusted:
                usage = await asyncio.to_thread(store.usage_by_tenant)
                return {"stats": {"tenant": self.principal.tenant, "usage": usage.get(self.principal.tenant, {})}}
            return {"stats": store.stats()}
        raise ProtocolError(f"unknown op {op!r}")

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

    def _scoped(self, text: Any) -> str:
        """A message's key in this connection's scope, as the store keys it."""
        return self.principal.scope(Key.from_string(text)).to_string()

    async def _lease(self, key: str) -> list | None:
        store = self.store
        # NOTE: a host hit is a dict lookup; anything else may verify and copy: off the loop.
        lease = store.lease(key, self.owner) if store.host.contains(key) else \
            await asyncio.to_thread(store.lease, key, self.owner)
        if lease is None:
            return None
        self.leases.setdefault(key, []).append(lease)
        return [lease.offset, lease.nbytes, lease.tier, key]

    def _release(self, key: str) -> bool:
        leases = self.leases.get(key)
        if not leases:
            return False
        lease = leases.pop()
        if not leases:
            del self.leases[key]
        self.store.release(lease)
        return True

    async def _reserve(self, msg: dict) -> dict:
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
            res = self.store.reserve(key, nbytes, self.owner, float(encode_ms), persist=persist, wait_for_disk=False)
            if res is PutStatus.NO_SPACE:  # the slow path waits for disk commits: off the event loop
                res = await asyncio.to_thread(self.store.reserve, key, nbytes, self.owner, float(encode_ms),
                                              persist=persist)
        except EntryExists:
            return {"status": "exists"}
        if res is PutStatus.NO_SPACE:
            return {"status": "no_space", "retry_after_s": RETRY_AFTER_S}
        if res is PutStatus.TOO_LARGE:
            return {"status": "too_large", "capacity_bytes": self.store.host.allocator.capacity_bytes}
        self.reservations[key] = res
        return {"status": "reserved", "offset": res.offset}

    def close(self) -> None:
        for leases in self.leases.values():
            for lease in leases:
                self.store.release(lease)
        self.leases.clear()
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
        loop = asyncio.get_running_loop()
        loop.add_reader(self.pidfd, self._writer_exited, loop)

    def _writer_exited(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self.pidfd)
        freed = self.store.host.free_quarantine(self.owner)
        logger.info("connection %s: its process exited; %s quarantined bytes are free again", self.owner, freed)
        self._close_pidfd()

    def _close_pidfd(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def _error_answer(e: BaseException) -> dict:
    if isinstance(e, CacheFull):
        return {"error": str(e), "kind": "CacheFull"}
    if isinstance(e, EntryTooLarge):
        return {"error": str(e), "kind": "EntryTooLarge"}
    if isinstance(e, PermissionError):
        return {"error": str(e), "kind": "Forbidden"}
    return {"error": str(e), "kind": type(e).__name__}


async def _serve_connection(store: TieredStore, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            tenants: Tenants | None = None, ops: dict[str, int] | None = None) -> None:
    conn = _Connection(store, _peer_pidfd(writer.get_extra_info("socket")), tenants, ops)
    try:
        while True:
            try:
                line = await reader.readline()
            except (asyncio.LimitOverrunError, ValueError):
                writer.write(b'{"id":null,"error":"message too long","kind":"ProtocolError"}\n')
                break
            if not line:
                break
            answer: dict[str, Any]
            msg_id = None
            try:
                msg = json.loads(line)
                if not isinstance(msg, dict):
                    raise ProtocolError("a message must be a JSON object")
                msg_id = msg.get("id")
                answer = await conn.handle(msg)
            except (ProtocolError, EntryFormatError, ValueError, json.JSONDecodeError, CacheFull, EntryTooLarge,
                    PermissionError) as e:
                answer = _error_answer(e)
            except Exception as e:  # a bug in the sidecar: answer, log loudly, keep serving
                logger.exception("local op failed: %.200s", line)
                answer = {"error": f"internal error: {e}", "kind": "InternalError"}
            answer["id"] = msg_id
            writer.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
            await writer.drain()
    except (ConnectionResetError, BrokenPipeError):
        logger.debug("connection %s reset", conn.owner)  # its leases go in finally
    finally:
        conn.close()
        writer.close()


async def start_local_server(store: TieredStore, path: str, tenants: Tenants | None = None,
                             ops: dict[str, int] | None = None) -> asyncio.AbstractServer:
    """Listen on the Unix socket ``path`` (replacing a stale one); mode 0600 from birth. ``ops``:
    where the count of each op served is kept (see ``_OPS``)."""
    try:
        if os.path.lexists(path):
            os.unlink(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        old_umask = os.umask(0o177)  # NOTE: bind creates the socket file: never world-accessible
        try:
            server = await asyncio.start_unix_server(
                lambda r, w: _serve_connection(store, r, w, tenants, ops), path=path, limit=MAX_MESSAGE_BYTES, backlog=1024
            )
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
    except OSError as e:
        why = e.strerror or str(e)
        if e.filename and e.filename != path:  # NOTE: makedirs' EEXIST names a file where a directory must be
            why = f"{e.filename} is not a directory" if os.path.exists(e.filename) else f"{why}: {e.filename}"
        raise OSError(e.errno, f"cannot listen on the Unix socket {path}: {why}") from None
    return server

"""One local connection's session (``LocalSession``): the ops of the local protocol run against the
store, and the leases and reservations the connection holds, dropped when it closes (or the
client dies). The socket, its threads and the framing are ``mmcache.sidecar.local_server``'s."""

from __future__ import annotations

import itertools
import json
import logging
import os
import select
import socket
import struct
import threading
from typing import Any

from mmcache.core.claims import DEFAULT_TTL_MS
from mmcache.core.tier import EntryExists, Reservation
from mmcache.sidecar.listing import DEFAULT_LIST_LIMIT, list_page
from mmcache.core.store import RETRY_AFTER_S, Lease, TieredStore
from mmcache.common.tenants import DEFAULT, Principal, Tenants
from mmcache.core.tier import PutStatus
from mmcache_client import wire
from mmcache_client.format import FORMAT_VERSION
from mmcache_client.keys import Key
from mmcache_client.wire import OP_CODES, OP_NAMES, LeaseLoc


logger = logging.getLogger(__name__)

MAX_KEYS_PER_MESSAGE = 4096
_LEASE, _RELEASE, _SCAN = OP_CODES["lease"], OP_CODES["release"], OP_CODES["scan"]
PROTOCOL = 2
"""The framing's version, in ``hello``: 1 was JSON lines."""
_SCOPE_CACHE_KEYS = 8192
_OPS_LOCK = threading.Lock()
_HOST = wire.TIER_CODES["host"]
_MISS_RECORD = wire.LEASE_RECORD.pack(wire.MISS, 0, 0, wire.NO_LAYOUT, 0, 0, 0, 0)


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


class LocalSession:
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
        if code == _LEASE or code == _SCAN:
            return self._lease_batch([self._scoped(k) for k in _key_list(wire.parse_keys(body))], promote=code == _LEASE)
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
        if op == "list":
            return list_page(store, self.principal, namespace=msg.get("namespace"), after=msg.get("after"),
                             limit=msg.get("limit", DEFAULT_LIST_LIMIT))
        if op == "stats":
            if not self.principal.trusted:
                usage = store.usage_by_tenant()
                mine = {"tenant": self.principal.tenant, "usage": usage.get(self.principal.tenant, {})}
                quota = store.config.tenant_quotas.get(self.principal.tenant)
                return {"stats": mine | ({"quota_bytes": quota} if quota is not None else {})}
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

    def _lease_batch(self, keys: list[str], promote: bool = True) -> bytes:
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
                loc = self._lease(key, promote)
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

    def _lease(self, key: str, promote: bool = True) -> LeaseLoc | None:
        lease = self.store.lease(key, self.owner, promote=promote)
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

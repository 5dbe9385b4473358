"""The local zero-copy protocol: control messages over a Unix socket, never tensor bytes.

Framing: one JSON object per line. A request is ``{"id": N, "op": NAME, ...}``; the answer is
``{"id": N, ...}`` or ``{"id": N, "error": MESSAGE, "kind": NAME}``. Ops:

- ``hello`` → ``arena_path``, ``arena_bytes``, ``format``
- ``lookup {keys}`` → ``tiers`` (key → tier or null)
- ``lease {keys}`` → ``leases``: per key ``[offset, nbytes, tier]`` or null; each is a lease
- ``release {keys}`` → ``released`` (count)
- ``reserve {key, nbytes, encode_ms}`` → ``offset`` (``status`` ``exists`` / ``no_space`` instead)
- ``seal {key, durable}`` → ``created``, ``tier``; ``abort {key}``
- ``delete {key}`` → ``deleted``; ``stats`` → the store's stats

Leases and reservations belong to the connection: when it closes (or the client dies) every one
of them is dropped, so nothing leaks and nothing stays pinned.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
from typing import Any

from mmcache.host import EntryExists, Reservation
from mmcache.store import TieredStore
from mmcache_client.format import FORMAT_VERSION, EntryFormatError
from mmcache_client.keys import Key

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 1 << 20
MAX_KEYS_PER_MESSAGE = 4096


class ProtocolError(ValueError):
    """A malformed control message."""


def _keys(msg: dict) -> list[str]:
    keys = msg.get("keys")
    if not isinstance(keys, list) or len(keys) > MAX_KEYS_PER_MESSAGE:
        raise ProtocolError(f"'keys' must be a list of at most {MAX_KEYS_PER_MESSAGE} keys")
    return [Key.from_string(k).to_string() for k in keys]


def _key(msg: dict) -> str:
    return Key.from_string(msg.get("key")).to_string()


class _Connection:
    """One client's session: its reservations live here, its leases in the host tier."""

    _ids = itertools.count()

    def __init__(self, store: TieredStore):
        self.store = store
        self.owner = ("local", next(self._ids))
        self.reservations: dict[str, Reservation] = {}

    async def handle(self, msg: dict) -> dict:
        op = msg.get("op")
        store = self.store
        if op == "hello":
            return {"arena_path": store.arena_path, "arena_bytes": store.host.arena.capacity_bytes,
                    "format": FORMAT_VERSION, "pid": os.getpid()}
        if op == "lookup":
            return {"tiers": store.lookup(_keys(msg))}
        if op == "lease":
            out = []
            for key in _keys(msg):
                lease = store.lease(key, self.owner) if store.host.contains(key) else \
                    await asyncio.to_thread(store.lease, key, self.owner)  # promotion copies
                out.append(None if lease is None else [lease.location.offset, lease.location.nbytes, lease.tier])
            return {"leases": out}
        if op == "release":
            return {"released": sum(store.host.release(k, self.owner) for k in _keys(msg))}
        if op == "reserve":
            return await self._reserve(msg)
        if op == "seal":
            res = self.reservations.pop(_key(msg), None)
            if res is None:
                raise ProtocolError(f"no open reservation for {msg.get('key')!r} on this connection")
            result = store.seal(res)
            if msg.get("durable") and result.durable is not None:
                await asyncio.wrap_future(result.durable)
            return {"created": result.created, "tier": result.tier}
        if op == "abort":
            res = self.reservations.pop(_key(msg), None)
            if res is not None:
                store.abort(res)
            return {"aborted": res is not None}
        if op == "delete":
            return {"deleted": store.delete(_key(msg))}
        if op == "stats":
            return {"stats": store.stats()}
        raise ProtocolError(f"unknown op {op!r}")

    async def _reserve(self, msg: dict) -> dict:
        key, nbytes, encode_ms = _key(msg), msg.get("nbytes"), msg.get("encode_ms", 0.0)
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes <= 0:
            raise ProtocolError(f"nbytes={nbytes!r} must be a positive int")
        if not isinstance(encode_ms, (int, float)) or encode_ms < 0:
            raise ProtocolError(f"encode_ms={encode_ms!r} must be a number >= 0")
        if key in self.reservations:
            raise ProtocolError(f"{key} is already reserved on this connection")
        try:
            res = self.store.reserve(key, nbytes, self.owner, float(encode_ms), wait_for_disk=False)
            if res is None:  # the slow path waits for disk commits: off the event loop
                res = await asyncio.to_thread(self.store.reserve, key, nbytes, self.owner, float(encode_ms))
        except EntryExists:
            return {"status": "exists"}
        if res is None:
            return {"status": "no_space"}
        self.reservations[key] = res
        return {"status": "reserved", "offset": res.offset}

    def close(self) -> None:
        for res in self.reservations.values():
            self.store.abort(res)
        self.reservations.clear()
        dropped = self.store.release_owner(self.owner)
        if dropped:
            logger.info("connection %s closed holding %s leases/reservations; dropped", self.owner, dropped)


async def _serve_connection(store: TieredStore, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn = _Connection(store)
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
            except (ProtocolError, EntryFormatError, ValueError, json.JSONDecodeError) as e:
                answer = {"error": str(e), "kind": type(e).__name__}
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


async def start_local_server(store: TieredStore, path: str) -> asyncio.AbstractServer:
    """Listen on the Unix socket ``path`` (replacing a stale one); mode 0600."""
    try:
        if os.path.lexists(path):
            os.unlink(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        server = await asyncio.start_unix_server(
            lambda r, w: _serve_connection(store, r, w), path=path, limit=MAX_MESSAGE_BYTES
        )
        os.chmod(path, 0o600)
    except OSError as e:
        why = e.strerror or str(e)
        if e.filename and e.filename != path:  # NOTE: makedirs' EEXIST names a file where a directory must be
            why = f"{e.filename} is not a directory" if os.path.exists(e.filename) else f"{why}: {e.filename}"
        raise OSError(e.errno, f"cannot listen on the Unix socket {path}: {why}") from None
    return server

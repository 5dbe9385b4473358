"""Client side of the local protocol for the async SDK: one Unix-socket session (``asyncio``
streams) plus the arena mappings, and an event stream's own connection. The blocking twin is
``mmcache_client.local``; the framing is ``mmcache_client.wire``."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from typing import Any, AsyncIterator

from mmcache_client import wire
from mmcache_client.arena import SharedArena
from mmcache_client.errors import CacheTimeout, CacheUnavailable
from mmcache_client.local import MAX_LINE_BYTES, answer_fields
from mmcache_client.session import SessionState
from mmcache_client.wire import ERROR, OP_CODES


class AsyncLocalConnection:
    """One Unix-socket session plus the arena mappings; requests serialized on a lock."""

    def __init__(self, path: str, timeout: float | None = 30.0, token: str | None = None):
        self.path = path
        self._token = token
        self.timeout = timeout
        """Longest wait for one answer, in seconds (``CacheTimeout`` past it; the session stays)."""
        self.state = SessionState()
        self.lmdb_path: str | None = None
        self.arena: SharedArena | None = None
        self._writable: SharedArena | None = None
        self._lock = asyncio.Lock()
        self._ids = itertools.count()
        self._pending: set[asyncio.Future] = set()
        """Exchanges whose callers were cancelled, and their clean-ups (strong refs)."""

    async def connect(self) -> None:
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(self.path, limit=MAX_LINE_BYTES)
        except OSError as e:
            raise CacheUnavailable(f"cannot connect to unix://{self.path}: {e}") from e
        try:
            hello = await self.call("hello", **({"token": self._token} if self._token else {}))
        except BaseException:
            self._writer.close()
            raise
        self.tenant: str | None = hello.get("tenant")
        self.lmdb_path = hello.get("lmdb_path")
        self.state.lmdb_map_size = hello.get("lmdb_map_size")
        self.device_tier = bool(hello.get("device_tier"))
        self.arena = SharedArena(hello["arena_path"])

    async def call(self, op: str, **fields: Any) -> dict:
        if op == "release":
            self.release(fields["keys"])
            return {}
        if op in wire.LEASE_OPS:
            code, body = await self._call(OP_CODES[op], wire.keys_body(fields["keys"]), op, fields)
            if code == ERROR:
                answer_fields(code, body)
            try:
                return {"leases": wire.unpack_leases(body, fields["keys"])}
            except ValueError as e:
                raise CacheUnavailable(f"unix://{self.path}: {e}") from e
        return answer_fields(*await self._call(OP_CODES[op], wire.json_body(fields), op, fields))

    def release(self, keys: list[str]) -> None:
        """Give leases back: one-way (no answer), written at once."""
        if keys and not self.state.lost:
            try:
                self._writer.write(wire.frame(next(self._ids) & 0x7FFFFFFF, OP_CODES["release"], wire.keys_body(keys)))
            except (OSError, RuntimeError) as e:
                raise CacheUnavailable(f"unix://{self.path}: {e}") from e

    async def _call(self, code: int, body: bytes, op: str, fields: dict) -> tuple[int, bytes]:
        data = wire.frame(next(self._ids) & 0x7FFFFFFF, code, body)
        # NOTE: the exchange runs in its own task, shielded: a caller cancelled mid-request (e.g.
        # by asyncio.wait_for) must not leave its answer in the stream, where the next call would
        # read it as its own (a get of one key answered with another key's entry).
        task = asyncio.ensure_future(self._exchange(data))
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.timeout)
        except (asyncio.CancelledError, asyncio.TimeoutError) as e:
            # NOTE: the exchange goes on; whatever its late answer grants is given back (_undo).
            self._pending.add(task)
            task.add_done_callback(lambda t: self._undo(t, op, fields))
            if isinstance(e, asyncio.TimeoutError):
                raise CacheTimeout(f"unix://{self.path}: no answer to {op!r} in {self.timeout}s") from None
            raise

    async def _exchange(self, data: bytes) -> tuple[int, bytes]:
        async with self._lock:
            try:
                self._writer.write(data)
                await self._writer.drain()
                blen, msg_id, code = wire.HEAD.unpack(await self._reader.readexactly(wire.HEAD.size))
                if blen > wire.MAX_ANSWER_BYTES:
                    raise ValueError(f"an answer of {blen} bytes is over {wire.MAX_ANSWER_BYTES}")
                body = await self._reader.readexactly(blen) if blen else b""
            except asyncio.IncompleteReadError:
                self.state.lost = True
                raise CacheUnavailable(f"unix://{self.path} closed the connection") from None
            except (OSError, ValueError) as e:
                self.state.lost = True
                raise CacheUnavailable(f"unix://{self.path}: {e}") from e
        if msg_id == wire.NO_REQUEST:  # the sidecar hangs up, saying why
            self.state.lost = True
            raise CacheUnavailable(f"unix://{self.path}: {json.loads(body).get('error')}")
        return code, body

    def _undo(self, task: asyncio.Future, op: str, fields: dict) -> None:
        """Give back what a request whose caller was cancelled obtained (leases, a reservation)."""
        self._pending.discard(task)
        if task.cancelled() or task.exception() is not None:
            return
        code, body = task.result()
        if code == ERROR:
            return
        if op in wire.LEASE_OPS:
            try:
                locs = wire.unpack_leases(body, fields["keys"])
            except ValueError:
                return
            with contextlib.suppress(CacheUnavailable):
                self.release([k for k, loc in zip(fields["keys"], locs) if loc is not None])
        elif op == "reserve" and json.loads(body).get("status") == "reserved":
            t = asyncio.ensure_future(self.call("abort", key=fields["key"]))
            self._pending.add(t)
            t.add_done_callback(lambda t: (self._pending.discard(t), t.cancelled() or t.exception()))

    def writable_arena(self) -> SharedArena:
        if self._writable is None:
            self._writable = SharedArena(self.arena.path, writable=True)
        return self._writable

    async def close(self) -> None:
        if hasattr(self, "_writer"):
            self._writer.close()
            with contextlib.suppress(OSError):  # the socket closes (and the sidecar drops our leases) only once this returns
                await self._writer.wait_closed()
        for arena in (self.arena, self._writable):
            if arena is not None:
                arena.close()
        self.state.close()


async def unix_events(path: str, token: str | None, since: int | None, scope: str) -> AsyncIterator[dict]:
    try:
        reader, writer = await asyncio.open_unix_connection(path, limit=MAX_LINE_BYTES)
    except OSError as e:
        raise CacheUnavailable(f"cannot connect to unix://{path}: {e}") from e

    async def answer() -> dict:
        blen, msg_id, code = wire.HEAD.unpack(await reader.readexactly(wire.HEAD.size))
        if blen > wire.MAX_ANSWER_BYTES:
            raise CacheUnavailable(f"unix://{path}: an answer of {blen} bytes is over {wire.MAX_ANSWER_BYTES}")
        body = await reader.readexactly(blen) if blen else b""
        return answer_fields(code, body)

    try:
        writer.write(wire.frame(1, OP_CODES["hello"], wire.json_body({"token": token} if token else {})))
        await answer()
        writer.write(wire.frame(2, OP_CODES["events"], wire.json_body({"scope": scope, **({} if since is None
                                                                                      else {"since": since})})))
        first = await answer()
        yield {"kind": "subscribed", "seq": first.get("seq"), "node": first.get("node")}
        while True:
            doc = await answer()
            if doc.get("lost"):
                yield {"kind": "lost"}
            for ev in doc.get("events", ()):
                yield ev
    except (asyncio.IncompleteReadError, OSError) as e:
        raise CacheUnavailable(f"unix://{path}: the event stream ended ({e!r})") from None
    finally:
        writer.close()

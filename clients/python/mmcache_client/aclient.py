"""``AsyncCacheClient``: the asyncio twin of ``CacheClient`` (same methods, awaited)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, TypeVar

import aiohttp

from mmcache_client.arena import SharedArena
from mmcache_client.client import _claim_fields, _entries_from_arrow, _key, _key_str, _keys, _local_batch, parse_url, plan_put, raise_for_status
from mmcache_client.keys import Key
from mmcache_client.device_entries import AsyncDeviceBatch, DeviceEntry, copied, cuda_device, imported, merged, single
from mmcache_client.entry import AsyncEntry, AsyncEntryBatch
from mmcache_client.session import SessionState, open_lease
from mmcache_client.errors import BadRequest, CacheFull, CacheTimeout, CacheUnavailable, MMCacheError, CorruptEntry, EntryTooLarge
from mmcache_client.format import EntryFormatError, EntryPlan, read_entry, relayout
from mmcache_client import wire
from mmcache_client.local import MAX_LINE_BYTES, answer_fields
from mmcache_client.wire import ERROR, OP_CODES

T = TypeVar("T")


class _AsyncLocal:
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
        if op == "lease":
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
        if op == "lease":
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


class AsyncCacheClient:
    """``async with AsyncCacheClient(url) as c: ...``; see ``CacheClient`` for the semantics."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 30.0, retries: int = 3,
                 backoff_s: float = 0.05):
        self.url = url
        self.scheme, self._target = parse_url(url)
        self.retries, self.backoff_s = retries, backoff_s
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._unix_timeout = timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._token = token
        self._local: _AsyncLocal | None = None
        self._session: aiohttp.ClientSession | None = None

    async def _retry(self, fn: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(self.retries + 1):
            try:
                return await fn()
            except (CacheUnavailable, aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as e:
                if isinstance(e, CacheTimeout):
                    raise  # NOTE: a timed-out call may have happened; repeating it is not safe
                if attempt == self.retries:
                    raise CacheUnavailable(f"{self.url}: {e}") from e
                await asyncio.sleep(self.backoff_s * (2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    async def _call(self, op: str, **fields: Any) -> dict:
        async def once() -> dict:
            conn = await self._connect()
            try:
                return await conn.call(op, **fields)
            except CacheTimeout:
                raise
            except CacheUnavailable:
                await self._detach()
                raise
        return await self._retry(once)

    async def _connect(self) -> _AsyncLocal:
        """The local connection, opened (``hello``) on first use."""
        if self._local is None:
            local = _AsyncLocal(self._target, self._unix_timeout, self._token)
            await local.connect()
            self._local = local
        return self._local

    async def _request(self, method: str, path: str, body: Any = None, headers=None, ok=(200,)):
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)

        async def once():
            async with self._session.request(method, self._target + path, data=body, headers=headers) as resp:
                return resp.status, dict(resp.headers), await resp.read()
        status, hdrs, data = await self._retry(once)
        if status not in ok and status != 404:
            raise_for_status(status, data, hdrs)
        return status, hdrs, data

    async def put(self, namespace: str, hash_hex: str, tensor: Any, metadata: Mapping[str, str] | None = None, *,
                  extras: Mapping[str, Any] | None = None, encode_ms: float = 0.0, durable: bool = False,
                  persist: bool = True) -> bool:
        key = _key(namespace, hash_hex)
        plan = plan_put(key, tensor, metadata, extras, encode_ms)
        return await self._put_plan(key, plan, durable, persist)

    async def put_blob(self, namespace: str, hash_hex: str, blob, *, durable: bool = False, persist: bool = True) -> bool:
        """Store a safetensors entry as is (e.g. a file from ``mmcache get``); missing metadata is
        filled in, contradicting metadata raises ``BadRequest``."""
        key = _key(namespace, hash_hex)
        try:
            plan = relayout(blob, key.namespace, key.hash)
        except EntryFormatError as e:
            raise BadRequest(f"{key}: {e}") from e
        return await self._put_plan(key, plan, durable, persist)

    async def _put_plan(self, key: Key, plan: EntryPlan, durable: bool, persist: bool = True) -> bool:
        if durable and not persist:
            raise ValueError("durable=True needs persist=True: a host-only entry never reaches disk")
        if self.scheme != "unix":
            q = "?durable=1" if durable else ("?persist=0" if not persist else "")
            status, _, _ = await self._request("PUT", f"/v1/entries/{key}{q}", plan.to_bytes(),
                                               {"Content-Type": "application/vnd.safetensors"}, ok=(200, 201))
            return status == 201
        ans = await self._call("reserve", key=str(key), nbytes=plan.total_bytes,
                                 encode_ms=float(plan.metadata.get("encode_ms", 0.0)), persist=persist)
        if ans["status"] == "exists":
            return False
        if ans["status"] == "too_large":
            raise EntryTooLarge(f"{key}: {plan.total_bytes} bytes exceed the sidecar's arena of {ans.get('capacity_bytes')} bytes")
        if ans["status"] == "no_space":
            raise CacheFull(f"{key}: no room for {plan.total_bytes} bytes now (everything else is leased or being written)",
                            float(ans.get("retry_after_s", 1.0)))
        try:
            plan.write_into(self._local.writable_arena().view(ans["offset"], plan.total_bytes))
        except BaseException:
            await self._call("abort", key=str(key))
            raise
        return (await self._call("seal", key=str(key), durable=durable))["created"]

    async def get(self, namespace: str, hash_hex: str, *, device: Any = None) -> AsyncEntry | DeviceEntry | None:
        """See ``CacheClient.get`` (``device`` too)."""
        key = _key_str(namespace, hash_hex)
        dev = cuda_device(device)
        if dev is not None:
            return single(await self._get_many_on([key], dev))
        if self.scheme == "unix":
            loc = (await self._call("lease", keys=[key]))["leases"][0]
            if loc is None:
                return None
            return await self._entry(self._local, key, loc)
        status, headers, data = await self._request("GET", f"/v1/entries/{key}")
        if status == 404:
            return None
        try:
            view = read_entry(data, verify=True)
        except EntryFormatError as e:  # damaged on the way: never handed out
            raise CorruptEntry(f"{key}: {e}") from e
        return AsyncEntry(key, headers.get("X-MMCache-Tier", "remote"), view)

    async def get_many(self, keys, *, device: Any = None) -> AsyncEntryBatch | AsyncDeviceBatch:
        """See ``CacheClient.get_many``: ``async with await client.get_many(keys) as entries``."""
        keys = _keys(keys)
        dev = cuda_device(device)
        if dev is not None:
            return await self._get_many_on(keys, dev)
        if not keys:
            return AsyncEntryBatch([])
        if self.scheme == "unix":
            locs = (await self._call("lease", keys=keys))["leases"]
            return _local_batch(self._local, keys, locs, AsyncEntryBatch, AsyncEntry, _async_release)
        _, _, data = await self._request("POST", "/v1/batch_get", json.dumps({"keys": keys}),
                                         {"Content-Type": "application/json"})
        return AsyncEntryBatch(_entries_from_arrow(keys, data, AsyncEntry))

    async def _get_many_on(self, keys: list[str], dev: Any) -> AsyncDeviceBatch:
        """See ``CacheClient.get_many``; the CUDA work (imports, copies, pinning) runs in a
        thread, never on the event loop."""
        on_device: list = [None] * len(keys)
        release = None
        conn = await self._retry(self._connect) if self.scheme == "unix" else None
        if conn is not None and conn.device_tier:
            try:
                docs = (await conn.call("lease_device", keys=keys))["entries"]
            except CacheUnavailable:
                await self._detach()
                raise
            leased = [k for k, d in zip(keys, docs) if d is not None]
            release = _async_device_release(conn, leased)  # NOTE: bound to this connection, whose leases they are
            try:
                on_device, give_back = await asyncio.to_thread(imported, keys, docs, dev)
                if give_back:
                    await conn.call("release_device", keys=give_back)
                    for k in give_back:
                        leased.remove(k)
            except BaseException:
                await release()
                raise
        try:
            rest = [k for k, d in zip(keys, on_device) if d is None]
            from_host: dict = {}
            if rest:
                if conn is not None:
                    await asyncio.to_thread(conn.arena.pin)
                async with await self.get_many(rest) as batch:
                    copies = await asyncio.to_thread(copied, list(batch), dev)
                    from_host = {k: e for k, e in zip(rest, copies) if e is not None}
        except BaseException:
            if release is not None:
                await release()
            raise
        return AsyncDeviceBatch(merged(keys, on_device, from_host), release)

    async def _detach(self) -> None:
        """Stop using the current connection; close it only once no open entry relies on it."""
        conn, self._local = self._local, None
        if conn is not None and conn.state.detach():
            await conn.close()

    async def _entry(self, conn: _AsyncLocal, key: str, loc: list) -> AsyncEntry:
        try:
            view, end_local = open_lease(conn.state, conn.arena, conn.lmdb_path, key, loc)
        except BaseException:
            with contextlib.suppress(MMCacheError):
                await conn.call("release", keys=[wire.release_name(key, loc)])
            raise
        conn.state.ref()
        return AsyncEntry(key, loc[2], view, lambda: self._release(conn, wire.release_name(key, loc), end_local),
                          conn.state if end_local is None else None)

    async def _release(self, conn: _AsyncLocal, key: str, end_local) -> None:
        if end_local is not None:
            end_local()
        try:
            if not conn.state.lost:
                with contextlib.suppress(CacheUnavailable):
                    await conn.call("release", keys=[key])
        finally:
            if conn.state.unref():
                await conn.close()

    async def exists(self, namespace: str, hash_hex: str) -> bool:
        key = _key_str(namespace, hash_hex)
        if self.scheme == "unix":
            return (await self._call("lookup", keys=[key]))["tiers"][key] is not None
        return (await self._request("HEAD", f"/v1/entries/{key}"))[0] == 200

    async def lookup(self, keys, *, detail: bool = False) -> dict:
        """See ``CacheClient.lookup``."""
        keys = _keys(keys)
        if detail:
            if self.scheme == "unix":
                return (await self._call("lookup", keys=keys, detail=True))["items"]
            _, _, data = await self._request("POST", "/v1/lookup", json.dumps({"keys": keys, "detail": True}),
                                             {"Content-Type": "application/json"})
            return json.loads(data)["items"]
        if self.scheme == "unix":
            return (await self._call("lookup", keys=keys))["tiers"]
        _, _, data = await self._request("POST", "/v1/lookup", json.dumps({"keys": keys}),
                                         {"Content-Type": "application/json"})
        return json.loads(data)["tiers"]

    async def claim(self, keys, owner: str, ttl_ms: int | None = None) -> dict:
        """See ``CacheClient.claim``."""
        fields = _claim_fields(keys, owner, ttl_ms)
        if self.scheme == "unix":
            return (await self._call("claim", **fields))["claims"]
        _, _, data = await self._request("POST", "/v1/claims", json.dumps(fields), {"Content-Type": "application/json"})
        return json.loads(data)["claims"]

    async def release_claims(self, keys, owner: str) -> int:
        """See ``CacheClient.release_claims``."""
        fields = _claim_fields(keys, owner, None)
        if self.scheme == "unix":
            return (await self._call("unclaim", **fields))["released"]
        _, _, data = await self._request("POST", "/v1/claims/release", json.dumps(fields),
                                         {"Content-Type": "application/json"})
        return json.loads(data)["released"]

    async def events(self, since: int | None = None, *, scope: str = "all") -> AsyncIterator[dict]:
        """The sidecar's inventory events (``stored`` / ``evicted`` / ``deleted``: key, tier,
        node, bytes, seq), from ``since`` (default: from now), until the iterator is closed. The
        first is ``{"kind": "subscribed", "seq", "node"}`` (the stream is up); a ``{"kind":
        "lost"}`` says some were missed (the follower fell behind). Over its own
        connection (a Unix socket's event stream, or ``GET /v1/events``); raises
        ``CacheUnavailable`` when that connection ends. ``scope="local"``: the sidecar's own
        events only, not those it relays from other nodes through the remote."""
        if self.scheme == "unix":
            async for ev in _unix_events(self._target, self._token, since, scope):
                yield ev
            return
        query = f"?scope={scope}" + (f"&since={since}" if since is not None else "")
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._timeout.total)
        try:
            async with aiohttp.ClientSession(headers=self._headers, timeout=timeout) as session:
                async with session.get(self._target + "/v1/events" + query) as resp:
                    if resp.status != 200:
                        raise_for_status(resp.status, await resp.read(), dict(resp.headers))
                    kind, data = None, []
                    async for raw in resp.content:
                        line = raw.decode().rstrip("\r\n")
                        if line.startswith("event:"):
                            kind = line[6:].strip()
                        elif line.startswith("data:"):
                            data.append(line[5:].strip())
                        elif not line:
                            if kind == "lost":
                                yield {"kind": "lost"}
                            elif data:
                                yield json.loads("\n".join(data))
                            kind, data = None, []
        except aiohttp.ClientError as e:
            raise CacheUnavailable(f"{self.url}/v1/events: {e}") from e
        raise CacheUnavailable(f"{self.url}/v1/events: the stream ended")

    async def delete(self, namespace: str, hash_hex: str) -> bool:
        key = _key_str(namespace, hash_hex)
        if self.scheme == "unix":
            return (await self._call("delete", key=key))["deleted"]
        return (await self._request("DELETE", f"/v1/entries/{key}", ok=(204,)))[0] == 204

    async def stats(self) -> dict:
        if self.scheme == "unix":
            return (await self._call("stats"))["stats"]
        return json.loads((await self._request("GET", "/v1/stats"))[2])

    async def close(self) -> None:
        """Close the client. A connection that open entries still rely on closes with the last."""
        await self._detach()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> "AsyncCacheClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


async def _unix_events(path: str, token: str | None, since: int | None, scope: str) -> AsyncIterator[dict]:
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


def _async_release(conn: _AsyncLocal, keys: list[str], ends: list):
    async def release() -> None:
        try:
            for end in ends:
                if end is not None:
                    end()
            if keys and not conn.state.lost:
                with contextlib.suppress(CacheUnavailable):
                    await conn.call("release", keys=keys)
        finally:
            closing = False
            for _ in keys:
                closing = conn.state.unref() or closing
            if closing:
                await conn.close()
    return release


def _async_device_release(conn: _AsyncLocal, leased: list[str]) -> Callable[[], Awaitable[None]]:
    """What gives a batch's device leases back, on the connection that took them: it holds a
    reference on it until then (a detached connection stays open for them)."""
    conn.state.ref()

    async def release() -> None:
        try:
            if leased and not conn.state.lost:  # a lost connection's leases went with it
                with contextlib.suppress(CacheUnavailable):
                    await conn.call("release_device", keys=leased)
        finally:
            if conn.state.unref():
                await conn.close()
    return release

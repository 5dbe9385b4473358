"""``AsyncCacheClient``: the asyncio twin of ``CacheClient`` (same methods, awaited). Both run the
sans-IO calls of ``mmcache_client.core``; only the round trips differ."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, TypeVar

import aiohttp

from mmcache_client import core
from mmcache_client.core import key_of as _key, key_str as _key_str, key_strs as _keys, parse_url, plan_put, raise_for_status
from mmcache_client.keys import Key
from mmcache_client.device_entries import AsyncDeviceBatch, DeviceEntry, copied, cuda_device, imported, merged, single
from mmcache_client.entry import AsyncEntry, AsyncEntryBatch
from mmcache_client.session import LeaseVanished, open_lease
from mmcache_client.errors import BadRequest, CacheTimeout, CacheUnavailable, MMCacheError
from mmcache_client.format import EntryFormatError, EntryPlan, relayout
from mmcache_client import wire
from mmcache_client.alocal import AsyncLocalConnection, unix_events
from mmcache_client.retry import RetryPolicy

T = TypeVar("T")


_TRANSIENT = (CacheUnavailable, aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError)
"""What the async transports raise when the sidecar cannot be reached or a connection broke."""


class AsyncCacheClient:
    """``async with AsyncCacheClient(url) as c: ...``; see ``CacheClient`` for the semantics."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 30.0, retries: int = 3,
                 backoff_s: float = 0.05):
        self.url = url
        self.scheme, self._target = parse_url(url)
        self.retries, self.backoff_s = retries, backoff_s
        self.retry = RetryPolicy(retries, backoff_s)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._unix_timeout = timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._token = token
        self._local: AsyncLocalConnection | None = None
        self._connecting: asyncio.Lock | None = None
        self._session: aiohttp.ClientSession | None = None

    async def _retry(self, fn: Callable[[], Awaitable[T]]) -> T:
        """``await fn()`` under the client's retry policy (``mmcache_client.retry``)."""
        for attempt in self.retry.attempts():
            try:
                return await fn()
            except BaseException as e:
                if not self.retry.retryable(e, _TRANSIENT):
                    raise
                if attempt == self.retries:
                    raise self.retry.gave_up(self.url, e) from e
                await asyncio.sleep(self.retry.delay_s(attempt))
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

    async def _run(self, call: core.Call) -> Any:
        """One API call (``mmcache_client.core``) over this client's transport."""
        if self.scheme == "unix":
            return call.local_result(await self._call(call.op, **call.fields))
        return call.http_result(*await self._request(call.method, call.path, call.body, call.headers, call.ok))

    async def _connect(self) -> AsyncLocalConnection:
        """The local connection, opened (``hello``) on first use: once, however many tasks ask at
        once (a second connection would strand the first's reservations: ``seal`` must go on the
        connection that reserved)."""
        if self._local is None:
            if self._connecting is None:
                self._connecting = asyncio.Lock()
            async with self._connecting:
                if self._local is None:
                    local = AsyncLocalConnection(self._target, self._unix_timeout, self._token)
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
        core.check_put(durable, persist)
        if self.scheme != "unix":
            path, body, headers = core.http_put(key, plan, durable, persist)
            return (await self._request("PUT", path, body, headers, ok=(200, 201)))[0] == 201
        answer = await self._call("reserve", **core.reserve_fields(key, plan, persist))
        offset = core.reserved_offset(key, plan, answer)
        if offset is None:
            return False
        try:
            plan.write_into(self._local.writable_arena().view(offset, plan.total_bytes))
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
        path, headers = core.entry_route(key)
        return core.http_entry(key, *await self._request("GET", path, headers=headers), AsyncEntry)

    async def get_many(self, keys, *, device: Any = None, promote: bool = True) -> AsyncEntryBatch | AsyncDeviceBatch:
        """See ``CacheClient.get_many`` (``promote`` too): ``async with await client.get_many(keys) as entries``."""
        keys = _keys(keys)
        dev = cuda_device(device)
        if dev is not None:
            return await self._get_many_on(keys, dev)
        if not keys:
            return AsyncEntryBatch([])
        if self.scheme == "unix":
            locs = (await self._call("lease" if promote else "scan", keys=keys))["leases"]
            return core.local_batch(self._local, keys, locs, AsyncEntryBatch, AsyncEntry, _async_release)
        _, _, data = await self._request("POST", "/v1/batch_get", *core.batch_get(keys, promote))
        return AsyncEntryBatch(core.entries_from_arrow(keys, data, AsyncEntry))

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

    async def _entry(self, conn: AsyncLocalConnection, key: str, loc: list) -> AsyncEntry | None:
        try:
            view, end_local = open_lease(conn.state, conn.arena, conn.lmdb_path, key, loc)
        except BaseException as e:
            with contextlib.suppress(MMCacheError):
                await conn.call("release", keys=[wire.release_name(key, loc)])
            if isinstance(e, LeaseVanished):
                return None  # NOTE: deleted from disk before it could be read: a miss
            raise
        conn.state.ref()
        return AsyncEntry(key, loc[2], view, lambda: self._release(conn, wire.release_name(key, loc), end_local),
                          conn.state if end_local is None else None)

    async def _release(self, conn: AsyncLocalConnection, key: str, end_local) -> None:
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
        return await self._run(core.exists(_key_str(namespace, hash_hex)))

    async def lookup(self, keys, *, detail: bool = False) -> dict:
        """See ``CacheClient.lookup``."""
        return await self._run(core.lookup(_keys(keys), detail))

    async def claim(self, keys, owner: str, ttl_ms: int | None = None) -> dict:
        """See ``CacheClient.claim``."""
        return await self._run(core.claim(keys, owner, ttl_ms))

    async def release_claims(self, keys, owner: str) -> int:
        """See ``CacheClient.release_claims``."""
        return await self._run(core.release_claims(keys, owner))

    async def events(self, since: int | None = None, *, scope: str = "all") -> AsyncIterator[dict]:
        """The sidecar's inventory events (``stored`` / ``evicted`` / ``deleted``: key, tier,
        node, bytes, seq), from ``since`` (default: from now), until the iterator is closed. The
        first is ``{"kind": "subscribed", "seq", "node"}`` (the stream is up); a ``{"kind":
        "lost"}`` says some were missed (the follower fell behind). Over its own
        connection (a Unix socket's event stream, or ``GET /v1/events``); raises
        ``CacheUnavailable`` when that connection ends. ``scope="local"``: the sidecar's own
        events only, not those it relays from other nodes through the remote."""
        if self.scheme == "unix":
            async for ev in unix_events(self._target, self._token, since, scope):
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
        return await self._run(core.delete(_key_str(namespace, hash_hex)))

    async def list_entries(self, namespace: str | None = None, *, after: str | None = None,
                           limit: int = 1000) -> dict:
        """See ``CacheClient.list_entries``."""
        return await self._run(core.list_entries(namespace, after, limit))

    async def iter_entries(self, namespace: str | None = None, *, page: int = 1000) -> AsyncIterator[dict]:
        """See ``CacheClient.iter_entries``."""
        after = None
        while True:
            answer = await self.list_entries(namespace, after=after, limit=page)
            for entry in answer["entries"]:
                yield entry
            after = answer["next"]
            if after is None:
                return

    async def stats(self) -> dict:
        return await self._run(core.stats())

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


def _async_release(conn: AsyncLocalConnection, keys: list[str], ends: list):
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


def _async_device_release(conn: AsyncLocalConnection, leased: list[str]) -> Callable[[], Awaitable[None]]:
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

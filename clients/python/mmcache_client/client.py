"""``CacheClient``: the blocking SDK, over ``unix://PATH`` (zero-copy) or ``http(s)://HOST:PORT``.

On the local path a put writes the entry straight into the sidecar's arena (reserve → fill in
place → seal) and a get views it in place under a lease; over HTTP entries travel as bytes.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import time
import urllib.parse
from typing import Any, Callable, Iterator, Mapping, TypeVar

from mmcache_client.device_entries import DeviceBatch, DeviceEntry, copied, cuda_device, imported, merged, single
from mmcache_client.entry import Entry, EntryBatch
from mmcache_client.errors import BadRequest, CacheTimeout, CacheUnavailable, MMCacheError
from mmcache_client.format import EntryFormatError, EntryPlan, relayout
from mmcache_client import core, wire
from mmcache_client.keys import Key
from mmcache_client.local import LocalConnection
from mmcache_client.retry import RetryPolicy
from mmcache_client.session import LeaseVanished, open_lease

T = TypeVar("T")
_key, _key_str, _keys = core.key_of, core.key_str, core.key_strs
parse_url, raise_for_status, plan_put = core.parse_url, core.raise_for_status, core.plan_put


_TRANSIENT = (ConnectionError, socket.timeout, http.client.HTTPException, CacheUnavailable, OSError)
"""What the blocking transports raise when the sidecar cannot be reached or a connection broke."""


def with_retries(fn: Callable[[], T], policy: RetryPolicy, what: str) -> T:
    """``fn()`` under ``policy`` (``mmcache_client.retry``), sleeping between attempts."""
    for attempt in policy.attempts():
        try:
            return fn()
        except BaseException as e:
            if not policy.retryable(e, _TRANSIENT):
                raise
            if attempt == policy.retries:
                raise policy.gave_up(what, e) from e
            time.sleep(policy.delay_s(attempt))
    raise AssertionError("unreachable")


def _read_body(resp: http.client.HTTPResponse) -> bytes | bytearray:
    """The body, read straight into one buffer of its announced length (no chunk list joined)."""
    length = resp.length
    if not length:
        return resp.read()
    buf = bytearray(length)
    view, got = memoryview(buf), 0
    while got < length:
        n = resp.readinto(view[got:])
        if not n:
            raise http.client.IncompleteRead(bytes(view[:got]), length - got)
        got += n
    return buf


class _Http:
    """Keep-alive HTTP/1.1 over http.client; reconnects on a broken connection."""

    def __init__(self, url: str, token: str | None, timeout: float):
        parsed = urllib.parse.urlparse(url)
        self._cls = http.client.HTTPSConnection if parsed.scheme == "https" else http.client.HTTPConnection
        self._host, self._port, self._timeout = parsed.hostname, parsed.port, timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: Any = None, headers: Mapping[str, str] | None = None):
        if self._conn is None:
            self._conn = self._cls(self._host, self._port, timeout=self._timeout)
        try:
            self._conn.request(method, path, body=body, headers={**self._headers, **(headers or {})})
            resp = self._conn.getresponse()
            return resp.status, dict(resp.getheaders()), _read_body(resp)
        except BaseException:
            self._conn.close()
            self._conn = None
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class CacheClient:
    """Blocking client. ``CacheClient("unix:///run/mmcache.sock")`` or ``("http://127.0.0.1:8470")``.

    ``get`` returns None on a miss, else an ``Entry`` to use in a ``with`` block.
    """

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 30.0, retries: int = 3,
                 backoff_s: float = 0.05):
        self.url = url
        self.scheme, target = parse_url(url)
        self.retries, self.backoff_s = retries, backoff_s
        self.retry = RetryPolicy(retries, backoff_s)
        """The SDK's one retry policy (``mmcache_client.retry``), shared with the async client."""
        self._local: LocalConnection | None = None
        self._http: _Http | None = None
        self._token = token
        if self.scheme == "unix":
            self._path, self._timeout = target, timeout
        else:
            self._http = _Http(target, token, timeout)

    # ------------------------------------------------------------ transports
    def _call(self, op: str, **fields: Any) -> dict:
        def once() -> dict:
            conn = self._connect()
            try:
                return conn.call(op, **fields)
            except CacheTimeout:
                raise
            except CacheUnavailable:
                self._detach()
                raise
        return with_retries(once, self.retry, self.url)

    def _connect(self) -> LocalConnection:
        """The local connection, opened (``hello``) on first use."""
        if self._local is None:
            self._local = LocalConnection(self._path, timeout=self._timeout, token=self._token)
        return self._local

    def _detach(self) -> None:
        """Stop using the current connection; close it only once no open entry relies on it."""
        conn, self._local = self._local, None
        if conn is not None and conn.state.detach():
            conn.close()

    def _run(self, call: core.Call) -> Any:
        """One API call (``mmcache_client.core``) over this client's transport."""
        if self.scheme == "unix":
            return call.local_result(self._call(call.op, **call.fields))
        return call.http_result(*self._request(call.method, call.path, call.body, call.headers, call.ok))

    def _request(self, method: str, path: str, body: Any = None, headers=None, ok=(200,)) -> tuple[int, dict, bytes]:
        status, hdrs, data = with_retries(lambda: self._http.request(method, path, body, headers), self.retry,
                                          self.url)
        if status not in ok and status != 404:
            raise_for_status(status, data, hdrs)
        return status, hdrs, data

    # ------------------------------------------------------------ API
    def put(self, namespace: str, hash_hex: str, tensor: Any, metadata: Mapping[str, str] | None = None, *,
            extras: Mapping[str, Any] | None = None, encode_ms: float = 0.0, durable: bool = False,
            persist: bool = True) -> bool:
        """Store ``tensor`` ([num_tokens, hidden], torch or numpy) as ``namespace/hash``.

        Returns True if created, False if the key existed (the first put is kept).
        """
        key = _key(namespace, hash_hex)
        plan = plan_put(key, tensor, metadata, extras, encode_ms)
        return self._put_plan(key, plan, durable, persist)

    def put_blob(self, namespace: str, hash_hex: str, blob, *, durable: bool = False, persist: bool = True) -> bool:
        """Store a safetensors entry as is (e.g. a file from ``mmcache get``); missing metadata is
        filled in, contradicting metadata raises ``BadRequest``."""
        key = _key(namespace, hash_hex)
        try:
            plan = relayout(blob, key.namespace, key.hash)
        except EntryFormatError as e:
            raise BadRequest(f"{key}: {e}") from e
        return self._put_plan(key, plan, durable, persist)

    def _put_plan(self, key: Key, plan: EntryPlan, durable: bool, persist: bool = True) -> bool:
        core.check_put(durable, persist)
        if self.scheme != "unix":
            path, body, headers = core.http_put(key, plan, durable, persist)
            return self._request("PUT", path, body, headers, ok=(200, 201))[0] == 201
        offset = core.reserved_offset(key, plan, self._call("reserve", **core.reserve_fields(key, plan, persist)))
        if offset is None:
            return False
        try:
            plan.write_into(self._local.writable_arena().view(offset, plan.total_bytes))
        except BaseException:
            self._call("abort", key=str(key))
            raise
        return self._call("seal", key=str(key), durable=durable)["created"]

    def get(self, namespace: str, hash_hex: str, *, device: Any = None) -> Entry | DeviceEntry | None:
        """The entry, or None on a miss. ``device="cuda[:N]"``: a ``DeviceEntry`` whose tensors
        are on that GPU (the sidecar's device tier through CUDA IPC where it has one, else a copy
        from the pinned arena; ``mmcache_client.device_entries``)."""
        key = _key_str(namespace, hash_hex)
        dev = cuda_device(device)
        if dev is not None:
            return single(self._get_many_on([key], dev))
        if self.scheme == "unix":
            loc = self._call("lease", keys=[key])["leases"][0]
            if loc is None:
                return None
            return self._entry(self._local, key, loc)
        path, headers = core.entry_route(key)
        return core.http_entry(key, *self._request("GET", path, headers=headers))

    def get_many(self, keys, *, device: Any = None, promote: bool = True) -> EntryBatch | DeviceBatch:
        """Every key's entry (``"ns/hash"`` strings or ``Key``s), in key order, None for a miss:
        ``with client.get_many(keys) as entries: ...``. Over ``unix://`` all are leased in one
        round trip and released in one when the batch closes; over HTTP one ``POST
        /v1/batch_get`` brings them (owned, verified bytes). A key may repeat. ``device``: as
        for ``get``, a ``DeviceBatch`` of ``DeviceEntry``. ``promote=False`` (a scan over many
        entries: an export) reads disk entries in place rather than promote them into host, so
        the scan leaves the hot set be (both transports)."""
        keys = _keys(keys)
        dev = cuda_device(device)
        if dev is not None:
            return self._get_many_on(keys, dev)
        if not keys:
            return EntryBatch([])
        if self.scheme == "unix":
            locs = self._call("lease" if promote else "scan", keys=keys)["leases"]
            return core.local_batch(self._local, keys, locs, EntryBatch, Entry, _sync_release)
        _, _, data = self._request("POST", "/v1/batch_get", *core.batch_get(keys, promote))
        return EntryBatch(core.entries_from_arrow(keys, data, Entry))

    def get_tensors(self, keys, *, device: Any = None) -> list:
        """Each key's ``embeddings`` as a tensor (None for a miss), in key order, for holders that
        drop references rather than close entries (vLLM's encoder cache). Over ``unix://`` all
        are leased in one round trip and each tensor views the arena in place and owns its lease,
        given back when the last tensor sharing its memory is garbage
        (``mmcache_client.leased_tensors``); over HTTP, or from disk in place, they are copies.
        ``device``: copies on that GPU, as ``get_many(device=...)`` makes them."""
        from mmcache_client import leased_tensors

        keys = _keys(keys)
        if not keys:
            return []
        if cuda_device(device) is not None:
            with self.get_many(keys, device=device) as batch:
                return leased_tensors.device_tensors(batch)
        if self.scheme == "unix":
            locs = self._call("lease", keys=keys)["leases"]
            return leased_tensors.local_tensors(self._local, keys, locs)
        with self.get_many(keys) as batch:
            return [None if e is None else e.tensor for e in batch]

    def _get_many_on(self, keys: list[str], dev: Any) -> DeviceBatch:
        """``get_many(keys, device=dev)``: see ``mmcache_client.device_entries``."""
        on_device: list = [None] * len(keys)
        release = None
        conn = with_retries(self._connect, self.retry, self.url) if self.scheme == "unix" else None
        if conn is not None and conn.device_tier:
            try:
                docs = conn.call("lease_device", keys=keys)["entries"]
            except CacheUnavailable:
                self._detach()
                raise
            leased = [k for k, d in zip(keys, docs) if d is not None]
            release = _device_release(conn, leased)  # NOTE: bound to this connection, whose leases they are
            try:
                on_device, give_back = imported(keys, docs, dev)
                if give_back:
                    conn.call("release_device", keys=give_back)
                    for k in give_back:
                        leased.remove(k)
            except BaseException:
                release()
                raise
        try:
            rest = [k for k, d in zip(keys, on_device) if d is None]
            from_host: dict = {}
            if rest:
                if conn is not None:
                    conn.arena.pin()
                with self.get_many(rest) as batch:
                    from_host = {k: e for k, e in zip(rest, copied(list(batch), dev)) if e is not None}
        except BaseException:
            if release is not None:
                release()
            raise
        return DeviceBatch(merged(keys, on_device, from_host), release)

    def _entry(self, conn: LocalConnection, key: str, loc: list) -> Entry | None:
        """An ``Entry`` over a lease answer; it holds a reference on ``conn`` until closed. None:
        the entry was deleted from disk before it could be read (a miss)."""
        try:
            view, end_local = open_lease(conn.state, conn.arena, conn.lmdb_path, key, loc)
        except BaseException as e:
            with contextlib.suppress(MMCacheError):
                conn.call("release", keys=[wire.release_name(key, loc)])
            if isinstance(e, LeaseVanished):
                return None
            raise
        conn.state.ref()
        return Entry(key, loc[2], view, lambda: self._release(conn, wire.release_name(key, loc), end_local),
                     conn.state if end_local is None else None)

    def _release(self, conn: LocalConnection, key: str, end_local) -> None:
        if end_local is not None:
            end_local()
        try:
            if not conn.state.lost:  # a lost connection's leases went with it
                with contextlib.suppress(CacheUnavailable):
                    conn.call("release", keys=[key])
        finally:
            if conn.state.unref():
                conn.close()

    def exists(self, namespace: str, hash_hex: str) -> bool:
        return self._run(core.exists(_key_str(namespace, hash_hex)))

    def lookup(self, keys, *, detail: bool = False) -> dict:
        """Key → tier holding it (``host``/``disk``) or None. ``detail``: key → ``{"tier",
        "num_tokens"[, "image_grid_thw"]}`` or None, so a hit needs no lease to be laid out."""
        return self._run(core.lookup(_keys(keys), detail))

    def claim(self, keys, owner: str, ttl_ms: int | None = None) -> dict:
        """Claim ``keys`` before encoding them, so each is encoded once across every encoder
        sharing the cache: key → ``{"state": "exists"}`` (some tier holds it), ``{"state":
        "won", "ttl_ms"}`` (encode it and put it; the put ends the claim; claiming again renews
        it) or ``{"state": "wait", "ttl_ms"}`` (``owner`` is another's for that long: wait for
        its entry, then claim again). ``ttl_ms`` defaults to the sidecar's 30 s."""
        return self._run(core.claim(keys, owner, ttl_ms))

    def release_claims(self, keys, owner: str) -> int:
        """Give back ``owner``'s claims on ``keys`` (an encode that failed); how many it held."""
        return self._run(core.release_claims(keys, owner))

    def delete(self, namespace: str, hash_hex: str) -> bool:
        return self._run(core.delete(_key_str(namespace, hash_hex)))

    def list_entries(self, namespace: str | None = None, *, after: str | None = None, limit: int = 1000) -> dict:
        """One page of the entries this client may see (local tiers, key order): ``{"entries":
        [{"key", "tier", "nbytes"}, ...], "next": KEY | None}``; pass ``next`` as ``after`` for
        the page after, None means the last. ``namespace`` None: every namespace."""
        return self._run(core.list_entries(namespace, after, limit))

    def iter_entries(self, namespace: str | None = None, *, page: int = 1000) -> Iterator[dict]:
        """Every entry of ``namespace`` (or all), page by page: ``{"key", "tier", "nbytes"}``.
        Entries stored while it runs may or may not be seen (each page is a fresh look)."""
        after = None
        while True:
            answer = self.list_entries(namespace, after=after, limit=page)
            yield from answer["entries"]
            after = answer["next"]
            if after is None:
                return

    def stats(self) -> dict:
        return self._run(core.stats())

    def close(self) -> None:
        """Close the client. A connection that open entries still rely on closes with the last."""
        self._detach()
        if self._http is not None:
            self._http.close()

    def __enter__(self) -> "CacheClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _device_release(conn: LocalConnection, leased: list[str]) -> Callable[[], None]:
    """What gives a batch's device leases back, on the connection that took them: it holds a
    reference on it until then (a detached connection stays open for them)."""
    conn.state.ref()

    def release() -> None:
        try:
            if leased and not conn.state.lost:  # a lost connection's leases went with it
                with contextlib.suppress(CacheUnavailable):
                    conn.call("release_device", keys=leased)
        finally:
            if conn.state.unref():
                conn.close()
    return release


def _sync_release(conn: LocalConnection, keys: list[str], ends: list) -> Callable[[], None]:
    def release() -> None:
        try:
            for end in ends:
                if end is not None:
                    end()
            if keys and not conn.state.lost:  # a lost connection's leases went with it
                with contextlib.suppress(CacheUnavailable):
                    conn.call("release", keys=keys)
        finally:
            closing = False
            for _ in keys:
                closing = conn.state.unref() or closing
            if closing:
                conn.close()
    return release

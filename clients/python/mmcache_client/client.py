"""``CacheClient``: the blocking SDK, over ``unix://PATH`` (zero-copy) or ``http(s)://HOST:PORT``.

On the local path a put writes the entry straight into the sidecar's arena (reserve → fill in
place → seal) and a get views it in place under a lease; over HTTP entries travel as bytes.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import socket
import time
import urllib.parse
from typing import Any, Callable, Mapping, TypeVar

from mmcache_client.device_entries import DeviceBatch, DeviceEntry, copied, cuda_device, imported, merged, single
from mmcache_client.entry import Entry, EntryBatch
from mmcache_client.errors import (AuthError, BadRequest, Forbidden, CacheFull, CacheTimeout, CacheUnavailable, CorruptEntry, EntryTooLarge,
                                   MMCacheError, ServerError)
from mmcache_client.format import EntryFormatError, EntryPlan, plan_entry, read_entry, relayout
from mmcache_client import wire
from mmcache_client.keys import Key
from mmcache_client.local import LocalConnection
from mmcache_client.session import ArenaEntryView, open_lease

T = TypeVar("T")


def _key(namespace: str, hash_hex: str) -> Key:
    """``Key(namespace, hash_hex)``; a ``tenant@namespace`` (the default tenant acting for a
    tenant, as an encoder does for the router's) names that tenant's key."""
    tenant, at, plain = namespace.partition("@") if isinstance(namespace, str) else ("", "", namespace)
    return Key(plain, hash_hex, tenant) if at else Key(namespace, hash_hex)


_VALID: dict = {}
"""Key strings (and ``(namespace, hash)`` pairs) already validated → the key string: a hot key
is checked once, not on every get. Bounded: cleared when full."""
_VALID_MAX = 16384


def _key_str(namespace: str, hash_hex: str) -> str:
    """``str(_key(namespace, hash_hex))``, validated once per pair."""
    pair = (namespace, hash_hex)
    try:
        return _VALID[pair]
    except (KeyError, TypeError):
        text = str(_key(namespace, hash_hex))
    if len(_VALID) >= _VALID_MAX:
        _VALID.clear()
    _VALID[pair] = text
    return text


def _keys(keys) -> list[str]:
    out = []
    for k in keys:
        if isinstance(k, Key):
            out.append(k.to_string())
            continue
        text = _VALID.get(k) if isinstance(k, str) else None
        if text is None:
            text = Key.from_string(k).to_string()
            if len(_VALID) >= _VALID_MAX:
                _VALID.clear()
            _VALID[k] = text
        out.append(text)
    return out


def parse_url(url: str) -> tuple[str, str]:
    """``unix:///run/x.sock`` → (unix, path); ``http://h:p`` → (http, url). ValueError otherwise."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "unix" and parsed.path:
        return "unix", parsed.path
    if parsed.scheme in ("http", "https") and parsed.hostname:
        return parsed.scheme, url.rstrip("/")
    raise ValueError(f"url={url!r} must be unix:///path/to.sock or http(s)://host:port")


def raise_for_status(status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
    """Map an HTTP error status to the SDK's named exceptions (503: ``CacheFull``)."""
    try:
        retry_after_s = float((headers or {}).get("Retry-After", 1))
    except ValueError:
        retry_after_s = 1.0
    try:
        message = json.loads(body).get("error", "")
    except (ValueError, AttributeError):
        message = body[:200].decode(errors="replace")
    if status == 401:
        raise AuthError(message or "unauthorized")
    if status == 403:
        raise Forbidden(message or "forbidden")
    if status == 413:
        raise EntryTooLarge(message)
    if status == 503:
        raise CacheFull(message or "the sidecar has no room now", retry_after_s)
    if 400 <= status < 500:
        raise BadRequest(f"HTTP {status}: {message}")
    raise ServerError(f"HTTP {status}: {message}")


def with_retries(fn: Callable[[], T], retries: int, backoff_s: float, what: str) -> T:
    """Retry connection failures with exponential backoff and jitter, then CacheUnavailable."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except (ConnectionError, socket.timeout, http.client.HTTPException, CacheUnavailable, OSError) as e:
            if isinstance(e, CacheTimeout) or (isinstance(e, MMCacheError) and not isinstance(e, CacheUnavailable)):
                raise  # NOTE: a timed-out call may have happened; repeating it is not safe
            if attempt == retries:
                raise CacheUnavailable(f"{what}: {e}") from e
            time.sleep(backoff_s * (2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def plan_put(key: Key, tensor: Any, metadata: Mapping[str, str] | None, extras: Mapping[str, Any] | None,
             encode_ms: float) -> EntryPlan:
    return plan_entry(key.namespace, key.hash, {"embeddings": tensor, **(extras or {})}, metadata, encode_ms=encode_ms)


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
        return with_retries(once, self.retries, self.backoff_s, self.url)

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

    def _request(self, method: str, path: str, body: Any = None, headers=None, ok=(200,)) -> tuple[int, dict, bytes]:
        status, hdrs, data = with_retries(lambda: self._http.request(method, path, body, headers),
                                          self.retries, self.backoff_s, self.url)
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
        if durable and not persist:
            raise ValueError("durable=True needs persist=True: a host-only entry never reaches disk")
        if self.scheme != "unix":
            q = "?durable=1" if durable else ("?persist=0" if not persist else "")
            status, _, _ = self._request("PUT", f"/v1/entries/{key}{q}", plan.to_bytes(),
                                         {"Content-Type": "application/vnd.safetensors"}, ok=(200, 201))
            return status == 201
        ans = self._call("reserve", key=str(key), nbytes=plan.total_bytes,
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
        status, headers, data = self._request("GET", f"/v1/entries/{key}")
        if status == 404:
            return None
        try:
            view = read_entry(data, verify=True)
        except EntryFormatError as e:  # damaged on the way: never handed out
            raise CorruptEntry(f"{key}: {e}") from e
        return Entry(key, headers.get("X-MMCache-Tier", "remote"), view)

    def get_many(self, keys, *, device: Any = None) -> EntryBatch | DeviceBatch:
        """Every key's entry (``"ns/hash"`` strings or ``Key``s), in key order, None for a miss:
        ``with client.get_many(keys) as entries: ...``. Over ``unix://`` all are leased in one
        round trip and released in one when the batch closes; over HTTP one ``POST
        /v1/batch_get`` brings them (owned, verified bytes). A key may repeat. ``device``: as
        for ``get``, a ``DeviceBatch`` of ``DeviceEntry``."""
        keys = _keys(keys)
        dev = cuda_device(device)
        if dev is not None:
            return self._get_many_on(keys, dev)
        if not keys:
            return EntryBatch([])
        if self.scheme == "unix":
            locs = self._call("lease", keys=keys)["leases"]
            return _local_batch(self._local, keys, locs, EntryBatch, Entry, _sync_release)
        _, _, data = self._request("POST", "/v1/batch_get", json.dumps({"keys": keys}),
                                   {"Content-Type": "application/json"})
        return EntryBatch(_entries_from_arrow(keys, data, Entry))

    def _get_many_on(self, keys: list[str], dev: Any) -> DeviceBatch:
        """``get_many(keys, device=dev)``: see ``mmcache_client.device_entries``."""
        on_device: list = [None] * len(keys)
        release = None
        conn = with_retries(self._connect, self.retries, self.backoff_s, self.url) if self.scheme == "unix" else None
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

    def _entry(self, conn: LocalConnection, key: str, loc: list) -> Entry:
        """An ``Entry`` over a lease answer; it holds a reference on ``conn`` until closed."""
        try:
            view, end_local = open_lease(conn.state, conn.arena, conn.lmdb_path, key, loc)
        except BaseException:
            with contextlib.suppress(MMCacheError):
                conn.call("release", keys=[wire.release_name(key, loc)])
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
        key = _key_str(namespace, hash_hex)
        if self.scheme == "unix":
            return self._call("lookup", keys=[key])["tiers"][key] is not None
        return self._request("HEAD", f"/v1/entries/{key}")[0] == 200

    def lookup(self, keys, *, detail: bool = False) -> dict:
        """Key → tier holding it (``host``/``disk``) or None. ``detail``: key → ``{"tier",
        "num_tokens"[, "image_grid_thw"]}`` or None, so a hit needs no lease to be laid out."""
        keys = _keys(keys)
        if detail:
            if self.scheme == "unix":
                return self._call("lookup", keys=keys, detail=True)["items"]
            _, _, data = self._request("POST", "/v1/lookup", json.dumps({"keys": keys, "detail": True}),
                                       {"Content-Type": "application/json"})
            return json.loads(data)["items"]
        if self.scheme == "unix":
            return self._call("lookup", keys=keys)["tiers"]
        _, _, data = self._request("POST", "/v1/lookup", json.dumps({"keys": keys}), {"Content-Type": "application/json"})
        return json.loads(data)["tiers"]

    def claim(self, keys, owner: str, ttl_ms: int | None = None) -> dict:
        """Claim ``keys`` before encoding them, so each is encoded once across every encoder
        sharing the cache: key → ``{"state": "exists"}`` (some tier holds it), ``{"state":
        "won", "ttl_ms"}`` (encode it and put it; the put ends the claim; claiming again renews
        it) or ``{"state": "wait", "ttl_ms"}`` (``owner`` is another's for that long: wait for
        its entry, then claim again). ``ttl_ms`` defaults to the sidecar's 30 s."""
        fields = _claim_fields(keys, owner, ttl_ms)
        if self.scheme == "unix":
            return self._call("claim", **fields)["claims"]
        _, _, data = self._request("POST", "/v1/claims", json.dumps(fields), {"Content-Type": "application/json"})
        return json.loads(data)["claims"]

    def release_claims(self, keys, owner: str) -> int:
        """Give back ``owner``'s claims on ``keys`` (an encode that failed); how many it held."""
        fields = _claim_fields(keys, owner, None)
        if self.scheme == "unix":
            return self._call("unclaim", **fields)["released"]
        _, _, data = self._request("POST", "/v1/claims/release", json.dumps(fields),
                                   {"Content-Type": "application/json"})
        return json.loads(data)["released"]

    def delete(self, namespace: str, hash_hex: str) -> bool:
        key = _key_str(namespace, hash_hex)
        if self.scheme == "unix":
            return self._call("delete", key=key)["deleted"]
        return self._request("DELETE", f"/v1/entries/{key}", ok=(204,))[0] == 204

    def stats(self) -> dict:
        if self.scheme == "unix":
            return self._call("stats")["stats"]
        return json.loads(self._request("GET", "/v1/stats")[2])

    def close(self) -> None:
        """Close the client. A connection that open entries still rely on closes with the last."""
        self._detach()
        if self._http is not None:
            self._http.close()

    def __enter__(self) -> "CacheClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _claim_fields(keys, owner: str, ttl_ms: int | None) -> dict:
    fields: dict[str, Any] = {"keys": _keys(keys), "owner": owner}
    if ttl_ms is not None:
        fields["ttl_ms"] = int(ttl_ms)
    return fields


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


def _local_batch(conn, keys: list[str], locs: list, batch_type, entry_type, make_release):
    """Entries over one ``lease`` answer, each holding a reference on ``conn`` until the batch
    closes. On a failure (a corrupt entry) every lease of the answer is given back (the release
    runs, or for the async client is scheduled, before the error propagates)."""
    leased = [f"{k}\t{loc.offset}" for k, loc in zip(keys, locs) if loc is not None]  # wire.release_name
    conn.state.refs += len(leased)
    entries: list = []
    ends: list = []
    state, arena = conn.state, conn.arena
    try:
        for key, loc in zip(keys, locs):
            if loc is None:
                entries.append(None)
            elif loc.layout is not None and loc.offset >= 0:  # NOTE: the common case, inlined
                entries.append(entry_type(key, loc.tier, ArenaEntryView(arena, loc.offset, loc.nbytes, loc.layout),
                                          None, state))
            else:
                view, end_local = open_lease(state, arena, conn.lmdb_path, key, loc)
                ends.append(end_local)
                entries.append(entry_type(key, loc.tier, view, None, state if end_local is None else None))
    except BaseException:
        batch_type(entries, make_release(conn, leased, ends)).close()
        raise
    return batch_type(entries, make_release(conn, leased, ends))


def _entries_from_arrow(keys: list[str], data: bytes, entry_type) -> list:
    """``POST /v1/batch_get``'s Arrow stream as entries in key order (misses left out there)."""
    import pyarrow as pa

    found: dict[str, tuple[str, bytes]] = {}
    for batch in pa.ipc.open_stream(pa.py_buffer(data)):
        for key, tier, blob in zip(*(batch.column(i).to_pylist() for i in range(3))):
            found[key] = (tier, blob)
    out = []
    for key in keys:
        if key not in found:
            out.append(None)
            continue
        tier, blob = found[key]
        try:
            view = read_entry(blob, verify=True)
        except EntryFormatError as e:  # damaged on the way: never handed out
            raise CorruptEntry(f"{key}: {e}") from e
        out.append(entry_type(key, tier, view))
    return out

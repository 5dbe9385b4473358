"""The SDK's sans-IO core: what the sync and the async client share, with no I/O at all.

Each API call is described once here as a ``Call``: what to ask the local socket (an op and its
fields) and what to ask HTTP (method, path, body), and how either answer becomes the result.
``CacheClient`` and ``AsyncCacheClient`` only run it (``_run``: a blocking or an awaited round
trip) and hold their connections; the same holds for keys, put plans, the answer to a
reservation, an HTTP error status and the entries of an answer (h11 / httpcore are the model).
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from mmcache_client.entry import Entry
from mmcache_client.errors import (AuthError, BadRequest, CacheFull, CorruptEntry, EntryTooLarge, Forbidden,
                                   ServerError, TooManyKeys, TooManyRequests)
from mmcache_client.format import EntryFormatError, EntryPlan, plan_entry, read_entry
from mmcache_client.keys import Key
from mmcache_client.session import ArenaEntryView, LeaseVanished, open_lease

JSON = {"Content-Type": "application/json"}


# ---------------------------------------------------------------- keys and URLs

def key_of(namespace: str, hash_hex: str) -> Key:
    """``Key(namespace, hash_hex)``; a ``tenant@namespace`` (the default tenant acting for a
    tenant, as an encoder does for the router's) names that tenant's key."""
    tenant, at, plain = namespace.partition("@") if isinstance(namespace, str) else ("", "", namespace)
    return Key(plain, hash_hex, tenant) if at else Key(namespace, hash_hex)


_VALID: dict = {}
"""Key strings (and ``(namespace, hash)`` pairs) already validated → the key string: a hot key
is checked once, not on every get. Bounded: cleared when full."""
_VALID_MAX = 16384


def key_str(namespace: str, hash_hex: str) -> str:
    """``str(key_of(namespace, hash_hex))``, validated once per pair."""
    pair = (namespace, hash_hex)
    try:
        return _VALID[pair]
    except (KeyError, TypeError):
        text = str(key_of(namespace, hash_hex))
    if len(_VALID) >= _VALID_MAX:
        _VALID.clear()
    _VALID[pair] = text
    return text


def key_strs(keys) -> list[str]:
    """``"ns/hash"`` strings or ``Key``s as validated key strings."""
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


TENANT_HEADER = "X-MMCache-Tenant"


def entry_route(key: "Key | str") -> tuple[str, dict]:
    """The HTTP path of one key's single-key routes (GET, HEAD, PUT, DELETE) and its headers: a
    tenant's key (``tenant@ns/hash``, the default tenant acting for a tenant) goes as
    ``/v1/entries/ns/hash`` with ``X-MMCache-Tenant: tenant``, as the server wants it ('@' is no
    namespace character on a path)."""
    if isinstance(key, str) and "@" not in key:  # NOTE: the common case; a validated key string
        return f"/v1/entries/{key}", {}
    k = key if isinstance(key, Key) else Key.from_string(key)
    path = f"/v1/entries/{k.namespace}/{k.hash}"
    return path, ({TENANT_HEADER: k.tenant} if k.tenant is not None else {})


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
        raise (TooManyKeys if message.startswith("too many keys") else EntryTooLarge)(message)
    if status == 503:
        raise CacheFull(message or "the sidecar has no room now", retry_after_s)
    if status == 429:
        raise TooManyRequests(message or "too many requests", retry_after_s)
    if 400 <= status < 500:
        raise BadRequest(f"HTTP {status}: {message}")
    raise ServerError(f"HTTP {status}: {message}")


# ---------------------------------------------------------------- calls

@dataclass(frozen=True)
class Call:
    """One API call as data, for either transport."""

    op: str
    """The local op (``mmcache_client.wire.OPS``)."""
    fields: dict
    local_result: Callable[[dict], Any]
    method: str
    path: str
    http_result: Callable[[int, dict, bytes], Any]
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    ok: tuple[int, ...] = (200,)
    """HTTP statuses that are answers (404 always is one: a miss); others raise."""


def _json_field(name: str) -> Callable[[int, dict, bytes], Any]:
    return lambda status, headers, data: json.loads(data)[name]


def exists(key: str) -> Call:
    path, headers = entry_route(key)
    return Call("lookup", {"keys": [key]}, lambda a: a["tiers"][key] is not None,
                "HEAD", path, lambda status, headers, data: status == 200, headers=headers)


def lookup(keys: list[str], detail: bool) -> Call:
    name = "items" if detail else "tiers"
    fields = {"keys": keys, "detail": True} if detail else {"keys": keys}
    return Call("lookup", fields, lambda a: a[name], "POST", "/v1/lookup", _json_field(name),
                json.dumps(fields), JSON)


def claim_fields(keys, owner: str, ttl_ms: int | None) -> dict:
    fields: dict[str, Any] = {"keys": key_strs(keys), "owner": owner}
    if ttl_ms is not None:
        fields["ttl_ms"] = int(ttl_ms)
    return fields


def claim(keys, owner: str, ttl_ms: int | None) -> Call:
    fields = claim_fields(keys, owner, ttl_ms)
    return Call("claim", fields, lambda a: a["claims"], "POST", "/v1/claims", _json_field("claims"),
                json.dumps(fields), JSON)


def release_claims(keys, owner: str) -> Call:
    fields = claim_fields(keys, owner, None)
    return Call("unclaim", fields, lambda a: a["released"], "POST", "/v1/claims/release", _json_field("released"),
                json.dumps(fields), JSON)


def delete(key: str) -> Call:
    path, headers = entry_route(key)
    return Call("delete", {"key": key}, lambda a: a["deleted"], "DELETE", path,
                lambda status, headers, data: status == 204, headers=headers, ok=(204,))


def list_entries(namespace: str | None, after: str | None, limit: int) -> Call:
    fields: dict[str, Any] = {"limit": int(limit)}
    if namespace is not None:
        fields["namespace"] = namespace
    if after is not None:
        fields["after"] = after
    query = urllib.parse.urlencode(fields)
    return Call("list", fields, lambda a: a, "GET", f"/v1/entries?{query}",
                lambda status, headers, data: json.loads(data))


def stats() -> Call:
    return Call("stats", {}, lambda a: a["stats"], "GET", "/v1/stats", lambda status, headers, data: json.loads(data))


# ---------------------------------------------------------------- puts

def plan_put(key: Key, tensor: Any, metadata: Mapping[str, str] | None, extras: Mapping[str, Any] | None,
             encode_ms: float) -> EntryPlan:
    return plan_entry(key.namespace, key.hash, {"embeddings": tensor, **(extras or {})}, metadata, encode_ms=encode_ms)


def check_put(durable: bool, persist: bool) -> None:
    if durable and not persist:
        raise ValueError("durable=True needs persist=True: a host-only entry never reaches disk")


def http_put(key: Key, plan: EntryPlan, durable: bool, persist: bool) -> tuple[str, bytes, dict]:
    """The PUT's path, body and headers (``entry_route``: a tenant's key by header)."""
    q = "?durable=1" if durable else ("?persist=0" if not persist else "")
    path, headers = entry_route(key)
    return path + q, plan.to_bytes(), {"Content-Type": "application/vnd.safetensors", **headers}


def reserve_fields(key: Key, plan: EntryPlan, persist: bool) -> dict:
    return {"key": str(key), "nbytes": plan.total_bytes, "encode_ms": float(plan.metadata.get("encode_ms", 0.0)),
            "persist": persist}


def reserved_offset(key: Key, plan: EntryPlan, answer: dict) -> int | None:
    """Where to fill the entry in the arena, or None when the key exists (the first put is
    kept); no room raises ``CacheFull``, an entry larger than the arena ``EntryTooLarge``."""
    status = answer["status"]
    if status == "exists":
        return None
    if status == "too_large":
        raise EntryTooLarge(f"{key}: {plan.total_bytes} bytes exceed the sidecar's arena of "
                            f"{answer.get('capacity_bytes')} bytes")
    if status == "no_space":
        raise CacheFull(f"{key}: no room for {plan.total_bytes} bytes now (everything else is leased or being written)",
                        float(answer.get("retry_after_s", 1.0)))
    return answer["offset"]


# ---------------------------------------------------------------- entries

def http_entry(key: str, status: int, headers: Mapping[str, str], data: bytes, entry_type: type = Entry):
    """A ``GET /v1/entries/...`` answer as an entry (None: a miss); damaged bytes are never
    handed out (``CorruptEntry``)."""
    if status == 404:
        return None
    try:
        view = read_entry(data, verify=True)
    except EntryFormatError as e:
        raise CorruptEntry(f"{key}: {e}") from e
    return entry_type(key, headers.get("X-MMCache-Tier", "remote"), view)


def batch_get(keys: list[str], promote: bool = True) -> tuple[str, dict]:
    """``POST /v1/batch_get``'s body and headers (``promote=False``: a scan, see ``get_many``)."""
    return json.dumps({"keys": keys} if promote else {"keys": keys, "promote": False}), JSON


def entries_from_arrow(keys: list[str], data: bytes, entry_type) -> list:
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


def local_batch(conn, keys: list[str], locs: list, batch_type, entry_type, make_release):
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
                try:
                    view, end_local = open_lease(state, arena, conn.lmdb_path, key, loc)
                except LeaseVanished:  # NOTE: deleted from disk before it could be read: a miss
                    entries.append(None)
                    continue
                ends.append(end_local)
                entries.append(entry_type(key, loc.tier, view, None, state if end_local is None else None))
    except BaseException:
        batch_type(entries, make_release(conn, leased, ends)).close()
        raise
    return batch_type(entries, make_release(conn, leased, ends))

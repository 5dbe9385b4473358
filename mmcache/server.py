"""The sidecar's HTTP API (``mmcache serve``): see DESIGN.md "HTTP API of the sidecar".

``create_app(config)`` builds the aiohttp application; the store, the local Unix-socket server
and the disk writer live in ``cleanup_ctx``, so a graceful stop finishes in-flight requests,
flushes disk writes, removes the socket and the arena file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import socket
import time
from typing import AsyncIterator

import pyarrow as pa
from aiohttp import web

from mmcache.claims import DEFAULT_TTL_MS
from mmcache.config import ServeConfig
from mmcache.serving.http_limits import HTTP_COUNTERS, HttpCounters, PinnedWriter, read_body, read_json
from mmcache.local_server import start_local_server
from mmcache.remote_config import RemoteConfig
from mmcache.metrics import Metrics
from mmcache.serving.app import metrics_response
from mmcache.serving.security import bearer_matches, bearer_token
from mmcache.store import StoreConfig, TieredStore
from mmcache.serving.tenants import DEFAULT, TENANT_HEADER, Forbidden, Principal, Tenants
from mmcache_client.errors import CacheFull, EntryTooLarge
from mmcache_client.format import EntryFormatError, relayout
from mmcache_client.keys import Key

logger = logging.getLogger(__name__)

CONFIG = web.AppKey("config", ServeConfig)
STORE = web.AppKey("store", TieredStore)
METRICS = web.AppKey("metrics", Metrics)
TENANTS = web.AppKey("tenants", Tenants)
TENANT_COUNTS = web.AppKey("tenant_counts", dict)
LOCAL_OPS = web.AppKey("local_ops", dict)
_DETAIL = web.RequestKey("detail", bool) if hasattr(web, "RequestKey") else "mmcache.detail"
_BODY = web.RequestKey("body", dict) if hasattr(web, "RequestKey") else "mmcache.body"
STOPPING = web.AppKey("stopping", asyncio.Event)
"""Set when the app shuts down: long-lived streams (``/v1/events``) end."""
EVENT_HEARTBEAT_S = 15.0
EVENT_WRITE_TIMEOUT_S = 10.0
"""Unix-socket ops served, by name (``/v1/stats`` ``"local"``)."""
PRINCIPAL = web.RequestKey("principal", Principal) if hasattr(web, "RequestKey") else "mmcache.principal"  # aiohttp < 3.12
DEFAULT_TENANT_NAME = "(default)"
"""The default tenant's row in per-tenant stats (not a valid tenant name, so never a tenant's)."""
TIER_HEADER = "X-MMCache-Tier"
_ENTRY_CONTENT_TYPE = "application/vnd.safetensors"
_ARROW_CONTENT_TYPE = "application/vnd.apache.arrow.stream"
_MAX_JSON_BYTES = 4 << 20


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Map domain errors to HTTP statuses with a JSON body; record latency."""
    start = time.perf_counter()
    try:
        response = await handler(request)
    except web.HTTPException as e:
        if e.empty_body:
            response = web.Response(status=e.status)
        elif e.content_type == "application/json":
            response = web.Response(status=e.status, text=e.text, content_type="application/json")
        else:
            response = _error(e.status, e.reason)
        response.headers.update({k: v for k, v in e.headers.items() if k.lower() in ("www-authenticate", "allow")})
    except CacheFull as e:
        response = _error(503, str(e))
        response.headers["Retry-After"] = str(max(1, math.ceil(e.retry_after_s)))
    except EntryTooLarge as e:
        response = _error(413, str(e))
    except Forbidden as e:
        response = _error(403, str(e))
    except (EntryFormatError, ValueError) as e:
        response = _error(400, str(e))
    except Exception:
        logger.exception("%s %s failed", request.method, request.path)
        response = _error(500, "internal error; see the sidecar's log")
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    request.app[METRICS].request_seconds.labels(request.method, route, str(response.status)).observe(
        time.perf_counter() - start)
    return response


@web.middleware
async def auth_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Who is asking (``request[PRINCIPAL]``): with ``--tenants`` every token is someone's, the
    sidecar's own token (or none configured) is the default tenant."""
    tenants, token = request.app.get(TENANTS), request.app[CONFIG].token
    principal: Principal | None = DEFAULT
    if request.path != "/healthz":
        header = request.headers.get("Authorization")
        if tenants is not None:
            principal = tenants.authenticate(bearer_token(header))
        elif token:
            # NOTE: the scheme in any case (RFC 7235: "bearer X" is "Bearer X"); the token in constant time.
            principal = DEFAULT if bearer_matches(header, token) else None
        if principal is None:
            raise web.HTTPUnauthorized(
                text='{"error": "missing or wrong bearer token"}', content_type="application/json",
                headers={"WWW-Authenticate": "Bearer"})
    request[PRINCIPAL] = principal
    return await handler(request)


def _acting_for(request: web.Request) -> str | None:
    value = request.headers.get(TENANT_HEADER)
    return value if value else None


def _scoped(request: web.Request, key: Key) -> Key:
    return request[PRINCIPAL].scope(key, _acting_for(request))


def _key(request: web.Request) -> Key:
    return _scoped(request, Key(request.match_info["ns"], request.match_info["hash"]))


def _shown(request: web.Request, key: Key | str) -> str:
    return request[PRINCIPAL].shown(Key.from_string(key) if isinstance(key, str) else key)


def _flag(request: web.Request, name: str, default: bool) -> bool:
    value = request.query.get(name)
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no", ""):
        return False
    raise ValueError(f"query parameter {name}={value!r} must be 1 or 0")


async def put_entry(request: web.Request) -> web.Response:
    key = _key(request)
    store = request.app[STORE]
    body = await read_body(request, request.app[CONFIG].max_entry_size_bytes, "entry")
    if not body:
        raise ValueError("empty body: PUT takes a safetensors entry with an 'embeddings' tensor")
    durable = _flag(request, "durable", False)
    persist = _flag(request, "persist", True)
    # NOTE: off the loop: parsing, the copy into the arena (up to max_entry_size) and a possible
    # wait for disk commits must not stall other requests.
    plan = await asyncio.to_thread(relayout, body, key.namespace, key.hash)
    result = await asyncio.to_thread(store.put_plan, key.to_string(), plan, durable=False, persist=persist)
    _count(request, "puts")
    if result.created:
        _count(request, "created")
    if durable and result.durable is not None:
        await asyncio.wrap_future(result.durable)
    elif durable and not store.disk.contains(key.to_string()):
        await asyncio.to_thread(store.flush)  # the key existed: an earlier non-durable put may still be queued
    return web.json_response({"key": _shown(request, key), "created": result.created, "tier": result.tier,
                              "durable": durable, "persist": persist}, status=201 if result.created else 200)


async def _lease(store: TieredStore, key: str, owner):
    if store.host.contains(key):
        return store.lease(key, owner)
    return await asyncio.to_thread(store.lease, key, owner)  # promotion copies from disk


async def get_entry(request: web.Request) -> web.StreamResponse:
    key = _key(request).to_string()
    store = request.app[STORE]
    owner = ("http", id(request))
    lease = await _lease(store, key, owner)
    _count(request, "gets", hits=lease is not None)
    if lease is None:
        raise web.HTTPNotFound(text=f'{{"error": "no entry {_shown(request, key)}"}}', content_type="application/json")
    try:
        view = lease.view
        response = web.StreamResponse(headers={TIER_HEADER: lease.tier, "Content-Type": _ENTRY_CONTENT_TYPE})
        response.content_length = view.nbytes
        writer = PinnedWriter(request, response, request.app[CONFIG].write_timeout_s, request.app[HTTP_COUNTERS])
        try:
            # NOTE: returns once the kernel holds every byte, so the lease can go right after.
            await writer.write([view], eof=True)
        except ConnectionResetError as e:  # the client left, or never read (WriteTimeout)
            logger.debug("GET %s not delivered: %s", key, e)
        return response
    finally:
        store.release(lease)


async def head_entry(request: web.Request) -> web.Response:
    store = request.app[STORE]
    key = _key(request)
    # NOTE: with a remote tier a local miss asks it over the network: off the event loop
    tier = await asyncio.to_thread(store.tier_of, key) if store.remote is not None else store.tier_of(key)
    if tier is None:
        return web.Response(status=404)
    return web.Response(status=200, headers={TIER_HEADER: tier})


async def delete_entry(request: web.Request) -> web.Response:
    key = _key(request)
    _count(request, "deletes")
    if not await asyncio.to_thread(request.app[STORE].delete, key):
        raise web.HTTPNotFound(text=f'{{"error": "no entry {_shown(request, key)}"}}', content_type="application/json")
    return web.Response(status=204)


async def _json_keys(request: web.Request, shape: str = '{"keys": ["ns/hash", ...]}') -> dict[str, str]:
    """The body's keys in the caller's scope: ``{stored key: the key as the caller wrote it}``
    (the whole body in ``request[_BODY]``)."""
    doc = await read_json(request, _MAX_JSON_BYTES, shape)
    request[_BODY] = doc
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list):
        raise ValueError('body must be {"keys": ["ns/hash", ...]}')
    detail = doc.get("detail", False)
    if not isinstance(detail, bool):
        raise ValueError('"detail" must be true or false')
    request[_DETAIL] = detail
    out: dict[str, str] = {}
    for k in keys:
        key = _scoped(request, Key.from_string(k))
        out[key.to_string()] = _shown(request, key)
    return out


async def lookup(request: web.Request) -> web.Response:
    keys = await _json_keys(request)
    if request.get(_DETAIL):
        items = await asyncio.to_thread(request.app[STORE].describe, list(keys))
        return web.json_response({"items": {keys[k]: d for k, d in items.items()},
                                  "found": sum(d is not None for d in items.values())})
    store = request.app[STORE]
    tiers = await asyncio.to_thread(store.lookup, list(keys)) if store.remote is not None else store.lookup(list(keys))
    return web.json_response({"tiers": {keys[k]: t for k, t in tiers.items()},
                              "found": sum(t is not None for t in tiers.values())})


async def claim(request: web.Request) -> web.Response:
    """``POST /v1/claims {"keys": [...], "owner": ID, "ttl_ms": N}``: per key ``exists``, ``won``
    or ``wait`` (with ``ttl_ms`` left); see ``mmcache.claims``."""
    keys = await _json_keys(request, '{"keys": ["ns/hash", ...], "owner": "encoder-id", "ttl_ms": 30000}')
    doc = request[_BODY]
    answer = await asyncio.to_thread(request.app[STORE].claims.claim, list(keys), doc.get("owner"),
                                     doc.get("ttl_ms", DEFAULT_TTL_MS))
    return web.json_response({"claims": {keys[k]: v for k, v in answer.items()}})


async def release_claims(request: web.Request) -> web.Response:
    """``POST /v1/claims/release {"keys": [...], "owner": ID}``: an owner gives its claims back."""
    keys = await _json_keys(request, '{"keys": ["ns/hash", ...], "owner": "encoder-id"}')
    n = await asyncio.to_thread(request.app[STORE].claims.release, list(keys), request[_BODY].get("owner"))
    return web.json_response({"released": n})


async def events(request: web.Request) -> web.StreamResponse:
    """``GET /v1/events[?since=SEQ][&scope=local]``: the store's inventory events as server-sent
    events (``id`` the sequence number, ``event`` the kind, ``data`` the JSON event), from
    ``since`` (or ``Last-Event-ID``; default: from now). ``scope=local``: this node's own only,
    not those relayed from the remote's stream. A tenant sees its own keys only. An ``event:
    lost`` says the follower fell more than the bus holds behind (re-read what it indexes). The
    first is ``event: subscribed`` with the sequence number it follows from and the node."""
    bus, principal = request.app[STORE].events, request[PRINCIPAL]
    since_text = request.query.get("since", request.headers.get("Last-Event-ID"))
    if since_text is not None and not since_text.isdigit():
        raise ValueError(f"since={since_text!r} must be a sequence number >= 0")
    scope = request.query.get("scope", "all")
    if scope not in ("all", "local"):
        raise ValueError(f"scope={scope!r} must be all or local")
    seq = int(since_text) if since_text is not None else bus.seq
    stale = seq > bus.seq  # NOTE: a number from before this sidecar restarted (an old Last-Event-ID)
    seq = min(seq, bus.seq)
    tenant = None if principal.trusted else principal.tenant
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-MMCache-Node": bus.node})
    await response.prepare(request)
    stopping = request.app[STOPPING]

    async def send(text: str) -> None:
        await asyncio.wait_for(response.write(text.encode()), EVENT_WRITE_TIMEOUT_S)

    try:
        await send(f"event: subscribed\ndata: {json.dumps({'kind': 'subscribed', 'seq': seq, 'node': bus.node})}\n\n")
        if stale:
            await send("event: lost\ndata: {}\n\n")
        sent = time.monotonic()
        while not stopping.is_set():
            found, lost = await bus.wait_async(seq, 1.0)
            parts = ["event: lost\ndata: {}\n\n"] if lost else []
            for ev in found:
                seq = ev.seq
                if scope == "local" and ev.node != bus.node:
                    continue
                doc = ev.as_dict()
                if tenant is not None:
                    if not ev.key.startswith(tenant + "@"):
                        continue
                    doc["key"] = ev.key[len(tenant) + 1:]
                parts.append(f"id: {ev.seq}\nevent: {ev.kind}\ndata: {json.dumps(doc)}\n\n")
            if not parts and time.monotonic() - sent >= EVENT_HEARTBEAT_S:
                parts.append(": heartbeat\n\n")
            if parts:
                await send("".join(parts))
                sent = time.monotonic()
    except (ConnectionResetError, asyncio.TimeoutError) as e:  # the follower left or stopped reading
        logger.debug("events follower gone: %r", e)
    return response


_BATCH_SCHEMA = pa.schema([("key", pa.string()), ("tier", pa.string()), ("entry", pa.large_binary())])


class _Chunks:
    """A write-only file for ``pyarrow.ipc``: keeps what it is given until taken (pyarrow hands
    over ``Buffer``s that own their bytes, so keeping them keeps the batch, not a copy)."""

    closed = False

    def __init__(self) -> None:
        self.parts: list[memoryview] = []

    def write(self, data) -> int:
        view = memoryview(data)
        self.parts.append(view)
        return view.nbytes

    def flush(self) -> None:
        """pyarrow's sink API; nothing is buffered here (``take`` hands the parts over)."""

    def take(self) -> list[memoryview]:
        parts, self.parts = self.parts, []
        return parts


async def batch_get(request: web.Request) -> web.StreamResponse:
    """One Arrow IPC stream (columns ``key``, ``tier``, ``entry``: the safetensors blob), sent as
    record batches of about ``batch_get_budget_bytes`` each: entries are leased until copied into
    their batch, and a batch is sent before the next is gathered, so memory is bounded by the
    budget, not by the answer. Misses are left out."""
    store, config = request.app[STORE], request.app[CONFIG]
    keys = await _json_keys(request)
    owner = ("http-batch", id(request))
    response = web.StreamResponse(headers={"Content-Type": _ARROW_CONTENT_TYPE})
    writer = PinnedWriter(request, response, config.write_timeout_s, request.app[HTTP_COUNTERS])
    sink = _Chunks()
    stream = pa.ipc.new_stream(sink, _BATCH_SCHEMA)
    leases: list = []

    def flush() -> None:
        rows = ([keys[lease.key] for lease in leases], [lease.tier for lease in leases], [lease.view for lease in leases])
        batch = pa.record_batch([pa.array(rows[0], pa.string()), pa.array(rows[1], pa.string()),
                                 pa.array(rows[2], pa.large_binary())], schema=_BATCH_SCHEMA)
        release_all()  # the batch holds copies now
        stream.write_batch(batch)

    def release_all() -> None:
        while leases:
            store.release(leases.pop())

    try:
        gathered = 0
        for key in keys:
            lease = await _lease(store, key, owner)
            if lease is None:
                continue
            leases.append(lease)
            gathered += lease.view.nbytes
            if gathered >= config.batch_get_budget_bytes:
                await asyncio.to_thread(flush)
                gathered = 0
                await writer.write(sink.take())
        if leases:
            await asyncio.to_thread(flush)
        stream.close()
        await writer.write(sink.take(), eof=True)
    except ConnectionResetError as e:  # the client left, or never read (WriteTimeout)
        logger.debug("batch_get not delivered: %s", e)
    finally:
        release_all()
    return response


def _count(request: web.Request, what: str, *, hits: bool | None = None) -> None:
    """Per-tenant request counters (only kept with ``--tenants``)."""
    counts = request.app.get(TENANT_COUNTS)
    if counts is None:
        return
    row = counts.setdefault(request[PRINCIPAL].tenant or DEFAULT_TENANT_NAME,
                            dict(gets=0, hits=0, misses=0, puts=0, created=0, deletes=0))
    row[what] += 1
    if hits is not None:
        row["hits" if hits else "misses"] += 1


async def stats(request: web.Request) -> web.Response:
    """Everything for the default tenant (with ``"tenants"``: each one's usage and requests); a
    tenant sees its own usage and requests only."""
    store, principal = request.app[STORE], request[PRINCIPAL]
    tenants = request.app.get(TENANTS)
    usage = await asyncio.to_thread(store.usage_by_tenant) if tenants is not None else {}
    counts = request.app.get(TENANT_COUNTS, {})

    def of(tenant: str | None) -> dict:
        name = tenant or DEFAULT_TENANT_NAME
        return {"usage": usage.get(tenant, {}), "requests": counts.get(name, {})}

    if not principal.trusted:
        return web.json_response({"tenant": principal.tenant, **of(principal.tenant)})
    doc = store.stats()
    doc["http"] = request.app[HTTP_COUNTERS].as_dict()
    doc["local"] = {"ops": dict(request.app[LOCAL_OPS])}
    if tenants is not None:
        doc["tenants"] = {name: of(name) for name in tenants.names} | {DEFAULT_TENANT_NAME: of(None)}
    return web.json_response(doc)


async def metrics(request: web.Request) -> web.Response:
    if not request[PRINCIPAL].trusted:
        raise Forbidden("/metrics shows every tenant's totals: the sidecar's own token only")
    return metrics_response(request.app[METRICS].registry)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _store_ctx(config: ServeConfig):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        store = TieredStore(StoreConfig(
            data_dir=config.data_dir, host_capacity_bytes=config.host_capacity_bytes,
            disk_capacity_bytes=config.disk_capacity_bytes, arena_path=config.arena_path,
            host_policy=config.host_policy, disk_policy=config.disk_policy,
            disk_max_queued_bytes=config.disk_queue_bytes,
            remote=None if config.remote is None else RemoteConfig(
                config.remote, ttl_s=config.remote_ttl_s, timeout_ms=config.remote_timeout_ms,
                required=config.remote_required),
            node=config.node or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}",
            device_capacity_bytes=config.device_capacity_bytes, device=config.device))
        app[STORE] = store
        local = None
        try:
            local = start_local_server(store, config.socket, app.get(TENANTS), app[LOCAL_OPS]) \
                if config.socket else None
        except BaseException:  # NOTE: the arena is shared memory: a failed start must not leave it behind
            if local is not None:
                await asyncio.to_thread(local.close)
                _unlink(config.socket)
            await asyncio.to_thread(store.close)
            raise
        logger.info("mmcache store up: arena %s, data dir %s, socket %s", store.arena_path, config.data_dir, config.socket)
        try:
            yield
        finally:
            if local is not None:
                await asyncio.to_thread(local.close)  # joins its threads: every lease given back
                _unlink(config.socket)
            await asyncio.to_thread(store.close)  # flushes pending disk writes
            logger.info("mmcache store closed")
    return ctx


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def create_app(config: ServeConfig) -> web.Application:
    app = web.Application(middlewares=[error_middleware, auth_middleware],
                          client_max_size=config.max_entry_size_bytes)
    app[CONFIG] = config
    if config.tenants:
        app[TENANTS] = Tenants.load(config.tenants, admin_token=config.token)
        app[TENANT_COUNTS] = {}
    app[HTTP_COUNTERS] = HttpCounters()
    app[LOCAL_OPS] = {}
    app[STOPPING] = asyncio.Event()

    async def on_shutdown(app: web.Application) -> None:
        app[STOPPING].set()
    app.on_shutdown.append(on_shutdown)
    app[METRICS] = Metrics(lambda: app[STORE].stats(), lambda: app[HTTP_COUNTERS].as_dict())
    app.cleanup_ctx.append(_store_ctx(config))
    entry = "/v1/entries/{ns}/{hash}"
    app.add_routes([
        web.put(entry, put_entry),
        web.get(entry, get_entry, allow_head=False),
        web.head(entry, head_entry),
        web.delete(entry, delete_entry),
        web.post("/v1/lookup", lookup),
        web.post("/v1/batch_get", batch_get),
        web.post("/v1/claims", claim),
        web.post("/v1/claims/release", release_claims),
        web.get("/v1/events", events),
        web.get("/v1/stats", stats),
        web.get("/metrics", metrics),
        web.get("/healthz", healthz),
    ])
    return app

"""The sidecar's HTTP API (``mmcache serve``): see docs/sidecar.md.

``create_app(config)`` builds the aiohttp application; the store, the local Unix-socket server
and the disk writer live in ``cleanup_ctx``, so a graceful stop finishes in-flight requests,
flushes disk writes, removes the socket and the arena file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from typing import AsyncIterator

from aiohttp import web

from mmcache.core.claims import DEFAULT_TTL_MS
from mmcache.sidecar.config import ServeConfig
from mmcache.common.http_limits import HTTP_COUNTERS, HttpCounters, PinnedWriter, read_body
from mmcache.sidecar.listing import DEFAULT_LIST_LIMIT, list_page
from mmcache.sidecar.local_server import start_local_server
from mmcache.tiers.remote_config import RemoteConfig
from mmcache.sidecar.metrics import Metrics
from mmcache.common.app import metrics_response
from mmcache.core.store import StoreConfig, TieredStore
from mmcache.tiers.wiring import open_store
from mmcache.sidecar.common import (
    CONFIG,
    STORE,
    METRICS,
    TENANTS,
    TENANT_COUNTS,
    EVENT_HEARTBEAT_S, EVENT_HUB, LOCAL_OPS, LOCAL_SERVER,
    _DETAIL,
    _BODY,
    STOPPING,
    PRINCIPAL,
    DEFAULT_TENANT_NAME,
    TIER_HEADER,
    _ENTRY_CONTENT_TYPE,
    error_middleware,
    auth_middleware,
    _key,
    _shown,
    _flag,
    _lease,
    _json_keys,
    _count,
    _acting_for,
)
from mmcache.sidecar.event_hub import EventHub
from mmcache.sidecar.openapi import openapi_document
from mmcache.sidecar.streams import batch_get, events
from mmcache.common.tenants import Forbidden, Tenants
from mmcache_client.format import relayout

logger = logging.getLogger(__name__)

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


async def list_entries(request: web.Request) -> web.Response:
    """``GET /v1/entries?namespace=NS&after=KEY&limit=N``: one page of the caller's entries in
    key order (``mmcache.sidecar.listing``); ``next`` is the ``after`` of the next page, null at the end."""
    query = request.query
    unknown = sorted(set(query) - {"namespace", "after", "limit"})
    if unknown:
        raise ValueError(f"unknown query parameters {unknown}: namespace, after and limit are taken")
    try:
        limit = int(query.get("limit", DEFAULT_LIST_LIMIT))
    except ValueError:
        raise ValueError(f"limit={query.get('limit')[:40]!r} must be an integer") from None
    page = await asyncio.to_thread(list_page, request.app[STORE], request[PRINCIPAL], namespace=query.get("namespace"),
                                   after=query.get("after"), limit=limit, acting_for=_acting_for(request))
    return web.json_response(page)


async def claim(request: web.Request) -> web.Response:
    """``POST /v1/claims {"keys": [...], "owner": ID, "ttl_ms": N}``: per key ``exists``, ``won``
    or ``wait`` (with ``ttl_ms`` left); see ``mmcache.core.claims``."""
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


async def stats(request: web.Request) -> web.Response:
    """Everything for the default tenant (with ``"tenants"``: each one's usage and requests); a
    tenant sees its own usage and requests only."""
    store, principal = request.app[STORE], request[PRINCIPAL]
    tenants = request.app.get(TENANTS)
    usage = await asyncio.to_thread(store.usage_by_tenant) if tenants is not None else {}
    counts = request.app.get(TENANT_COUNTS, {})

    def of(tenant: str | None) -> dict:
        name = tenant or DEFAULT_TENANT_NAME
        doc = {"usage": usage.get(tenant, {}), "requests": counts.get(name, {})}
        if tenant in tenants.quotas:
            doc["quota_bytes"] = tenants.quotas[tenant]
        return doc

    if not principal.trusted:
        return web.json_response({"tenant": principal.tenant, **of(principal.tenant)})
    doc = store.stats()
    doc["http"] = request.app[HTTP_COUNTERS].as_dict()
    doc["local"] = {"ops": dict(request.app[LOCAL_OPS])}
    hub = request.app.get(EVENT_HUB)
    if hub is not None:
        doc["events"].update(hub.stats())
    local = request.app.get(LOCAL_SERVER)
    if local is not None:
        doc["local"].update(refused=local.refused, stalled_frames=local.stalled)
    if tenants is not None:
        doc["tenants"] = {name: of(name) for name in tenants.names} | {DEFAULT_TENANT_NAME: of(None)}
    return web.json_response(doc)


async def metrics(request: web.Request) -> web.Response:
    if not request[PRINCIPAL].trusted:
        raise Forbidden("/metrics shows every tenant's totals: the sidecar's own token only")
    return metrics_response(request.app[METRICS].registry)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def openapi(request: web.Request) -> web.Response:
    """``GET /openapi.json``: this API described (``mmcache.sidecar.openapi``)."""
    return web.json_response(openapi_document())


def _store_ctx(config: ServeConfig):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        store = open_store(StoreConfig(
            data_dir=config.data_dir, host_capacity_bytes=config.host_capacity_bytes,
            disk_capacity_bytes=config.disk_capacity_bytes, arena_path=config.arena_path,
            host_policy=config.host_policy, disk_policy=config.disk_policy,
            disk_max_queued_bytes=config.disk_queue_bytes,
            remote=None if config.remote is None else RemoteConfig(
                config.remote, ttl_s=config.remote_ttl_s, timeout_ms=config.remote_timeout_ms,
                required=config.remote_required, max_entry_bytes=config.max_entry_size_bytes),
            node=config.node or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}",
            device_capacity_bytes=config.device_capacity_bytes, device=config.device,
            max_claims=config.max_claims, max_claims_per_owner=config.max_claims_per_owner,
            max_event_followers=config.max_event_followers,
            max_event_followers_per_tenant=config.max_event_followers_per_tenant,
            claim_ttl_max_ms=max(1, int(config.claim_ttl_max_s * 1000)),
            tenant_quotas=app[TENANTS].quotas if TENANTS in app else {}))
        app[STORE] = store
        local = None
        try:
            local = start_local_server(store, config.socket, app.get(TENANTS), app[LOCAL_OPS],
                                       frame_timeout_s=config.header_timeout_s) \
                if config.socket else None
        except BaseException:  # NOTE: the arena is shared memory: a failed start must not leave it behind
            if local is not None:
                await asyncio.to_thread(local.close)
                _unlink(config.socket)
            await asyncio.to_thread(store.close)
            raise
        if local is not None:
            app[LOCAL_SERVER] = local
        hub = EventHub(store.events, EVENT_HEARTBEAT_S)
        hub.start()
        app[EVENT_HUB] = hub
        logger.info("mmcache store up: arena %s, data dir %s, socket %s", store.arena_path, config.data_dir, config.socket)
        try:
            yield
        finally:
            await hub.stop()
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
        hub = app.get(EVENT_HUB)
        if hub is not None:
            await hub.stop()  # NOTE: every event stream ends now; a graceful stop does not wait on them
    app.on_shutdown.append(on_shutdown)
    app[METRICS] = Metrics(lambda: app[STORE].stats(), lambda: app[HTTP_COUNTERS].as_dict())
    app.cleanup_ctx.append(_store_ctx(config))
    entry = "/v1/entries/{ns}/{hash}"
    app.add_routes([
        web.put(entry, put_entry),
        web.get(entry, get_entry, allow_head=False),
        web.head(entry, head_entry),
        web.delete(entry, delete_entry),
        web.get("/v1/entries", list_entries),
        web.post("/v1/lookup", lookup),
        web.post("/v1/batch_get", batch_get),
        web.post("/v1/claims", claim),
        web.post("/v1/claims/release", release_claims),
        web.get("/v1/events", events),
        web.get("/v1/stats", stats),
        web.get("/metrics", metrics),
        web.get("/healthz", healthz),
        web.get("/openapi.json", openapi),
    ])
    return app

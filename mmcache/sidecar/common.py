"""What the sidecar's HTTP handlers share (``mmcache.sidecar.server``, ``mmcache.sidecar.streams``): the
app's keys, the error and auth middlewares, and how a request's keys are read and scoped to its
tenant."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time

from aiohttp import web

from mmcache.sidecar.config import ServeConfig
from mmcache.sidecar.local_session import MAX_KEYS_PER_MESSAGE
from mmcache.common.http_limits import read_body
from mmcache.sidecar.metrics import Metrics
from mmcache.common.security import bearer_matches, bearer_token
from mmcache.core.store import TieredStore
from mmcache.common.tenants import DEFAULT, TENANT_HEADER, Forbidden, Principal, Tenants
from mmcache_client.errors import CacheFull, EntryTooLarge, TooManyKeys, TooManyRequests
from mmcache_client.format import EntryFormatError
from mmcache_client.keys import Key

logger = logging.getLogger("mmcache.sidecar.server")


CONFIG = web.AppKey("config", ServeConfig)
STORE = web.AppKey("store", TieredStore)
METRICS = web.AppKey("metrics", Metrics)
TENANTS = web.AppKey("tenants", Tenants)
TENANT_COUNTS = web.AppKey("tenant_counts", dict)
LOCAL_OPS = web.AppKey("local_ops", dict)
LOCAL_SERVER = web.AppKey("local_server", object)
EVENT_HUB = web.AppKey("event_hub", object)
"""The broadcaster of ``GET /v1/events`` (``mmcache.sidecar.event_hub.EventHub``)."""
"""The Unix-socket server (``mmcache.sidecar.local_server.LocalServer``), where there is one."""
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
MAX_KEYS_PER_CALL = MAX_KEYS_PER_MESSAGE
"""Keys one ``lookup``, ``batch_get`` or claim call takes at most, over HTTP as on the local socket."""
_PARSE_INLINE_BYTES = 16 << 10
"""A JSON body up to this size is parsed on the event loop (~100 keys); a larger one in a thread."""


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
    except TooManyRequests as e:
        response = _error(429, str(e))
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


async def _lease(store: TieredStore, key: str, owner):
    if store.host.contains(key):
        return store.lease(key, owner)
    return await asyncio.to_thread(store.lease, key, owner)  # promotion copies from disk


async def _json_keys(request: web.Request, shape: str = '{"keys": ["ns/hash", ...]}') -> dict[str, str]:
    """The body's keys in the caller's scope: ``{stored key: the key as the caller wrote it}``
    (the whole body in ``request[_BODY]``). At most ``MAX_KEYS_PER_CALL`` keys (more: 413 naming
    the limit); a body past ``_PARSE_INLINE_BYTES`` is parsed and checked off the event loop."""
    body = await read_body(request, _MAX_JSON_BYTES, "JSON body")
    if len(body) <= _PARSE_INLINE_BYTES:
        doc, out = _parse_keys(request, body, shape)
    else:
        doc, out = await asyncio.to_thread(_parse_keys, request, body, shape)
    request[_BODY] = doc
    request[_DETAIL] = doc.get("detail", False)
    return out


def _parse_keys(request: web.Request, body: bytes | bytearray, shape: str) -> tuple[dict, dict[str, str]]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise ValueError(f"body must be JSON: {shape}") from None
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list):
        raise ValueError('body must be {"keys": ["ns/hash", ...]}')
    if len(keys) > MAX_KEYS_PER_CALL:
        raise TooManyKeys(f"too many keys: {len(keys)} in one call, at most {MAX_KEYS_PER_CALL}; split it")
    if not isinstance(doc.get("detail", False), bool):
        raise ValueError('"detail" must be true or false')
    out: dict[str, str] = {}
    for k in keys:
        key = _scoped(request, Key.from_string(k))
        out[key.to_string()] = _shown(request, key)
    return doc, out


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

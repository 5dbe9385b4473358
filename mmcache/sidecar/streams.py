"""The sidecar's streaming routes: ``GET /v1/events`` (server-sent inventory events, with a
heartbeat and a write timeout) and ``POST /v1/batch_get`` (an Arrow IPC stream, one row per
found entry, in bounded memory; ``"promote": false`` for a scan that must not promote)."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time

import pyarrow as pa
from aiohttp import web

from mmcache.sidecar.event_hub import Follower
from mmcache.common.http_limits import HTTP_COUNTERS, PinnedWriter

from mmcache.sidecar.common import (
    CONFIG,
    EVENT_HUB,
    STORE,
    STOPPING,
    EVENT_HEARTBEAT_S,
    EVENT_WRITE_TIMEOUT_S,
    PRINCIPAL,
    _ARROW_CONTENT_TYPE,
    _BODY,
    _lease,
    _json_keys,
)

logger = logging.getLogger("mmcache.sidecar.server")


async def events(request: web.Request) -> web.StreamResponse:
    """``GET /v1/events[?since=SEQ][&scope=local]``: the store's inventory events as server-sent
    events (``id`` the sequence number, ``event`` the kind, ``data`` the JSON event), from
    ``since`` (or ``Last-Event-ID``; default: from now). ``scope=local``: this node's own only,
    not those relayed from the remote's stream. A tenant sees its own keys only. An ``event:
    lost`` says the follower fell more than the bus holds behind (re-read what it indexes). The
    first is ``event: subscribed`` with the sequence number it follows from and the node.

    Followers are capped (429 past ``--max-event-followers``, in all or per tenant), served by
    one broadcaster (``mmcache.sidecar.event_hub``), closed once they stop reading, and their
    connections do not count against ``--max-connections``."""
    bus, principal = request.app[STORE].events, request[PRINCIPAL]
    since_text = request.query.get("since", request.headers.get("Last-Event-ID"))
    if since_text is not None and not since_text.isdigit():
        raise ValueError(f"since={since_text!r} must be a sequence number >= 0")
    scope = request.query.get("scope", "all")
    if scope not in ("all", "local"):
        raise ValueError(f"scope={scope!r} must be all or local")
    tenant = None if principal.trusted else principal.tenant
    bus.admit(tenant)  # NOTE: past a cap: TooManyRequests, a 429 with Retry-After
    streams = request.app[HTTP_COUNTERS].streams
    try:
        seq = int(since_text) if since_text is not None else bus.seq
        stale = seq > bus.seq  # NOTE: a number from before this sidecar restarted (an old Last-Event-ID)
        seq = min(seq, bus.seq)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-MMCache-Node": bus.node})
        await response.prepare(request)
        streams.add(request.protocol)
        await asyncio.wait_for(response.write(
            f"event: subscribed\ndata: {json.dumps({'kind': 'subscribed', 'seq': seq, 'node': bus.node})}\n\n".encode()),
            EVENT_WRITE_TIMEOUT_S)
        follower = Follower(response, request.transport, tenant, scope == "local", seq, lost=stale)
        request.app[EVENT_HUB].add(follower)
        await follower.done
    except (ConnectionResetError, asyncio.TimeoutError) as e:  # the follower left or stopped reading
        logger.debug("events follower gone: %r", e)
    finally:
        streams.discard(request.protocol)
        bus.leave(tenant)
    return response


async def _lease_in_place(store, key: str, owner):
    """``_lease`` without promotion (a lower tier's entry is read where it is)."""
    if store.host.contains(key):
        return store.lease(key, owner, promote=False)
    return await asyncio.to_thread(functools.partial(store.lease, key, owner, promote=False))


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
    budget, not by the answer. Misses are left out. ``"promote": false`` in the body (a scan: an
    export) serves a lower tier's entries in place instead of promoting them into host, so the
    scan leaves host's hot set as it was."""
    store, config = request.app[STORE], request.app[CONFIG]
    keys = await _json_keys(request)
    promote = request[_BODY].get("promote", True)
    if not isinstance(promote, bool):
        raise ValueError('"promote" must be true or false')
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
            lease = await (_lease(store, key, owner) if promote else _lease_in_place(store, key, owner))
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

"""The LLM worker service (``mmcache-llm serve --role prefill|decode|both``): the router's
internal API, JSON in and out, errors as ``{"error": ...}``.

- ``prefill``: ``POST /v1/prefill`` — prompt + image keys → embeddings read in place from the
  cache → prefill → the KV entry put under ``engine.kv_key(request_id)`` → the first token.
- ``decode``: ``POST /v1/decode`` — KV key → KV read in place → the continuous decode batch →
  tokens (JSON, or Server-Sent Events); the KV entry is deleted once copied into the batch.
- ``both``: ``POST /v1/generate`` — the aggregated baseline, no cache: images fetched and encoded
  in process, prefill and decode in one worker.

Statuses: 400 bad input (the message names it; ``max_tokens`` past the model's context
included), 404 a route of another role, 409 an entry the request names is not in the cache
(re-encode / re-prefill, then retry) or a request id already has a KV entry, 413 the prompt's KV
entry exceeds the cache's size limit, 503 the cache is unreachable, the cache is full
(``CacheFull``), the decode queue is full (``max_waiting``), a request's KV found no memory as it
joined the batch, or the worker is shutting down: with ``Retry-After`` where waiting helps; 500
a bug (a failed decode step fails the requests in that step; the worker goes on).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any, AsyncIterator

import torch
from aiohttp import web

from mmcache.common.app import metrics_response
from mmcache_client import AsyncCacheClient, CacheFull, CacheUnavailable, CorruptEntry, EntryTooLarge, Key
from mmcache_client.keys import validate_tenant

from encoder_worker.encoder import Encoder
from encoder_worker.media import MediaError
from encoder_worker.models import ensure_model
from encoder_worker.video import VideoSampling
from llm_worker.engine.decode_loop import RETRY_AFTER_S, DecodeJob, QueueFull, ShuttingDown
from llm_worker.engine.engine import LLMEngine
from llm_worker.engine.slab import KVAllocationError
from llm_worker.serve.config import LLMServeConfig
from llm_worker.serve.service import (LLMService, NotInCache, RequestConflict, WrongRole, _MAX_REQUEST_ID_CHARS,
                                parse_sampling)

logger = logging.getLogger(__name__)

SERVICE = web.AppKey("service", LLMService)
CONFIG = web.AppKey("config", LLMServeConfig)


def _error(status: int, message: str, retry_after_s: float | None = None) -> web.Response:
    headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))} if retry_after_s is not None else None
    return web.json_response({"error": message}, status=status, headers=headers)


def _error_response(request: web.Request, e: Exception) -> web.Response:
    if isinstance(e, MediaError):
        return _error(400, f"{e.kind} {e.index}: {e}" if e.index is not None else str(e))
    if isinstance(e, (NotInCache, RequestConflict)):
        return _error(409, str(e))
    if isinstance(e, CorruptEntry):
        return _error(409, f"a cache entry is corrupt (re-create it): {e}")
    if isinstance(e, WrongRole):
        return _error(404, str(e))
    if isinstance(e, CacheFull):
        return _error(503, f"the cache is full (every byte leased): {e}", e.retry_after_s)
    if isinstance(e, EntryTooLarge):  # NOTE: before ValueError: never fits, whatever the load
        return _error(413, f"the prompt's KV entry exceeds the cache's entry size limit: {e}")
    if isinstance(e, QueueFull):
        return _error(503, str(e), e.retry_after_s)
    if isinstance(e, KVAllocationError):
        return _error(503, f"the decode worker has no memory for this request's KV now: {e}", RETRY_AFTER_S)
    if isinstance(e, CacheUnavailable):
        return _error(503, f"the cache is unavailable: {e}")
    if isinstance(e, ShuttingDown):
        return _error(503, str(e))
    if isinstance(e, ValueError):
        return _error(400, str(e))
    logger.exception("%s %s failed", request.method, request.path, exc_info=e)
    return _error(500, f"internal error: {type(e).__name__}: {e}")


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Maps domain errors to statuses; counts work requests (POST), errors and those in flight."""
    service = request.app[SERVICE]
    counted = request.method == "POST"
    if counted:
        service.counters["requests"] += 1
        service.counters["active"] += 1
        service.metrics.active.inc()
    try:
        response = await handler(request)
    except web.HTTPException as e:
        if e.empty_body:
            raise
        if e.content_type == "application/json":  # NOTE: already a JSON error body: kept, with its challenge
            response = web.Response(status=e.status, text=e.text, content_type="application/json")
            response.headers.update({k: v for k, v in e.headers.items() if k.lower() == "www-authenticate"})
        else:
            response = _error(e.status, e.reason)
    except Exception as e:
        response = _error_response(request, e)
    finally:
        if counted:
            service.counters["active"] -= 1
            service.metrics.active.dec()
    if counted:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "other"
        service.metrics.requests.labels(route, str(response.status)).inc()
        if response.status >= 400:
            service.counters["errors"] += 1
    return response


def _service(request: web.Request, role: str) -> LLMService:
    service = request.app[SERVICE]
    # NOTE: an elastic worker gates its routes by its current role itself (llm_worker.elastic.app)
    if service.config.role not in (role, "elastic"):
        raise WrongRole(f"{request.path} is served by {role} workers; this one is a {service.config.role} worker")
    return service


async def _json_body(request: web.Request) -> dict:
    try:
        doc = await request.json()
    except ValueError:
        raise ValueError("the body must be a JSON object") from None
    if not isinstance(doc, dict):
        raise ValueError("the body must be a JSON object")
    return doc


def _request_id(doc: dict) -> str:
    rid = doc.get("request_id")
    if not isinstance(rid, str) or not rid or len(rid) > _MAX_REQUEST_ID_CHARS:
        raise ValueError(f'"request_id" must be a non-empty string of at most {_MAX_REQUEST_ID_CHARS} chars')
    return rid


def _key(doc: Any, where: str) -> Key:
    if not isinstance(doc, dict) or not isinstance(doc.get("namespace"), str) or not isinstance(doc.get("hash"), str):
        raise ValueError(f'{where} must be {{"namespace": str, "hash": str}}')
    try:
        # NOTE: "tenant@namespace" (from a router with tenants) names that tenant's entry.
        return Key.from_string(f'{doc["namespace"]}/{doc["hash"]}')
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _stream_flag(doc: dict) -> bool:
    stream = doc.get("stream", False)
    if not isinstance(stream, bool):
        raise ValueError('"stream" must be true or false')
    return stream


async def prefill_handler(request: web.Request) -> web.Response:
    service = _service(request, "prefill")
    doc = await _json_body(request)
    request_id = _request_id(doc)
    images = doc.get("images", [])
    if not isinstance(images, list):
        raise ValueError('"images" must be a list of {"namespace", "hash"} in prompt order')
    if len(images) > service.config.max_images_per_request:
        raise ValueError(f"{len(images)} images exceed max_images_per_request={service.config.max_images_per_request}")
    keys = [_key(image, f"images[{i}]") for i, image in enumerate(images)]
    videos = doc.get("videos", [])
    if not isinstance(videos, list) or not all(isinstance(v, list) and v for v in videos):
        raise ValueError('"videos" must be a list, per video of its frame groups\' {"namespace", "hash"} in order')
    if sum(map(len, videos)) > service.config.max_video_groups:
        raise ValueError(f"{sum(map(len, videos))} video frame groups exceed {service.config.max_video_groups}")
    video_keys = [[_key(g, f"videos[{j}][{k}]") for k, g in enumerate(v)] for j, v in enumerate(videos)]
    sampling = parse_sampling(doc.get("sampling"))
    ids = doc.get("prompt_ids")
    if ids is not None and (not isinstance(ids, list) or not ids
                            or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
        raise ValueError('"prompt_ids" must be a non-empty list of token ids')
    return web.json_response(await service.prefill(request_id, doc.get("messages"), keys, sampling, ids, video_keys))


async def decode_handler(request: web.Request) -> web.StreamResponse:
    service = _service(request, "decode")
    doc = await _json_body(request)
    request_id = _request_id(doc)
    kv = service.engine.kv_key(request_id)
    given = _key(doc["kv"], '"kv"') if doc.get("kv") is not None else kv
    if given != kv:
        raise ValueError(f'"kv" {given} is not the KV key of request_id {request_id!r} ({kv})')
    sampling, stream = parse_sampling(doc.get("sampling")), _stream_flag(doc)
    job = await service.decode(request_id, kv, sampling)
    return await _respond(request, service, job, stream)


async def generate_handler(request: web.Request) -> web.StreamResponse:
    service = _service(request, "both")
    doc = await _json_body(request)
    sampling, stream = parse_sampling(doc.get("sampling")), _stream_flag(doc)
    tenant = doc.get("tenant")
    if tenant is not None:
        validate_tenant(tenant)
    try:
        video = VideoSampling.from_options(doc.get("video"), service.config.video_sampling,
                                           service.config.video.max_frames)
    except ValueError as e:
        raise ValueError(f'"video": {e}') from None
    job = await service.generate(doc.get("messages"), sampling, tenant, video)
    return await _respond(request, service, job, stream)


def _sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _respond(request: web.Request, service: LLMService, job: DecodeJob, stream: bool) -> web.StreamResponse:
    """The job's output: one JSON answer, or SSE ``{"text": delta, "token_id"}`` per token, a
    ``{"finish_reason", ...}`` event and ``[DONE]``. Leaving early abandons the job."""
    async with job:
        if stream:
            return await _stream(request, service, job)
        events = [event async for event in job]
    last, token_ids = events[-1], [e.token_id for e in events]
    service.count_completion(len(token_ids))
    return web.json_response({"text": last.text, "token_ids": token_ids, "finish_reason": last.finish_reason,
                              "completion_tokens": len(token_ids), "prompt_tokens": job.state.num_prompt_tokens})


async def _stream(request: web.Request, service: LLMService, job: DecodeJob) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    try:
        await response.prepare(request)
        sent = 0
        try:
            async for event in job:
                await response.write(_sse({"text": event.text[sent:], "token_id": event.token_id}))
                sent = len(event.text)
            service.count_completion(event.num_tokens)
            last = {"finish_reason": event.finish_reason, "completion_tokens": event.num_tokens,
                    "prompt_tokens": job.state.num_prompt_tokens}
        except ConnectionResetError:
            raise
        except Exception as e:  # NOTE: the status line is gone: the error becomes the stream's last event
            service.counters["errors"] += 1
            answer = _error_response(request, e)
            last = {"error": json.loads(answer.text)["error"], "status": answer.status}
            if "Retry-After" in answer.headers:
                last["retry_after_s"] = int(answer.headers["Retry-After"])
        await response.write(_sse(last))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionResetError:
        pass  # NOTE: the client left; _respond abandons the job
    return response


async def stats_handler(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVICE].stats())


async def metrics_handler(request: web.Request) -> web.Response:
    return metrics_response(request.app[SERVICE].metrics.registry)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "role": request.app[SERVICE].config.role})


def _resolve_device(device: str | None) -> str:
    # NOTE: is_available() counts devices without creating a CUDA context.
    return device if device is not None else "cuda" if torch.cuda.is_available() else "cpu"


def _service_ctx(config: LLMServeConfig, engine: Any | None, encoder: Any | None):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        eng, enc = engine, encoder
        if eng is None or (config.role == "both" and enc is None):
            model_dir = await asyncio.to_thread(ensure_model, config.model, config.data_dir)
            device = _resolve_device(config.device)
            if eng is None:
                eng = await asyncio.to_thread(LLMEngine.load, model_dir, device, config.dtype)
            if config.role == "both" and enc is None:
                enc = await asyncio.to_thread(Encoder.load, model_dir, device, config.dtype)
        cache = None if config.role == "both" else AsyncCacheClient(config.cache_url, token=config.cache_token)
        service = LLMService(config, eng, cache, enc)
        await service.start()
        app[SERVICE] = service
        logger.info("llm worker up: role %s, model %s, namespace %s, cache %s", config.role, config.model,
                    eng.namespace, config.cache_url)
        try:
            yield
        finally:
            await service.close()
    return ctx


def create_app(config: LLMServeConfig, engine: Any | None = None, encoder: Any | None = None) -> web.Application:
    """``engine`` / ``encoder`` inject ready models (tests, in-process stacks); else they are loaded here."""
    app = web.Application(middlewares=[error_middleware], client_max_size=256 << 20)
    app[CONFIG] = config
    app.cleanup_ctx.append(_service_ctx(config, engine, encoder))
    app.add_routes([
        web.post("/v1/prefill", prefill_handler),
        web.post("/v1/decode", decode_handler),
        web.post("/v1/generate", generate_handler),
        web.get("/v1/stats", stats_handler),
        web.get("/metrics", metrics_handler),
        web.get("/healthz", healthz),
    ])
    return app

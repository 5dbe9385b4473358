"""The encode service (``mmcache-encoder serve``): every image encoded once, cluster-wide.

Per image: fetch → hash the raw bytes → look the key up in the cache → encode the misses
(single-flight, dynamically batched, off the event loop) → put them in the cache → answer.

Statuses: 400 a bad image or body (the message names the image), 503 with ``Retry-After`` the
encode queue is full (``max_queued_images``) or the cache is full (``CacheFull``: every byte
leased), 503 the cache is unreachable, 500 a bug.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from typing import Any, AsyncIterator

from aiohttp import web

from mmcache.common.app import metrics_response

from encoder_worker.batcher import QueueFull
from encoder_worker.media import MediaError
from mmcache_client import AsyncCacheClient, CacheFull, CacheUnavailable
from mmcache_client.keys import validate_tenant
from encoder_worker.config import EncoderServeConfig
from encoder_worker.service import EncodeService
from encoder_worker.video import VideoSampling

logger = logging.getLogger(__name__)


SERVICE = web.AppKey("service", EncodeService)
CONFIG = web.AppKey("config", EncoderServeConfig)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.empty_body:
            raise
        return web.json_response({"error": e.reason if e.content_type != "application/json" else e.text},
                                 status=e.status)
    except MediaError as e:
        where = f"{e.kind} {e.index}: " if e.index is not None else ""
        return web.json_response({"error": f"{where}{e}"}, status=400)
    except QueueFull as e:
        return _retry_later(str(e), e.retry_after_s)
    except CacheFull as e:  # NOTE: a put of an encoded image found every byte leased
        return _retry_later(f"the cache is full (every byte leased): {e}", e.retry_after_s)
    except CacheUnavailable as e:
        return web.json_response({"error": f"the cache is unavailable: {e}"}, status=503)
    except ValueError as e:
        return web.json_response({"error": str(e)}, status=400)
    except Exception as e:
        logger.exception("%s %s failed", request.method, request.path)
        return web.json_response({"error": f"internal error: {type(e).__name__}: {e}"}, status=500)


def _retry_later(message: str, retry_after_s: float) -> web.Response:
    return web.json_response({"error": message}, status=503,
                             headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})


async def encode_handler(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    t0 = time.perf_counter()
    try:
        doc = await request.json()
    except ValueError:
        raise ValueError('body must be JSON: {"images": ["data:image/png;base64,...", ...]}') from None
    if not isinstance(doc, dict):
        raise ValueError('body must be a JSON object: {"images": [...], "videos": [{"url": ...}]}')
    images = doc.get("images", [])
    videos = doc.get("videos", [])
    if not isinstance(images, list) or not all(isinstance(u, str) for u in images):
        raise ValueError('"images" must be a list of strings (data:, http(s)://, file:// URLs)')
    if not isinstance(videos, list) or not images and not videos:
        raise ValueError('"images" (a list of URL strings) or "videos" (a list of {"url", "fps", "max_frames"}) '
                         'must be non-empty')
    if len(images) + len(videos) > service.config.max_images_per_request:
        raise ValueError(f"{len(images) + len(videos)} images and videos exceed max_images_per_request="
                         f"{service.config.max_images_per_request}")
    if len(videos) > service.config.video.max_videos_per_request:
        raise ValueError(f"{len(videos)} videos exceed max_videos_per_request={service.config.video.max_videos_per_request}")
    clips = []
    for k, video in enumerate(videos):
        if not isinstance(video, dict) or not isinstance(video.get("url"), str):
            raise ValueError(f'videos[{k}] must be an object with a "url" string')
        try:
            sampling = VideoSampling.from_options({n: v for n, v in video.items() if n != "url"},
                                                  VideoSampling(), service.config.video.max_frames)
        except ValueError as e:
            raise ValueError(f"video {k}: {e}") from None
        clips.append((video["url"], sampling))
    tenant = doc.get("tenant")
    if tenant is not None:
        validate_tenant(tenant)
    answer = await service.encode(images, tenant, clips)
    service.metrics.request_seconds.observe(time.perf_counter() - t0)
    return web.json_response(answer)


async def models_handler(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    return web.json_response({"object": "list", "data": [{
        "id": service.config.model, "object": "model", "namespace": service.namespace,
        "model_type": getattr(service.encoder, "model_type", "unknown")}]})


async def stats_handler(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    return web.json_response({"namespace": service.namespace, "model": service.config.model, "pid": os.getpid(),
                              **service.counters,
                              "claims": service.config.claims, "claim_owner": service.owner,
                              "claims_held": len(service._held), "events_connected": service._events_up,
                              "inflight": service.batcher.inflight, "queued": service.batcher.queued,
                              "single_flight_joins": service.batcher.joins, "schedule": service.batcher.schedule,
                              "max_queued": service.batcher.max_queued, "refused": service.batcher.refused,
                              "schedule_overtakes": service.batcher.overtakes})


async def metrics_handler(request: web.Request) -> web.Response:
    return metrics_response(request.app[SERVICE].metrics.registry)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _service_ctx(config: EncoderServeConfig, encoder: Any | None):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        enc = encoder
        if enc is None:
            from encoder_worker.encoder import Encoder
            from encoder_worker.models import ensure_model

            model_dir = await asyncio.to_thread(ensure_model, config.model, config.data_dir)
            enc = await asyncio.to_thread(Encoder.load, model_dir, salt=config.salt)
        service = EncodeService(enc, AsyncCacheClient(config.cache_url, token=config.cache_token), config)
        await service.start()
        app[SERVICE] = service
        logger.info("encoder up: model %s, namespace %s, cache %s", config.model, service.namespace, config.cache_url)
        try:
            yield
        finally:
            await service.close()
    return ctx


def create_app(config: EncoderServeConfig, encoder: Any | None = None) -> web.Application:
    """``encoder`` injects a ready model (tests, in-process stacks); else it is loaded here."""
    app = web.Application(middlewares=[error_middleware], client_max_size=256 << 20)
    app[CONFIG] = config
    app.cleanup_ctx.append(_service_ctx(config, encoder))
    app.add_routes([
        web.post("/v1/encode", encode_handler),
        web.get("/v1/models", models_handler),
        web.get("/v1/stats", stats_handler),
        web.get("/metrics", metrics_handler),
        web.get("/healthz", healthz),
    ])
    return app

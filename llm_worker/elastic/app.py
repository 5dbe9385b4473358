"""The elastic worker's HTTP face (``mmcache-llm serve --role elastic --initial-role R``).

It holds the vision tower and the language model, and composes the real encode service
(``encoder_worker.service.EncodeService``: single flight, batching, claims, cache puts) with the
LLM service (prefill, and decode with its ``DecodeLoop``). It serves the routes of its current
role only (``llm_worker.elastic.role.ElasticRole``):

- ``POST /v1/encode`` (role ``encode``): the encoder's body and answer (``encoder_worker.app``);
- ``POST /v1/prefill`` / ``POST /v1/decode`` (roles ``prefill`` / ``decode``): as ``llm_worker.serve.app``;
- ``POST /v1/role {"role": R}``: drain the current role, then serve R: ``{"role", "previous",
  "drained_s"}``; 400 an unknown role, 409 a switch already under way, a no-op for the role it has;
- ``GET /v1/stats``: the LLM's and the encoder's counters, ``role``, ``switching``, the switch
  history and ``load`` (``llm_worker.elastic.load``: the controller's signals); ``GET /healthz``: role too.

A request for a role the worker does not serve now (or is draining away from) is a 503 with
``Retry-After``, never a 404: the router retries a 5xx on another worker of that stage.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from typing import Any, AsyncIterator

from aiohttp import web

import encoder_worker.app as encoder_app
from encoder_worker.batcher import QueueFull as EncodeQueueFull
from encoder_worker.config import EncoderServeConfig
from encoder_worker.encoder import Encoder
from encoder_worker.models import ensure_model
from encoder_worker.service import EncodeService
from llm_worker.serve import app as llm_app
from llm_worker.serve.config import LLMServeConfig
from llm_worker.elastic.role import ElasticRole, NotServing, SwitchInProgress
from llm_worker.engine.engine import LLMEngine
from llm_worker.elastic.load import LoadMeter
from llm_worker.serve.service import LLMService
from mmcache.common.security import check_control
from mmcache_client import AsyncCacheClient

logger = logging.getLogger(__name__)

ELASTIC = web.AppKey("elastic", ElasticRole)
METER = web.AppKey("meter", LoadMeter)
ENCODE = encoder_app.SERVICE
"""The encode service, under the encoder app's key: its ``encode_handler`` runs here unchanged."""
LLM = llm_app.SERVICE


def encoder_config(config: LLMServeConfig) -> EncoderServeConfig:
    """The encode service's settings, from the worker's flags."""
    return EncoderServeConfig(cache_url=config.cache_url, model=config.model, data_dir=config.data_dir,
                              host=config.host, port=config.port, max_batch=config.encoder_batch,
                              max_images_per_request=config.max_images_per_request, cache_token=config.cache_token,
                              media=config.media, video=config.video, schedule=config.encoder_schedule)


def _retry_later(message: str, retry_after_s: float) -> web.Response:
    return web.json_response({"error": message}, status=503,
                             headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})


@web.middleware
async def elastic_middleware(request: web.Request, handler) -> web.StreamResponse:
    """The elastic worker's own errors; the rest go on to ``llm_worker.serve.app.error_middleware``
    (which maps the LLM's and the cache's errors, and the encoder's ``MediaError`` as a 400 naming
    the image, as the encoder does)."""
    try:
        return await handler(request)
    except NotServing as e:
        return _retry_later(str(e), e.retry_after_s)
    except EncodeQueueFull as e:
        return _retry_later(str(e), e.retry_after_s)
    except SwitchInProgress as e:
        return web.json_response({"error": str(e)}, status=409)


def _gated(role: str, handler):
    async def gated(request: web.Request) -> web.StreamResponse:
        with request.app[ELASTIC].serving(role):
            return await handler(request)
    return gated


async def role_handler(request: web.Request) -> web.Response:
    """``POST /v1/role``: needs the stack's control credential (``LLMServeConfig.stack_token``)."""
    check_control(request, request.app[llm_app.CONFIG].stack_token)
    doc = await llm_app._json_body(request)
    role = doc.get("role")
    if not isinstance(role, str):
        raise ValueError('the body must be {"role": "encode" | "prefill" | "decode"}')
    return web.json_response(await request.app[ELASTIC].switch(role))


def _encoder_stats(service: EncodeService) -> dict:
    """What the router's totals read from an encoder (its ``requests`` as ``encode_requests``)."""
    counters = {("encode_requests" if k == "requests" else k): v for k, v in service.counters.items()}
    batcher = service.batcher
    return {**counters, "encoder_namespace": service.namespace, "encode_inflight": batcher.inflight,
            "queued": batcher.queued, "single_flight_joins": batcher.joins, "schedule": batcher.schedule,
            "refused": batcher.refused}


async def stats_handler(request: web.Request) -> web.Response:
    elastic, meter = request.app[ELASTIC], request.app[METER]
    out = {**_encoder_stats(request.app[ENCODE]), **request.app[LLM].stats()}
    info = elastic.info()
    out.update(role=info["role"], elastic=True, switching=info["switching"], target=info["target"],
               switches=info["switches"], switch_history=info["history"], load=meter.snapshot(info["inflight"]))
    return web.json_response(out)


async def healthz(request: web.Request) -> web.Response:
    elastic = request.app[ELASTIC]
    return web.json_response({"status": "ok", "role": elastic.role, "elastic": True, "switching": elastic.switching})


class _MeteredEncoder:
    """The encoder, its forwards (on the batcher's thread) counted as the worker's busy time."""

    def __init__(self, encoder: Any, meter: LoadMeter) -> None:
        self._encoder, self._meter = encoder, meter

    def encode(self, items: list) -> list:
        token = self._meter.begin()
        try:
            return self._encoder.encode(items)
        finally:
            self._meter.end(token)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)


def _elastic_ctx(config: LLMServeConfig, encode_config: EncoderServeConfig, engine: Any | None, encoder: Any | None):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        eng, enc = engine, encoder
        if eng is None or enc is None:
            model_dir = await asyncio.to_thread(ensure_model, config.model, config.data_dir)
            device = llm_app._resolve_device(config.device)
            if eng is None:
                eng = await asyncio.to_thread(LLMEngine.load, model_dir, device, config.dtype)
            if enc is None:
                enc = await asyncio.to_thread(Encoder.load, model_dir, device, config.dtype)
        meter = LoadMeter(config.load_window_s)
        llm = LLMService(config, eng, AsyncCacheClient(config.cache_url, token=config.cache_token))
        llm.load = meter
        encode = EncodeService(_MeteredEncoder(enc, meter),
                               AsyncCacheClient(config.cache_url, token=config.cache_token), encode_config)
        counted = encode.batcher.on_batch

        def on_batch(stats) -> None:  # NOTE: the batcher's hook, chained: an image's wait in its queue
            counted(stats)
            meter.observe_wait(stats.wait_ms / 1e3)
        encode.batcher.on_batch = on_batch
        loop = llm.decode_loop
        oldest = {"encode": encode.batcher.oldest_wait_s, "prefill": None, "decode": loop.oldest_wait_s}

        def on_switch(previous: str, role: str) -> None:
            meter.reset()  # NOTE: the signals are the new stage's from here
            meter.oldest_wait = oldest[role]
        # NOTE: behind the requests: a decode batch (a client that left still holds its row until
        # the next step) and the encode batcher (an image whose requests left is still encoded).
        elastic = ElasticRole(config.initial_role, idle={
            "encode": lambda: encode.batcher.inflight == 0,
            "decode": lambda: loop.num_running == 0 and loop.num_waiting == 0}, on_switch=on_switch)
        meter.oldest_wait = oldest[config.initial_role]
        await llm.start()
        try:
            await encode.start()
        except BaseException:
            await llm.close()
            raise
        app[LLM], app[ENCODE], app[ELASTIC], app[METER] = llm, encode, elastic, meter
        logger.info("elastic worker up: serving %s, model %s, namespace %s, cache %s (pid %d)", elastic.role,
                    config.model, eng.namespace, config.cache_url, os.getpid())
        try:
            yield
        finally:
            await encode.close()
            await llm.close()
    return ctx


def create_app(config: LLMServeConfig, engine: Any | None = None, encoder: Any | None = None) -> web.Application:
    """``engine`` / ``encoder`` inject ready models (tests); else they are loaded here."""
    if config.role != "elastic":
        raise ValueError(f"the elastic app serves role 'elastic', not {config.role!r}")
    encode_config = encoder_config(config)  # NOTE: checked now, before any model loads
    app = web.Application(middlewares=[llm_app.error_middleware, elastic_middleware], client_max_size=256 << 20)
    app[llm_app.CONFIG] = config
    app.cleanup_ctx.append(_elastic_ctx(config, encode_config, engine, encoder))
    app.add_routes([
        web.post("/v1/encode", _gated("encode", encoder_app.encode_handler)),
        web.post("/v1/prefill", _gated("prefill", llm_app.prefill_handler)),
        web.post("/v1/decode", _gated("decode", llm_app.decode_handler)),
        web.post("/v1/role", role_handler),
        web.get("/v1/models", encoder_app.models_handler),  # NOTE: its encoder's namespace (mmcache warm reads it)
        web.get("/v1/stats", stats_handler),
        web.get("/metrics", llm_app.metrics_handler),
        web.get("/healthz", healthz),
    ])
    return app

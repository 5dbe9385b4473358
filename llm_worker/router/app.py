"""The router's HTTP face (``mmcache-llm router``): the OpenAI routes, the stack's stats and
metrics, the API-key and tenant check, and the app's lifecycle. The pipeline itself (encode,
prefill, decode over node groups) is ``llm_worker.router.router.Router``."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from llm_worker.router import openai_api as api
from llm_worker.router.backends import TokenStream
from llm_worker.elastic.controller import SwitchRefused
from llm_worker.router.openai_api import APIError, ChatRequest, completion_id, parse_chat_request
from llm_worker.engine.prompt import PromptTokens
from llm_worker.router.router import _RETRY_AFTER_S, Router, RouterConfig
from mmcache.common.app import metrics_response
from mmcache.common.security import bearer_matches, bearer_token, is_loopback
from mmcache.common.tenants import DEFAULT, Tenants

logger = logging.getLogger("llm_worker.router.router")

ROUTER = web.AppKey("router", Router)
CONFIG = web.AppKey("config", RouterConfig)
TENANTS = web.AppKey("tenants", Tenants)
TENANT = web.RequestKey("tenant", str) if hasattr(web, "RequestKey") else "mmcache.tenant"  # aiohttp < 3.12


def _error_response(e: APIError) -> web.Response:
    return web.json_response(e.body(), status=e.status, headers=e.headers())


def _sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    router = request.app[ROUTER]
    t0 = time.perf_counter()
    router.counters["requests"] += 1
    if router.counters["active"] >= router.config.max_inflight:  # NOTE: refused before the body is read
        router.counters["errors"] += 1
        router.metrics.stage_errors.labels("router").inc()
        router.metrics.requests.labels("503").inc()
        return _error_response(APIError(503, f"the router has {router.counters['active']} requests in flight "
                                             f"(max_inflight={router.config.max_inflight}); retry later",
                                        retry_after_s=_RETRY_AFTER_S))
    router.counters["active"] += 1
    router.metrics.active.inc()
    try:
        response = await _chat(request, router, t0)
    except APIError as e:
        router.counters["errors"] += 1
        router.metrics.stage_errors.labels(e.stage).inc()
        response = _error_response(e)
    finally:
        router.counters["active"] -= 1
        router.metrics.active.dec()
    router.metrics.requests.labels(str(response.status)).inc()
    return response


async def _chat(request: web.Request, router: Router, t0: float) -> web.StreamResponse:
    try:
        doc = await request.json()
    except ValueError:
        raise APIError(400, "the body must be a JSON object") from None
    req = parse_chat_request(doc, router.config.default_max_tokens)
    if req.model != router.config.model_id:
        raise APIError(404, f"The model `{req.model}` does not exist (this server serves "
                            f"`{router.config.model_id}`).", param="model")
    cid = completion_id()
    stream = await router.open(req, cid, request.get(TENANT))
    try:
        first = await stream.next()
        router.metrics.ttft.observe(time.perf_counter() - t0)
        if req.stream:
            return await _relay(request, router, req, cid, stream, first, t0)
        events = [first]
        while "finish_reason" not in events[-1]:
            events.append(await stream.next())
    finally:
        stream.close()
    final, tokens = events[-1], events[:-1]
    router.counters["prompt_tokens"] += final["prompt_tokens"]
    router.counters["completion_tokens"] += len(tokens)
    router.metrics.e2e.observe(time.perf_counter() - t0)
    token_ids = [e["token_id"] for e in tokens]
    body = api.completion(cid, req.model, "".join(e["text"] for e in tokens), final["finish_reason"],
                          final["prompt_tokens"], token_ids)
    if not req.return_token_ids:
        body["choices"][0].pop("token_ids")
    return web.json_response(body)


async def _relay(request: web.Request, router: Router, req: ChatRequest, cid: str, stream: TokenStream,
                 event: dict, t0: float) -> web.StreamResponse:
    """Worker events → OpenAI chunks; an error after the first byte ends the stream with an
    ``{"error": ...}`` event (as vLLM does) before ``[DONE]``."""
    created = int(time.time())
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    await response.write(_sse(api.chunk(cid, req.model, created, {"role": "assistant", "content": ""})))
    num_tokens = 0
    try:
        while "finish_reason" not in event:
            num_tokens += 1
            # NOTE: a token that ends inside a UTF-8 sequence has no text yet; its chunk is skipped
            # unless the client wants the ids.
            if event["text"] or req.return_token_ids:
                ids = [event["token_id"]] if req.return_token_ids else None
                await response.write(_sse(api.chunk(cid, req.model, created, {"content": event["text"]},
                                                    token_ids=ids)))
            event = await stream.next()
        await response.write(_sse(api.chunk(cid, req.model, created, {}, event["finish_reason"])))
        if req.include_usage:
            await response.write(_sse(api.usage_chunk(cid, req.model, created, event["prompt_tokens"], num_tokens)))
        router.counters["prompt_tokens"] += event["prompt_tokens"]
        router.metrics.e2e.observe(time.perf_counter() - t0)
    except APIError as e:
        router.counters["errors"] += 1
        router.metrics.stage_errors.labels(e.stage).inc()
        await response.write(_sse(e.body()))
    router.counters["completion_tokens"] += num_tokens
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def models_handler(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    return web.json_response({"object": "list", "data": [
        {"id": config.model_id, "object": "model", "created": 0, "owned_by": "mmcache", "mode": config.mode}]})


def _operator_only(request: web.Request) -> None:
    """The stack's stats and metrics show every tenant's traffic: the default tenant's key only."""
    if request.get(TENANT) is not None:
        raise APIError(403, f"{request.path} shows the whole stack: it needs the operator's API key, "
                            "not a tenant's")


async def stats_handler(request: web.Request) -> web.Response:
    _operator_only(request)
    return web.json_response(await request.app[ROUTER].stats())


async def elastic_switch_handler(request: web.Request) -> web.Response:
    """``POST /v1/elastic/switch {"url": WORKER, "role": "encode" | "prefill" | "decode"}``: an
    operator's switch, through the controller's path and history: the record (``ok``), a 502
    naming the worker's error when it could not switch, a 409 while another switch is under way
    or for a stage's last worker."""
    _operator_only(request)
    # NOTE: a switch drains a worker: with no API key only a local operator may ask for one
    if request.app[ROUTER].config.api_key is None and not is_loopback(request.remote or ""):
        raise APIError(403, f"{request.path} moves workers: from {request.remote} it needs the router to have an "
                            "API key (MMCACHE_API_KEY); without one only loopback clients may switch")
    controller = request.app[ROUTER].elastic
    if controller is None:
        raise APIError(404, "this router moves no workers: start it with --elastic")
    try:
        doc = await request.json()
    except ValueError:
        raise APIError(400, 'the body must be {"url": WORKER_URL, "role": "encode" | "prefill" | "decode"}') from None
    if not isinstance(doc, dict) or not isinstance(doc.get("url"), str) or not isinstance(doc.get("role"), str):
        raise APIError(400, 'the body must be {"url": WORKER_URL, "role": "encode" | "prefill" | "decode"}')
    backend = controller.find(doc["url"])
    if backend is None:
        raise APIError(404, f"{doc['url']} is none of this router's workers", param="url")
    try:
        record = await controller.switch(backend, doc["role"], {"manual": True})
    except SwitchRefused as e:
        raise APIError(e.status, str(e)) from None
    if not record["ok"]:
        raise APIError(502, f"{backend.url} could not switch to {doc['role']}: {record.get('error')}")
    return web.json_response(record)


async def metrics_handler(request: web.Request) -> web.Response:
    _operator_only(request)
    return metrics_response(request.app[ROUTER].metrics.registry)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "mode": request.app[CONFIG].mode})


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Routing errors (404, 405) and bugs as OpenAI error JSON too."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.empty_body or e.status < 400:
            raise
        return _error_response(APIError(e.status, e.reason))
    except APIError as e:
        return _error_response(e)
    except Exception as e:
        logger.exception("%s %s failed", request.method, request.path)
        return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}"))


@web.middleware
async def api_key_middleware(request: web.Request, handler) -> web.StreamResponse:
    """OpenAI's authentication: ``Authorization: Bearer KEY`` (the scheme in any case), else a
    401 with OpenAI's error JSON."""
    api_key, tenants = request.app[CONFIG].api_key, request.app.get(TENANTS)
    if request.path != "/healthz" and (api_key or tenants is not None):
        header = request.headers.get("Authorization")
        if tenants is not None:
            principal = tenants.authenticate(bearer_token(header))
        else:
            principal = DEFAULT if bearer_matches(header, api_key) else None
        if principal is None:
            e = APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'.")
            return web.json_response(e.body(), status=401, headers={"WWW-Authenticate": "Bearer"})
        request[TENANT] = principal.tenant
    return await handler(request)


def load_tokenizer(model_dir: str) -> tuple[Any, PromptTokens, int | None]:
    """The checkpoint's tokenizer (with its chat template), image and video tokens and context
    length (the language model's ``max_position_embeddings``; None when its config has none)."""
    from transformers import AutoConfig, AutoTokenizer

    from llm_worker.engine.text_models import family_of

    config = AutoConfig.from_pretrained(model_dir)
    family = family_of(config)
    tokens = PromptTokens(family.image_token_id(config), family.video_token_id(config))
    text_config = getattr(config, "text_config", config)
    max_model_len = getattr(text_config, "max_position_embeddings", None)
    return AutoTokenizer.from_pretrained(model_dir), tokens, max_model_len


def _router_ctx(config: RouterConfig, tokenizer: Any | None, image_token_id: PromptTokens | int | None,
                max_model_len: int | None):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        tok, image_token, context = tokenizer, image_token_id, max_model_len
        if tok is None:
            from encoder_worker.models import ensure_model

            model_dir = await asyncio.to_thread(ensure_model, config.model, config.data_dir)
            tok, image_token, context = await asyncio.to_thread(load_tokenizer, model_dir)
        router = Router(config, tok, image_token, context)
        await router.start()
        app[ROUTER] = router
        logger.info("router up (%s): model %s; %s", config.mode, config.model_id,
                    " | ".join(f"{g.name}: " + "; ".join(f"{role}: {', '.join(b.url for b in pool.backends)}"
                                                         for role, pool in g.pools.items()) for g in router.groups))
        try:
            yield
        finally:
            await router.close()
    return ctx


def create_app(config: RouterConfig, tokenizer: Any | None = None, image_token_id: PromptTokens | int | None = None,
               max_model_len: int | None = None) -> web.Application:
    """``tokenizer`` / ``image_token_id`` / ``max_model_len`` inject what ``load_tokenizer`` gives
    (tests); else it is loaded here. An injected tokenizer without ``max_model_len`` leaves the
    context check to the workers."""
    app = web.Application(middlewares=[error_middleware, api_key_middleware], client_max_size=256 << 20)
    app[CONFIG] = config
    if config.tenants:
        app[TENANTS] = Tenants.load(config.tenants, admin_token=config.api_key)
    app.cleanup_ctx.append(_router_ctx(config, tokenizer, image_token_id, max_model_len))
    app.add_routes([
        web.post("/v1/chat/completions", chat_completions),
        web.get("/v1/models", models_handler),
        web.get("/v1/stats", stats_handler),
        web.post("/v1/elastic/switch", elastic_switch_handler),
        web.get("/metrics", metrics_handler),
        web.get("/healthz", healthz),
    ])
    return app

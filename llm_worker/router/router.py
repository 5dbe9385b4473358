"""The router (``mmcache-llm router``): the stack's OpenAI-compatible front door.

``POST /v1/chat/completions`` in EPD mode: the chat template is applied here (one image token
per image part, checked before any image is fetched); the request's images are split into
contiguous runs over the least-busy encoders and encoded in parallel; prefill gets the template
ids and the image keys, reads the embeddings from the cache and hands the KV to decode through
it; decode's tokens stream back as OpenAI chunks. In aggregated mode (``--generate``) the request
goes whole to a ``both`` worker. The HTTP routes (``/v1/models``, ``/v1/stats``, ``/metrics``,
``/healthz``) and the app are in ``llm_worker.router.app``.

Bounds: at most ``max_inflight`` requests at once (more get 503 + ``Retry-After``); a
``max_tokens`` (or ``max_completion_tokens``) past the model's context minus the prompt is a 400,
checked against the template's ids before any image is fetched and against the exact prompt
(image tokens counted) once the encoders have answered; no ``max_tokens`` means the default,
cut to what fits. A worker's 503 reaches the client as a 503 with its ``Retry-After``.

Elastic (``--elastic``): every EPD worker can change stage while serving, and
``llm_worker.elastic.controller`` moves workers between the pools as the load shifts; a worker
that is draining answers 503, which is retried on another worker of the stage like any 5xx.

Failures: a worker that cannot be reached (refused, reset, died mid-answer) is skipped for
``retry_down_s`` and the step is retried on another worker of its role; encoding and a prefill
whose KV never reached decode are idempotent. Once tokens have been sent, a failure ends the
stream with an error event. Every error names its stage (see ``openai_api.APIError``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llm_worker.router.backends import Backend, FirstTokenFirst, Pool, TokenStream, Unreachable, worker_error
from llm_worker.elastic.controller import ElasticController
from llm_worker.router.openai_api import APIError, ChatRequest
from llm_worker.router.nodes import GroupStream, Inventory, NodeGroup, NodeSpec, choose, follow
from llm_worker.engine.prompt import MediaPart, PromptTokens, check_max_tokens, media_parts, template_ids
from llm_worker.router.config import RouterConfig
from llm_worker.router.encoding import MediaEncoding
from llm_worker.router.stats import gather_stats
from encoder_worker.video import VideoSampling
from mmcache_client import AsyncCacheClient

logger = logging.getLogger(__name__)

_GROUP: contextvars.ContextVar[NodeGroup] = contextvars.ContextVar("mmcache_router_group")
"""The node group of the request being served (set by ``Router.open``)."""
_LATENCY_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120)
_RETRY_AFTER_S = 1.0
"""What a client refused by ``max_inflight`` is told to wait."""


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("mmcache_router_requests", "Chat completion requests by status",
                                ["status"], registry=self.registry)
        self.stage_errors = Counter("mmcache_router_stage_errors", "Errors by stage", ["stage"],
                                    registry=self.registry)
        self.retries = Counter("mmcache_router_retries", "Calls retried on another worker", ["stage"],
                               registry=self.registry)
        self.active = Gauge("mmcache_router_active_requests", "Requests in progress", registry=self.registry)
        self.stage_seconds = Histogram("mmcache_router_stage_seconds", "Time per stage", ["stage"],
                                       buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("mmcache_router_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("mmcache_router_request_seconds", "Arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)


class Router:
    def __init__(self, config: RouterConfig, tokenizer: Any, tokens: PromptTokens | int,
                 max_model_len: int | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.tokens = tokens if isinstance(tokens, PromptTokens) else PromptTokens(int(tokens))
        """The model's image and video placeholder tokens (no video token: frames are images)."""
        self.video_sampling = VideoSampling(config.video_fps, config.video_max_frames)
        """How a video is sampled when its request names no ``mm_processor_kwargs``."""
        self.max_model_len = max_model_len
        """The model's positions (prompt and output); None: not checked here (the workers do)."""
        down = config.retry_down_s
        specs = config.nodes or (NodeSpec("local", config.cache_url, config.encoders, config.prefill, config.decode),)
        self.groups = [NodeGroup(spec.name, spec.cache_url, {role: Pool(role, urls, down) for role, urls in
                                 (("encode", spec.encoders), ("prefill", spec.prefill), ("decode", spec.decode),
                                  ("generate", config.generate if not config.nodes else ())) if urls})
                       for spec in specs]
        """One group (``local``) unless ``config.nodes`` names several; see ``llm_worker.router.nodes``."""
        self.inventory = Inventory()
        self._follows: list[asyncio.Task] = []
        self.metrics = _Metrics()
        self.counters = {"requests": 0, "errors": 0, "active": 0, "retries": 0, "images": 0, "videos": 0,
                         "prompt_tokens": 0, "completion_tokens": 0, "router_cache_hits": 0}
        self.http: aiohttp.ClientSession | None = None
        self.encoding = MediaEncoding(call=self._call, pools=lambda: self.pools, cache=lambda: self.cache,
                                      counters=self.counters)
        """The encode step: the cache looked up first, each miss on the encoder that owns it."""
        self.elastic = ElasticController(config, self.groups[0].pools, lambda: self.http) if config.elastic else None
        """``--elastic``: moves workers between the pools as the load shifts."""

    async def start(self) -> None:
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10,
                                                                        sock_read=self.config.timeout_s))
        for group in self.groups:
            if group.cache_url:
                group.cache = AsyncCacheClient(group.cache_url, token=self.config.cache_token, retries=0)
                if len(self.groups) > 1 and self.config.routing == "cache":
                    self._follows.append(asyncio.create_task(follow(group, self.inventory)))
        if self.elastic is not None:
            self.elastic.start()

    async def close(self) -> None:
        if self.elastic is not None:
            await self.elastic.close()
        for task in self._follows:
            task.cancel()
        await asyncio.gather(*self._follows, return_exceptions=True)
        if self.http is not None:
            await self.http.close()
        for group in self.groups:
            if group.cache is not None:
                await group.cache.close()

    @property
    def image_token_id(self) -> int:
        return self.tokens.image

    @property
    def group(self) -> NodeGroup:
        """The node group the current request was sent to (the first outside a request)."""
        return _GROUP.get(self.groups[0])

    @property
    def pools(self) -> dict[str, Pool]:
        return self.group.pools

    @property
    def cache(self) -> AsyncCacheClient | None:
        return self.group.cache

    # -- calls to workers -------------------------------------------------------------------

    async def _post(self, backend: Backend, path: str, body: dict) -> tuple[int, Any, Any]:
        """``(status, JSON answer, headers)``; ``Unreachable`` when there is no answer."""
        backend.inflight += 1
        backend.requests += 1
        try:
            async with self.http.post(backend.url + path, json=body) as resp:
                try:
                    return resp.status, await resp.json(content_type=None), resp.headers
                except ValueError:
                    return resp.status, {"error": (await resp.text())[:500]}, resp.headers
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            raise Unreachable(f"{type(e).__name__}: {e}") from e
        finally:
            backend.inflight -= 1

    async def _call(self, stage: str, path: str, body: dict, first: Backend | None = None) -> tuple[Backend, Any]:
        """POST JSON to a worker of ``stage``: ``(the worker, its JSON answer)``."""
        async def attempt(backend: Backend) -> tuple[Backend, Any]:
            status, doc, headers = await self._post(backend, path, body)
            if status != 200:
                raise worker_error(status, doc, stage, backend, headers)
            return backend, doc
        return await self._on_some_worker(stage, attempt, first)

    async def _open_stream(self, stage: str, path: str, body: dict) -> TokenStream:
        """A token stream from a worker of ``stage``."""
        async def attempt(backend: Backend) -> TokenStream:
            backend.requests += 1
            try:
                resp = await self.http.post(backend.url + path, json=body)
            except aiohttp.ClientConnectionError as e:
                raise Unreachable(f"{type(e).__name__}: {e}") from e
            if resp.status == 200:
                return TokenStream(resp, backend, stage)
            try:
                doc = await resp.json(content_type=None)
            except (ValueError, aiohttp.ClientError):
                doc = None
            finally:
                resp.close()
            raise worker_error(resp.status, doc, stage, backend, resp.headers)
        return await self._on_some_worker(stage, attempt)

    async def _on_some_worker(self, stage: str, attempt, first: Backend | None = None):
        """``attempt(worker)`` on ``first`` or the least busy worker of ``stage``, then on the next
        one while they cannot be reached or fail with a 5xx. A 4xx (the input) is final. When
        none is left: the last 5xx, else 503 naming the unreachable workers."""
        pool, tried, backend, last = self.pools[stage], [], first, None
        while True:
            if backend is None:
                picked = pool.pick(1, exclude=tried)
                if not picked:
                    raise last or APIError(503, "no worker could be reached: " + "; ".join(
                        f"{b.url}: {b.last_error}" for b in tried), stage)
                backend = picked[0]
            try:
                return await attempt(backend)
            except Unreachable as e:
                pool.failed(backend, str(e))
            except APIError as e:
                if e.status < 500:
                    raise
                backend.last_error, last = e.message, e
            tried.append(backend)
            backend = None
            self._retried(stage)

    def _retried(self, stage: str) -> None:
        self.counters["retries"] += 1
        self.metrics.retries.labels(stage).inc()

    # -- the pipeline -----------------------------------------------------------------------

    async def open(self, req: ChatRequest, cid: str, tenant: str | None = None) -> TokenStream:
        """Encode, prefill and start decode (or hand the request to a ``both`` worker), in
        ``tenant``'s scope of the cache."""
        try:
            ids = template_ids(self.tokenizer, req.messages, self.tokens)
            parts = media_parts(req.messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        if len(parts) > self.config.max_images_per_request:
            raise APIError(400, f"{len(parts)} images and videos exceed max_images_per_request="
                                f"{self.config.max_images_per_request}", param="messages")
        num_videos = sum(p.kind == "video" for p in parts)
        if num_videos > self.config.max_videos_per_request:
            raise APIError(400, f"{num_videos} videos exceed max_videos_per_request="
                                f"{self.config.max_videos_per_request}", param="messages")
        try:
            video = VideoSampling.from_options(req.mm_processor_kwargs, self.video_sampling,
                                               self.config.max_video_frames)
        except ValueError as e:
            raise APIError(400, str(e), param="mm_processor_kwargs") from None
        # NOTE: every image (video) takes at least its placeholder's position: a bound before any fetch.
        sampling = self._fit_max_tokens(req, len(ids))
        urls = [p.url for p in parts if p.kind == "image"]
        self.counters["images"] += len(urls)
        self.counters["videos"] += len(parts) - len(urls)
        if self.config.mode == "aggregated":
            body = {"messages": req.messages, "sampling": sampling, "stream": True}
            if len(parts) > len(urls):
                body["video"] = video.to_json()
            if tenant:
                body["tenant"] = tenant
            return await self._open_stream("generate", "/v1/generate", body)
        group, hashes = self._route(urls, tenant)
        _GROUP.set(group)  # NOTE: this request's encode, prefill and decode run on its workers
        group.active += 1
        try:
            return GroupStream(await self._open_epd(req, cid, tenant, ids, sampling, parts, hashes, video), group)
        except BaseException:
            group.active -= 1
            raise

    def _route(self, urls: list[str], tenant: str | None) -> tuple[NodeGroup, dict[int, str] | None]:
        """The node group for a request with images ``urls`` (``llm_worker.router.nodes.choose``)."""
        if len(self.groups) == 1:
            return self.groups[0], None
        hashes = self.encoding.data_hashes(urls)
        namespace = self.encoding.namespace
        scope = (f"{tenant}@{namespace}" if tenant else namespace) if namespace else None
        keys = [f"{scope}/{h}" for h in hashes.values()] if scope else []
        group, why = choose(self.groups, self.inventory, keys, self.config.routing)
        group.counts["requests"] += 1
        group.counts[f"routed_by_{why}"] += 1
        return group, hashes

    async def _open_epd(self, req: ChatRequest, cid: str, tenant: str | None, ids: list[int], sampling: dict,
                        parts: list[MediaPart], hashes: dict[int, str] | None, video: VideoSampling) -> TokenStream:
        t0 = time.perf_counter()
        with self._timed("encode"):
            images, videos, frames = await self._encode_media(parts, tenant, hashes, video)
        t1 = time.perf_counter()
        if frames and self.tokens.video is None:  # NOTE: frames as images: one placeholder per frame
            try:
                ids = template_ids(self.tokenizer, req.messages, self.tokens, frames)
            except ValueError as e:
                raise APIError(400, str(e), param="messages") from None
        pieces = images + [item for v in videos for item in v]
        sampling = self._fit_max_tokens(req, len(ids) - len(images) - len(videos) + sum(_num_tokens(it) for it in pieces))
        with self._timed("prefill"):
            prefilled = await self._prefill(cid, ids, images, videos, sampling, parts, tenant, video)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s: %d images and video groups (%d cached) encoded in %.3f s; prefill of %s tokens %.3f s "
                         "(forward %s ms)", cid, len(pieces), sum(bool(it.get("cached")) for it in pieces), t1 - t0,
                         prefilled.get("prompt_tokens"), time.perf_counter() - t1, prefilled.get("prefill_ms"))
        body = {"request_id": prefilled["request_id"], "kv": prefilled["kv"], "stream": True,
                "sampling": {**sampling, "seed": prefilled["seed"]}}
        if not isinstance(prefilled.get("first_text"), str) or prefilled.get("first_finish_reason") is not None:
            return await self._open_stream("decode", "/v1/decode", body)  # NOTE: decode ends it (and frees the KV)
        # NOTE: the first token is the prefill's: it goes to the client now, while the decode
        # worker loads the KV (a decode that shares busy cores may take a while to answer).
        first = {"text": prefilled["first_text"], "token_id": prefilled["first_token"]}
        return FirstTokenFirst(first, asyncio.ensure_future(self._open_stream("decode", "/v1/decode", body)))

    async def _encode_media(self, parts: list[MediaPart], tenant: str | None, hashes: dict[int, str] | None,
                            video: VideoSampling) -> tuple[list[dict], list[list[dict]], list[int]]:
        """The request's images and videos encoded (in parallel): ``(items for the image tokens,
        per video the items for its video tokens, per video its groups)``. A model without video
        tokens takes a video's frames as images, in prompt order among the images (and then no
        videos are left)."""
        urls = [p.url for p in parts if p.kind == "image"]
        video_urls = [p.url for p in parts if p.kind == "video"]
        items, clips = await asyncio.gather(self.encoding.encode(urls, tenant, hashes),
                                            self.encoding.encode_videos(video_urls, video, tenant) if video_urls else _nothing())
        videos = [clip["items"] for clip in clips]
        frames = [len(v) for v in videos]
        if not videos or self.tokens.video is not None:
            return items, videos, frames
        images, still, clip = [], iter(items), iter(videos)
        for part in parts:
            images.extend([next(still)] if part.kind == "image" else next(clip))
        return images, [], frames

    async def _prefill(self, cid: str, ids: list[int], images: list[dict], videos: list[list[dict]], sampling: dict,
                       parts: list[MediaPart], tenant: str | None, video: VideoSampling) -> dict:
        def key(it: dict) -> dict:
            return {"namespace": it["namespace"], "hash": it["hash"]}
        body = {"request_id": cid, "prompt_ids": ids, "sampling": sampling, "images": [key(it) for it in images]}
        if videos:
            body["videos"] = [[key(it) for it in v] for v in videos]
        try:
            return (await self._call("prefill", "/v1/prefill", body))[1]
        except APIError as e:
            if e.status != 502 or "not in the cache" not in e.message:
                raise
        # NOTE: an image was evicted between encode and prefill: encode again (puts it back), once.
        logger.info("%s: an image left the cache before prefill; encoding again", cid)
        self._retried("prefill")
        images, videos, _ = await self._encode_media(parts, tenant, None, video)
        body["images"] = [key(it) for it in images]
        if videos:
            body["videos"] = [[key(it) for it in v] for v in videos]
        return (await self._call("prefill", "/v1/prefill", body))[1]

    def _fit_max_tokens(self, req: ChatRequest, num_prompt_tokens: int) -> dict:
        """``req.sampling`` once its ``max_tokens`` fits after ``num_prompt_tokens``: a 400 for
        one the client gave, the default cut to the room left (vLLM's default is all of it)."""
        sampling, limit = req.sampling, self.max_model_len
        if limit is None:
            return sampling
        if req.max_tokens_param is None:
            if num_prompt_tokens >= limit:
                raise APIError(400, f"the prompt's {num_prompt_tokens} tokens fill the model's context of "
                                    f"{limit}: no room for output", param="messages")
            return {**sampling, "max_tokens": min(sampling["max_tokens"], limit - num_prompt_tokens)}
        try:
            check_max_tokens(sampling["max_tokens"], num_prompt_tokens, limit, req.max_tokens_param)
        except ValueError as e:
            raise APIError(400, str(e), param=req.max_tokens_param) from None
        return sampling

    def _timed(self, stage: str):
        return self.metrics.stage_seconds.labels(stage).time()

    async def stats(self) -> dict:
        """The router's counters, the cache's stats and every worker's health and counters; with
        several node groups, ``nodes`` (``llm_worker.router.stats``)."""
        return await gather_stats(self.http, self.config, self.groups, self.counters, self.inventory, self.elastic)


async def _nothing() -> list:
    return []


def _num_tokens(item: dict) -> int:
    """An encoded image's token count; at least 1 (its placeholder) when the encoder names none:
    prefill checks the exact prompt again."""
    n = item.get("num_tokens")
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1

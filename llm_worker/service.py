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
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import aiohttp
import torch
from aiohttp import web

from mmcache.serving.app import metrics_response
from mmcache_client import (
    AsyncCacheClient,
    CacheFull,
    CacheUnavailable,
    CorruptEntry,
    EntryTooLarge,
    Key,
    content_hash,
)
from mmcache_client.keys import validate_tenant
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from encoder_worker.encoder import Encoder
from encoder_worker.media import MediaError, MediaLimits, http_session, load_image
from encoder_worker.models import ensure_model
from llm_worker.decode_loop import RETRY_AFTER_S, DecodeJob, DecodeLoop, QueueFull, ShuttingDown
from llm_worker.embedding_lru import EmbeddingLRU
from llm_worker.engine import LLMEngine
from llm_worker.kv import kv_entry_fields, kv_namespace, read_prefill
from llm_worker.prompt import expand_image_tokens, image_urls
from llm_worker.sampling import SamplingParams
from llm_worker.slab import KVAllocationError

logger = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "both")
_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "seed", "stop")
_MAX_REQUEST_ID_CHARS = 256


@dataclass(frozen=True)
class LLMServeConfig:
    """Everything ``mmcache-llm serve`` takes."""

    role: str
    """``prefill``, ``decode`` or ``both`` (the aggregated baseline, no cache)."""
    cache_url: str | None = None
    """The sidecar: ``unix:///path.sock`` (zero-copy reads) or ``http://host:port``; unused by ``both``."""
    model: str = "tiny-llava"
    """``tiny-llava`` (built on first use into data_dir) or a local Hugging Face directory."""
    data_dir: str = "./mmcache-data"
    host: str = "127.0.0.1"
    port: int = 8472
    device: str | None = None
    """``cpu``, ``cuda``, ``cuda:1``; None: ``cuda`` when a GPU is visible, else ``cpu``."""
    dtype: str | None = None
    """Weights and KV dtype (``bfloat16``, ...); None: float32 on the CPU, the checkpoint's on a GPU."""
    max_batch: int = 64
    """Most requests in one decode step; more wait to join."""
    max_waiting: int = 256
    """Decode and both: most requests waiting to join the decode batch; more are refused with 503
    and ``Retry-After`` (never queued without bound)."""
    max_images_per_request: int = 64
    cache_token: str | None = None
    """Bearer token of the sidecar, if it has one."""
    media: MediaLimits = field(default_factory=MediaLimits)
    """Limits on the images a ``both`` worker fetches itself."""
    encoder_cache_bytes: int = 0
    """``both`` only: an in-process LRU of image embeddings this large (0: none, encode every image)."""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role={self.role!r} must be one of {', '.join(ROLES)}")
        if self.role != "both" and not self.cache_url:
            raise ValueError(f"role={self.role!r} needs cache_url (the sidecar's unix:// or http:// URL)")
        if self.max_batch < 1:
            raise ValueError(f"max_batch={self.max_batch} must be >= 1")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting={self.max_waiting} must be >= 0")
        if self.max_images_per_request < 1:
            raise ValueError(f"max_images_per_request={self.max_images_per_request} must be >= 1")
        if self.device is not None and self.device.startswith("cuda") and not torch.cuda.is_available():
            # NOTE: is_available() counts devices without creating a CUDA context
            raise ValueError(f"--device {self.device}: no CUDA device is visible to this process (or torch is "
                             "a CPU build); use --device cpu, or leave --device out to take a GPU where there is one")


class NotInCache(LookupError):
    """An entry the request names is not (or no longer) in the cache: 409, the caller re-creates it."""


class RequestConflict(Exception):
    """The request id already has a KV entry: 409."""


class WrongRole(LookupError):
    """A route this worker's role does not serve: 404."""


def parse_sampling(doc: Any) -> SamplingParams:
    """``SamplingParams`` from a request's ``"sampling"`` object (absent = defaults)."""
    if doc is None:
        return SamplingParams()
    if not isinstance(doc, dict):
        raise ValueError(f'"sampling" must be an object with any of {", ".join(_SAMPLING_FIELDS)}')
    unknown = sorted(set(doc) - set(_SAMPLING_FIELDS))
    if unknown:
        raise ValueError(f"sampling: unknown field(s) {unknown}; known: {', '.join(_SAMPLING_FIELDS)}")
    try:
        return SamplingParams(**{k: v for k, v in doc.items() if v is not None})  # NOTE: null = the default
    except (TypeError, ValueError) as e:
        raise ValueError(f"sampling: {e}") from None


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("mmcache_llm_requests", "Work requests (POST), by route and status",
                                ["route", "status"], registry=self.registry)
        self.prompt_tokens = Counter("mmcache_llm_prompt_tokens", "Prompt tokens prefilled", registry=self.registry)
        self.completion_tokens = Counter("mmcache_llm_completion_tokens", "Tokens generated and answered",
                                         registry=self.registry)
        self.active = Gauge("mmcache_llm_active_requests", "Work requests in progress", registry=self.registry)
        self.prefill_seconds = Histogram("mmcache_llm_prefill_seconds", "Prefill forward time",
                                         registry=self.registry)
        self.batch_size = Histogram("mmcache_llm_decode_batch_size", "Requests per decode step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.step_seconds = Histogram("mmcache_llm_decode_step_seconds", "Decode step time",
                                      buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1),
                                      registry=self.registry)


class LLMService:
    """Engine + cache client + decode loop of one worker.

    Lifecycle: ``start()`` on the loop → requests → ``close()``. Every forward (prefill, decode
    step, in-process encode) runs on one thread, one at a time: the engine takes one forward at
    a time, and on a ``both`` worker a prefill queues between two decode steps.
    """

    def __init__(self, config: LLMServeConfig, engine: Any, cache: AsyncCacheClient | None = None,
                 encoder: Any | None = None) -> None:
        self.config = config
        self.engine = engine
        self.cache = cache
        self.encoder = encoder
        self.metrics = _Metrics()
        self.counters = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "errors": 0, "active": 0}
        self._forward_thread = ThreadPoolExecutor(1, thread_name_prefix="llm-forward")
        self.decode_loop = None if config.role == "prefill" else \
            DecodeLoop(engine, self.forward, config.max_batch, on_step=self._on_step, max_waiting=config.max_waiting)
        self._http: aiohttp.ClientSession | None = None
        self.embedding_cache = EmbeddingLRU(config.encoder_cache_bytes) \
            if config.role == "both" and config.encoder_cache_bytes else None
        if self.embedding_cache is not None:
            self.counters.update(images=0, encoded=0)

    async def start(self) -> None:
        if self.config.role == "both":
            self._http = http_session(self.config.media)  # NOTE: refuses non-public addresses unless allowed
        if self.decode_loop is not None:
            self.decode_loop.start()

    async def close(self) -> None:
        if self.decode_loop is not None:
            await self.decode_loop.close()
        await asyncio.to_thread(self._forward_thread.shutdown)
        if self._http is not None:
            await self._http.close()
        if self.cache is not None:
            await self.cache.close()

    async def forward(self, fn, *args):
        """``fn(*args)`` on the forward thread. Returns (or raises) only once ``fn`` has ended, even
        when cancelled: what ``fn`` reads (embeddings leased from the cache) stays valid until then."""
        future = asyncio.get_running_loop().run_in_executor(self._forward_thread, fn, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await asyncio.wait([future])
            raise

    def _on_step(self, batch_size: int, step_ms: float) -> None:
        self.metrics.batch_size.observe(batch_size)
        self.metrics.step_seconds.observe(step_ms / 1e3)

    def _count_prompt(self, num_tokens: int, prefill_ms: float) -> None:
        self.counters["prompt_tokens"] += num_tokens
        self.metrics.prompt_tokens.inc(num_tokens)
        self.metrics.prefill_seconds.observe(prefill_ms / 1e3)

    def count_completion(self, num_tokens: int) -> None:
        self.counters["completion_tokens"] += num_tokens
        self.metrics.completion_tokens.inc(num_tokens)

    async def prefill(self, request_id: str, messages: Any, images: list[Key], sampling: SamplingParams,
                      prompt_ids: list[int] | None = None) -> dict:
        """``prompt_ids`` (the chat template's ids, one image token per image, as the router sends
        them) or else ``messages`` (templated here)."""
        if prompt_ids is not None:
            num_parts = prompt_ids.count(self.engine.image_token_id)
            what = "prompt_ids hold {} image tokens"
        else:
            num_parts = len(image_urls(messages))  # NOTE: validates the messages before any cache traffic
            what = "the messages hold {} image parts"
        if num_parts != len(images):
            raise ValueError(what.format(num_parts) + f" but {len(images)} images were given")
        kv = self.engine.kv_key(request_id)
        if await self.cache.exists(kv.namespace, kv.hash):
            raise RequestConflict(f"request_id {request_id!r} already has a KV entry ({kv}) in the cache")
        seed = sampling.resolved_seed()
        async with AsyncExitStack() as entries:  # NOTE: leases held until the prefill has copied them
            embeddings = []
            if images:  # NOTE: one round trip leases them all (and one releases them)
                # NOTE: on a GPU, the sidecar's device tier hands its tensors over by CUDA IPC, or
                # they come from the pinned arena (mmcache_client.device_entries)
                device = self.engine.device
                batch = await self.cache.get_many(images, device=device if device.type == "cuda" else None)
                entries.push_async_callback(batch.aclose)
                for image, entry in zip(images, batch):
                    if entry is None:
                        raise NotInCache(f"image {image} is not in the cache")
                    embeddings.append(entry.tensor)
            counts = [int(e.shape[0]) for e in embeddings]
            ids = self.engine.prompt_ids(messages, counts) if prompt_ids is None else \
                expand_image_tokens(prompt_ids, self.engine.image_token_id, counts)
            self.engine.check_max_tokens(len(ids), sampling)  # NOTE: decode would refuse it: spare the forward
            result = await self.forward(self.engine.prefill, ids, embeddings, sampling, seed)
        # NOTE: host-only (kv_entry_fields says persist=False): a hand-off never goes to disk.
        if not await self.cache.put(kv.namespace, kv.hash, **kv_entry_fields(result)):
            raise RequestConflict(f"request_id {request_id!r} already has a KV entry ({kv}) in the cache")
        self._count_prompt(len(ids), result.prefill_ms)
        first = self.engine.first_output(result.first_token, sampling)
        return {"request_id": request_id, "kv": {"namespace": kv.namespace, "hash": kv.hash},
                "first_token": result.first_token, "first_text": first.readable_text(),
                "first_finish_reason": first.finish_reason, "prompt_tokens": len(ids),
                "prefill_ms": round(result.prefill_ms, 3), "seed": seed}

    async def decode(self, request_id: str, kv: Key, sampling: SamplingParams) -> DecodeJob:
        own = kv_namespace(self.engine.namespace)
        if kv.namespace != own:
            raise ValueError(f"kv namespace {kv.namespace!r} is not this model's ({own!r})")
        # NOTE: refused before the KV is read, and the KV is left in the cache: a retry (here or on
        # another decode worker) finds it; if none comes, an unleased entry is evictable.
        self.decode_loop.check_room()
        entry = await self.cache.get(kv.namespace, kv.hash)
        if entry is None:
            raise NotInCache(f"KV {kv} is not in the cache")

        async def release() -> None:  # NOTE: the KV is per request: gone once in the batch
            await entry.aclose()
            await self.cache.delete(kv.namespace, kv.hash)
        try:
            state = self.engine.start(request_id, read_prefill(entry), sampling)
            return await self.decode_loop.submit(state, release)
        except BaseException:  # NOTE: submit refuses before release runs; closing twice is a no-op
            await entry.aclose()
            raise

    async def generate(self, messages: Any, sampling: SamplingParams, tenant: str | None = None) -> DecodeJob:
        self.decode_loop.check_room()  # NOTE: before any image is fetched or encoded
        urls = image_urls(messages)
        if len(urls) > self.config.max_images_per_request:
            raise ValueError(f"{len(urls)} images exceed max_images_per_request={self.config.max_images_per_request}")
        loaded = await asyncio.gather(*(load_image(u, self.config.media, self._http) for u in urls),
                                      return_exceptions=True)
        for i, result in enumerate(loaded):
            if isinstance(result, MediaError):
                result.index = i
            if isinstance(result, BaseException):
                raise result
        images = [image for _, image in loaded]
        # NOTE: the in-process cache is keyed within a tenant too: no tenant reuses another's embedding.
        scope = f"{tenant}@" if tenant else ""
        hashes = [scope + content_hash(raw) for raw, _ in loaded] if self.embedding_cache is not None else None
        ids = self.engine.prompt_ids(messages, [self.encoder.num_image_tokens(im) for im in images])
        self.engine.check_max_tokens(len(ids), sampling)
        seed = sampling.resolved_seed()

        def encode_and_prefill():
            return self.engine.prefill(ids, self._encode(images, hashes), sampling, seed)
        result = await self.forward(encode_and_prefill)
        self._count_prompt(len(ids), result.prefill_ms)
        state = self.engine.start(f"gen-{uuid.uuid4().hex}", result, sampling, seed)
        return await self.decode_loop.submit(state)

    def _encode(self, images: list, hashes: list[str] | None) -> list[torch.Tensor]:
        """Embeddings of ``images`` (on the forward thread); with an in-process cache, only its
        misses are encoded, in one batch."""
        if hashes is None:
            return [e.embeddings for e in self.encoder.encode(images)]
        out = [self.embedding_cache.get(h) for h in hashes]
        misses = [i for i, e in enumerate(out) if e is None]
        self.counters["images"] += len(images)
        self.counters["encoded"] += len(misses)
        for i, encoded in zip(misses, self.encoder.encode([images[i] for i in misses]) if misses else ()):
            out[i] = encoded.embeddings
            self.embedding_cache.put(hashes[i], encoded.embeddings)
        return out

    def stats(self) -> dict:
        out = {"role": self.config.role, "model": self.config.model, "namespace": self.engine.namespace,
               "pid": os.getpid(), **self.counters}
        if self.decode_loop is not None:
            loop = self.decode_loop
            if self.embedding_cache is not None:
                out["embedding_cache"] = self.embedding_cache.stats()
            out["decode"] = {"running": loop.num_running, "waiting": loop.num_waiting, "steps": loop.steps,
                             "batched_tokens": loop.batched_tokens, "max_batch_size": loop.max_batch_size}
        return out


SERVICE = web.AppKey("service", LLMService)
CONFIG = web.AppKey("config", LLMServeConfig)


def _error(status: int, message: str, retry_after_s: float | None = None) -> web.Response:
    headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))} if retry_after_s is not None else None
    return web.json_response({"error": message}, status=status, headers=headers)


def _error_response(request: web.Request, e: Exception) -> web.Response:
    if isinstance(e, MediaError):
        return _error(400, f"image {e.index}: {e}" if e.index is not None else str(e))
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
        response = _error(e.status, e.reason if e.content_type != "application/json" else e.text)
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
    if service.config.role != role:
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
    sampling = parse_sampling(doc.get("sampling"))
    ids = doc.get("prompt_ids")
    if ids is not None and (not isinstance(ids, list) or not ids
                            or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
        raise ValueError('"prompt_ids" must be a non-empty list of token ids')
    return web.json_response(await service.prefill(request_id, doc.get("messages"), keys, sampling, ids))


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
    job = await service.generate(doc.get("messages"), sampling, tenant)
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

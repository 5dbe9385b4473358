"""The LLM worker's work (``LLMService``): prefill, decode and the aggregated baseline's generate,
over an engine, the cache and (``both``) an in-process encoder. Its HTTP face is
``llm_worker.serve.app``; its settings ``llm_worker.serve.config``."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import torch

from mmcache_client import AsyncCacheClient, Key, content_hash
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from encoder_worker.media import MediaError, http_session, load_image
from encoder_worker.video import FrameGroup, VideoSampling, load_video
from llm_worker.engine.decode_loop import DecodeJob, DecodeLoop
from llm_worker.serve.embedding_lru import EmbeddingLRU
from llm_worker.engine.kv import kv_entry_fields, kv_namespace, read_prefill
from llm_worker.elastic.load import LoadMeter
from llm_worker.engine.prompt import expand_tokens, media_parts
from llm_worker.engine.sampling import SamplingParams
from llm_worker.serve.config import LLMServeConfig  # noqa: F401 - ROLES: the roles a worker serves

logger = logging.getLogger(__name__)

_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "seed", "stop")
_MAX_REQUEST_ID_CHARS = 256

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
        if config.role == "both":
            self.counters.update(videos=0, frames=0, frames_encoded=0)
        self._forward_thread = ThreadPoolExecutor(1, thread_name_prefix="llm-forward")
        self.load: LoadMeter | None = None
        """An elastic worker's load signals (``llm_worker.elastic.load``); None: not measured."""
        self.decode_loop = None if config.role == "prefill" else \
            DecodeLoop(engine, self._step_forward, config.max_batch, on_step=self._on_step,
                       max_waiting=config.max_waiting, on_join=self._on_join)
        self._http: aiohttp.ClientSession | None = None
        self._decodes = asyncio.Semaphore(1)
        """``both``: video decodes at once (each takes a core for up to ``video.max_decode_s``)."""
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

    async def forward(self, fn, *args, queued: bool = True):
        """``fn(*args)`` on the forward thread. Returns (or raises) only once ``fn`` has ended, even
        when cancelled: what ``fn`` reads (embeddings leased from the cache) stays valid until then.
        With ``load``, its run counts as busy time and (``queued``: a prefill's, not a decode
        step's) its wait for the thread as queue delay."""
        if self.load is not None:
            fn = self.load.metered(fn, wait=queued)
        future = asyncio.get_running_loop().run_in_executor(self._forward_thread, fn, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await asyncio.wait([future])
            raise

    async def _step_forward(self, fn, *args):
        return await self.forward(fn, *args, queued=False)

    def _on_step(self, batch_size: int, step_ms: float) -> None:
        self.metrics.batch_size.observe(batch_size)
        self.metrics.step_seconds.observe(step_ms / 1e3)
        if self.load is not None:
            self.load.observe_step(step_ms / 1e3, batch_size)

    def _on_join(self, wait_s: float) -> None:
        if self.load is not None:
            self.load.observe_wait(wait_s)

    def _count_prompt(self, num_tokens: int, prefill_ms: float) -> None:
        self.counters["prompt_tokens"] += num_tokens
        self.metrics.prompt_tokens.inc(num_tokens)
        self.metrics.prefill_seconds.observe(prefill_ms / 1e3)

    def count_completion(self, num_tokens: int) -> None:
        self.counters["completion_tokens"] += num_tokens
        self.metrics.completion_tokens.inc(num_tokens)
        if self.load is not None:
            self.load.observe_tokens(num_tokens)

    async def prefill(self, request_id: str, messages: Any, images: list[Key], sampling: SamplingParams,
                      prompt_ids: list[int] | None = None, videos: list[list[Key]] = ()) -> dict:
        """``prompt_ids`` (the chat template's ids, one placeholder per image and per video, as the
        router sends them) or else ``messages`` (templated here). ``videos``: per video, the keys
        of its frame groups (models with video tokens; LLaVA takes frames among the images)."""
        engine = self.engine
        if videos and engine.video_token_id is None:
            raise ValueError(f"{engine.family.name} has no video tokens: send a video's frames among the images")
        if prompt_ids is not None:
            found = (prompt_ids.count(engine.image_token_id),
                     prompt_ids.count(engine.video_token_id) if engine.video_token_id is not None else 0)
            what = "prompt_ids hold {} image and {} video placeholders"
        else:  # NOTE: validates the messages before any cache traffic
            parts = media_parts(messages)
            if engine.video_token_id is None and any(p.kind == "video" for p in parts):
                raise ValueError("send prompt_ids for a video on a model without video tokens (the router does)")
            found = (sum(p.kind == "image" for p in parts), sum(p.kind == "video" for p in parts))
            what = "the messages hold {} image and {} video parts"
        if found != (len(images), len(videos)):
            raise ValueError(what.format(*found) + f" but {len(images)} images and {len(videos)} videos were given")
        kv = engine.kv_key(request_id)
        if await self.cache.exists(kv.namespace, kv.hash):
            raise RequestConflict(f"request_id {request_id!r} already has a KV entry ({kv}) in the cache")
        seed = sampling.resolved_seed()
        pieces = list(images) + [g for v in videos for g in v]
        async with AsyncExitStack() as entries:  # NOTE: leases held until the prefill has copied them
            read = []
            if pieces:  # NOTE: one round trip leases them all (and one releases them)
                # NOTE: on a GPU, the sidecar's device tier hands its tensors over by CUDA IPC, or
                # they come from the pinned arena (mmcache_client.device_entries)
                device = engine.device
                batch = await self.cache.get_many(pieces, device=device if device.type == "cuda" else None)
                entries.push_async_callback(batch.aclose)
                for key, entry in zip(pieces, batch):
                    if entry is None:
                        raise NotInCache(f"{'image' if len(read) < len(images) else 'video frame group'} {key} "
                                         "is not in the cache")
                    read.append(entry)
            media = _Media.of(engine, read[:len(images)], _split(read[len(images):], [len(v) for v in videos]))
            ids = engine.prompt_ids(messages, media.image_counts, media.video_counts) if prompt_ids is None else \
                media.expand(engine, prompt_ids)
            engine.check_max_tokens(len(ids), sampling)  # NOTE: decode would refuse it: spare the forward
            result = await self.forward(media.prefill, engine, ids, sampling, seed)
        # NOTE: host-only (kv_entry_fields says persist=False): a hand-off never goes to disk.
        if not await self.cache.put(kv.namespace, kv.hash, **kv_entry_fields(result)):
            raise RequestConflict(f"request_id {request_id!r} already has a KV entry ({kv}) in the cache")
        self._count_prompt(len(ids), result.prefill_ms)
        first = engine.first_output(result.first_token, sampling)
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

    async def generate(self, messages: Any, sampling: SamplingParams, tenant: str | None = None,
                       video: VideoSampling | None = None) -> DecodeJob:
        self.decode_loop.check_room()  # NOTE: before any image is fetched or encoded
        parts = media_parts(messages)
        if len(parts) > self.config.max_images_per_request:
            raise ValueError(f"{len(parts)} images and videos exceed max_images_per_request="
                             f"{self.config.max_images_per_request}")
        num_videos = sum(p.kind == "video" for p in parts)
        if num_videos > self.config.video.max_videos_per_request:
            raise ValueError(f"{num_videos} videos exceed max_videos_per_request={self.config.video.max_videos_per_request}")
        video, media = video or self.config.video_sampling, self.config.media
        loaded = await asyncio.gather(*(
            load_video(p.url, video, media, self.config.video, self.encoder, self._http, self._decodes)
            if p.kind == "video" else load_image(p.url, media, self._http) for p in parts), return_exceptions=True)
        counters = {"image": 0, "video": 0}
        for part, result in zip(parts, loaded):
            if isinstance(result, MediaError):
                result.index, result.kind = counters[part.kind], part.kind
            if isinstance(result, BaseException):
                raise result
            counters[part.kind] += 1
        # NOTE: the in-process cache is keyed within a tenant too: no tenant reuses another's embedding.
        scope = f"{tenant}@" if tenant else ""
        engine, encoder = self.engine, self.encoder
        stills = [(scope + content_hash(r[0]), r[1]) for p, r in zip(parts, loaded) if p.kind == "image"]
        clips = [[(scope + g.hash, g) for g in r.groups] for p, r in zip(parts, loaded) if p.kind == "video"]
        self.counters["videos"] += len(clips)
        if engine.video_token_id is None:  # NOTE: frames as images, in prompt order
            frames = [len(c) for c in clips]
            ordered = iter(stills), iter(clips)
            stills = [x for p in parts for x in ([next(ordered[0])] if p.kind == "image" else next(ordered[1]))]
            clips = []
            ids = engine.prompt_ids(messages, [encoder.num_image_tokens(im) for _, im in stills], (), frames)
        else:
            ids = engine.prompt_ids(messages, [encoder.num_image_tokens(im) for _, im in stills],
                                    [sum(encoder.num_image_tokens(g) for _, g in c) for c in clips])
        engine.check_max_tokens(len(ids), sampling)
        seed = sampling.resolved_seed()

        def encode_and_prefill():
            encoded = self._encode(stills + [x for c in clips for x in c])
            media = _Media.of(engine, encoded[:len(stills)], _split(encoded[len(stills):], [len(c) for c in clips]))
            return media.prefill(engine, ids, sampling, seed)
        result = await self.forward(encode_and_prefill)
        self._count_prompt(len(ids), result.prefill_ms)
        state = engine.start(f"gen-{uuid.uuid4().hex}", result, sampling, seed)
        return await self.decode_loop.submit(state)

    def _encode(self, items: list[tuple[str, Any]]) -> list:
        """``EncodedImage`` of each ``(hash, image or frame group)`` (on the forward thread); with an
        in-process cache, only its misses are encoded, in one batch."""
        groups = [item for _, item in items if isinstance(item, FrameGroup)]
        if self.embedding_cache is None:
            out = self.encoder.encode([item for _, item in items])
            self.counters["frames"] += sum(g.num_frames for g in groups)
            self.counters["frames_encoded"] += sum(g.num_frames for g in groups)
            return out
        self.counters["frames"] += sum(g.num_frames for g in groups)
        out = [self.embedding_cache.get(h) for h, _ in items]
        misses = [i for i, e in enumerate(out) if e is None]
        self.counters["frames_encoded"] += sum(items[i][1].num_frames for i in misses
                                               if isinstance(items[i][1], FrameGroup))
        self.counters["images"] += len(items)
        self.counters["encoded"] += len(misses)
        for i, encoded in zip(misses, self.encoder.encode([items[i][1] for i in misses]) if misses else ()):
            out[i] = encoded
            self.embedding_cache.put(items[i][0], encoded)
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


def _split(items: list, sizes: list[int]) -> list[list]:
    out, at = [], 0
    for n in sizes:
        out.append(items[at:at + n])
        at += n
    return out


@dataclasses.dataclass
class _Media:
    """A prompt's image and video embeddings (cache entries or ``EncodedImage``s) with the grids a
    3-D-position model needs (from the ``image_grid_thw`` / ``video_grid_thw`` stored with them)."""

    images: list[torch.Tensor]
    videos: list[list[torch.Tensor]]
    image_grids: list[list[int]] | None
    video_grids: list[list[int]] | None

    @classmethod
    def of(cls, engine: Any, images: list, videos: list[list]) -> "_Media":
        def tensor(item, name):
            if hasattr(item, "extras"):  # an EncodedImage
                return item.embeddings if name == "embeddings" else item.extras.get(name)
            return item.tensor if name == "embeddings" else (item.get_tensor(name) if name in item.names else None)

        def grid(item, name) -> list[int]:
            g = tensor(item, name)
            if g is None or tuple(g.shape) != (1, 3):
                raise ValueError(f"{engine.family.name} needs {name} [1, 3] with each embedding; an entry has "
                                 f"{None if g is None else list(g.shape)}")
            return [int(x) for x in g[0].tolist()]
        image_grids = video_grids = None
        if engine.family.mrope:
            image_grids = [grid(e, "image_grid_thw") for e in images]
            video_grids = []
            for groups in videos:
                steps = [grid(g, "video_grid_thw") for g in groups]
                if any(s[1:] != steps[0][1:] for s in steps):
                    raise ValueError(f"the frame groups of a video differ in size: {steps}")
                video_grids.append([sum(s[0] for s in steps), *steps[0][1:]])
        return cls([tensor(e, "embeddings") for e in images], [[tensor(g, "embeddings") for g in v] for v in videos],
                   image_grids, video_grids)

    @property
    def image_counts(self) -> list[int]:
        return [int(e.shape[0]) for e in self.images]

    @property
    def video_counts(self) -> list[int]:
        return [sum(int(g.shape[0]) for g in v) for v in self.videos]

    def expand(self, engine: Any, prompt_ids: list[int]) -> list[int]:
        ids = expand_tokens(prompt_ids, engine.image_token_id, self.image_counts, "image")
        if engine.video_token_id is None:
            return ids
        return expand_tokens(ids, engine.video_token_id, self.video_counts, "video")

    def prefill(self, engine: Any, ids: list[int], sampling: SamplingParams, seed: int):
        return engine.prefill(ids, self.images, sampling, seed, image_grids=self.image_grids,
                              video_embeddings=self.videos, video_grids=self.video_grids)

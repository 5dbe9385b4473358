"""The encoder's work (``EncodeService``): every image encoded once, cluster-wide.

Per image: fetch → hash the raw bytes → look the key up in the cache → encode the misses
(single-flight, dynamically batched, off the event loop) → put them in the cache → answer. Its
HTTP face is ``encoder_worker.app``; its settings ``encoder_worker.config``.

Per video: fetch → decode and sample its frames (``encoder_worker.video``, off the event loop) →
cut them into the model's temporal groups, each keyed by its pixels and the sampling → the same
lookup, encode and put per group. A group another clip shared is a hit: only new frames are
encoded (``frames_encoded`` / ``frames_reused`` in the stats).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from typing import Any

import aiohttp

from prometheus_client import CollectorRegistry, Counter, Histogram

from encoder_worker.batcher import BatchStats, Job, SingleFlightBatcher
from encoder_worker.media import MediaError, decode_fetched, fetch_bytes, http_session
from encoder_worker.video import Clip, FrameGroup, VideoSampling, load_video
from mmcache_client import AsyncCacheClient, CacheFull, CacheUnavailable, MMCacheError, content_hash
from encoder_worker.config import EncoderServeConfig

logger = logging.getLogger(__name__)
_CLAIM_CHUNK = 512
"""Keys per claim call (the sidecar answers each key in turn)."""


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.images = Counter("mmcache_encoder_images", "Images seen, by outcome", ["outcome"], registry=self.registry)
        self.batch_size = Histogram("mmcache_encoder_batch_size", "Images per model forward",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.encode_seconds = Histogram("mmcache_encoder_batch_seconds", "Model forward time per batch",
                                        registry=self.registry)
        self.request_seconds = Histogram("mmcache_encoder_request_seconds", "POST /v1/encode latency",
                                         registry=self.registry)

    def on_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.size)
        self.encode_seconds.observe(stats.run_ms / 1000)


class EncodeService:
    """Model + cache client + batcher. Lifecycle: ``start()`` on the loop → ``encode`` → ``close()``."""

    def __init__(self, encoder: Any, cache: AsyncCacheClient, config: EncoderServeConfig):
        self.encoder = encoder
        self.cache = cache
        self.config = config
        self.namespace: str = encoder.namespace
        self.metrics = _Metrics()
        self.counters = {"images": 0, "cache_hits": 0, "encoded": 0, "requests": 0, "batches": 0,
                         "videos": 0, "frames": 0, "frames_encoded": 0, "frames_reused": 0,
                         "claims_won": 0, "claims_waited": 0, "claims_taken_over": 0, "claims_unavailable": 0,
                         "claim_waits_ended": 0}
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        """This worker's name on its claims."""
        self._held: dict[str, str] = {}
        """Keys this worker claimed and has not stored yet → their batcher keys (renewed while
        they wait for the model)."""
        self._waiters: dict[str, set[asyncio.Event]] = {}
        """Key another owner holds → the events of the requests waiting for its ``stored``."""
        self._events_up = False
        self._tasks: list[asyncio.Task] = []
        self.batcher = SingleFlightBatcher(self._encode_batch, max_batch=config.max_batch,
                                           max_wait_ms=config.max_wait_ms, after=self._store,
                                           on_batch=self._on_batch, schedule=config.schedule,
                                           max_queue_delay_ms=config.max_queue_delay_ms,
                                           max_queued=config.max_queued_images)
        self._http: aiohttp.ClientSession | None = None
        self._decodes = asyncio.Semaphore(config.max_concurrent_decodes)
        """Video decodes running at once (each takes a core for up to ``video.max_decode_s``)."""

    async def start(self) -> None:
        self._http = http_session(self.config.media)  # NOTE: refuses non-public addresses unless allowed
        self.batcher.start()
        if self.config.claims:
            self._tasks = [asyncio.create_task(self._follow_events()), asyncio.create_task(self._renew_claims())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.batcher.close()
        if self._http is not None:
            await self._http.close()
        await self.cache.close()

    def _encode_batch(self, images: list) -> list:
        """Runs in a worker thread (the batcher's). ``encoded`` counts images and video frames."""
        out = self.encoder.encode(images)
        frames = sum(item.num_frames for item in images if isinstance(item, FrameGroup))
        self.counters["frames_encoded"] += frames
        self.counters["encoded"] += frames + sum(not isinstance(item, FrameGroup) for item in images)
        return out

    def _on_batch(self, stats: BatchStats) -> None:
        self.counters["batches"] += 1
        self.metrics.on_batch(stats)

    def _scope(self, tenant: str | None) -> str:
        """The namespace the cache is asked in: ``tenant@namespace`` for a router's tenant (this
        worker is the cache's default tenant, trusted to act for one), else the namespace."""
        return f"{tenant}@{self.namespace}" if tenant else self.namespace

    async def _store(self, job_key: str, encoded: Any) -> None:
        # NOTE: the batcher's key is "[tenant@]hash": single flight within a tenant, never across.
        tenant, _, hash_hex = job_key.rpartition("@")
        scope = self._scope(tenant or None)
        await self.cache.put(scope, hash_hex, encoded.embeddings,
                             extras=encoded.extras or None, encode_ms=encoded.encode_ms)
        self._held.pop(f"{scope}/{hash_hex}", None)  # NOTE: the put ended the claim in the sidecar

    # ------------------------------------------------------------ claims (mmcache.core.claims)
    async def _follow_events(self) -> None:
        """Wake the requests waiting on another owner's claim when its entry is stored."""
        backoff = 0.1
        while True:
            try:
                async for ev in self.cache.events():
                    self._events_up, backoff = True, 0.1
                    if ev.get("kind") == "lost":
                        keys = list(self._waiters)
                    elif ev.get("kind") == "stored":
                        keys = [ev.get("key")]
                    else:
                        continue
                    for key in keys:
                        for waiter in self._waiters.get(key, ()):
                            waiter.set()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the sidecar restarting, or one without events
                logger.debug("encoder: the cache's event stream ended: %r", e)
            self._events_up = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _renew_claims(self) -> None:
        """Renew the claims of misses still waiting for the model, so a long queue is not taken
        for a dead owner (another encoder would encode them too). Only keys in this worker's
        batcher: a claim whose encode is over (stored, or failed) lapses or was given back."""
        while True:
            await asyncio.sleep(self.config.claim_ttl_s / 3)
            for key, job_key in list(self._held.items()):
                if not self.batcher.in_flight(job_key):
                    self._held.pop(key, None)
            held = list(self._held)
            for i in range(0, len(held), _CLAIM_CHUNK):
                try:
                    states = await self.cache.claim(held[i:i + _CLAIM_CHUNK], self.owner, self._ttl_ms)
                except Exception as e:  # noqa: BLE001 - renewal is best effort; the TTL is the backstop
                    logger.debug("encoder: renewing %d claims failed: %r", len(held), e)
                    break
                for key, st in states.items():
                    if st.get("state") == "exists":
                        self._held.pop(key, None)

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.config.claim_ttl_s * 1000))

    async def _claim_states(self, keys: list[str]) -> dict[str, dict]:
        """The sidecar's claim answers for ``keys`` (in chunks); a sidecar that cannot claim must
        not stop encodes: every key is then ``won`` (counted in ``claims_unavailable``)."""
        out: dict[str, dict] = {}
        try:
            for i in range(0, len(keys), _CLAIM_CHUNK):
                out.update(await self.cache.claim(keys[i:i + _CLAIM_CHUNK], self.owner, self._ttl_ms))
        except (CacheFull, CacheUnavailable, MMCacheError) as e:
            self.counters["claims_unavailable"] += len(keys)
            logger.debug("encoder: claims unavailable (%r); encoding %d images here", e, len(keys))
            return {k: {"state": "unclaimed"} for k in keys}
        return out

    async def _encode_misses(self, scope: str, job_prefix: str, misses: list[str], images: dict[str, Any],
                             look, cached: set[str]) -> dict[str, Any]:
        """Each miss encoded here (joining this worker's encode of it if one is in flight), or
        waited for while another encoder (of this node or another) owns its claim, then read.
        The encoded results by hash; the ones read are left to ``look`` (which adds them to ``cached``).

        The rules that keep "exactly once": a key won is enqueued at once (no await between the
        claim's answer and the enqueue, and none while it waits on other keys), unless this
        worker's own encode of it ended while the claim was out (then it is read); a claim is
        given back only when its key is not being encoded here (its encode failed, or it was
        never enqueued)."""
        job_of = {h: job_prefix + h for h in misses}
        futures: dict[str, asyncio.Future] = {}
        won_here: list[str] = []
        waited: set[str] = set()
        waited_since: dict[str, float] = {}
        pending = list(misses)
        try:
            while pending:
                mark = self.batcher.mark()
                joins = [h for h in pending if self.batcher.in_flight(job_of[h])]
                fresh = [h for h in pending if h not in joins]
                states = await self._claim_states([f"{scope}/{h}" for h in fresh]) \
                    if self.config.claims and fresh else {}
                state = {h: (states.get(f"{scope}/{h}") or {"state": "unclaimed"}) for h in fresh}
                now = asyncio.get_running_loop().time()
                for h in fresh:
                    if state[h]["state"] == "wait" and now - waited_since.setdefault(h, now) >= self.config.claim_ttl_s:
                        # NOTE: waited as long as this encoder would hold a claim itself: encode it
                        # here, whatever TTL the owner asked for
                        state[h] = {"state": "unclaimed"}
                        self.counters["claim_waits_ended"] += 1
                won = [h for h in fresh if state[h]["state"] in ("won", "unclaimed")]
                found = [h for h in fresh if state[h]["state"] == "exists"]
                waits = [h for h in fresh if state[h]["state"] == "wait"]
                # NOTE: no await from here to the enqueue
                finished = [h for h in joins + won if self.batcher.finished_since(job_of[h], mark)]
                go = [h for h in joins + won if h not in finished]
                for h in won:
                    if state[h]["state"] != "won":
                        continue
                    key = f"{scope}/{h}"
                    if key not in self._held:  # NOTE: not this worker's other requests renewing it
                        self.counters["claims_won"] += 1
                        self.counters["claims_taken_over"] += h in waited
                    self._held[key] = job_of[h]
                    won_here.append(h)
                for h in waits:
                    if h not in waited:
                        self.counters["claims_waited"] += 1
                        waited.add(h)
                job = Job(len(go)) if go else None
                for h, fut in zip(go, self.batcher.enqueue_many([(job_of[h], images[h]) for h in go], job)):
                    futures[h] = asyncio.shield(fut)
                vanished: list[str] = []
                if found or finished:
                    await look(found + finished)
                    vanished = [h for h in found + finished if h not in cached]  # NOTE: evicted at once: again
                pending = waits + vanished
                if waits and not vanished:
                    mine_left = min(self.config.claim_ttl_s - (now - waited_since[h]) for h in waits)
                    await self._wait_stored([f"{scope}/{h}" for h in waits],
                                            min(min(int(state[h].get("ttl_ms", self._ttl_ms)) for h in waits) / 1000,
                                                max(0.0, mine_left)))
            names = list(futures)
            results = await asyncio.gather(*(futures[h] for h in names), return_exceptions=True)
        except BaseException:
            await asyncio.shield(self._give_back(scope, [h for h in won_here if not self.batcher.in_flight(job_of[h])]))
            raise
        failed = [h for h, r in zip(names, results) if isinstance(r, BaseException)]
        if failed:
            await asyncio.shield(self._give_back(scope, [h for h in failed if not self.batcher.in_flight(job_of[h])]))
            raise next(r for r in results if isinstance(r, BaseException))
        return dict(zip(names, results))

    async def _wait_stored(self, keys: list[str], deadline_s: float) -> None:
        """Until one of ``keys`` is stored (an event), the nearest claim deadline passes, or a
        poll interval (the fallback, short while the event stream is down) ends."""
        waiter = asyncio.Event()
        for key in keys:
            self._waiters.setdefault(key, set()).add(waiter)
        try:
            poll = 2.0 if self._events_up else 0.1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(waiter.wait(), min(poll, deadline_s + 0.005))
        finally:
            for key in keys:
                group = self._waiters.get(key)
                if group is not None:
                    group.discard(waiter)
                    if not group:
                        del self._waiters[key]

    async def _give_back(self, scope: str, hashes: list[str]) -> None:
        """Encodes that failed (or never started): give their claims back, so waiters take over
        at once rather than at the claim's deadline."""
        keys = [f"{scope}/{h}" for h in hashes if f"{scope}/{h}" in self._held]
        if not keys:
            return
        for key in keys:
            self._held.pop(key, None)
        with contextlib.suppress(Exception):
            await self.cache.release_claims(keys, self.owner)

    async def encode(self, urls: list[str], tenant: str | None = None,
                     videos: list[tuple[str, VideoSampling]] = ()) -> dict:
        """Answer one ``POST /v1/encode``; MediaError (with ``.index`` and ``.kind``) for a bad image
        or video. With a ``tenant`` (from the router) lookups and puts are in that tenant's scope."""
        # NOTE: fetch and hash first, decode only the misses: a hit costs no pixel decoding.
        raws = await _gather_media((fetch_bytes(u, self.config.media, self._http) for u in urls), "image")
        clips = await self._load_videos(videos) if videos else []
        hashes = [content_hash(raw) for raw in raws]
        decoders = {}
        for i, h in enumerate(hashes):
            decoders.setdefault(h, (i, lambda i=i: decode_fetched(urls[i], raws[i], self.config.media)))
        for clip in clips:
            for group in clip.groups:
                decoders.setdefault(group.hash, (None, lambda g=group: _ready(g)))
        num_tokens, cached = await self._resolve(tenant, decoders)
        self.counters["requests"] += 1
        self.counters["images"] += len(urls)
        hits = sum(h in cached for h in hashes)
        self.counters["cache_hits"] += hits
        self.metrics.images.labels("hit").inc(hits)
        self.metrics.images.labels("miss").inc(len(urls) - hits)
        answer = {"namespace": self.namespace,
                  "items": [{"hash": h, "num_tokens": num_tokens[h], "cached": h in cached} for h in hashes]}
        if videos:
            self.counters["videos"] += len(clips)
            self.counters["frames"] += sum(c.num_frames for c in clips)
            self.counters["frames_reused"] += sum(g.num_frames for c in clips for g in c.groups if g.hash in cached)
            answer["videos"] = [{"frames": c.num_frames, "interval_s": c.interval_s, "items": [
                {"hash": g.hash, "num_tokens": num_tokens[g.hash], "cached": g.hash in cached, "frames": g.num_frames}
                for g in c.groups]} for c in clips]
        return answer

    async def _load_videos(self, videos: list[tuple[str, VideoSampling]]) -> list[Clip]:
        """Each video fetched, decoded and sampled (``video.load_video``), at most
        ``config.max_concurrent_decodes`` decodes at once in this worker."""
        return await _gather_media((load_video(url, sampling, self.config.media, self.config.video, self.encoder,
                                               self._http, self._decodes) for url, sampling in videos), "video")

    async def _resolve(self, tenant: str | None, decoders: dict) -> tuple[dict[str, int], set[str]]:
        """For each hash of ``decoders`` (hash → (image index or None, coroutine function giving the
        item to encode)): its token count, looked up or encoded here; and the set of those that
        were in the cache."""
        num_tokens: dict[str, int] = {}
        cached: set[str] = set()
        scope = self._scope(tenant)
        job_prefix = f"{tenant}@" if tenant else ""

        async def look(candidates: list[str]) -> None:
            # NOTE: a miss whose encode for another request ended (and was stored) while this
            # lookup was out is looked up again, so an image is not encoded twice.
            while candidates:
                mark = self.batcher.mark()
                # NOTE: detail: a hit's num_tokens comes with the lookup, no lease per hit
                items = await self.cache.lookup([f"{scope}/{h}" for h in candidates], detail=True)
                for h in candidates:
                    item = items.get(f"{scope}/{h}")
                    if item is not None:
                        num_tokens[h] = int(item["num_tokens"])
                        cached.add(h)
                candidates = [h for h in candidates
                              if h not in cached and self.batcher.finished_since(job_prefix + h, mark)]

        await look(list(decoders))
        images: dict[str, Any] = {}
        misses = [h for h in decoders if h not in cached]
        if misses:
            mark = self.batcher.mark()
            decoded = await asyncio.gather(*(decoders[h][1]() for h in misses), return_exceptions=True)
            for h, result in zip(misses, decoded):
                if not isinstance(result, BaseException):
                    try:  # NOTE: refused here, not in the encoder batch it would share with others
                        self.encoder.num_image_tokens(result)
                    except ValueError as e:
                        result = MediaError(f"the image cannot be encoded: {e}")
                if isinstance(result, MediaError):
                    result.index = decoders[h][0]
                if isinstance(result, BaseException):
                    raise result
                images[h] = result
            # NOTE: encodes that ended while these decoded are looked up again; from the last
            # check to enqueue there is no await, so one ending after it is joined or found.
            await look([h for h in misses if self.batcher.finished_since(job_prefix + h, mark)])
            misses = [h for h in misses if h not in cached]
        encoded = await self._encode_misses(scope, job_prefix, misses, images, look, cached) if misses else {}
        for h, enc in encoded.items():
            num_tokens[h] = int(enc.embeddings.shape[0])
        return num_tokens, cached


async def _ready(item: Any) -> Any:
    return item


async def _gather_media(coros, kind: str) -> list:
    """The results of ``coros`` (one per image or video, in order); the first ``MediaError`` raised,
    numbered with its position and ``kind``."""
    results = await asyncio.gather(*coros, return_exceptions=True)
    for i, result in enumerate(results):
        if isinstance(result, MediaError):
            result.index, result.kind = i, kind
        if isinstance(result, BaseException):
            raise result
    return results

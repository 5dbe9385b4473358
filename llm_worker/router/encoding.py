"""The router's encode step (``MediaEncoding``, owned by the router): a request's images and
videos to cache entries. The images the router finds in the cache itself never reach an encoder;
each miss goes to the encoder that owns its key (rendezvous hashing), so concurrent requests for
one new image meet at one encoder and its single flight."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any, Awaitable, Callable

from encoder_worker.media import MediaError, MediaLimits, decode_data_uri
from encoder_worker.video import VideoLimits, VideoSampling
from llm_worker.router.backends import Backend, Pool
from llm_worker.router.openai_api import APIError
from mmcache_client import AsyncCacheClient, MMCacheError, content_hash

logger = logging.getLogger("llm_worker.router.router")

_IMAGE_INDEX = re.compile(r"^image (\d+): ")
_VIDEO_INDEX = re.compile(r"^video 0: ")


class MediaEncoding:
    """What it uses of the router, given here: ``call`` (a stage's worker, retried on another:
    the router's ``_call``), the current node group's ``pools`` and ``cache``, and the router's
    ``counters``."""

    def __init__(self, *, call: Callable[..., Awaitable[tuple[Backend, Any]]], pools: Callable[[], dict[str, Pool]],
                 cache: Callable[[], AsyncCacheClient | None], counters: dict):
        self._call, self._pools, self._cache, self.counters = call, pools, cache, counters
        self.namespace: str | None = None
        """The encoders' namespace, learnt from their first answer (they serve one model)."""
        self.media_limits = MediaLimits()
        self.video_limits = MediaLimits(max_bytes=VideoLimits().max_bytes)
        """For hashing ``data:`` videos (routing keys): the encoders' default byte bound."""

    async def encode(self, urls: list[str], tenant: str | None = None,
                     hashes: dict[int, str] | None = None) -> list[dict]:
        """``{"namespace", "hash", "num_tokens", "cached"}`` per URL, in order. The images the
        router finds in the cache itself never reach an encoder; each miss goes to the encoder
        that owns its key (rendezvous hashing: the content hash of a ``data:`` image, else its
        URL), so concurrent requests for one new image meet at one encoder and its single flight.
        With a ``tenant`` the encoders look up and store in its scope, and each ``namespace``
        comes back as ``tenant@namespace``: the key prefill reads."""
        if not urls:
            return []
        hashes = hashes if hashes is not None else self.data_hashes(urls)
        known = await self._cached(hashes, tenant)
        self.counters["router_cache_hits"] += len(known)
        misses = [i for i in range(len(urls)) if i not in known]
        if misses:
            found = await self._encode_all([urls[i] for i in misses], tenant, misses,
                                           [hashes.get(i, urls[i]) for i in misses])
            for i, item in zip(misses, found):
                known[i] = item
        return [known[i] for i in range(len(urls))]

    def data_hashes(self, urls: list[str]) -> dict[int, str]:
        """The content hash of each ``data:`` image (the router holds its bytes), by index; one
        that does not decode is left to the encoder, which answers it with the reason."""
        hashes: dict[int, str] = {}
        for i, url in enumerate(urls):
            if url[:5].lower() == "data:":
                try:
                    hashes[i] = content_hash(decode_data_uri(url, self.media_limits))
                except MediaError:
                    pass  # NOTE: not looked up here; the encoder answers it with the reason
        return hashes

    async def _cached(self, hashes: dict[int, str], tenant: str | None) -> dict[int, dict]:
        """The images of ``hashes`` the router finds in the cache itself, by index. Nothing
        before the first encode has told the router its encoders' namespace, or without a cache."""
        if self._cache() is None or self.namespace is None or not hashes:
            return {}
        scope = f"{tenant}@{self.namespace}" if tenant else self.namespace
        try:
            items = await self._cache().lookup([f"{scope}/{h}" for h in hashes.values()], detail=True)
        except MMCacheError as e:  # NOTE: the encoders look up too: a shortcut lost, not a failure
            logger.info("router lookup failed (%s); asking the encoders", e)
            return {}
        out = {}
        for i, h in hashes.items():
            item = items.get(f"{scope}/{h}")
            if item is not None:
                out[i] = {"namespace": scope, "hash": h, "num_tokens": item["num_tokens"], "cached": True}
        return out

    async def _encode_all(self, urls: list[str], tenant: str | None, positions: list[int],
                          keys: list[str]) -> list[dict]:
        """Encode ``urls`` (at ``positions`` of the request, for error messages), each on the
        encoder owning its routing key, the encoders in parallel; in order."""
        pool = self._pools()["encode"]
        groups: dict[Backend, list[int]] = {}
        for j, key in enumerate(keys):
            groups.setdefault(pool.owner(key), []).append(j)
        runs = list(groups.items())
        results = await asyncio.gather(*(self._encode_run([urls[j] for j in idx], [positions[j] for j in idx], b, tenant)
                                         for b, idx in runs), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        if results and isinstance(results[0].get("namespace"), str):
            self.namespace = results[0]["namespace"]  # NOTE: what _cached looks up in from now on
        scope = f"{tenant}@" if tenant else ""
        out: list[dict | None] = [None] * len(urls)
        for (_, idx), doc in zip(runs, results):
            for j, item in zip(idx, doc["items"]):
                out[j] = {"namespace": scope + doc["namespace"], **item}
        return out  # type: ignore[return-value]

    async def _encode_run(self, urls: list[str], positions: list[int], backend: Backend,
                          tenant: str | None = None) -> dict:
        body: dict[str, Any] = {"images": urls}
        if tenant:
            body["tenant"] = tenant
        try:
            _, doc = await self._call("encode", "/v1/encode", body, first=backend)
        except APIError as e:  # NOTE: the encoder numbers the images of its run; renumber for the request
            e.message = _IMAGE_INDEX.sub(lambda m: f"image {positions[int(m.group(1))]}: "
                                         if int(m.group(1)) < len(positions) else m.group(0), e.message)
            raise
        if not isinstance(doc, dict) or len(doc.get("items", ())) != len(urls):
            raise APIError(502, f"encoder answered {str(doc)[:200]!r} for {len(urls)} images", "encode")
        return doc

    async def encode_videos(self, urls: list[str], sampling: VideoSampling, tenant: str | None = None) -> list[dict]:
        """Per video, ``{"frames", "items"}``: its frame groups as ``{"namespace", "hash",
        "num_tokens", "cached", "frames"}``, in order. Each video goes to the encoder owning its
        key (the content hash of a ``data:`` video, else its URL), the videos in parallel."""
        pool = self._pools()["encode"]
        scope = f"{tenant}@" if tenant else ""

        async def one(k: int, url: str) -> dict:
            key = url
            if url[:5].lower() == "data:":
                try:  # NOTE: off the event loop: a data: video may be hundreds of MiB
                    key = await asyncio.to_thread(lambda: content_hash(decode_data_uri(url, self.video_limits)))
                except MediaError:
                    pass  # NOTE: the encoder answers it with the reason
            body: dict[str, Any] = {"images": [], "videos": [{"url": url, **sampling.to_json()}]}
            if tenant:
                body["tenant"] = tenant
            try:
                _, doc = await self._call("encode", "/v1/encode", body, first=pool.owner(key))
            except APIError as e:
                e.message = _VIDEO_INDEX.sub(f"video {k}: ", e.message)
                raise
            videos = doc.get("videos") if isinstance(doc, dict) else None
            if not isinstance(videos, list) or len(videos) != 1 or not isinstance(videos[0], dict) \
                    or not isinstance(videos[0].get("items"), list) or not videos[0]["items"] \
                    or not all(isinstance(it, dict) for it in videos[0]["items"]) \
                    or not isinstance(doc.get("namespace"), str):
                raise APIError(502, f"encoder answered {str(doc)[:200]!r} for a video", "encode")
            self.namespace = doc["namespace"]
            return {"frames": videos[0].get("frames"),
                    "items": [{"namespace": scope + doc["namespace"], **item} for item in videos[0]["items"]]}

        return list(await asyncio.gather(*(one(k, url) for k, url in enumerate(urls))))

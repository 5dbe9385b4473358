"""Reading a warm run's images under a memory budget: ``Budget`` (at most so many bytes held at
once) and ``ImageReader`` (a file read or a URL fetched under the encoders' address policy, sized
against the budget, hashed: the cache's key)."""

from __future__ import annotations

import asyncio
import os

from mmcache.ops.warm_sources import Item, read_file


class Budget:
    """At most ``limit`` bytes held at once; one holder may exceed it alone (an image larger
    than the budget still goes, by itself), so the run never deadlocks."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0
        self.peak = 0
        self._changed = asyncio.Condition()

    def can_take(self, n: int) -> bool:
        return self.held == 0 or self.held + n <= self.limit

    async def acquire(self, n: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.held == 0 or self.held + n <= self.limit)
            self.held += n
            self.peak = max(self.peak, self.held)

    def force(self, n: int) -> None:
        """Count ``n`` more bytes held now, without waiting (an item turned out larger than its
        reservation: the bytes are here already; later acquires wait for them)."""
        self.held += n
        self.peak = max(self.peak, self.held)

    async def release(self, n: int) -> None:
        if n <= 0:
            return
        async with self._changed:
            self.held -= n
            self._changed.notify_all()


class ImageReader:
    """Fills an item's bytes and hash; ``fetch_session`` resolves through the address policy
    (``mmcache.common.ssrf``), unlike the session that talks to the stack on loopback."""

    def __init__(self, max_image_bytes: int, fetch_timeout_s: float, allow_private_urls: bool, budget: Budget,
                 fetch_session):
        self.max_image_bytes, self.fetch_timeout_s = max_image_bytes, fetch_timeout_s
        self.allow_private_urls, self.budget, self.fetch_session = allow_private_urls, budget, fetch_session

    async def read(self, item: Item) -> str | None:
        """Fill ``item.data`` and ``item.hash``; an error message when it cannot be read."""
        from mmcache_client import content_hash

        limit = self.max_image_bytes
        if item.error is not None:
            return item.error
        try:
            if item.data is None and item.path is not None:
                item.data = await asyncio.to_thread(read_file, item.path, limit)
            elif item.data is None and item.url is not None:
                item.data = await self._fetch(item.url, limit)
            elif item.data is None:
                return "nothing to read"
        except (OSError, ValueError) as e:
            return (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or type(e).__name__
        except asyncio.TimeoutError:
            return f"timed out after {self.fetch_timeout_s:g} s"
        except Exception as e:  # aiohttp.ClientError and kin: the URL failed, the run goes on
            return f"{type(e).__name__}: {e}"
        size = item.size = len(item.data)
        # NOTE: the reservation was an estimate (a URL's size is known once fetched, a file may
        # have grown): held bytes are counted as they are, never fewer
        if size > item.reserved:
            self.budget.force(size - item.reserved)
        else:
            await self.budget.release(item.reserved - size)
        item.reserved = size
        if size > limit:
            return f"over --max-image-bytes={limit}"
        if not size:
            return "empty file"
        item.hash = await asyncio.to_thread(content_hash, item.data) if size > 1 << 20 else content_hash(item.data)
        return None

    async def _fetch(self, url: str, limit: int) -> bytes:
        """The image at ``url`` under the encoders' address policy (``mmcache.common.http_fetch``:
        each redirect hop checked, a refused one never connected to)."""
        from mmcache.common import http_fetch

        try:
            body, _ = await http_fetch.fetch_http(http_fetch.parse_http_url(url), self.fetch_session,
                                                  allow_private_urls=self.allow_private_urls,
                                                  max_bytes=limit, timeout_s=self.fetch_timeout_s)
        except http_fetch.FetchRefused as e:
            how = "points at" if e.hop == 0 else "redirects to"
            raise ValueError(f"{how} a private, loopback, link-local or multicast address ({e.host}): refused "
                             "(--allow-private-urls allows it)") from None
        except http_fetch.FetchFailed as e:
            raise ValueError(e.cause.replace("max_bytes=", "--max-image-bytes=")) from None
        return body

    def estimate(self, item: Item) -> int:
        """The bytes ``item`` will likely hold once read (reserved from the budget before it is)."""
        if item.data is not None:
            return len(item.data)
        if item.path is not None:
            try:
                return min(os.stat(item.path).st_size, self.max_image_bytes)
            except (OSError, ValueError):  # NOTE: ValueError: a NUL in the path; the read names it
                return 0
        return self.max_image_bytes if item.url is not None else 0

"""``mmcache warm``: encode a corpus into the cache ahead of traffic.

    mmcache warm ./catalog                                  # a running `mmcache up` in ./mmcache-data
    mmcache warm urls.txt frames.parquet --data-dir /srv/mmcache
    mmcache warm ./catalog --encoder http://127.0.0.1:8471 --cache unix:///run/mmcache.sock
    mmcache warm ./catalog --model tiny-llava --cache unix:///run/mmcache.sock   # its own encoder

Sources: a folder (walked recursively for image files), a text file with one path or URL per
line (``#`` comments; relative paths are relative to the list's folder), a Parquet file with an
image column (bytes, a path or URL string, or a ``{bytes, path}`` struct as Hugging Face image
datasets store them; read in small batches, never whole), or one image file.

The images go to the encoders of a running stack (``POST /v1/encode``, as the router sends
them), which encode each image once and put it in the cache. Before any upload each image is
hashed here (BLAKE3, the cache's key) and looked up in the cache in batches, so what is cached
already costs a read and a hash, not an upload: a second run does only what is left, which is
what makes a run resumable (the cache is the journal). Bounded: at most ``--memory`` bytes of
image data are held at once (read, queued or in flight), at most ``--concurrency`` encode
requests are in flight, each of at most ``--batch`` images.

Per image failures (an unreadable or undecodable file, a URL that does not answer, an image
over ``--max-image-bytes``) are named and the run goes on; pressure (503 + ``Retry-After``
from an encoder whose queue or cache is full) is waited out, never a failure. At the end a
summary goes to standard error and one JSON line to standard output; the exit status is 0 when
every image is cached, 1 when some failed. Progress: a bar on a terminal (images, bytes, rate,
hits, failures), plain lines every ``--interval`` seconds with ``--quiet`` or off a terminal.

``mmcache`` imports no worker: with ``--model`` the encoder is started as a process by module
name (``python -m encoder_worker.cli serve``) and stopped at the end.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from typing import Iterator

from mmcache.ops.warm_reader import Budget, ImageReader
from mmcache.ops.warm_sources import Item, WarmError, open_sources
from mmcache.ops.warm_target import Target, namespace_of

__all__ = ["Budget", "Settings", "Target", "WarmError", "open_sources", "warm"]

DEFAULT_MAX_IMAGE_BYTES = 20 << 20
"""The encoders' own default limit (``MediaLimits.max_bytes``): a bigger image would be refused."""
_IMAGE_ERROR = re.compile(r"^image (\d+): (.*)$", re.S)
_TAKE, _TAKE_BYTES = 16, 1 << 20
"""Items taken from the sources per thread hop: at most this many, or this many bytes of them."""


@dataclass
class Settings:
    concurrency: int = 0
    """Encode requests in flight at most (0: two per encoder)."""
    batch: int = 8
    batch_bytes: int = 16 << 20
    memory_bytes: int = 256 << 20
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    lookup_batch: int = 64
    fetch_concurrency: int = 8
    tenant: str | None = None
    max_wait_s: float = 0.0
    """Longest one batch waits out pressure (503s) before its images are counted failed; 0: as
    long as it lasts (pressure is an answer to wait on, not a failure)."""
    fetch_timeout_s: float = 30.0
    allow_private_urls: bool = False
    """Fetch image URLs that are, resolve to or redirect to private, loopback or link-local
    addresses (off: each is a named failure, and nothing is connected to), as the encoders'
    ``--allow-private-urls``."""


@dataclass
class Report:
    images: int = 0
    hits: int = 0
    """Cached before the upload (or encoded by someone else meanwhile, or a duplicate)."""
    encoded: int = 0
    failures: list[dict] = field(default_factory=list)
    bytes_read: int = 0
    bytes_uploaded: int = 0
    retries: int = 0
    seconds: float = 0.0
    peak_held_bytes: int = 0

    def as_dict(self, namespace: str) -> dict:
        return {"images": self.images, "hits": self.hits, "encoded": self.encoded, "failed": len(self.failures),
                "namespace": namespace, "bytes_read": self.bytes_read, "bytes_uploaded": self.bytes_uploaded,
                "retries": self.retries, "seconds": round(self.seconds, 3), "peak_held_bytes": self.peak_held_bytes,
                "failures": self.failures[:100]}


class _Fatal(Exception):
    """The run stops: every encoder is gone."""


class Warmer:
    """One run: items → read (bounded) → hash → cache lookup in batches → encode the misses."""

    def __init__(self, target: Target, settings: Settings, progress, session, cache_client, fetch_session=None):
        self.target, self.settings, self.progress = target, settings, progress
        self.session, self.cache = session, cache_client
        self.fetch_session = fetch_session if fetch_session is not None else session
        """Image URLs are fetched with this one: it resolves through the address policy
        (``mmcache.common.ssrf``), unlike the session that talks to the stack on loopback."""
        self.report = Report()
        self.budget = Budget(settings.memory_bytes)
        self.reader = ImageReader(settings.max_image_bytes, settings.fetch_timeout_s, settings.allow_private_urls,
                                  self.budget, self.fetch_session)
        """Reads, fetches and hashes each image, its bytes counted against the budget."""
        self.queue: asyncio.Queue[Item | None] = asyncio.Queue()
        self.inflight_hashes: set[str] = set()
        self.encoder_load = {url: 0 for url in target.encoders}
        # NOTE: a tenant's token names plain keys (the sidecar adds its tenant); a trusted one
        # names the tenant it warms for
        self.scope = f"{settings.tenant}@{target.namespace}" if settings.tenant and not target.token_tenant \
            else target.namespace
        self._failures_file = None

    # -- bookkeeping ---------------------------------------------------------------------------

    async def _done(self, item: Item, outcome: str, error: str | None = None) -> None:
        """One image finished: counted, its memory given back."""
        if item.owner:
            self.inflight_hashes.discard(item.hash)
            item.owner = False
        item.data = None
        await self.budget.release(item.reserved)
        item.reserved = 0
        if outcome == "failed":
            failure = {"name": item.name, "error": error}
            self.report.failures.append(failure)
            if self._failures_file is not None:
                self._failures_file.write(json.dumps(failure) + "\n")
                self._failures_file.flush()
            self.progress.note(f"failed: {item.name}: {error}")
            self.progress.update(1, nbytes=item.size, failures=1)
        elif outcome == "hit":
            self.report.hits += 1
            self.progress.update(1, nbytes=item.size, hits=1)
        else:
            self.report.encoded += 1
            self.progress.update(1, nbytes=item.size, encoded=1)

    # -- the feed: read, hash, look up ---------------------------------------------------------

    async def feed(self, items: Iterator[Item]) -> None:
        """Items in chunks of ``lookup_batch``: each read (a few at once), hashed, looked up
        together; the misses queued for the encoders."""
        iterator = iter(items)
        taken: collections.deque[Item] = collections.deque()
        reads = asyncio.Semaphore(self.settings.fetch_concurrency)

        def take() -> list[Item]:
            """The next few items, each with its estimated size (a stat): off the loop, a few at
            a time (a thread hop per item would cost more than small images take to read)."""
            more: list[Item] = []
            nbytes = 0
            for item in itertools.islice(iterator, _TAKE):
                item.reserved = self.reader.estimate(item)
                more.append(item)
                nbytes += len(item.data) if item.data is not None else 0
                if nbytes >= _TAKE_BYTES:  # NOTE: rows that carry their bytes are held here unbudgeted
                    break
            return more

        async def read(item: Item) -> tuple[Item, str | None]:
            async with reads:
                return item, await self.reader.read(item)

        carried: Item | None = None
        while True:
            chunk: list[asyncio.Task] = []
            while len(chunk) < self.settings.lookup_batch:
                if carried is not None:
                    item, carried = carried, None
                else:
                    if not taken:
                        taken.extend(await asyncio.to_thread(take))
                        if not taken:
                            break
                    item = taken.popleft()
                    self.report.images += 1
                if chunk and not self.budget.can_take(item.reserved):
                    carried = item  # NOTE: the chunk's own reads hold the budget: look them up first
                    break
                await self.budget.acquire(item.reserved)
                chunk.append(asyncio.ensure_future(read(item)))
            if not chunk:
                return
            ready: list[Item] = []
            for item, error in await asyncio.gather(*chunk):
                self.report.bytes_read += item.size if error is None else 0
                if error is not None:
                    await self._done(item, "failed", error)
                elif item.hash in self.inflight_hashes:  # NOTE: the same image twice: encoded once
                    await self._done(item, "hit")
                else:
                    self.inflight_hashes.add(item.hash)
                    item.owner = True
                    ready.append(item)
            if ready:
                tiers = await self._lookup([f"{self.scope}/{i.hash}" for i in ready])
                for item in ready:
                    if tiers.get(f"{self.scope}/{item.hash}") is not None:
                        await self._done(item, "hit")
                    else:
                        await self.queue.put(item)

    async def _lookup(self, keys: list[str]) -> dict:
        from mmcache_client import CacheUnavailable

        for attempt in range(5):
            try:
                return await self.cache.lookup(keys)
            except CacheUnavailable:
                if attempt == 4:
                    raise
                await asyncio.sleep(0.5 * 2 ** attempt)
        raise AssertionError("unreachable")

    # -- the senders: encode the misses --------------------------------------------------------

    async def send_loop(self) -> None:
        """Take a batch of queued misses (as many as are ready, up to ``batch`` images and
        ``batch_bytes``), encode it, until the feed's end (None)."""
        while True:
            first = await self.queue.get()
            if first is None:
                await self.queue.put(None)  # NOTE: every sender sees the end
                return
            batch, nbytes = [first], len(first.data)
            while len(batch) < self.settings.batch:
                try:
                    nxt = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if nxt is None:
                    await self.queue.put(None)
                    break
                if nbytes + len(nxt.data) > self.settings.batch_bytes:
                    await self.queue.put(nxt)  # NOTE: the next batch starts with it
                    break
                batch.append(nxt)
                nbytes += len(nxt.data)
            await self._encode(batch)

    async def _encode(self, batch: list[Item]) -> None:
        """Encode ``batch``; a bad image named by the encoder is failed and the rest sent again;
        503s are waited out (up to ``max_wait_s``); an encoder that does not answer is retried
        on another."""
        deadline = time.monotonic() + self.settings.max_wait_s if self.settings.max_wait_s > 0 else float("inf")
        unreachable = 0
        payload = None
        while batch:
            url = min(self.encoder_load, key=self.encoder_load.get)
            if payload is None:  # NOTE: built once per batch, kept across 503s. On the loop: built in
                # worker threads, glibc's per-thread arenas kept the freed MBs (+27 MB peak on 74 MB)
                payload = _payload(batch, self.settings.tenant)
            self.encoder_load[url] += 1
            try:
                status, doc, retry_after = await self._post(url, payload)
            except Exception as e:  # noqa: BLE001 - connection refused/reset, timeouts: the encoder is away
                status, doc, retry_after = None, {"error": f"{type(e).__name__}: {e}"}, min(0.1 * 2 ** unreachable, 5.0)
            finally:
                self.encoder_load[url] -= 1
            self.report.bytes_uploaded += len(payload)
            if status == 200:
                items = doc.get("items", [])
                for item, answer in zip(batch, items):
                    if answer.get("hash") != item.hash:
                        await self._done(item, "failed", f"the encoder answered hash {answer.get('hash')!r}")
                    else:
                        await self._done(item, "hit" if answer.get("cached") else "encoded")
                for item in batch[len(items):]:
                    await self._done(item, "failed", "the encoder answered fewer items than it was sent")
                return
            message = str(doc.get("error", doc))
            if status in (400, 413):
                match = _IMAGE_ERROR.match(message)
                if match and int(match[1]) < len(batch):
                    bad = batch.pop(int(match[1]))
                    await self._done(bad, "failed", match[2])
                    payload = None  # the batch changed
                    continue
                if len(batch) > 1:  # NOTE: which one is bad is not said: each alone
                    await asyncio.gather(*(self._encode([item]) for item in batch))
                    return
                await self._done(batch[0], "failed", f"HTTP {status}: {message}")
                return
            if status == 503 or status is None:
                if status is None:
                    unreachable += 1
                    if self.target.started is not None and self.target.started.dead():
                        raise _Fatal(f"the encoder this run started exited ({message})")
                    if unreachable > 5 * len(self.encoder_load):
                        raise _Fatal(f"no encoder answers: last {url}: {message}")
                self.report.retries += 1
                if time.monotonic() + retry_after > deadline:
                    for item in batch:
                        await self._done(item, "failed", f"the stack stayed busy for {self.settings.max_wait_s:g} s: "
                                                         f"{message}")
                    return
                await asyncio.sleep(retry_after)
                continue
            for item in batch:  # 5xx: a bug or a broken encoder; named, the run goes on
                await self._done(item, "failed", f"HTTP {status}: {message}")
            return

    async def _post(self, url: str, payload: str) -> tuple[int, dict, float]:
        async with self.session.post(f"{url}/v1/encode", data=payload,
                                     headers={"Content-Type": "application/json"}) as resp:
            try:
                doc = await resp.json(content_type=None)
            except ValueError:
                doc = {"error": (await resp.text())[:500]}
            try:
                retry_after = float(resp.headers.get("Retry-After", "1"))
            except ValueError:
                retry_after = 1.0
            return resp.status, doc if isinstance(doc, dict) else {"error": str(doc)[:500]}, max(retry_after, 0.05)

    async def run(self, items: Iterator[Item], failures_path: str | None = None) -> Report:
        start = time.monotonic()
        senders = self.settings.concurrency or 2 * len(self.target.encoders)
        if failures_path:
            self._failures_file = open(failures_path, "w")
        tasks = [asyncio.ensure_future(self.send_loop()) for _ in range(senders)]
        feed = asyncio.ensure_future(self.feed(items))
        try:
            pending = {feed, *tasks}
            while not feed.done():  # NOTE: a sender that fails (every encoder gone) ends the run now
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.exception() is not None:
                        raise task.exception()
            await self.queue.put(None)
            await asyncio.gather(*tasks)
        finally:
            for task in (feed, *tasks):
                task.cancel()
            if self._failures_file is not None:
                self._failures_file.close()
            self.report.seconds = time.monotonic() - start
            self.report.peak_held_bytes = self.budget.peak
        return self.report


def _payload(batch: list[Item], tenant: str | None) -> str:
    """The ``POST /v1/encode`` body for ``batch``: each image as a base64 ``data:`` URI."""
    body: dict = {"images": ["data:application/octet-stream;base64," + base64.b64encode(i.data).decode("ascii")
                             for i in batch]}
    if tenant:
        body["tenant"] = tenant
    return json.dumps(body)


async def warm(sources: list[str], target: Target, settings: Settings, *, column: str | None = None,
               quiet: bool = False, interval_s: float = 10.0, failures_path: str | None = None,
               stream=None) -> dict:
    """One run (the command without its argument parsing): the summary as a dict."""
    import aiohttp

    from mmcache.common.progress import Progress
    from mmcache_client import AsyncCacheClient

    items, total = open_sources(sources, column, memory_bytes=settings.memory_bytes)
    connector = aiohttp.TCPConnector(limit=max(settings.concurrency, 2 * len(target.encoders)) + settings.fetch_concurrency)
    from mmcache.common.ssrf import CheckingConnector

    # NOTE: two sessions: the stack is on loopback; image URLs go through the address policy,
    # with no cookies and no proxy from the environment (the proxy, not this host, would resolve)
    fetch_connector = CheckingConnector(settings.allow_private_urls, limit=settings.fetch_concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_read=600),
                                     read_bufsize=1 << 20) as session, \
            aiohttp.ClientSession(connector=fetch_connector, cookie_jar=aiohttp.DummyCookieJar(),
                                  trust_env=False) as fetch_session, \
            AsyncCacheClient(target.cache, token=target.cache_token) as cache:
        target.namespace = await namespace_of(session, target.encoders)
        target.token_tenant = (await cache.stats()).get("tenant")
        if target.token_tenant:
            if settings.tenant not in (None, target.token_tenant):
                raise WarmError(f"the cache token is tenant {target.token_tenant!r}'s: it cannot warm tenant "
                                f"{settings.tenant!r}'s scope (use that tenant's token, or the sidecar's own)")
            settings.tenant = target.token_tenant  # NOTE: the encoders must write where the lookups look
        with Progress("warm", total=total, unit="images", counters=("hits", "encoded", "failures"),
                      quiet=quiet, interval_s=interval_s, stream=stream) as progress:
            warmer = Warmer(target, settings, progress, session, cache, fetch_session)
            try:
                report = await warmer.run(items, failures_path)
            except _Fatal as e:
                raise WarmError(str(e)) from None
    return report.as_dict(target.namespace)

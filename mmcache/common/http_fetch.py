"""One http(s) fetch under the address policy (``mmcache.common.ssrf``), redirects followed hop
by hop and each hop checked: shared by the encoders' image fetches (``encoder_worker.media``) and
``mmcache warm``.

The session must resolve through ``ssrf.CheckingConnector`` (names resolving to no public
address are refused inside the connector, so the address checked is the one connected to);
IP-literal hosts never reach a resolver and are checked here. Nothing is connected to for a
refused hop.
"""

from __future__ import annotations

import asyncio

import aiohttp
from yarl import URL

from mmcache.common import ssrf

MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
CHUNK_BYTES = 1 << 16


class FetchRefused(Exception):
    """Hop ``hop`` (0: the URL itself) names a non-public address and private ones are not allowed."""

    def __init__(self, host: str, hop: int):
        super().__init__(f"{host} (hop {hop}) has no public address")
        self.host, self.hop = host, hop


class FetchFailed(Exception):
    """The fetch failed after the address checks; ``cause`` is for the log, not for a client
    (it must not tell a closed port from an open one)."""

    def __init__(self, cause: str, hop: int):
        super().__init__(cause)
        self.cause, self.hop = cause, hop


def parse_http_url(url: str) -> URL:
    """``url`` as a ``yarl.URL``; ``ValueError`` unless it is http(s) with a host and a valid port."""
    parsed = URL(url)
    parsed.port  # noqa: B018 - raises for an out-of-range port
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"{url[:200]!r} is not an http(s) URL")
    return parsed


def in_chain(exc: BaseException | None, kind: type) -> BaseException | None:
    """The first exception of type ``kind`` in ``exc``'s cause/context chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


async def fetch_http(url: URL, session: aiohttp.ClientSession, *, allow_private_urls: bool, max_bytes: int,
                     timeout_s: float) -> tuple[bytes, int]:
    """The body at ``url`` and the number of redirects followed. Raises ``FetchRefused`` (a hop
    names a non-public address) or ``FetchFailed`` (anything else: status, size, timeout, I/O)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    current, hop = url, 0
    try:
        while True:
            literal = ssrf.literal_address(current.host or "")
            if not allow_private_urls and literal is not None and not ssrf.address_is_public(literal):
                raise ssrf.AddressRefused(current.host or "")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise FetchFailed(f"timed out after {timeout_s}s", hop)
            async with session.get(current, timeout=aiohttp.ClientTimeout(total=remaining),
                                   allow_redirects=False) as resp:
                if resp.status in REDIRECT_STATUSES:
                    current = _redirect_target(current, resp, hop)
                    hop += 1
                    continue
                if resp.status != 200:
                    raise FetchFailed(f"HTTP {resp.status}", hop)
                if resp.content_length is not None and resp.content_length > max_bytes:
                    raise FetchFailed(f"Content-Length {resp.content_length}, over max_bytes={max_bytes}", hop)
                body = bytearray()
                async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
                    body += chunk
                    if len(body) > max_bytes:
                        raise FetchFailed(f"sent more than max_bytes={max_bytes}", hop)
                return bytes(body), hop
    except FetchFailed:
        raise
    except (ssrf.AddressRefused, aiohttp.ClientError, OSError, ValueError,
            asyncio.TimeoutError) as exc:  # NOTE: TimeoutError is an OSError; distinct before 3.11
        refused = in_chain(exc, ssrf.AddressRefused)
        if refused is not None:
            raise FetchRefused(refused.host, hop) from exc
        if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
            raise FetchFailed(f"timed out after {timeout_s}s", hop) from exc
        raise FetchFailed(f"{type(exc).__name__}: {exc}", hop) from exc


def _redirect_target(current: URL, resp: aiohttp.ClientResponse, hop: int) -> URL:
    """Where a redirect from ``current`` leads: http(s) only, credentials kept only for the
    same origin, at most ``MAX_REDIRECTS`` hops."""
    if hop >= MAX_REDIRECTS:
        raise FetchFailed(f"more than {MAX_REDIRECTS} redirects", hop)
    location = resp.headers.get("Location")
    if not location:
        raise FetchFailed(f"HTTP {resp.status} without a Location", hop)
    target = current.join(URL(location))  # ValueError for a malformed Location
    if target.scheme not in ("http", "https") or not target.host:
        raise FetchFailed(f"redirect to a {target.scheme or 'relative'}: URL", hop)
    target.port  # noqa: B018 - raises for an out-of-range port
    if (target.scheme, target.host, target.port) != (current.scheme, current.host, current.port):
        target = target.with_user(None)  # NOTE: with_user(None) drops the password too
    return target.with_fragment(None)

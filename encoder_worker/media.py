"""Turn one IMAGE string (OpenAI's ``image_url.url``) into raw bytes and a decoded RGB image.

Every input is untrusted: sizes are bounded before work is done (encoded length before base64
decoding, Content-Length and a streaming count for http(s), ``fstat`` for files, header
dimensions before pixels are loaded), and every failure is a ``MediaError`` naming the problem.

http(s) fetches cannot be turned against the worker's own network (SSRF): a URL, or a redirect
from it, whose host is or resolves to a private, loopback, link-local, multicast or otherwise
non-public address is refused before any connection (``MediaLimits.allow_private_urls`` lifts
this). The check lives in the session's resolver (``http_session``), so the address checked is
the one connected to: DNS is resolved once. Redirects are followed here, hop by hop, so that each
hop is checked. Every other http(s) failure (refused connection, DNS failure, timeout, an HTTP
status, too many redirects, a body too large or not a decodable image) gives one message, so
that answers do not tell an open port from a closed one; the cause is logged here.
"""

from __future__ import annotations

import asyncio
import binascii
import io
import logging
import os
import stat
import sys
import time
import urllib.parse
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver
from PIL import Image
from yarl import URL

from mmcache.common import http_fetch, ssrf

logger = logging.getLogger(__name__)

_MAX_URL_CHARS_IN_MESSAGE = 100
MAX_REDIRECTS = http_fetch.MAX_REDIRECTS
"""Most redirects an http(s) image fetch follows (each hop's address is checked)."""



@dataclass(frozen=True)
class MediaLimits:
    """Bounds applied to every image a request names; shared, immutable, cheap to pass around."""

    max_bytes: int = 20 << 20
    """Largest encoded image accepted, in bytes (after base64 decoding, before pixel decoding)."""
    max_pixels: int = 40_000_000
    """Largest ``width * height`` accepted, in pixels: the decompression-bomb guard."""
    fetch_timeout_s: float = 10.0
    """Whole http(s) fetch, connect, redirects and body included, in seconds."""
    allowed_dirs: tuple[str, ...] = ()
    """Directories ``file://`` images may come from (resolved, symlinks followed); empty refuses
    ``file://`` altogether."""
    allow_http: bool = True
    """Whether ``http://`` and ``https://`` images are fetched at all."""
    allow_private_urls: bool = False
    """Whether http(s) images may come from (or redirect to) hosts at private, loopback,
    link-local, multicast or other non-public addresses (``address_is_public``); off, such a
    URL is refused before any connection is made."""
    formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
    """Pillow format names tried when decoding; others are refused (NOTE: some Pillow plugins,
    EPS for one, shell out or have a history of parser bugs, so we do not try them all)."""

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "fetch_timeout_s"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"{name}={value!r} must be > 0")
        # NOTE: accept a list from config loaders but store a tuple so the object stays hashable.
        object.__setattr__(self, "allowed_dirs", tuple(self.allowed_dirs))
        object.__setattr__(self, "formats", tuple(self.formats))
        if any(not isinstance(d, str) or not d for d in self.allowed_dirs):
            raise ValueError(f"allowed_dirs={self.allowed_dirs!r} must be non-empty strings")
        if not self.formats:
            raise ValueError(f"formats={self.formats!r} must not be empty")


class MediaError(ValueError):
    """An image or video could not be fetched or decoded; the message says why.

    ``index`` is its position among the request's images (videos), ``None`` until a caller that knows it
    sets it (``err.index = i``) before letting the error reach the HTTP layer.
    """

    def __init__(self, message: str, index: int | None = None, kind: str = "image") -> None:
        super().__init__(message)
        self.index = index
        self.kind = kind
        """``image`` or ``video``: what ``index`` counts."""


def http_session(limits: MediaLimits, *, resolver: AbstractResolver | None = None) -> aiohttp.ClientSession:
    """A session for fetching http(s) images under ``limits``' address policy; call it on the
    event loop that will use it. Workers create one and pass it to every ``load_image``.

    ``resolver`` is the one the address checks wrap (aiohttp's threaded resolver by default).
    No cookie jar (one client's fetch must not send cookies another's set) and no proxy
    settings from the environment (``trust_env=False``: the proxy, not this host, would
    resolve the name).
    """
    return aiohttp.ClientSession(connector=ssrf.CheckingConnector(limits.allow_private_urls, resolver),
                                 cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)


def _session_fits(session: aiohttp.ClientSession, limits: MediaLimits) -> bool:
    """Whether ``session`` enforces exactly ``limits``' address policy (a plain session checks
    nothing: it fits only where private addresses are allowed anyway)."""
    connector = session.connector
    if isinstance(connector, ssrf.CheckingConnector):
        return connector.allow_private_urls == limits.allow_private_urls
    return limits.allow_private_urls


def _describe(url: str) -> str:
    """A short, credential-free form of ``url`` for messages (no query, userinfo or payload)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # e.g. an unbalanced '[' in the host
        return url.partition("?")[0][:_MAX_URL_CHARS_IN_MESSAGE]
    if parts.scheme.lower() == "data":
        return "data URI"
    if not parts.scheme:
        return url[:_MAX_URL_CHARS_IN_MESSAGE]
    host = parts.hostname or ""
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    text = f"{parts.scheme}://{host}{port}{parts.path}"
    if len(text) > _MAX_URL_CHARS_IN_MESSAGE:
        text = text[:_MAX_URL_CHARS_IN_MESSAGE] + "..."
    return text


async def fetch_bytes(
    url: str, limits: MediaLimits, session: aiohttp.ClientSession | None = None
) -> bytes:
    """The encoded image ``url`` names, at most ``limits.max_bytes`` long.

    ``session`` is reused for http(s) when given and it enforces ``limits``' address policy
    (callers serving many requests should pass one from ``http_session(limits)``); otherwise a
    fitting session lives for this call only.
    """
    if not isinstance(url, str):
        raise MediaError(f"image URL must be a string, got {type(url).__name__}")
    if not url:
        raise MediaError("image URL is empty")
    scheme = url.partition(":")[0].lower() if ":" in url else ""
    if scheme == "data":
        return _decode_data_uri(url, limits)
    if scheme in ("http", "https"):
        if not limits.allow_http:
            raise MediaError("http(s) image URLs are disabled on this worker")
        return await _fetch_http(url, limits, session)
    if scheme == "file":
        path = _resolve_file_url(url, limits)
        return await asyncio.to_thread(_read_file, path, url, limits)
    raise MediaError(
        f"unsupported image URL {_describe(url)!r}: expected a data:, http(s):// or file:// URL"
    )


def decode_data_uri(url: str, limits: MediaLimits) -> bytes:
    """The bytes of a base64 ``data:`` URI, at most ``limits.max_bytes``; ``MediaError`` otherwise."""
    return _decode_data_uri(url, limits)


def _decode_data_uri(url: str, limits: MediaLimits) -> bytes:
    header, sep, payload = url[len("data:"):].partition(",")
    if not sep:
        raise MediaError("data URI has no ',' separating its header from its data")
    if header.split(";")[-1].strip().lower() != "base64":
        raise MediaError("data URI must be base64-encoded (';base64,' marker missing)")
    # NOTE: valid strict base64 has no whitespace, so the decoded size follows from the encoded
    # length; checking it first refuses a huge payload without allocating its decoded copy.
    padding = 2 if payload.endswith("==") else 1 if payload.endswith("=") else 0
    num_bytes = len(payload) // 4 * 3 - padding
    if num_bytes > limits.max_bytes:
        raise MediaError(f"data URI holds ~{num_bytes} bytes, over max_bytes={limits.max_bytes}")
    try:
        if sys.version_info >= (3, 11):
            data = binascii.a2b_base64(payload, strict_mode=True)
        else:  # pragma: no cover - strict_mode arrived in 3.11
            import base64

            data = base64.b64decode(payload, validate=True)
    except ValueError as exc:  # binascii.Error, or non-ASCII characters
        raise MediaError(f"data URI has invalid base64: {exc}") from exc
    if len(data) > limits.max_bytes:
        raise MediaError(f"data URI holds {len(data)} bytes, over max_bytes={limits.max_bytes}")
    return data


def _unloadable(where: str) -> str:
    """The one message for every http(s) failure after the address check: it must not tell a
    closed port from an open one, nor one that answered from one that did not."""
    return f"could not load an image from {where}"


def _refused(where: str, hop: int) -> str:
    how = "points at" if hop == 0 else "redirects to"
    return (f"{where} {how} a private, loopback, link-local or multicast address: refused "
            "(the worker's --allow-private-urls allows it)")


def _parse_http_url(url: str, where: str) -> URL:
    try:
        parsed = URL(url)
        parsed.port  # noqa: B018 - raises for an out-of-range port
    except (ValueError, TypeError) as exc:
        raise MediaError(f"{where!r} is not a valid http(s) URL") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise MediaError(f"{where!r} is not a valid http(s) URL")
    return parsed


async def _fetch_http(
    url: str, limits: MediaLimits, session: aiohttp.ClientSession | None
) -> bytes:
    where = _describe(url)
    current = _parse_http_url(url, where)
    if session is None or not _session_fits(session, limits):
        if session is not None:
            logger.debug("the session given does not enforce allow_private_urls=%s; using a fitting one",
                         limits.allow_private_urls)
        async with http_session(limits) as own_session:
            return await _fetch_http(url, limits, own_session)
    start = time.perf_counter()
    try:
        body, hops = await http_fetch.fetch_http(current, session, allow_private_urls=limits.allow_private_urls,
                                                 max_bytes=limits.max_bytes, timeout_s=limits.fetch_timeout_s)
    except http_fetch.FetchRefused as exc:
        logger.info("image fetch from %s refused: %s (hop %d) has no public address", where, exc.host, exc.hop)
        raise MediaError(_refused(where, exc.hop)) from exc
    except http_fetch.FetchFailed as exc:
        logger.info("image fetch from %s failed (hop %d): %s", where, exc.hop, exc.cause)
        raise MediaError(_unloadable(where)) from exc
    logger.debug("fetched %s: %d bytes in %.1f ms (%d redirects)", where, len(body),
                 (time.perf_counter() - start) * 1e3, hops)
    return body


def _resolve_file_url(url: str, limits: MediaLimits) -> str:
    """The real path ``url`` names, checked to lie inside one of ``limits.allowed_dirs``."""
    if not limits.allowed_dirs:
        raise MediaError("file:// image URLs are disabled on this worker (no allowed_dirs)")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        raise MediaError(f"malformed file:// URL: {exc}") from exc
    if parts.netloc not in ("", "localhost"):
        raise MediaError(f"file:// URL names a remote host {parts.netloc!r}")
    path = urllib.parse.unquote(parts.path)
    if not os.path.isabs(path) or "\x00" in path:
        raise MediaError(f"file:// URL must name an absolute path, got {path!r}")
    real = os.path.realpath(path)
    for allowed in limits.allowed_dirs:
        root = os.path.realpath(allowed)
        if os.path.commonpath([real, root]) == root:
            return real
    raise MediaError(f"{path!r} is outside the allowed directories")


def _read_file(real: str, url: str, limits: MediaLimits) -> bytes:
    where = _describe(url)
    # NOTE: O_NOFOLLOW refuses a final component swapped for a symlink after realpath();
    # O_NONBLOCK keeps a FIFO from hanging open(); fstat() judges the file actually opened.
    flags = os.O_RDONLY
    for name in ("O_NOFOLLOW", "O_NONBLOCK", "O_CLOEXEC"):
        flags |= getattr(os, name, 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError as exc:
        raise MediaError(f"{where}: no such file") from exc
    except OSError as exc:
        raise MediaError(f"{where}: cannot open: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MediaError(f"{where}: not a regular file")
        if st.st_size > limits.max_bytes:
            raise MediaError(f"{where} is {st.st_size} bytes, over max_bytes={limits.max_bytes}")
        f = os.fdopen(fd, "rb")  # owns fd from here on
    except BaseException:
        os.close(fd)
        raise
    with f:
        data = f.read(limits.max_bytes + 1)  # the file may have grown since fstat()
    if len(data) > limits.max_bytes:
        raise MediaError(f"{where} grew past max_bytes={limits.max_bytes} while being read")
    return data


def decode_image(data: bytes, limits: MediaLimits) -> Image.Image:
    """``data`` decoded into a fully loaded RGB image, refusing more than ``limits.max_pixels``.

    Pillow's own global bomb guard (``Image.MAX_IMAGE_PIXELS``) is left as configured; it can
    only tighten ``max_pixels``, never loosen it.
    """
    try:
        with Image.open(io.BytesIO(data), formats=limits.formats) as im:
            width, height = im.size  # read from the header; no pixels decoded yet
            if width * height > limits.max_pixels:
                raise MediaError(
                    f"image is {width}x{height} = {width * height} pixels, "
                    f"over max_pixels={limits.max_pixels}"
                )
            im.load()  # decode now so truncated or corrupt data fails here, not later
            return im.convert("RGB")
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError(f"image too large: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise MediaError(
            f"not a decodable image: not in an accepted format ({', '.join(limits.formats)})"
        ) from exc
    except Exception as exc:
        # NOTE: Pillow's plugins raise many types on hostile input (OSError, SyntaxError,
        # struct.error, IndexError, ...); all mean the same thing to the caller.
        raise MediaError(f"not a decodable image: {exc or type(exc).__name__}") from exc


async def load_image(
    url: str, limits: MediaLimits, session: aiohttp.ClientSession | None = None
) -> tuple[bytes, Image.Image]:
    """The raw bytes ``url`` names (for content hashing) and their decoded RGB image.

    Decoding runs in a worker thread so that a large image does not stall the event loop.
    """
    data = await fetch_bytes(url, limits, session)
    return data, await decode_fetched(url, data, limits)


async def decode_fetched(url: str, data: bytes, limits: MediaLimits) -> Image.Image:
    """``data`` (what ``fetch_bytes(url)`` gave) decoded in a worker thread; for an http(s) URL
    a decode failure is the uniform fetch error (see ``load_image``)."""
    try:
        return await asyncio.to_thread(decode_image, data, limits)
    except MediaError as exc:
        raise uniform_fetch_error(url, exc) from exc


def uniform_fetch_error(url: str, exc: MediaError) -> MediaError:
    """``exc`` (a decode failure of what ``url`` gave) as the client may see it: for an http(s)
    URL the one fetch message, since what an open port sent is not for the client ("not an
    image" vs "cannot connect" would map the host's ports); the cause is logged here."""
    if not url[:8].lower().startswith(("http://", "https://")):
        return exc
    where = _describe(url)
    logger.info("media fetch from %s: %s", where, exc)
    return MediaError(_unloadable(where), exc.index, exc.kind)

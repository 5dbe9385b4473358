"""encoder_worker.media: data:, http(s):// and file:// images, size and pixel bounds, bad input."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import socket
import struct
import time
import zlib

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from PIL import Image

from encoder_worker.media import MediaError, MediaLimits, decode_image, fetch_bytes, http_session, load_image

LIMITS = MediaLimits()
LOCAL = MediaLimits(allow_private_urls=True)
"""For the http(s) tests: their server listens on 127.0.0.1, refused by default (tests/test_ssrf.py)."""


def _encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _noise(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims ``width x height`` RGB pixels (its IDAT holds almost none)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


PNG = _encode(_noise(), "PNG")
JPEG = _encode(_noise(seed=1), "JPEG", quality=90)


# -- config and error type ------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["max_bytes", "max_pixels", "fetch_timeout_s"])
def test_limits_reject_non_positive(field: str) -> None:
    with pytest.raises(ValueError, match=f"{field}=0 must be > 0"):
        MediaLimits(**{field: 0})


def test_limits_store_tuples_and_stay_hashable() -> None:
    limits = MediaLimits(allowed_dirs=["/tmp"])  # type: ignore[arg-type]
    assert limits.allowed_dirs == ("/tmp",)
    hash(limits)
    with pytest.raises(ValueError, match="allowed_dirs"):
        MediaLimits(allowed_dirs=("",))


def test_media_error_carries_index() -> None:
    err = MediaError("boom")
    assert isinstance(err, ValueError) and err.index is None and str(err) == "boom"
    err.index = 3
    assert err.index == 3


# -- data: URIs and decoding ---------------------------------------------------------------------


async def test_data_uri_png_round_trip() -> None:
    array = _noise()
    png = _encode(array, "PNG")
    data, image = await load_image(_data_uri(png), LIMITS)
    assert data == png
    assert image.mode == "RGB" and image.size == (64, 48)
    np.testing.assert_array_equal(np.asarray(image), array)


async def test_data_uri_jpeg_round_trip() -> None:
    data, image = await load_image(_data_uri(JPEG, "image/jpeg"), LIMITS)
    assert data == JPEG
    assert image.mode == "RGB" and image.size == (64, 48)


async def test_decode_converts_to_rgb() -> None:
    gray = _encode(np.zeros((8, 8), dtype=np.uint8), "PNG")
    rgba = _encode(np.zeros((8, 8, 4), dtype=np.uint8), "PNG")
    for raw in (gray, rgba):
        assert decode_image(raw, LIMITS).mode == "RGB"


@pytest.mark.parametrize(
    "url, message",
    [
        ("data:image/png;base64,iVBOR!!!", "invalid base64"),
        ("data:image/png;base64,iVBORw0KGgo", "invalid base64"),  # bad padding
        ("data:image/png;base64,aGVs bG8=", "invalid base64"),  # whitespace
        ("data:image/png;base64,aGVsbG8=\u00e9", "invalid base64"),  # non-ASCII
        ("data:image/png," + base64.b64encode(PNG).decode(), "base64-encoded"),
        ("data:image/png;base64", "no ','"),
    ],
)
async def test_bad_data_uris(url: str, message: str) -> None:
    with pytest.raises(MediaError, match=message):
        await fetch_bytes(url, LIMITS)


async def test_oversized_data_uri_refused_before_decoding() -> None:
    limits = MediaLimits(max_bytes=1000)
    # NOTE: the payload ends in invalid base64; a size error (not a base64 one) proves the
    # size was judged from the encoded length before anything was decoded.
    url = "data:image/png;base64," + "A" * 4000 + "!!!!"
    with pytest.raises(MediaError, match="over max_bytes=1000"):
        await fetch_bytes(url, limits)
    # Exactly at the limit is fine; one byte over is not.
    assert len(await fetch_bytes(_data_uri(b"x" * 1000), limits)) == 1000
    with pytest.raises(MediaError, match="over max_bytes"):
        await fetch_bytes(_data_uri(b"x" * 1001), limits)


@pytest.mark.parametrize(
    "raw",
    [b"", b"hello, world", PNG[: len(PNG) // 2], JPEG[: len(JPEG) // 2], PNG[:40]],
    ids=["empty", "text", "truncated-png", "truncated-jpeg", "png-header-only"],
)
async def test_undecodable_bytes(raw: bytes) -> None:
    with pytest.raises(MediaError, match="not a decodable image"):
        await load_image(_data_uri(raw), LIMITS)


def test_format_outside_allow_list_refused() -> None:
    ppm = _encode(_noise(4, 4), "PPM")
    assert decode_image(ppm, MediaLimits(formats=("PPM",))).size == (4, 4)
    with pytest.raises(MediaError, match="not in an accepted format"):
        decode_image(ppm, LIMITS)


def test_bomb_refused_from_header_before_loading() -> None:
    # 8000x6000 1-bit zeros: 48 M pixels in a PNG of a few KiB, over the default 40 M.
    buf = io.BytesIO()
    Image.new("1", (8000, 6000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 100_000
    with pytest.raises(MediaError, match="8000x6000 = 48000000 pixels, over max_pixels"):
        decode_image(buf.getvalue(), LIMITS)


@pytest.mark.parametrize("size", [(30000, 30000), (100000, 100000)])
def test_crafted_huge_ihdr_refused(size: tuple[int, int]) -> None:
    with pytest.raises(MediaError, match="pixels"):
        decode_image(_png_claiming(*size), LIMITS)
    # A small claim in the same crafted file decodes far enough to fail as truncated instead.
    with pytest.raises(MediaError, match="not a decodable image"):
        decode_image(_png_claiming(64, 64), LIMITS)


def test_max_pixels_is_a_per_call_limit() -> None:
    with pytest.raises(MediaError, match="over max_pixels=100"):
        decode_image(PNG, MediaLimits(max_pixels=100))
    assert Image.MAX_IMAGE_PIXELS is not None  # PIL's global guard is left alone


@pytest.mark.parametrize(
    "url", ["", "ftp://example.com/a.png", "a.png", "/abs/a.png", "C:\\a.png", "gopher:x"]
)
async def test_unsupported_urls(url: str) -> None:
    with pytest.raises(MediaError):
        await fetch_bytes(url, LIMITS)


async def test_non_string_url() -> None:
    with pytest.raises(MediaError, match="must be a string"):
        await fetch_bytes(b"data:,x", LIMITS)  # type: ignore[arg-type]


# -- file:// -------------------------------------------------------------------------------------


@pytest.fixture
def image_dirs(tmp_path):
    allowed = tmp_path / "allowed"
    outside = tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "cat.png").write_bytes(PNG)
    (outside / "secret.png").write_bytes(PNG)
    return allowed, outside


async def test_file_inside_allowed_dir(image_dirs) -> None:
    allowed, _ = image_dirs
    limits = MediaLimits(allowed_dirs=(str(allowed),))
    data, image = await load_image(f"file://{allowed}/cat.png", limits)
    assert data == PNG and image.size == (64, 48)
    assert await fetch_bytes(f"file://localhost{allowed}/cat.png", limits) == PNG
    (allowed / "a b.png").write_bytes(PNG)
    assert await fetch_bytes(f"file://{allowed}/a%20b.png", limits) == PNG


async def test_file_outside_allowed_dir(image_dirs) -> None:
    allowed, outside = image_dirs
    limits = MediaLimits(allowed_dirs=(str(allowed),))
    (allowed / "link.png").symlink_to(outside / "secret.png")
    (allowed / "linkdir").symlink_to(outside)
    sibling = str(allowed) + "2"  # shares a string prefix with the allowed dir, nothing more
    os.mkdir(sibling)
    with open(os.path.join(sibling, "x.png"), "wb") as f:
        f.write(PNG)
    for url in [
        f"file://{outside}/secret.png",
        f"file://{allowed}/../outside/secret.png",
        f"file://{allowed}/link.png",
        f"file://{allowed}/linkdir/secret.png",
        f"file://{sibling}/x.png",
        f"file://{allowed}/%2e%2e/outside/secret.png",
    ]:
        with pytest.raises(MediaError, match="outside the allowed directories"):
            await fetch_bytes(url, limits)


async def test_file_refused_without_allowed_dirs(image_dirs) -> None:
    allowed, _ = image_dirs
    with pytest.raises(MediaError, match="disabled"):
        await fetch_bytes(f"file://{allowed}/cat.png", LIMITS)


async def test_file_bad_targets(image_dirs, tmp_path) -> None:
    allowed, _ = image_dirs
    limits = MediaLimits(allowed_dirs=(str(allowed),), max_bytes=len(PNG))
    (allowed / "big.png").write_bytes(PNG + b"\x00")
    (allowed / "sub").mkdir()
    os.mkfifo(allowed / "fifo")
    cases = {
        f"file://{allowed}/missing.png": "no such file",
        f"file://{allowed}/sub": "not a regular file",
        f"file://{allowed}/fifo": "not a regular file",
        f"file://{allowed}/big.png": "over max_bytes",
        f"file://otherhost{allowed}/cat.png": "remote host",
        "file:cat.png": "absolute path",
    }
    for url, message in cases.items():
        with pytest.raises(MediaError, match=message):
            await fetch_bytes(url, limits)


# -- http(s):// ----------------------------------------------------------------------------------


@pytest.fixture
async def http_server():
    """A local server with one route per outcome; yields its base URL."""
    release = asyncio.Event()  # wakes handlers still waiting, so cleanup is immediate

    async def good(request: web.Request) -> web.Response:
        return web.Response(body=PNG, content_type="image/png")

    async def missing(request: web.Request) -> web.Response:
        return web.Response(status=404, text="nope")

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()  # chunked: no Content-Length to refuse up front
        await resp.prepare(request)
        try:
            for _ in range(10_000):
                await resp.write(b"\x00" * 16384)
        except (ConnectionError, RuntimeError):
            pass  # the client hung up, as it should
        return resp

    async def slow(request: web.Request) -> web.Response:
        await asyncio.wait_for(release.wait(), timeout=10)
        return web.Response(body=PNG)

    async def huge_length(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(1 << 40)})
        await resp.prepare(request)
        await resp.write(PNG[:16])
        await asyncio.wait_for(release.wait(), timeout=10)
        return resp

    app = web.Application()
    app.router.add_get("/good.png", good)
    app.router.add_get("/missing.png", missing)
    app.router.add_get("/endless", endless)
    app.router.add_get("/slow", slow)
    app.router.add_get("/huge-length", huge_length)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}"
    release.set()
    await runner.cleanup()


async def test_http_good_image(http_server: str) -> None:
    data, image = await load_image(f"{http_server}/good.png", LOCAL)  # own session
    assert data == PNG and image.size == (64, 48)
    async with http_session(LOCAL) as session:  # caller's session, as the workers pass theirs
        assert await fetch_bytes(f"{http_server}/good.png", LOCAL, session) == PNG
        assert not session.closed
    async with aiohttp.ClientSession() as session:  # a plain session checks nothing: fits only LOCAL
        assert await fetch_bytes(f"{http_server}/good.png", LOCAL, session) == PNG
        with pytest.raises(MediaError, match="private"):
            await fetch_bytes(f"{http_server}/good.png", LIMITS, session)


async def test_http_failures(http_server: str, caplog) -> None:
    """One message for all (the client must not learn what a port answered); the cause is logged."""
    limits = MediaLimits(max_bytes=64 << 10, fetch_timeout_s=0.3, allow_private_urls=True)
    causes = {
        "/missing.png": "HTTP 404",
        "/endless": "sent more than max_bytes=65536",
        "/huge-length": f"Content-Length {1 << 40}, over max_bytes",
        "/slow": "timed out after 0.3s",
    }
    caplog.set_level("INFO", logger="encoder_worker.media")
    async with http_session(limits) as session:
        for path, cause in causes.items():
            start = time.perf_counter()
            with pytest.raises(MediaError) as info:
                await fetch_bytes(http_server + path, limits, session)
            assert str(info.value) == f"could not load an image from {http_server}{path}"
            assert time.perf_counter() - start < 2.0, path
            assert cause in caplog.text, path


async def test_http_message_hides_query_and_credentials(http_server: str) -> None:
    url = http_server.replace("http://", "http://user:hunter2@") + "/missing.png?sig=s3cret"
    with pytest.raises(MediaError) as info:
        await fetch_bytes(url, LOCAL)
    assert "hunter2" not in str(info.value) and "s3cret" not in str(info.value)
    assert "/missing.png" in str(info.value)


@pytest.mark.parametrize("url", ["http://", "https://[::1/a.png", "http://:99999/a.png"])
async def test_http_malformed(url: str) -> None:
    with pytest.raises(MediaError, match="not a valid http"):
        await fetch_bytes(url, LIMITS)


async def test_http_unreachable() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago; nothing listens now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(MediaError, match="could not load an image from"):
        await fetch_bytes(f"http://127.0.0.1:{port}/a.png", MediaLimits(fetch_timeout_s=2, allow_private_urls=True))


async def test_http_disabled(http_server: str) -> None:
    with pytest.raises(MediaError, match="disabled"):
        await fetch_bytes(f"{http_server}/good.png", MediaLimits(allow_http=False))

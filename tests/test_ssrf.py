"""Image fetches cannot be turned against the host (SSRF): http(s) image URLs at private,
loopback, link-local or multicast addresses, and redirects to them, are refused before any
connection unless ``allow_private_urls`` (``--allow-private-urls``); the address checked is the
one connected to; every other fetch failure gives one message, so that answers do not tell an
open port from a closed one; ``mmcache up --no-http-images`` / ``--allow-private-urls`` reach
the workers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import io
import ipaddress
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver
from PIL import Image

from encoder_worker.cli import main as encoder_main
import mmcache.common.ssrf as ssrf
from encoder_worker.media import MAX_REDIRECTS, MediaError, MediaLimits, fetch_bytes, http_session, load_image
from mmcache.common.ssrf import CheckingResolver, address_is_public
from llm_worker.cli import main as llm_main
from mmcache.sidecar.config import ServeConfig
from mmcache.stack.up import LOOPBACK, Stack, StackConfig
from mmcache.stack.supervisor import Child
from sidecar import ThreadedSidecar


def _png() -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()
DEFAULT = MediaLimits()
LOCAL = MediaLimits(allow_private_urls=True)
REFUSAL = "private, loopback, link-local or multicast address: refused (the worker's --allow-private-urls allows it)"


# ---------------------------------------------------------------- the address policy


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.0.0.2", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "224.0.0.1", "239.255.255.250", "255.255.255.255", "240.0.0.1", "192.0.2.1",
    "::", "::1", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1", "ff0e::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",  # IPv4-mapped
    "2002:7f00:1::1", "2002:a9fe:a9fe::1",  # 6to4 of 127.0.0.1 and 169.254.169.254
    "64:ff9b::7f00:1", "::127.0.0.1",  # NAT64, IPv4-compatible
])
def test_non_public_addresses(address):
    assert address_is_public(ipaddress.ip_address(address)) is False
    assert address_is_public(address) is False


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111",
                                     "2001:4860:4860::8888", "::ffff:8.8.8.8", "2002:808:808::1"])
def test_public_addresses(address):
    assert address_is_public(ipaddress.ip_address(address)) is True


class StubResolver(AbstractResolver):
    """Answers from a table (name → addresses) without DNS; counts its lookups."""

    def __init__(self, table: dict[str, list[str]]):
        self.table, self.lookups = table, []

    async def resolve(self, host, port=0, family=socket.AF_INET):
        self.lookups.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [{"hostname": host, "host": a, "port": port, "family": socket.AF_INET6 if ":" in a else socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST} for a in self.table[host]]

    async def close(self):
        pass


async def test_the_resolver_drops_non_public_addresses_and_refuses_a_name_with_none_left():
    stub = StubResolver({"mixed.test": ["127.0.0.1", "8.8.8.8", "10.0.0.1"], "internal.test": ["10.0.0.1", "::1"]})
    checked = CheckingResolver(inner=stub)
    assert [r["host"] for r in await checked.resolve("mixed.test", 80)] == ["8.8.8.8"]
    with pytest.raises(ssrf.AddressRefused):
        await checked.resolve("internal.test", 80)
    allowing = CheckingResolver(allow_private_urls=True, inner=stub)
    assert len(await allowing.resolve("internal.test", 80)) == 2


# ---------------------------------------------------------------- local servers


class Server:
    """An aiohttp server on ``host``, port 0; ``hits`` lists each request's (path, headers)."""

    def __init__(self, host: str = "127.0.0.1"):
        self.host, self.hits, self.port = host, [], None
        self.app = web.Application()
        self.app.middlewares.append(self._count)
        self.runner: web.AppRunner | None = None

    @web.middleware
    async def _count(self, request, handler):
        self.hits.append((request.path, dict(request.headers)))
        return await handler(request)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> "Server":
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, 0).start()
        self.port = self.runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()


async def _good(request):
    return web.Response(body=PNG, content_type="image/png")


@pytest.fixture
async def local():
    server = Server("127.0.0.1")
    server.app.router.add_get("/good.png", _good)
    yield await server.start()
    await server.stop()


def _can_bind(host: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


@pytest.fixture
def public_127_0_0_2(monkeypatch):
    """127.0.0.2 (also loopback on Linux) counts as public; every other address keeps the real rule."""
    if not _can_bind("127.0.0.2"):
        pytest.skip("cannot bind 127.0.0.2")
    real = ssrf.address_is_public
    monkeypatch.setattr(ssrf, "address_is_public", lambda ip: str(ip) == "127.0.0.2" or real(ip))


# ---------------------------------------------------------------- refused by default


async def test_a_url_on_127_0_0_1_is_refused_by_default_without_connecting(local):
    url = f"{local.url}/good.png"
    with pytest.raises(MediaError) as info:
        await fetch_bytes(url, DEFAULT)  # own session
    assert str(info.value) == f"{url} points at a {REFUSAL}"
    async with http_session(DEFAULT) as session:  # the workers' shared session
        with pytest.raises(MediaError, match="points at a private"):
            await load_image(url, DEFAULT, session)
    assert local.hits == []
    data, image = await load_image(url, LOCAL)
    assert data == PNG and image.size == (32, 24)
    async with http_session(LOCAL) as session:
        assert await fetch_bytes(url, LOCAL, session) == PNG
    assert len(local.hits) == 2


@pytest.mark.parametrize("host", ["localhost", "LocalHost", "127.0.0.1.", "127.1", "2130706433", "0x7f.0.0.1", "[::ffff:127.0.0.1]"])
async def test_names_and_other_spellings_of_loopback_are_refused(local, host):
    with pytest.raises(MediaError, match="points at a private"):
        await fetch_bytes(f"http://{host}:{local.port}/good.png", DEFAULT)
    assert local.hits == []


async def test_localhost_is_judged_by_the_resolver(local, monkeypatch):
    """``localhost`` is a name: the connector's resolver, not a literal check, refuses it."""
    seen = []
    real = ssrf.address_is_public
    monkeypatch.setattr(ssrf, "address_is_public", lambda ip: seen.append(str(ip)) or real(ip))
    with pytest.raises(MediaError, match="points at a private"):
        await fetch_bytes(f"http://localhost:{local.port}/good.png", DEFAULT)
    assert seen and set(seen) <= {"127.0.0.1", "::1"}
    assert await fetch_bytes(f"http://localhost:{local.port}/good.png", LOCAL) == PNG


async def test_the_address_checked_is_the_one_connected_to(public_127_0_0_2):
    """A name is resolved once, by the checking resolver: the connection goes to the address it
    let through (the server on 127.0.0.2 sees the request, with the name as Host)."""
    server = Server("127.0.0.2")
    server.app.router.add_get("/good.png", _good)
    await server.start()
    try:
        stub = StubResolver({"images.test": ["127.0.0.2"], "rebound.test": ["127.0.0.1"]})
        async with http_session(DEFAULT, resolver=stub) as session:
            assert await fetch_bytes(f"http://images.test:{server.port}/good.png", DEFAULT, session) == PNG
            assert server.hits[-1][1]["Host"] == f"images.test:{server.port}"
            with pytest.raises(MediaError, match="points at a private"):
                await fetch_bytes(f"http://rebound.test:{server.port}/good.png", DEFAULT, session)
        assert len(server.hits) == 1 and stub.lookups == ["images.test", "rebound.test"]
    finally:
        await server.stop()


# ---------------------------------------------------------------- redirects


@pytest.fixture
async def redirector(public_127_0_0_2, local):
    """Server A on 127.0.0.2 ("public"), redirecting in various ways; B (``local``) on 127.0.0.1."""
    a = Server("127.0.0.2")

    async def to_b(request):
        raise web.HTTPFound(f"{local.url}/good.png")

    async def to_localhost(request):
        raise web.HTTPTemporaryRedirect(f"http://localhost:{local.port}/good.png")

    async def hop(request):
        n = int(request.match_info["n"])
        if n == 0:
            return web.Response(body=PNG, content_type="image/png")
        status = (301, 302, 303, 307, 308)[n % 5]
        location = f"{n - 1}" if n % 2 else f"/hop/{n - 1}"  # relative and absolute-path Locations
        return web.Response(status=status, headers={"Location": location})

    async def loop(request):
        raise web.HTTPFound("/loop")

    async def to_file(request):
        raise web.HTTPFound("file:///etc/passwd")

    a.app.router.add_get("/to-b", to_b)
    a.app.router.add_get("/to-localhost", to_localhost)
    a.app.router.add_get("/hop/{n}", hop)
    a.app.router.add_get("/loop", loop)
    a.app.router.add_get("/to-file", to_file)
    yield await a.start()
    await a.stop()


async def test_a_public_url_redirecting_to_127_0_0_1_is_refused(redirector, local):
    for path in ("/to-b", "/to-localhost"):
        url = f"{redirector.url}{path}"
        with pytest.raises(MediaError) as info:
            await fetch_bytes(url, DEFAULT)
        assert str(info.value) == f"{url} redirects to a {REFUSAL}"
    assert [p for p, _ in redirector.hits] == ["/to-b", "/to-localhost"]
    assert local.hits == []
    assert await fetch_bytes(f"{redirector.url}/to-b", LOCAL) == PNG  # allowed: followed
    assert [p for p, _ in local.hits] == ["/good.png"]


async def test_redirects_are_followed_up_to_the_limit(redirector):
    assert await fetch_bytes(f"{redirector.url}/hop/{MAX_REDIRECTS}", DEFAULT) == PNG
    assert [p for p, _ in redirector.hits] == [f"/hop/{n}" for n in range(MAX_REDIRECTS, -1, -1)]
    for path in (f"/hop/{MAX_REDIRECTS + 1}", "/loop", "/to-file"):
        url = f"{redirector.url}{path}"
        with pytest.raises(MediaError) as info:
            await fetch_bytes(url, DEFAULT)
        assert str(info.value) == f"could not load an image from {url}"


async def test_credentials_are_not_sent_across_origins(redirector, local):
    url = f"http://user:hunter2@127.0.0.2:{redirector.port}/to-b"
    assert await fetch_bytes(url, LOCAL) == PNG
    assert redirector.hits[-1][1]["Authorization"].startswith("Basic ")
    assert "Authorization" not in local.hits[-1][1]


# ---------------------------------------------------------------- one message for every failure


async def test_closed_open_and_answering_ports_give_byte_identical_errors():
    """The same URL served a 404, non-image bytes, a redirect loop, a body over max_bytes, a stall,
    then nothing at all (the port closed): the client reads the same bytes every time."""
    limits = MediaLimits(allow_private_urls=True, max_bytes=4096, fetch_timeout_s=0.5)
    mode = {"now": "404"}
    release = asyncio.Event()

    async def image(request):
        if mode["now"] == "404":
            return web.Response(status=404, text="not found")
        if mode["now"] == "text":
            return web.Response(text="SSH-2.0-OpenSSH_9.6 " * 10)
        if mode["now"] == "500":
            return web.Response(status=500, text="boom")
        if mode["now"] == "loop":
            raise web.HTTPFound("/a.png")
        if mode["now"] == "huge":
            return web.Response(body=b"\x89PNG" + b"\x00" * 8192)
        await asyncio.wait_for(release.wait(), 10)  # "slow"
        return web.Response(body=PNG)

    server = Server("127.0.0.1")
    server.app.router.add_get("/a.png", image)
    await server.start()
    url = f"{server.url}/a.png"
    messages = {}
    try:
        async with http_session(limits) as session:
            for name in ("404", "text", "500", "loop", "huge", "slow"):
                mode["now"] = name
                with pytest.raises(MediaError) as info:
                    await load_image(url, limits, session)
                messages[name] = str(info.value)
    finally:
        release.set()
        await server.stop()
    with pytest.raises(MediaError) as info:
        await load_image(url, limits)
    messages["closed"] = str(info.value)
    assert set(messages.values()) == {f"could not load an image from {url}"}, messages


async def test_a_name_that_does_not_resolve_gives_the_same_message():
    async with http_session(DEFAULT, resolver=StubResolver({})) as session:
        with pytest.raises(MediaError) as info:
            await fetch_bytes("http://no-such-host.test/a.png", DEFAULT, session)
    assert str(info.value) == "could not load an image from http://no-such-host.test/a.png"


# ---------------------------------------------------------------- the encoder, as users run it


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):
        type(self).hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(PNG)))
        self.end_headers()
        self.wfile.write(PNG)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ssrf")
    sock = os.path.join(tempfile.mkdtemp(prefix="mmc-", dir="/tmp"), "s.sock")
    sc = ThreadedSidecar(ServeConfig(data_dir=str(tmp / "cache"), port=0, socket=sock, host_capacity_bytes=32 << 20,
                                     disk_capacity_bytes=64 << 20, arena_path=str(tmp / "arena"))).start()
    yield sc
    sc.stop()


@contextlib.contextmanager
def encoder_cli(model_dir: str, sidecar, *flags: str):
    """``python -m encoder_worker.cli serve`` on a free port; yields its URL once it is ready."""
    proc = subprocess.Popen([sys.executable, "-m", "encoder_worker.cli", "serve", "--model", model_dir,
                             "--data-dir", model_dir, "--cache", f"unix://{sidecar.config.socket}",
                             "--port", "0", "--max-wait-ms", "0", "--log-level", "warning", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("mmcache-encoder ready"):
                break
        assert lines and lines[-1].startswith("mmcache-encoder ready: http://127.0.0.1:"), "".join(lines)
        yield lines[-1].split()[2]
    finally:
        proc.terminate()
        proc.wait(30)


def _post(url: str, doc: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(doc).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_the_encoder_cli_refuses_a_loopback_image_url_unless_allowed(model_dir, sidecar, image_server):
    data_uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    url = f"{image_server}/cat.png?sig=secret"
    _ImageHandler.hits.clear()
    with encoder_cli(model_dir, sidecar) as encoder:
        status, body = _post(f"{encoder}/v1/encode", {"images": [data_uri, url]})
        assert status == 400, body
        assert body["error"] == f"image 1: {image_server}/cat.png points at a {REFUSAL}"
        assert _ImageHandler.hits == []
    with encoder_cli(model_dir, sidecar, "--allow-private-urls") as encoder:
        status, body = _post(f"{encoder}/v1/encode", {"images": [data_uri, url]})
        assert status == 200, body
        assert len(body["items"]) == 2 and body["items"][0]["hash"] == body["items"][1]["hash"]
        assert _ImageHandler.hits == ["/cat.png?sig=secret"]


# ---------------------------------------------------------------- mmcache up


def _plan(monkeypatch, tmp_path, **config) -> Stack:
    def fake_spawn(child, events):  # NOTE: the plan only: no process is started
        child.url = f"http://{LOOPBACK}:1"
    monkeypatch.setattr(Child, "spawn", fake_spawn)
    monkeypatch.setattr(Stack, "_wait_ready", lambda self, children, deadline: None)
    stack = Stack(StackConfig(data_dir=str(tmp_path), **config))
    stack.start()
    return stack


def _media_of(child: Child, monkeypatch) -> MediaLimits:
    """The MediaLimits the child's own CLI builds from its argv (nothing is served)."""
    seen = {}
    module = child.argv[2]
    service = "encoder_worker.app" if module == "encoder_worker.cli" else "llm_worker.serve.app"
    monkeypatch.setattr(f"{service}.create_app", lambda config: seen.setdefault("config", config))
    monkeypatch.setattr("mmcache.common.run_app", lambda *a, **k: None)
    main = encoder_main if module == "encoder_worker.cli" else llm_main
    assert main(child.argv[3:]) == 0
    return seen["config"].media


@pytest.mark.parametrize("aggregated", [False, True])
def test_up_passes_the_image_url_flags_to_the_workers_that_fetch(monkeypatch, tmp_path, aggregated):
    fetchers = {"generate"} if aggregated else {"encoder"}
    stack = _plan(monkeypatch, tmp_path / "default", aggregated=aggregated, encoders=2)
    for child in stack.children:
        assert "--no-http" not in child.argv and "--allow-private-urls" not in child.argv, child.argv
    media_limits = _media_of(next(c for c in stack.children if c.role in fetchers), monkeypatch)
    assert media_limits.allow_http and not media_limits.allow_private_urls

    stack = _plan(monkeypatch, tmp_path / "flags", aggregated=aggregated, encoders=2,
                  http_images=False, allow_private_urls=True)
    assert {c.role for c in stack.children if "--no-http" in c.argv} == fetchers
    assert {c.role for c in stack.children if "--allow-private-urls" in c.argv} == fetchers
    for child in stack.children:
        if child.role in fetchers:
            media_limits = _media_of(child, monkeypatch)
            assert not media_limits.allow_http and media_limits.allow_private_urls


def test_up_cli_takes_the_flags(monkeypatch):
    from mmcache.cli import main as mmcache_main

    seen = []
    monkeypatch.setattr("mmcache.stack.up.run", lambda config: seen.append(config) or 0)
    assert mmcache_main(["up"]) == 0
    assert mmcache_main(["up", "--no-http-images", "--allow-private-urls"]) == 0
    assert (seen[0].http_images, seen[0].allow_private_urls) == (True, False)
    assert (seen[1].http_images, seen[1].allow_private_urls) == (False, True)

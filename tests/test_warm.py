"""``mmcache warm``: a corpus encoded into the cache ahead of traffic.

Fast tests drive ``mmcache.ops.warm`` against a real sidecar and a scripted encoder (it stores a
small entry per image, refuses images that begin with ``BAD``, answers 503 when told to), so
that failures, pressure and bisection are exact; the ``slow`` ones run ``mmcache warm`` as users
do, against ``mmcache up`` with the built-in model, and against an encoder it starts itself.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import http.server
import io
import json
import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from PIL import Image

from mmcache.ops import warm
from mmcache_client import AsyncCacheClient, CacheClient, content_hash
from sidecar import unix_sidecar

FAKE_NS = "fake-warm-ns"


def png(seed: int, size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------ a scripted encoder

class FakeEncoder:
    """``POST /v1/encode`` as the real one answers it: each image's hash, ``cached`` when the
    sidecar had it; a 400 naming ``image k`` for one that begins with ``BAD`` (or a 400 naming
    none with ``vague``); ``busy`` 503s with ``Retry-After: 0`` first. Served from a thread."""

    def __init__(self, cache_url: str, *, busy: int = 0, vague: bool = False, hang_up: bool = False):
        self.cache_url, self.busy, self.vague, self.hang_up = cache_url, busy, vague, hang_up
        self.requests: list[int] = []  # images per request
        self.encoded = 0
        self.loop = asyncio.new_event_loop()
        self.closed = False
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    async def _start(self):
        self.cache = AsyncCacheClient(self.cache_url)
        app = web.Application(client_max_size=256 << 20)
        app.add_routes([web.post("/v1/encode", self.encode), web.get("/v1/models", self.models)])
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def models(self, request):
        return web.json_response({"data": [{"id": "fake", "namespace": FAKE_NS}]})

    async def encode(self, request):
        doc = await request.json()
        self.requests.append(len(doc["images"]))
        if self.hang_up:  # NOTE: as an encoder killed mid-request looks to its client
            request.transport.close()
            raise ConnectionResetError("hung up")
        if self.busy > 0:
            self.busy -= 1
            return web.json_response({"error": "the encode queue is full"}, status=503, headers={"Retry-After": "0"})
        raws = [base64.b64decode(u.partition(",")[2]) for u in doc["images"]]
        for k, raw in enumerate(raws):
            if raw.startswith(b"BAD"):
                message = "not a decodable image" if self.vague else f"image {k}: not a decodable image"
                return web.json_response({"error": message}, status=400)
        scope = f"{doc['tenant']}@{FAKE_NS}" if doc.get("tenant") else FAKE_NS
        items = []
        for raw in raws:
            h = content_hash(raw)
            created = await self.cache.put(scope, h, np.full((4, 8), len(raw) % 251, dtype=np.float32))
            self.encoded += created
            items.append({"hash": h, "num_tokens": 4, "cached": not created})
        return web.json_response({"namespace": FAKE_NS, "items": items})

    def close(self):
        # NOTE: idempotent by a flag, not by loop.is_running(): the loop stops a moment after
        # call_soon_threadsafe(stop), so a second close could schedule onto a loop about to stop.
        if self.closed:
            return
        self.closed = True

        async def stop():
            await self.runner.cleanup()
            await self.cache.close()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture
def sidecar(tmp_path):
    with unix_sidecar(str(tmp_path / "cache")) as sc:
        yield sc


@pytest.fixture
def encoder(sidecar):
    enc = FakeEncoder(sidecar.unix_url)
    yield enc
    enc.close()


def run_warm(sources, sidecar, encoders, **kw) -> dict:
    settings = warm.Settings(**{k: v for k, v in kw.items() if k in warm.Settings.__dataclass_fields__})
    target = warm.Target([e.url for e in encoders], sidecar.unix_url)
    stream = io.StringIO()
    summary = asyncio.run(warm.warm([str(s) for s in sources], target, settings, quiet=True, interval_s=0,
                                    column=kw.get("column"), failures_path=kw.get("failures"), stream=stream))
    summary["progress"] = stream.getvalue()
    return summary


def cached(sidecar, hashes, scope=FAKE_NS) -> dict:
    with CacheClient(sidecar.unix_url) as c:
        return c.lookup([f"{scope}/{h}" for h in hashes])


def corpus(folder, n: int, start: int = 0) -> list[str]:
    """``n`` PNGs under ``folder`` (every third in a subfolder); their hashes."""
    hashes = []
    for i in range(start, start + n):
        sub = folder / ("deeper" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        data = png(i)
        (sub / f"img{i}.png").write_bytes(data)
        hashes.append(content_hash(data))
    return hashes


# ------------------------------------------------------------------------------ sources

def test_a_folder_is_walked_recursively_for_images_only(tmp_path):
    corpus(tmp_path / "imgs", 7)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    (tmp_path / "imgs" / "UPPER.JPG").write_bytes(b"x")
    items, total = warm.open_sources([str(tmp_path / "imgs")])
    names = [i.name for i in items]
    assert total == len(names) == 8
    assert "imgs/UPPER.JPG" in names and "imgs/deeper/img0.png" in names and not any("notes" in n for n in names)


def test_a_list_of_paths_and_urls(tmp_path):
    (tmp_path / "a.png").write_bytes(png(1))
    listing = tmp_path / "list.txt"
    listing.write_text("# the catalog\na.png\n\nhttps://example.com/b.png\n/abs/c.png\nfile:///abs/d.png\nftp://x/e\n")
    items, total = warm.open_sources([str(listing)])
    items = list(items)
    assert total == len(items) == 5
    assert items[0].path == str(tmp_path / "a.png")  # relative to the list's folder
    assert items[1].url == "https://example.com/b.png" and items[2].path == "/abs/c.png"
    assert items[3].path == "/abs/d.png" and "unsupported URL scheme" in items[4].error


def test_odd_list_lines_are_read_as_meant(tmp_path):
    (tmp_path / "a.png").write_bytes(png(1))
    listing = tmp_path / "list.txt"
    listing.write_bytes("\ufeffa.png\nHTTPS://Example.com/B.png\ndata:image/png;base64,aGVsbG8=\ndata:,x\n".encode())
    items = list(warm.open_sources([str(listing)])[0])
    assert items[0].path == str(tmp_path / "a.png")  # the BOM is not part of the path
    assert items[1].url == "HTTPS://Example.com/B.png" and items[2].data == b"hello"
    assert "base64" in items[3].error


def test_a_parquet_row_group_larger_than_the_memory_budget_is_refused_up_front(tmp_path):
    rows = [png(i, size=(64, 64)) for i in range(20)]
    pq.write_table(pa.table({"image": rows}), tmp_path / "one-group.parquet")  # pyarrow's default: one row group
    with pytest.raises(warm.WarmError, match=r"one-group.parquet: a row group of column 'image' holds .* --memory"):
        warm.open_sources([str(tmp_path / "one-group.parquet")], memory_bytes=100_000)
    assert warm.open_sources([str(tmp_path / "one-group.parquet")], memory_bytes=10 << 20)[1] == 20


def test_a_struct_column_of_the_wrong_types_is_refused_by_name(tmp_path):
    pq.write_table(pa.table({"img": [{"bytes": 1, "path": 2}]}), tmp_path / "s.parquet")
    with pytest.raises(warm.WarmError, match="no image column"):
        warm.open_sources([str(tmp_path / "s.parquet")])
    with pytest.raises(warm.WarmError, match="column 'img' is struct"):
        warm.open_sources([str(tmp_path / "s.parquet")], column="img")


def test_a_folder_with_a_link_loop_a_fifo_and_a_nul_path(tmp_path, sidecar, encoder):
    hashes = corpus(tmp_path / "imgs", 4)
    os.symlink(tmp_path / "imgs", tmp_path / "imgs" / "loop")  # a link back up: walked once
    os.mkfifo(tmp_path / "imgs" / "pipe.png")  # would block a plain open() forever
    items = list(warm.open_sources([str(tmp_path / "imgs")])[0])
    assert len(items) == 5 and not any("loop" in i.name for i in items)
    listing = tmp_path / "list.txt"
    listing.write_text("imgs/img1.png\nbad\x00name.png\n")
    summary = run_warm([tmp_path / "imgs", listing], sidecar, [encoder])
    errors = {f["name"]: f["error"] for f in summary["failures"]}
    assert errors["imgs/pipe.png"] == "not a regular file" and "null" in errors["bad\x00name.png"]
    assert summary["encoded"] == 4 and summary["hits"] == 1
    assert all(t is not None for t in cached(sidecar, hashes).values())


def test_parquet_image_columns_are_found_or_named(tmp_path):
    rows = [png(i) for i in range(3)]
    pq.write_table(pa.table({"id": [1, 2, 3], "jpeg": rows}), tmp_path / "bytes.parquet")
    pq.write_table(pa.table({"image": [{"bytes": rows[0], "path": "x.png"}, {"bytes": None, "path": "y.png"},
                                       None]}), tmp_path / "struct.parquet")
    pq.write_table(pa.table({"caption": ["a", "b"], "file_name": ["a.png", "https://h/b.png"]}), tmp_path / "paths.parquet")
    pq.write_table(pa.table({"caption": ["a"]}), tmp_path / "none.parquet")

    items = list(warm.open_sources([str(tmp_path / "bytes.parquet")])[0])
    assert [i.data for i in items] == rows and items[2].name == "bytes.parquet[row 2]"
    items = list(warm.open_sources([str(tmp_path / "struct.parquet")])[0])
    assert items[0].data == rows[0] and items[1].path == str(tmp_path / "y.png") and items[2].data is None
    items = list(warm.open_sources([str(tmp_path / "paths.parquet")])[0])
    assert items[0].path == str(tmp_path / "a.png") and items[1].url == "https://h/b.png"
    with pytest.raises(warm.WarmError, match="no image column"):
        warm.open_sources([str(tmp_path / "none.parquet")])
    with pytest.raises(warm.WarmError, match="has no column 'nope'"):
        warm.open_sources([str(tmp_path / "bytes.parquet")], column="nope")
    with pytest.raises(warm.WarmError, match="column 'id' is int64"):
        warm.open_sources([str(tmp_path / "bytes.parquet")], column="id")


def test_bad_sources_fail_before_anything_runs(tmp_path):
    with pytest.raises(warm.WarmError, match="neither a folder nor a file"):
        warm.open_sources([str(tmp_path / "missing")])
    (tmp_path / "fake.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(warm.WarmError, match="not a readable Parquet file"):
        warm.open_sources([str(tmp_path / "fake.parquet")])
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(warm.WarmError, match="not a folder, an image, a Parquet file or a text list"):
        warm.open_sources([str(tmp_path / "blob.bin")])


async def test_the_budget_lets_one_oversized_holder_through_alone():
    budget = warm.Budget(100)
    await budget.acquire(250)  # alone: allowed, or a big image would never go
    assert not budget.can_take(1)
    waiter = asyncio.ensure_future(budget.acquire(10))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await budget.release(250)
    await asyncio.wait_for(waiter, 5)
    assert budget.held == 10 and budget.peak == 250


# ------------------------------------------------------------------------------ runs

def test_warm_skips_what_is_cached_and_a_rerun_uploads_nothing(tmp_path, sidecar, encoder):
    hashes = corpus(tmp_path / "imgs", 30)
    with CacheClient(sidecar.unix_url) as c:  # some were cached before: no upload for those
        for h in hashes[:5]:
            c.put(FAKE_NS, h, np.zeros((4, 8), dtype=np.float32))
    first = run_warm([tmp_path / "imgs"], sidecar, [encoder], batch=4)
    assert (first["images"], first["hits"], first["encoded"], first["failed"]) == (30, 5, 25, 0)
    assert sum(encoder.requests) == 25 and max(encoder.requests) <= 4
    assert all(t is not None for t in cached(sidecar, hashes).values())
    assert "hits 5" in first["progress"] and "encoded 25" in first["progress"] and "30/30 images" in first["progress"]

    sent = sum(encoder.requests)
    again = run_warm([tmp_path / "imgs"], sidecar, [encoder])
    assert (again["hits"], again["encoded"], again["bytes_uploaded"]) == (30, 0, 0)
    assert sum(encoder.requests) == sent  # nothing reached the encoder


@pytest.mark.parametrize("vague", [False, True], ids=["named-index", "split"])
def test_a_bad_image_is_named_and_the_rest_of_its_batch_is_cached(tmp_path, sidecar, vague):
    enc = FakeEncoder(sidecar.unix_url, vague=vague)
    try:
        hashes = corpus(tmp_path / "imgs", 10)
        (tmp_path / "imgs" / "broken.png").write_bytes(b"BAD bytes, not a PNG")
        failures = tmp_path / "failures.jsonl"
        summary = run_warm([tmp_path / "imgs"], sidecar, [enc], batch=16, failures=str(failures))
        assert (summary["encoded"], summary["failed"]) == (10, 1)
        assert summary["failures"][0]["name"] == "imgs/broken.png"
        assert "not a decodable image" in summary["failures"][0]["error"]
        assert [json.loads(line)["name"] for line in failures.read_text().splitlines()] == ["imgs/broken.png"]
        assert "failed: imgs/broken.png" in summary["progress"]
        assert all(t is not None for t in cached(sidecar, hashes).values())
    finally:
        enc.close()


def test_unreadable_items_fail_by_name_without_an_upload(tmp_path, sidecar, encoder):
    (tmp_path / "ok.png").write_bytes(png(5))
    (tmp_path / "big.png").write_bytes(png(6, size=(300, 300)))
    (tmp_path / "empty.png").write_bytes(b"")
    listing = tmp_path / "list.txt"
    listing.write_text("ok.png\nbig.png\nempty.png\nmissing.png\nftp://host/x.png\nhttp://127.0.0.1:9/nothing.png\n")
    summary = run_warm([listing], sidecar, [encoder], max_image_bytes=50_000, fetch_timeout_s=5,
                       allow_private_urls=True)
    errors = {f["name"]: f["error"] for f in summary["failures"]}
    assert summary["encoded"] == 1 and summary["failed"] == 5, errors
    assert "over --max-image-bytes=50000" in errors["big.png"] and errors["empty.png"] == "empty file"
    assert "No such file" in errors["missing.png"] and "unsupported URL scheme" in errors["list.txt:5: ftp://host/x.png"]
    assert "nothing.png" in next(n for n in errors if n.startswith("http"))
    assert encoder.requests == [1]


def test_pressure_is_waited_out_not_failed(tmp_path, sidecar):
    enc = FakeEncoder(sidecar.unix_url, busy=3)
    try:
        hashes = corpus(tmp_path / "imgs", 6)
        summary = run_warm([tmp_path / "imgs"], sidecar, [enc], batch=8, concurrency=1)
        assert (summary["encoded"], summary["failed"], summary["retries"]) == (6, 0, 3)
        assert all(t is not None for t in cached(sidecar, hashes).values())
    finally:
        enc.close()


def test_a_tenants_token_warms_its_own_scope_and_resumes(tmp_path):
    tenants = tmp_path / "tenants.toml"
    tenants.write_text('"alice-token-0123456789" = "alice"\n')
    tenants.chmod(0o600)
    with unix_sidecar(str(tmp_path / "cache"), tenants=str(tenants), token="admin-token-0123456789") as sc:
        enc = FakeEncoder(sc.unix_url)
        try:
            hashes = corpus(tmp_path / "imgs", 3)

            def run(**kw):
                target = warm.Target([enc.url], sc.url, cache_token="alice-token-0123456789")
                return asyncio.run(warm.warm([str(tmp_path / "imgs")], target, warm.Settings(**kw), quiet=True,
                                             stream=io.StringIO()))
            assert run()["encoded"] == 3
            again = run()
            assert (again["hits"], again["bytes_uploaded"]) == (3, 0)  # found in alice's scope: nothing sent
            assert all(t is not None for t in cached(sc, hashes, scope=f"alice@{FAKE_NS}").values())
            assert all(t is None for t in cached(sc, hashes).values())
            with pytest.raises(warm.WarmError, match="tenant 'alice'.*cannot warm tenant 'bob'"):
                run(tenant="bob")
        finally:
            enc.close()


def test_a_stack_that_stays_busy_fails_its_images_after_max_wait(tmp_path, sidecar):
    enc = FakeEncoder(sidecar.unix_url, busy=10_000)
    try:
        corpus(tmp_path / "imgs", 2)
        summary = run_warm([tmp_path / "imgs"], sidecar, [enc], max_wait_s=0.3)
        assert summary["failed"] == 2 and "stayed busy" in summary["failures"][0]["error"]
    finally:
        enc.close()


def test_no_encoder_answering_ends_the_run_with_a_clear_error(tmp_path, sidecar, encoder):
    corpus(tmp_path / "imgs", 3)
    target = warm.Target([encoder.url], sidecar.unix_url)
    encoder.close()
    with pytest.raises(warm.WarmError, match="does not answer GET /v1/models"):
        asyncio.run(warm.warm([str(tmp_path / "imgs")], target, warm.Settings(), quiet=True, stream=io.StringIO()))


def test_encoders_that_hang_up_mid_run_end_it_with_a_clear_error(tmp_path, sidecar):
    enc = FakeEncoder(sidecar.unix_url, hang_up=True)
    try:
        corpus(tmp_path / "imgs", 3)
        with pytest.raises(warm.WarmError, match="no encoder answers"):
            run_warm([tmp_path / "imgs"], sidecar, [enc])
        assert len(enc.requests) >= 6  # tried again, then gave up
    finally:
        enc.close()


def test_duplicates_urls_parquet_and_a_tenant(tmp_path, sidecar, encoder):
    """The same image three times is encoded once; URLs are fetched (a loopback server) and
    hashed here; Parquet bytes; and a tenant's warm lands in the tenant's scope only."""
    data = [png(40 + i) for i in range(4)]
    site = tmp_path / "site"
    site.mkdir()
    for i, d in enumerate(data):
        (site / f"u{i}.png").write_bytes(d)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(site)))
    server.RequestHandlerClass.log_message = lambda *a: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        (tmp_path / "urls.txt").write_text("".join(f"http://127.0.0.1:{port}/u{i}.png\n" for i in range(4)))
        pq.write_table(pa.table({"img": [data[0], data[0], png(99)]}), tmp_path / "dup.parquet")
        summary = run_warm([tmp_path / "urls.txt", tmp_path / "dup.parquet"], sidecar, [encoder], tenant="acme",
                           allow_private_urls=True)
        assert (summary["images"], summary["encoded"], summary["hits"], summary["failed"]) == (7, 5, 2, 0), summary
        hashes = [content_hash(d) for d in data] + [content_hash(png(99))]
        assert all(t is not None for t in cached(sidecar, hashes, scope=f"acme@{FAKE_NS}").values())
        assert all(t is None for t in cached(sidecar, hashes).values())  # not the default tenant's
    finally:
        server.shutdown()


def test_private_urls_and_redirects_to_them_are_named_failures_without_a_connection(
        tmp_path, sidecar, encoder, monkeypatch):
    """The attack: warm fetched loopback URLs, followed a redirect to another loopback port, and
    read local files named in a URL list. Now the encoders' address policy holds: a loopback URL,
    and a "public" one (127.0.0.2, made public for the test) redirecting to loopback, are named
    failures; the loopback server never sees a request. (Paths and file:// in a list are the
    user's own files, a source as a folder is: they stay.)"""
    from mmcache.common import ssrf

    real = ssrf.address_is_public
    monkeypatch.setattr(ssrf, "address_is_public", lambda ip: str(ip) == "127.0.0.2" or real(ip))
    hits: list[str] = []

    class Counting(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(png(7))

        def log_message(self, *a):
            pass
    private = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Counting)
    port = private.server_address[1]

    class Redirector(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{port}/stolen.png")
            self.end_headers()

        def log_message(self, *a):
            pass
    public = http.server.ThreadingHTTPServer(("127.0.0.2", 0), Redirector)
    for srv in (private, public):
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        listing = tmp_path / "urls.txt"
        listing.write_text(f"http://127.0.0.1:{port}/direct.png\nhttp://localhost:{port}/named.png\n"
                           f"http://127.0.0.2:{public.server_address[1]}/hop.png\n")
        summary = run_warm([listing], sidecar, [encoder], fetch_timeout_s=5)
        errors = {f["name"]: f["error"] for f in summary["failures"]}
        assert summary["failed"] == 3 and summary["encoded"] == 0, errors
        by_url = {name.split(": ", 1)[-1] if ": " in name else name: e for name, e in errors.items()}
        assert any("points at a private" in e for n, e in by_url.items() if "direct.png" in n), errors
        assert any("points at a private" in e for n, e in by_url.items() if "named.png" in n), errors
        assert any("redirects to a private" in e for n, e in by_url.items() if "hop.png" in n), errors
        assert hits == []  # nothing ever connected to the loopback server
        allowed = run_warm([listing], sidecar, [encoder], fetch_timeout_s=5, allow_private_urls=True)
        assert allowed["encoded"] == 1 and len(hits) == 3  # the same list, allowed: fetched (one image)
    finally:
        private.shutdown()
        public.shutdown()


def test_memory_stays_within_the_budget(tmp_path, sidecar, encoder):
    rows = [png(200 + i, size=(160, 160)) for i in range(40)]  # ~77 KB each, 3 MB in all
    pq.write_table(pa.table({"image": rows}), tmp_path / "c.parquet", row_group_size=4)
    summary = run_warm([tmp_path / "c.parquet"], sidecar, [encoder], memory_bytes=400_000, batch=2)
    assert summary["encoded"] == 40 and summary["failed"] == 0
    assert summary["peak_held_bytes"] <= 400_000 + max(map(len, rows))

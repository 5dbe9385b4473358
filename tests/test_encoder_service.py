"""POST /v1/encode against a real sidecar, with a counting stand-in model (fast); the real
tiny-llava path is covered in test_encoder_e2e.py."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import threading
from dataclasses import dataclass, field

import blake3
import numpy as np
import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from encoder_worker.media import MediaLimits
from encoder_worker.video import FrameGroup
from encoder_worker.app import SERVICE, create_app
from encoder_worker.config import EncoderServeConfig
from mmcache_client import CacheClient, CacheFull, content_hash
from sidecar import unix_sidecar


@dataclass
class Encoded:
    embeddings: torch.Tensor
    extras: dict = field(default_factory=dict)
    encode_ms: float = 1.0


class CountingEncoder:
    """Deterministic stand-in: tokens = width // 8, values from the pixels; records batches."""

    namespace = "fake-encoder.v1"
    model_type = "fake"
    group_size = 2
    """Video frames per encoded group (as Qwen2-VL's temporal patch)."""

    def __init__(self):
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        """Set when a batch reaches the model (before the gate)."""

    def num_image_tokens(self, image) -> int:
        img = image.frames[0] if isinstance(image, FrameGroup) else image
        if img.width > 40 * img.height:
            raise ValueError(f"absolute aspect ratio must be smaller than 40, got {img.width / img.height}")
        return max(1, img.width // 8)

    def encode(self, images):
        self.entered.set()
        self.gate.wait(30)
        self.batches.append(len(images))
        out = []
        for img in images:
            img = img.frames[0] if isinstance(img, FrameGroup) else img
            px = torch.from_numpy(np.asarray(img, dtype=np.float32))
            n = max(1, img.width // 8)
            emb = px.mean(dim=(0, 1)).repeat(n, 4)[:, :8].contiguous()
            out.append(Encoded(emb, {"image_grid_thw": torch.tensor([[1, img.height, img.width]])}))
        return out


def png_uri(seed: int, size=(64, 48)) -> str:
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def raw_of(uri: str) -> bytes:
    return base64.b64decode(uri.split(",", 1)[1])


@pytest.fixture
def sidecar(tmp_path):
    with unix_sidecar(str(tmp_path / "cache"), host_capacity_bytes=16 << 20,
                      arena_path=str(tmp_path / "arena")) as sc:
        yield sc


@pytest.fixture
async def encoder_client(sidecar, tmp_path):
    model = CountingEncoder()
    (tmp_path / "imgs").mkdir()
    cfg = EncoderServeConfig(cache_url=f"unix://{sidecar.config.socket}", max_batch=8, max_wait_ms=50,
                             media=MediaLimits(allowed_dirs=(str(tmp_path / "imgs"),), max_bytes=1 << 20))
    client = TestClient(TestServer(create_app(cfg, encoder=model)))
    await client.start_server()
    client.model = model
    client.imgs = tmp_path / "imgs"
    yield client
    await client.close()


async def encode(client, images, status=200):
    resp = await client.post("/v1/encode", json={"images": images})
    body = await resp.json()
    assert resp.status == status, body
    return body


async def test_second_request_for_an_image_is_a_cache_hit(encoder_client, sidecar):
    uri = png_uri(1)
    first = await encode(encoder_client, [uri])
    second = await encode(encoder_client, [uri])
    h = content_hash(raw_of(uri))
    assert first["items"] == [{"hash": h, "num_tokens": 8, "cached": False}]
    assert second["items"] == [{"hash": h, "num_tokens": 8, "cached": True}]
    assert encoder_client.model.batches == [1]
    with CacheClient(f"unix://{sidecar.config.socket}") as c, c.get(first["namespace"], h) as e:
        expected = CountingEncoder().encode([Image.open(io.BytesIO(raw_of(uri))).convert("RGB")])[0]
        assert torch.equal(e.tensor, expected.embeddings)
        assert e.get_tensor("image_grid_thw").tolist() == [[1, 48, 64]]


async def test_a_hit_is_looked_up_before_any_pixel_is_decoded(encoder_client, monkeypatch):
    """The encoder hashes the bytes and looks up first: only misses are decoded."""
    import encoder_worker.media as media

    decoded = []
    real = media.decode_image
    monkeypatch.setattr(media, "decode_image", lambda data, limits: decoded.append(len(data)) or real(data, limits))
    a, b = png_uri(11), png_uri(12)
    await encode(encoder_client, [a])
    assert len(decoded) == 1
    decoded.clear()
    body = await encode(encoder_client, [a, b, a])  # a is cached; b is new and decoded once
    assert [it["cached"] for it in body["items"]] == [True, False, True]
    assert decoded == [len(raw_of(b))]
    decoded.clear()
    await encode(encoder_client, [b, a])
    assert decoded == []


async def test_the_returned_hash_is_the_blake3_of_the_raw_bytes(encoder_client, sidecar):
    """As a client computes it before uploading (``content_hash``): BLAKE3-256 of the bytes as
    sent, the file's or the data: URI's decoded payload, not of the decoded pixels."""
    uri = png_uri(11)
    path = encoder_client.imgs / "img.png"
    path.write_bytes(raw_of(png_uri(12)))
    doc = await encode(encoder_client, [uri, f"file://{path}"])
    want = [blake3.blake3(raw_of(uri)).hexdigest(), blake3.blake3(path.read_bytes()).hexdigest()]
    assert [it["hash"] for it in doc["items"]] == want
    assert all(len(h) == 64 for h in want)
    with CacheClient(f"unix://{sidecar.config.socket}") as c:
        assert all(c.exists(doc["namespace"], h) for h in want)


async def test_sixteen_concurrent_requests_for_one_new_image_encode_once(encoder_client):
    encoder_client.model.gate.clear()  # hold the model until all 16 are in
    uri = png_uri(2)
    tasks = [asyncio.create_task(encode(encoder_client, [uri])) for _ in range(16)]
    batcher = encoder_client.app[SERVICE].batcher
    for _ in range(1000):  # until the other 15 joined the one encode (bounded; the gate holds it)
        if batcher.joins == 15:
            break
        await asyncio.sleep(0.01)
    encoder_client.model.gate.set()
    answers = await asyncio.gather(*tasks)
    assert encoder_client.model.batches == [1] and batcher.joins == 15
    assert all(not a["items"][0]["cached"] for a in answers)


async def test_an_image_stored_while_a_lookup_was_out_is_not_encoded_again(encoder_client):
    """B looks the image up while A encodes it; A stores it and leaves the batcher before B reads
    its (stale) miss. B must find A's entry, not encode the image a second time."""
    service = encoder_client.app[SERVICE]
    model, uri = encoder_client.model, png_uri(7)
    model.gate.clear()  # A's encode waits here
    a = asyncio.ensure_future(encode(encoder_client, [uri]))
    while service.batcher.inflight == 0:
        await asyncio.sleep(0.01)
    real_lookup = service.cache.lookup

    async def stale_lookup(keys, **kwargs):
        answer = await real_lookup(keys, **kwargs)  # a miss: A has not stored it yet
        service.cache.lookup = real_lookup
        model.gate.set()
        await a  # A's encode ended, was stored, and A answered
        return answer

    service.cache.lookup = stale_lookup
    b = await encode(encoder_client, [uri])
    assert (await a)["items"][0]["cached"] is False
    assert b["items"][0]["cached"] is True and model.batches == [1]


async def test_concurrent_different_images_are_batched(encoder_client):
    uris = [png_uri(10 + i) for i in range(6)]
    answers = await asyncio.gather(*(encode(encoder_client, [u]) for u in uris))
    assert all(not a["items"][0]["cached"] for a in answers)
    assert max(encoder_client.model.batches) > 1


async def test_one_request_with_repeats_and_mixed_sources(encoder_client):
    uri = png_uri(3, size=(80, 40))
    path = encoder_client.imgs / "a.png"
    path.write_bytes(raw_of(uri))
    body = await encode(encoder_client, [uri, f"file://{path}", png_uri(4)])
    items = body["items"]
    assert items[0]["hash"] == items[1]["hash"] and items[0]["num_tokens"] == 10
    assert encoder_client.model.batches == [2]  # the repeat was encoded once


@pytest.mark.parametrize("images, needle", [
    (["data:image/png;base64,!!!"], "image 0"),
    ([None], "images"),
    ([], "images"),
    ("not-a-list", "images"),
    (["data:image/png;base64," + base64.b64encode(b"not an image").decode()], "image 0"),
    (["file:///etc/passwd"], "image 0"),
    (["ftp://x/y.png"], "image 0"),
])
async def test_bad_input_is_a_400_naming_the_image_and_the_worker_keeps_serving(encoder_client, images, needle):
    body = await encode(encoder_client, images if isinstance(images, list) else images, status=400)
    assert needle in body["error"]
    good = await encode(encoder_client, [png_uri(5)])
    assert good["items"][0]["num_tokens"] == 8


async def test_bad_image_among_good_ones_names_its_index(encoder_client):
    body = await encode(encoder_client, [png_uri(6), "data:image/png;base64,AAAA"], status=400)
    assert body["error"].startswith("image 1:")


async def test_models_stats_metrics_health(encoder_client):
    await encode(encoder_client, [png_uri(7)])
    await encode(encoder_client, [png_uri(7)])
    models = await (await encoder_client.get("/v1/models")).json()
    assert models["data"][0]["namespace"] == "fake-encoder.v1"
    stats = await (await encoder_client.get("/v1/stats")).json()
    assert stats["images"] == 2 and stats["cache_hits"] == 1 and stats["encoded"] == 1
    assert stats["single_flight_joins"] == 0 and stats["inflight"] == 0
    text = await (await encoder_client.get("/metrics")).text()
    assert 'mmcache_encoder_images_total{outcome="hit"} 1.0' in text
    assert (await encoder_client.get("/healthz")).status == 200


async def test_cache_down_is_a_503_and_the_worker_keeps_serving(tmp_path):
    cfg = EncoderServeConfig(cache_url=f"unix://{tmp_path}/nothing.sock")
    client = TestClient(TestServer(create_app(cfg, encoder=CountingEncoder())))
    await client.start_server()
    try:
        client.app[SERVICE].cache.retries = 0
        body = await encode(client, [png_uri(1)], status=503)
        assert "cache is unavailable" in body["error"]
        assert (await client.get("/healthz")).status == 200
    finally:
        await client.close()


async def test_a_full_encode_queue_is_a_503_with_retry_after(sidecar):
    model = CountingEncoder()
    cfg = EncoderServeConfig(cache_url=f"unix://{sidecar.config.socket}", max_batch=1, max_wait_ms=0,
                             max_queued_images=1)
    async with TestClient(TestServer(create_app(cfg, encoder=model))) as client:
        batcher = client.app[SERVICE].batcher
        model.gate.clear()
        running = asyncio.ensure_future(encode(client, [png_uri(20)]))
        await asyncio.to_thread(model.entered.wait, 10)  # NOTE: in the model, no longer queued
        queued_uri = png_uri(21)
        queued = asyncio.ensure_future(encode(client, [queued_uri]))
        await _until(lambda: batcher.queued == 1)
        resp = await client.post("/v1/encode", json={"images": [png_uri(22)]})
        body = await resp.json()
        assert resp.status == 503 and resp.headers["Retry-After"] == "1"
        assert "the encode queue is full" in body["error"] and "max_queued=1" in body["error"]
        joined = asyncio.ensure_future(encode(client, [queued_uri]))  # NOTE: in flight already: no room needed
        await _until(lambda: batcher.joins == 1)
        model.gate.set()
        answers = await asyncio.gather(running, queued, joined)
        assert [a["items"][0]["cached"] for a in answers] == [False, False, False] and model.batches == [1, 1]
        assert (await encode(client, [png_uri(22)]))["items"][0]["cached"] is False  # the refused one, retried
        stats = await (await client.get("/v1/stats")).json()
        assert stats["refused"] == 1 and stats["max_queued"] == 1 and stats["queued"] == 0


async def test_a_full_cache_is_a_503_with_retry_after(encoder_client, sidecar):
    service = encoder_client.app[SERVICE]
    real_put = service.cache.put

    async def full(namespace, hash_hex, *args, **kwargs):
        raise CacheFull(f"{namespace}/{hash_hex}: no room for 1024 bytes now (injected)", retry_after_s=2.5)
    service.cache.put = full
    uri = png_uri(30)
    try:
        resp = await encoder_client.post("/v1/encode", json={"images": [uri, png_uri(31)]})
        body = await resp.json()
        assert resp.status == 503 and resp.headers["Retry-After"] == "3"
        assert body["error"].startswith("the cache is full (every byte leased): ") and "(injected)" in body["error"]
    finally:
        service.cache.put = real_put
    assert (await encode(encoder_client, [uri]))["items"][0]["cached"] is False  # nothing was stored
    assert (await encode(encoder_client, [uri]))["items"][0]["cached"] is True


async def _until(cond, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.005)


async def test_videos_reuse_shared_frames_and_a_bad_one_fails_only_its_request(encoder_client):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from clips import data_uri, feed, make_clip

    source = feed(24, size=(32, 64), seed=5)
    first = {"url": data_uri(make_clip(source[:16])), "fps": 2, "max_frames": 16}
    overlapping = {"url": data_uri(make_clip(source[8:24])), "fps": 2, "max_frames": 16}
    wide = {"url": data_uri(make_clip(feed(4, size=(8, 400), seed=6))), "fps": 2}  # NOTE: the fake refuses 50:1
    stats = encoder_client.app[SERVICE].counters

    async def post(body, status=200):
        resp = await encoder_client.post("/v1/encode", json=body)
        doc = await resp.json()
        assert resp.status == status, doc
        return doc
    doc = await post({"videos": [first]})
    assert [it["frames"] for it in doc["videos"][0]["items"]] == [2, 2, 2, 2] and doc["videos"][0]["frames"] == 8
    assert (stats["frames_encoded"], stats["frames_reused"], stats["encoded"]) == (8, 0, 8)
    again = await post({"videos": [first]})
    assert all(it["cached"] for it in again["videos"][0]["items"])
    assert (stats["frames_encoded"], stats["frames_reused"]) == (8, 8)
    image = png_uri(40)
    results = await asyncio.gather(post({"images": [image], "videos": [overlapping]}),
                                   post({"images": [png_uri(41)], "videos": [first, wide]}, status=400))
    assert [it["cached"] for it in results[0]["videos"][0]["items"]] == [True, True, False, False]
    assert (stats["frames_encoded"], stats["frames_reused"]) == (12, 12)
    assert results[1]["error"].startswith("video 1: the video's frames cannot be encoded")
    doc = await post({"videos": [{"url": "data:video/mp4;base64,AAAA"}]}, status=400)
    assert doc["error"].startswith("video 0: not a decodable video")
    doc = await post({"videos": [first] * 9}, status=400)
    assert "max_videos_per_request=8" in doc["error"]
    doc = await post({"videos": [{**first, "max_frames": 65}]}, status=400)
    assert doc["error"].startswith("video 0: max_frames=65 exceeds")

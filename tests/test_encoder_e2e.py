"""The encoder service end to end with real tiny models: image in, the model's own image
features in the cache, bit for bit."""

from __future__ import annotations

import base64
import io
import os
import tempfile

import numpy as np
import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image
from transformers import AutoImageProcessor, LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration

from encoder_worker.models import ensure_model
from encoder_worker.app import SERVICE, create_app
from encoder_worker.config import EncoderServeConfig
from mmcache.sidecar.config import ServeConfig
from mmcache_client import CacheClient
from sidecar import ThreadedSidecar


def image_uri(seed: int, width: int, height: int) -> tuple[str, Image.Image]:
    arr = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    raw = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(raw).decode(), Image.open(io.BytesIO(raw)).convert("RGB")


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    sock = os.path.join(tempfile.mkdtemp(prefix="mmc-", dir="/tmp"), "s.sock")
    sc = ThreadedSidecar(ServeConfig(data_dir=str(tmp / "cache"), port=0, socket=sock, host_capacity_bytes=64 << 20,
                                     disk_capacity_bytes=256 << 20, arena_path=str(tmp / "arena"))).start()
    yield sc
    sc.stop()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("models"))


async def start_encoder(sidecar, data_dir, model):
    cfg = EncoderServeConfig(cache_url=f"unix://{sidecar.config.socket}", model=model, data_dir=data_dir,
                             max_batch=4, max_wait_ms=20)
    client = TestClient(TestServer(create_app(cfg)))  # loads the model the way `serve` does
    await client.start_server()
    return client


async def test_tiny_llava_entry_is_the_models_own_image_features(sidecar, data_dir):
    client = await start_encoder(sidecar, data_dir, "tiny-llava")
    try:
        uri, image = image_uri(0, 400, 300)
        first = await (await client.post("/v1/encode", json={"images": [uri]})).json()
        second = await (await client.post("/v1/encode", json={"images": [uri]})).json()
        item = first["items"][0]
        assert item["num_tokens"] == 576 and not item["cached"] and second["items"][0]["cached"]
        assert client.app[SERVICE].counters["encoded"] == 1

        model_dir = ensure_model("tiny-llava", data_dir)
        model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
        pixels = AutoImageProcessor.from_pretrained(model_dir)(images=[image], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            reference = model.get_image_features(
                pixel_values=pixels, vision_feature_layer=model.config.vision_feature_layer,
                vision_feature_select_strategy=model.config.vision_feature_select_strategy).pooler_output[0]
        with CacheClient(f"unix://{sidecar.config.socket}") as c, c.get(first["namespace"], item["hash"]) as e:
            assert torch.equal(e.tensor, reference)  # bit for bit, read in place from shared memory
            assert float(e.metadata["encode_ms"]) > 0
    finally:
        await client.close()


async def test_tiny_qwen2_vl_variable_tokens_round_trip_with_their_grid(sidecar, data_dir):
    client = await start_encoder(sidecar, data_dir, "tiny-qwen2-vl")
    try:
        (u1, im1), (u2, im2) = image_uri(1, 300, 400), image_uri(2, 100, 120)
        body = await (await client.post("/v1/encode", json={"images": [u1, u2]})).json()
        n1, n2 = (it["num_tokens"] for it in body["items"])
        assert n1 != n2 and body["namespace"].startswith("qwen2_vl.")

        model_dir = ensure_model("tiny-qwen2-vl", data_dir)
        model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir).eval()
        batch = AutoImageProcessor.from_pretrained(model_dir)(images=[im1, im2], return_tensors="pt")
        with torch.inference_mode():
            refs = model.get_image_features(pixel_values=batch["pixel_values"],
                                            image_grid_thw=batch["image_grid_thw"]).pooler_output
        with CacheClient(f"unix://{sidecar.config.socket}") as c:
            for item, ref, grid in zip(body["items"], refs, batch["image_grid_thw"]):
                with c.get(body["namespace"], item["hash"]) as e:
                    assert torch.equal(e.tensor, ref)
                    assert torch.equal(e.get_tensor("image_grid_thw")[0], grid)
    finally:
        await client.close()

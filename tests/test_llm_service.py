"""The LLM worker service on the CPU with tiny-llava: encoder → prefill → decode through a real
sidecar (embeddings and KV read in place), against the aggregated ``both`` worker and
``LlavaForConditionalGeneration.generate``; streaming, continuous batching, bad input."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass

import aiohttp
import huggingface_hub.constants
import numpy as np
import pytest
import pytest_asyncio
import torch
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from encoder_worker.models import ensure_model
from encoder_worker.config import EncoderServeConfig
from encoder_worker.app import create_app as create_encoder_app
from llm_worker.cli import main as llm_main
from llm_worker.engine.prompt import image_urls
from llm_worker.serve.app import SERVICE, create_app
from llm_worker.serve.config import LLMServeConfig
from mmcache.sidecar.config import ServeConfig
from mmcache_client import CacheClient
from sidecar import ThreadedSidecar

module_loop = pytest.mark.asyncio(loop_scope="module")
"""The async tests share the module's event loop, where the workers run."""

GREEDY = {"max_tokens": 12, "temperature": 0}
SIZES = [(300, 400), (336, 336), (500, 240)]


@pytest.fixture(scope="module", autouse=True)
def _offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def model_dir(data_dir) -> str:
    return ensure_model("tiny-llava", data_dir)


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sidecar")
    sock_dir = tempfile.mkdtemp(prefix="mmc-", dir="/tmp")  # AF_UNIX paths are short
    config = ServeConfig(data_dir=str(tmp / "data"), port=0, socket=os.path.join(sock_dir, "s.sock"),
                         host_capacity_bytes=128 << 20, disk_capacity_bytes=512 << 20,
                         arena_path=str(tmp / "arena"))
    sc = ThreadedSidecar(config).start()
    sc.unix_url = f"unix://{config.socket}"
    yield sc
    sc.stop()
    shutil.rmtree(sock_dir, ignore_errors=True)


@dataclass
class Stack:
    encoder: TestClient
    prefill: TestClient
    decode: TestClient
    both: TestClient


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(sidecar, data_dir, model_dir):
    """Every worker loads tiny-llava the way ``serve`` does."""
    url = sidecar.unix_url
    apps = [create_encoder_app(EncoderServeConfig(cache_url=url, data_dir=data_dir, max_batch=4, max_wait_ms=20)),
            *(create_app(LLMServeConfig(role, cache_url=url, model=model_dir, device="cpu", max_batch=8))
              for role in ("prefill", "decode", "both"))]
    clients = [TestClient(TestServer(app)) for app in apps]
    for client in clients:
        await client.start_server()
    yield Stack(*clients)
    for client in clients:
        await client.close()


@pytest.fixture(scope="module")
def images() -> list[tuple[str, Image.Image]]:
    """(data: URI, the decoded image) per size."""
    out = []
    for i, (h, w) in enumerate(SIZES):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(),
                    Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    return out


def conversation(uris: list[str], question: str = "What is shown in this image?") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in uris]
    return [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": question}, *parts]}]


async def post(client: TestClient, path: str, body, status: int = 200) -> dict:
    resp = await client.post(path, json=body)
    doc = await resp.json()
    assert resp.status == status, doc
    return doc


async def sse_events(resp) -> list:
    """The ``data:`` payloads of a Server-Sent Events body (``[DONE]`` as the string)."""
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    events = []
    async for line in resp.content:
        line = line.decode().rstrip("\n")
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def encode_and_prefill(stack: Stack, request_id: str, messages: list[dict], sampling: dict) -> dict:
    urls = image_urls(messages)
    images = []
    if urls:
        enc = await post(stack.encoder, "/v1/encode", {"images": urls})
        images = [{"namespace": enc["namespace"], "hash": it["hash"]} for it in enc["items"]]
    return await post(stack.prefill, "/v1/prefill", {"request_id": request_id, "messages": messages,
                                                     "images": images, "sampling": sampling})


async def epd(stack: Stack, request_id: str, messages: list[dict], sampling: dict, stream: bool = False):
    pre = await encode_and_prefill(stack, request_id, messages, sampling)
    body = {"request_id": request_id, "kv": pre["kv"], "sampling": {**sampling, "seed": pre["seed"]},
            "stream": stream}
    if stream:
        return pre, await sse_events(await stack.decode.post("/v1/decode", json=body))
    return pre, await post(stack.decode, "/v1/decode", body)


def kv_exists(sidecar, kv: dict) -> bool:
    with CacheClient(sidecar.unix_url) as c:
        return c.exists(kv["namespace"], kv["hash"])


# ---------------------------------------------------------------- EPD == aggregated == generate


@pytest.mark.parametrize("num_images", [1, 3])
@module_loop
async def test_epd_equals_aggregated_and_generate(stack, sidecar, model_dir, images, num_images):
    messages = conversation([u for u, _ in images[:num_images]])
    pre, disagg = await epd(stack, f"epd-{num_images}", messages, GREEDY)
    agg = await post(stack.both, "/v1/generate", {"messages": messages, "sampling": GREEDY})
    assert disagg == agg
    assert disagg["token_ids"][0] == pre["first_token"] and disagg["completion_tokens"] == 12
    assert pre["prompt_tokens"] == disagg["prompt_tokens"] > 576 * num_images and pre["prefill_ms"] > 0
    assert not kv_exists(sidecar, pre["kv"])  # the KV is per request: gone once decoded

    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    hf_messages = [{**m, "content": m["content"] if isinstance(m["content"], str) else
                    [p if p["type"] == "text" else {"type": "image"} for p in m["content"]]} for m in messages]
    text = processor.apply_chat_template(hf_messages, add_generation_prompt=True)
    inputs = processor(text=text, images=[im for _, im in images[:num_images]], return_tensors="pt")
    want = model.generate(**inputs, do_sample=False, max_new_tokens=12)[0, inputs["input_ids"].shape[1]:]
    assert disagg["token_ids"] == want.tolist()
    assert inputs["input_ids"].shape[1] == pre["prompt_tokens"]


@module_loop
async def test_a_five_image_prefill_makes_a_bounded_number_of_round_trips(stack, sidecar, images):
    """Prefill leases all of a request's images in one round trip and releases them in one
   : counted in the sidecar's stats, the same for 5 images as for 1."""
    from mmcache.sidecar.server import LOCAL_OPS

    uris = [images[i % len(images)][0] for i in range(5)]
    messages = conversation(uris)
    enc = await post(stack.encoder, "/v1/encode", {"images": uris})
    keys = [{"namespace": enc["namespace"], "hash": it["hash"]} for it in enc["items"]]
    ops = sidecar.app[LOCAL_OPS]
    before = dict(ops)
    pre = await post(stack.prefill, "/v1/prefill", {"request_id": "five", "messages": messages, "images": keys,
                                                    "sampling": GREEDY})
    delta = {op: n - before.get(op, 0) for op, n in ops.items() if n != before.get(op, 0)}
    assert delta.get("lease") == 1 and delta.get("release") == 1, delta
    assert sum(delta.values()) <= 5, delta  # the KV's exists, lease, release, reserve, seal
    await post(stack.decode, "/v1/decode", {"request_id": "five", "kv": pre["kv"],
                                            "sampling": {**GREEDY, "seed": pre["seed"]}})


@module_loop
async def test_text_only_request_and_a_request_finished_by_prefill(stack, sidecar):
    messages = [{"role": "user", "content": "Hello there"}]
    _, full = await epd(stack, "text-only", messages, GREEDY)
    assert full == await post(stack.both, "/v1/generate", {"messages": messages, "sampling": GREEDY})
    pre, one = await epd(stack, "one-token", messages, {"max_tokens": 1, "temperature": 0})
    assert one["token_ids"] == full["token_ids"][:1] and one["finish_reason"] == "length"
    assert pre["first_finish_reason"] == "length" and pre["first_text"] == one["text"]
    assert not kv_exists(sidecar, pre["kv"])


# ---------------------------------------------------------------- streaming


@module_loop
async def test_streamed_deltas_add_up_to_the_text(stack, sidecar, images):
    messages = conversation([images[0][0]], "Describe it.")
    long = {"max_tokens": 24, "temperature": 0}
    _, whole = await epd(stack, "whole", messages, long)
    # NOTE: the tiny model writes odd text; a printable pair from its middle makes a stop string.
    text = whole["text"]
    stop = next(text[i:i + 2] for i in range(3, len(text) - 1) if text[i:i + 2].isprintable())
    for name, sampling in [("plain", long), ("stop", {**long, "stop": ["never!", stop]})]:
        _, reference = await epd(stack, f"ref-{name}", messages, sampling)
        pre, events = await epd(stack, f"stream-{name}", messages, sampling, stream=True)
        assert events[-1] == "[DONE]"
        *tokens, final = events[:-1]
        assert "".join(e["text"] for e in tokens) == reference["text"]
        assert [e["token_id"] for e in tokens] == reference["token_ids"]
        # NOTE: what the router streams before decode answers is what decode streams first
        assert (pre["first_token"], pre["first_text"], pre["first_finish_reason"]) == \
            (tokens[0]["token_id"], tokens[0]["text"], final["finish_reason"] if len(tokens) == 1 else None)
        assert final["finish_reason"] == reference["finish_reason"]
        assert final["completion_tokens"] == len(reference["token_ids"])
        assert not kv_exists(sidecar, pre["kv"])
    assert reference["finish_reason"] == "stop" and reference["text"] == text[:text.find(stop)]

    resp = await stack.both.post("/v1/generate", json={"messages": messages, "sampling": long, "stream": True})
    events = await sse_events(resp)
    assert "".join(e.get("text", "") for e in events[:-2]) == whole["text"] and events[-1] == "[DONE]"


# ---------------------------------------------------------------- continuous batching


@module_loop
async def test_concurrent_decodes_share_steps_and_equal_their_solo_runs(stack, images):
    requests = [(conversation([u for u, _ in images[:n]], q), {"max_tokens": m, "temperature": 0})
                for n, q, m in [(0, "Hi", 20), (1, "Describe the picture in detail.", 24), (2, "Colors?", 16),
                                (3, "Why?", 22), (1, "And then?", 18)]]
    solo = [(await epd(stack, f"solo-{i}", msgs, s))[1] for i, (msgs, s) in enumerate(requests)]
    stats0 = await (await stack.decode.get("/v1/stats")).json()

    pres = await asyncio.gather(*(encode_and_prefill(stack, f"batch-{i}", msgs, s)
                                  for i, (msgs, s) in enumerate(requests)))
    together = await asyncio.gather(*(
        post(stack.decode, "/v1/decode", {"request_id": pre["request_id"], "kv": pre["kv"],
                                          "sampling": {**s, "seed": pre["seed"]}})
        for pre, (_, s) in zip(pres, requests)))
    assert together == solo
    stats = await (await stack.decode.get("/v1/stats")).json()
    steps = stats["decode"]["steps"] - stats0["decode"]["steps"]
    tokens = stats["decode"]["batched_tokens"] - stats0["decode"]["batched_tokens"]
    assert stats["decode"]["max_batch_size"] > 1 and tokens > steps  # several requests per step
    assert tokens == sum(s["max_tokens"] - 1 for _, s in requests)  # the first tokens came from prefill
    assert stats["decode"]["running"] == stats["decode"]["waiting"] == 0 and stats["active"] == 0


@module_loop
async def test_a_request_leaving_the_batch_leaves_the_others_untouched(stack, images):
    """The middle row leaves mid-decode (the last row moves into its place); the rest go on as alone."""
    mates = [(conversation([images[1][0]], "Describe it."), {"max_tokens": 20, "temperature": 0}),
             (conversation([images[2][0]], "Colors?"), {"max_tokens": 16, "temperature": 0})]
    solo = [(await epd(stack, f"mate-solo-{i}", msgs, s))[1] for i, (msgs, s) in enumerate(mates)]
    leaver = {"max_tokens": 400, "temperature": 0}
    pres = await asyncio.gather(encode_and_prefill(stack, "mate-0", *mates[0]),
                                encode_and_prefill(stack, "middle", conversation([]), leaver),
                                encode_and_prefill(stack, "mate-1", *mates[1]))

    async def leave_after_three_tokens():
        resp = await stack.decode.post("/v1/decode", json={"request_id": "middle", "stream": True,
                                                           "sampling": {**leaver, "seed": pres[1]["seed"]}})
        for _ in range(3):
            await resp.content.readline()
            await resp.content.readline()  # the blank line after each event
        resp.close()

    def decode(pre, sampling):
        return post(stack.decode, "/v1/decode", {"request_id": pre["request_id"],
                                                 "sampling": {**sampling, "seed": pre["seed"]}})
    together = await asyncio.gather(decode(pres[0], mates[0][1]), leave_after_three_tokens(),
                                    decode(pres[2], mates[1][1]))
    assert [together[0], together[2]] == solo


@module_loop
@pytest.mark.parametrize("handler_cancellation", [True, False])
async def test_a_client_that_leaves_mid_stream_frees_its_row(stack, sidecar, model_dir, handler_cancellation):
    """With cancellation (``serve``'s setting) the handler is cancelled at the disconnect; without
    it, the next write fails. Either way the request leaves the batch and the next ones run."""
    runner = None
    decode = stack.decode
    if not handler_cancellation:  # NOTE: TestServer always cancels handlers; this is aiohttp's default
        runner = web.AppRunner(create_app(LLMServeConfig("decode", cache_url=sidecar.unix_url, model=model_dir,
                                                         device="cpu")), handler_cancellation=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        decode = _RawClient(f"http://127.0.0.1:{runner.addresses[0][1]}")
    try:
        messages = [{"role": "user", "content": "Tell me a long story"}]
        sampling = {"max_tokens": 4000, "temperature": 0}
        request_id = f"leaver-{handler_cancellation}"
        pre = await encode_and_prefill(stack, request_id, messages, sampling)
        steps0 = (await (await decode.get("/v1/stats")).json())["decode"]["batched_tokens"]
        resp = await decode.post("/v1/decode", json={"request_id": request_id, "sampling": sampling, "stream": True})
        await resp.content.readline()  # the first token (the prefill's) is out
        resp.close()
        for _ in range(500):  # NOTE: the server notices the disconnect at once or on its next write
            stats = (await (await decode.get("/v1/stats")).json())["decode"]
            gone = not await asyncio.to_thread(kv_exists, sidecar, pre["kv"])  # released in the background
            if stats["running"] == stats["waiting"] == 0 and gone:
                break
            await asyncio.sleep(0.01)
        assert stats["running"] == stats["waiting"] == 0 and gone
        assert stats["batched_tokens"] - steps0 < sampling["max_tokens"] - 1  # left early, did not finish
        pre = await encode_and_prefill(stack, f"after-{request_id}", messages, GREEDY)
        after = await (await decode.post("/v1/decode", json={"request_id": pre["request_id"],
                                                             "sampling": GREEDY})).json()
        assert after["completion_tokens"] == 12
    finally:
        if runner is not None:
            await decode.close()
            await runner.cleanup()


class _RawClient:
    """``get`` / ``post`` on a base URL, as ``TestClient`` offers them."""

    def __init__(self, base: str) -> None:
        self._base = base
        self._session = aiohttp.ClientSession()

    async def get(self, path: str):
        return await self._session.get(self._base + path)

    async def post(self, path: str, **kwargs):
        return await self._session.post(self._base + path, **kwargs)

    async def close(self) -> None:
        await self._session.close()


@module_loop
async def test_a_failed_step_fails_its_requests_and_the_worker_goes_on(stack, sidecar):
    loop = stack.decode.app[SERVICE].decode_loop

    def broken_step():
        raise RuntimeError("injected step failure")
    loop._batch.step = broken_step  # NOTE: this batch only: a failed step replaces the batch
    messages = [{"role": "user", "content": "Hello there"}]
    pre = await encode_and_prefill(stack, "doomed", messages, GREEDY)
    doc = await post(stack.decode, "/v1/decode", {"request_id": "doomed", "sampling": GREEDY}, 500)
    assert "injected step failure" in doc["error"]
    assert not kv_exists(sidecar, pre["kv"])
    _, after = await epd(stack, "after-doomed", messages, GREEDY)
    assert after["completion_tokens"] == 12


# ---------------------------------------------------------------- bad input


@module_loop
async def test_bad_input_is_a_4xx_naming_the_problem(stack, sidecar, images):
    messages = conversation([images[0][0]])
    enc = await post(stack.encoder, "/v1/encode", {"images": [images[0][0]]})
    image = {"namespace": enc["namespace"], "hash": enc["items"][0]["hash"]}
    ok = {"request_id": "bad-0", "messages": messages, "images": [image], "sampling": GREEDY}
    errors0 = (await (await stack.prefill.get("/v1/stats")).json())["errors"]

    cases = [
        ({**ok, "messages": None}, 400, "messages must be a non-empty list"),
        ({k: v for k, v in ok.items() if k != "messages"}, 400, "messages must be a non-empty list"),
        ({**ok, "request_id": ""}, 400, "request_id"),
        ({**ok, "sampling": {"max_tokens": 0}}, 400, "max_tokens=0"),
        ({**ok, "sampling": {"temperature": -1}}, 400, "temperature=-1"),
        ({**ok, "sampling": {"top_p": "high"}}, 400, "top_p='high'"),
        ({**ok, "sampling": {"beam_width": 4}}, 400, "unknown field(s) ['beam_width']"),
        ({**ok, "images": []}, 400, "1 image and 0 video parts but 0 images"),
        ({**ok, "images": [{"namespace": image["namespace"]}]}, 400, "images[0]"),
        ({**ok, "images": [{**image, "hash": "0" * 32}]}, 400, "(32 chars) must be 64 lowercase hex"),
        ({**ok, "images": [{**image, "hash": "0" * 64}]}, 409,
         f"image {image['namespace']}/{'0' * 64} is not in the cache"),
    ]
    for body, status, message in cases:
        doc = await post(stack.prefill, "/v1/prefill", body, status)
        assert message in doc["error"], (body, doc)
    resp = await stack.prefill.post("/v1/prefill", data=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status == 400 and "JSON" in (await resp.json())["error"]

    pre = await post(stack.prefill, "/v1/prefill", ok)  # the worker keeps serving
    doc = await post(stack.prefill, "/v1/prefill", ok, 409)
    assert "already has a KV entry" in doc["error"]
    assert (await (await stack.prefill.get("/v1/stats")).json())["errors"] == errors0 + len(cases) + 2

    decode_cases = [
        ({"request_id": "bad-0", "sampling": {"stop": 5}}, 400, "sampling: stop=5 must be a string or a list"),
        ({"request_id": "bad-0", "stream": "yes"}, 400, '"stream" must be true or false'),
        ({"request_id": "bad-0", "kv": {"namespace": pre["kv"]["namespace"], "hash": "0" * 64}}, 400,
         "is not the KV key of request_id 'bad-0'"),
        ({"request_id": "never-prefilled"}, 409, "is not in the cache"),
    ]
    for body, status, message in decode_cases:
        doc = await post(stack.decode, "/v1/decode", body, status)
        assert message in doc["error"], (body, doc)
    assert kv_exists(sidecar, pre["kv"])  # refused requests leave the KV alone
    done = await post(stack.decode, "/v1/decode", {"request_id": "bad-0", "kv": pre["kv"], "sampling": GREEDY})
    assert done["completion_tokens"] == 12 and not kv_exists(sidecar, pre["kv"])

    doc = await post(stack.prefill, "/v1/decode", {"request_id": "x"}, 404)
    assert "served by decode workers; this one is a prefill worker" in doc["error"]
    doc = await post(stack.both, "/v1/generate", {"messages": conversation(["data:image/png;base64,AAAA"])}, 400)
    assert doc["error"].startswith("image 0: ")
    doc = await post(stack.both, "/v1/generate", {"messages": [{"role": "user", "content": "<image> hi"}]}, 400)
    assert "placeholders" in doc["error"]


@module_loop
async def test_health_stats_and_metrics(stack):
    for client, role in [(stack.prefill, "prefill"), (stack.decode, "decode"), (stack.both, "both")]:
        assert (await (await client.get("/healthz")).json()) == {"status": "ok", "role": role}
        stats = await (await client.get("/v1/stats")).json()
        assert stats["role"] == role and stats["namespace"].startswith("llava.llama.f32.")
        assert {"requests", "prompt_tokens", "completion_tokens", "errors", "active"} <= set(stats)
        assert stats["requests"] > 0 and stats["active"] == 0
        assert ("decode" in stats) == (role != "prefill")
        metrics = await (await client.get("/metrics")).text()
        assert "mmcache_llm_requests_total{" in metrics and "mmcache_llm_active_requests 0.0" in metrics
    assert client.app[SERVICE].counters["completion_tokens"] > 0
    assert "mmcache_llm_decode_batch_size_bucket" in await (await stack.decode.get("/metrics")).text()


# ---------------------------------------------------------------- CLI


def test_cli_refuses_a_bad_config(capsys):
    assert llm_main(["serve", "--role", "decode"]) == 2
    assert "needs cache_url" in capsys.readouterr().err


def test_cli_serves_until_terminated(model_dir):
    proc = subprocess.Popen([sys.executable, "-m", "llm_worker.cli", "serve", "--role", "both", "--model", model_dir,
                             "--device", "cpu", "--port", "0", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("mmcache-llm ready"):
                break
        assert lines and lines[-1].startswith("mmcache-llm ready: http://127.0.0.1:"), "".join(lines)
        port = int(lines[-1].strip().rsplit(":", 1)[1])
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
            assert json.load(resp) == {"status": "ok", "role": "both"}
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible here")
def test_cli_device_cuda_without_cuda_is_a_clear_error(capsys):
    assert llm_main(["serve", "--role", "both", "--device", "cuda", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device is visible" in err and "--device cpu" in err

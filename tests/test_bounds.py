"""Bounded everything, on the real stack (tiny-llava on the CPU, a real sidecar): the router in
front of an encoder, a prefill and a decode worker. A ``max_tokens`` past the context is a 400
and leaves its neighbours alone; a KV allocation that fails fails its own request only; a full
decode queue and a full cache answer 503 with ``Retry-After``, through the router too. (The
router's own limit and its pass-through against scripted workers are in ``test_router.py``; the
encoder's queue in ``test_encoder_service.py``.)"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import tempfile

import huggingface_hub.constants
import numpy as np
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from encoder_worker.models import ensure_model
from encoder_worker.app import SERVICE as ENCODER_SERVICE
from encoder_worker.config import EncoderServeConfig
from encoder_worker.app import create_app as create_encoder_app
from llm_worker.engine.prompt import template_ids
from llm_worker.router.router import RouterConfig
from llm_worker.router.app import ROUTER, create_app as create_router_app
from llm_worker.serve.app import SERVICE, create_app
from llm_worker.serve.config import LLMServeConfig
from llm_worker.engine.slab import BatchKV
from mmcache.sidecar.config import ServeConfig
from mmcache_client import CacheClient, CacheFull
from sidecar import ThreadedSidecar

module_loop = pytest.mark.asyncio(loop_scope="module")
CONTEXT = 4096
"""tiny-llava's max_position_embeddings."""
IMAGE_TOKENS = 576


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
                         host_capacity_bytes=128 << 20, disk_capacity_bytes=512 << 20, arena_path=str(tmp / "arena"))
    sc = ThreadedSidecar(config).start()
    sc.unix_url = f"unix://{config.socket}"
    yield sc
    sc.stop()
    shutil.rmtree(sock_dir, ignore_errors=True)


class Stack:
    def __init__(self, encoder: TestClient, prefill: TestClient, decode: TestClient, router: TestClient):
        self.encoder, self.prefill, self.decode, self.router = encoder, prefill, decode, router


def _url(client: TestClient) -> str:
    return str(client.server.make_url("")).rstrip("/")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(sidecar, data_dir, model_dir):
    url = sidecar.unix_url
    workers = [TestClient(TestServer(app)) for app in (
        create_encoder_app(EncoderServeConfig(cache_url=url, data_dir=data_dir, max_batch=4, max_wait_ms=20)),
        create_app(LLMServeConfig("prefill", cache_url=url, model=model_dir, device="cpu")),
        create_app(LLMServeConfig("decode", cache_url=url, model=model_dir, device="cpu", max_batch=8)))]
    for client in workers:
        await client.start_server()
    encoder, prefill, decode = workers
    config = RouterConfig(model=model_dir, data_dir=data_dir, encoders=(_url(encoder),), prefill=(_url(prefill),),
                          decode=(_url(decode),))
    router = TestClient(TestServer(create_router_app(config)))
    await router.start_server()
    yield Stack(encoder, prefill, decode, router)
    for client in (router, *workers):
        await client.close()


def png_uri(seed: int, size=(320, 240)) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def messages(question: str, num_images: int = 0, seed: int = 0) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": png_uri(seed + i)}} for i in range(num_images)]
    return [{"role": "user", "content": [{"type": "text", "text": question}, *parts]}]


def chat(msgs: list[dict], **extra) -> dict:
    return {"model": "tiny-llava", "messages": msgs, "temperature": 0, "return_token_ids": True, **extra}


async def complete(stack: Stack, body: dict) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of a chat completion through the router."""
    resp = await stack.router.post("/v1/chat/completions", json=body)
    return resp.status, await resp.json(), resp.headers


def answer(doc: dict) -> tuple[str, list[int], str]:
    choice = doc["choices"][0]
    return choice["message"]["content"], choice["token_ids"], choice["finish_reason"]


def prompt_len(stack: Stack, msgs: list[dict]) -> int:
    router = stack.router.app[ROUTER]
    ids = template_ids(router.tokenizer, msgs, router.image_token_id)
    return len(ids) + ids.count(router.image_token_id) * (IMAGE_TOKENS - 1)


NORMAL = [(messages("Describe the picture.", 1, seed=10), 14), (messages("Hi there"), 20),
          (messages("Compare them.", 2, seed=20), 9)]


async def solo_runs(stack: Stack) -> list[tuple[str, list[int], str]]:
    out = []
    for msgs, n in NORMAL:
        status, doc, _ = await complete(stack, chat(msgs, max_tokens=n))
        assert status == 200, doc
        out.append(answer(doc))
    assert [len(ids) for _, ids, _ in out] == [n for _, n in NORMAL]
    return out


async def prefill_requests(stack: Stack) -> int:
    return (await (await stack.prefill.get("/v1/stats")).json())["requests"]


# ---------------------------------------------------------------- max_tokens and the context


@module_loop
async def test_max_tokens_past_the_context_is_a_400_and_its_neighbours_finish(stack):
    solo = await solo_runs(stack)
    huge = messages("Tell me everything.")
    # NOTE: passes the check on the template alone (the image counts 1), fails on the exact prompt.
    close = messages("And this one?", 1, seed=30)
    close_max = CONTEXT - len(template_ids(stack.router.app[ROUTER].tokenizer, close,
                                           stack.router.app[ROUTER].image_token_id))
    prefills0 = await prefill_requests(stack)
    results = await asyncio.gather(
        *(complete(stack, chat(msgs, max_tokens=n)) for msgs, n in NORMAL[:2]),
        complete(stack, chat(huge, max_tokens=10**8)),
        complete(stack, chat(close, max_completion_tokens=close_max)),
        complete(stack, chat(NORMAL[2][0], max_tokens=NORMAL[2][1])))
    statuses = [status for status, _, _ in results]
    assert statuses == [200, 200, 400, 400, 200], results
    assert [answer(doc) for _, doc, _ in (results[0], results[1], results[4])] == solo

    error = results[2][1]["error"]
    assert error["message"] == (f"max_tokens=100000000 exceeds the model's context of {CONTEXT} minus the "
                                f"prompt's {prompt_len(stack, huge)} tokens (at most {CONTEXT - prompt_len(stack, huge)})")
    assert error["param"] == "max_tokens" and error["type"] == "invalid_request_error" and error["code"] == 400
    error = results[3][1]["error"]
    assert error["param"] == "max_completion_tokens" and error["message"].startswith(
        f"max_completion_tokens={close_max} exceeds the model's context of {CONTEXT} minus the prompt's "
        f"{prompt_len(stack, close)} tokens")
    assert await prefill_requests(stack) - prefills0 == 3  # NOTE: the refused ones never reached prefill


@module_loop
async def test_no_max_tokens_is_the_default_cut_to_what_fits(stack, monkeypatch):
    service = stack.prefill.app[SERVICE]
    asked = []
    prefill = service.prefill

    async def spy(request_id, messages, images, sampling, *args):
        asked.append(sampling.max_tokens)
        return await prefill(request_id, messages, images, sampling, *args)
    monkeypatch.setattr(service, "prefill", spy)
    long = messages("Look.", 7, seed=40)
    room = CONTEXT - prompt_len(stack, long)
    assert 0 < room < 256  # NOTE: 256 is the router's default
    status, doc, _ = await complete(stack, chat(long))
    assert status == 200, doc
    assert asked == [room] and doc["usage"]["prompt_tokens"] == prompt_len(stack, long)
    assert doc["usage"]["completion_tokens"] <= room
    status, doc, _ = await complete(stack, chat(messages("Hi there")))
    assert status == 200 and asked[-1] == 256


@module_loop
async def test_the_workers_check_max_tokens_themselves(stack, sidecar):
    msgs = messages("Hello there")
    too_many = {"max_tokens": CONTEXT, "temperature": 0}
    resp = await stack.prefill.post("/v1/prefill", json={"request_id": "direct-huge", "messages": msgs,
                                                         "sampling": too_many})
    doc = await resp.json()
    assert resp.status == 400 and doc["error"].startswith(f"max_tokens={CONTEXT} exceeds the model's context of "
                                                          f"{CONTEXT} minus the prompt's ")
    # NOTE: a decode asked for more than its prefill was is refused too, and leaves the KV alone
    pre = await (await stack.prefill.post("/v1/prefill", json={"request_id": "direct-small", "messages": msgs,
                                                               "sampling": {"max_tokens": 4, "temperature": 0}})).json()
    resp = await stack.decode.post("/v1/decode", json={"request_id": "direct-small", "sampling": too_many})
    assert resp.status == 400 and "exceeds the model's context" in (await resp.json())["error"]
    with CacheClient(sidecar.unix_url) as c:
        assert c.exists(pre["kv"]["namespace"], pre["kv"]["hash"])
    resp = await stack.decode.post("/v1/decode", json={"request_id": "direct-small",
                                                       "sampling": {"max_tokens": 4, "temperature": 0,
                                                                    "seed": pre["seed"]}})
    assert resp.status == 200 and (await resp.json())["completion_tokens"] == 4


# ---------------------------------------------------------------- a failed allocation


class ChunkStream:
    """A streamed chat completion through the router, chunk by chunk."""

    def __init__(self, resp):
        self.resp, self.token_ids, self.finish_reason = resp, [], None
        self._lines = resp.content.__aiter__()

    async def read(self, num_tokens: int | None = None) -> None:
        """Until ``num_tokens`` tokens have come (None: to the end)."""
        while num_tokens is None or len(self.token_ids) < num_tokens:
            try:
                line = await self._lines.__anext__()
            except StopAsyncIteration:
                assert num_tokens is None, self.token_ids
                return
            if line.startswith(b"data: {"):
                chunk = json.loads(line[len(b"data: "):])
                assert "error" not in chunk, chunk
                choice = chunk["choices"][0]
                self.token_ids += choice.get("token_ids") or []
                self.finish_reason = choice["finish_reason"] or self.finish_reason


LONG = [(messages("Describe the picture.", 1, seed=10), 150), (messages("Hi there"), 160),
        (messages("Compare them.", 2, seed=20), 140)]


@module_loop
async def test_a_kv_allocation_failure_fails_only_its_request(stack, sidecar, monkeypatch):
    solo = []
    for msgs, n in LONG:
        status, doc, _ = await complete(stack, chat(msgs, max_tokens=n))
        assert status == 200, doc
        solo.append(answer(doc)[1:])
    allocate = BatchKV._allocate
    refused_with_rows = []

    def no_memory_for_long_reservations(self, shape):
        if shape[2] > 2500:  # NOTE: only the doomed request reserves this many positions
            refused_with_rows.append(self.num_rows)
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory (injected)")
        return allocate(self, shape)
    monkeypatch.setattr(BatchKV, "_allocate", no_memory_for_long_reservations)
    streams = [ChunkStream(await stack.router.post("/v1/chat/completions", json=chat(msgs, max_tokens=n, stream=True)))
               for msgs, n in LONG]
    for stream in streams:  # NOTE: the prefill's token and one from a decode step: all three are decoding
        await stream.read(2)
    doomed = messages("Tell me a long story")
    status, doc, headers = await complete(stack, chat(doomed, max_tokens=3000))
    assert status == 503, doc
    assert refused_with_rows == [3]  # NOTE: it failed joining a batch of three, which went on
    assert doc["error"]["stage"] == "decode" and "no memory for this request's KV" in doc["error"]["message"]
    assert "can't allocate memory (injected)" in doc["error"]["message"] and headers["Retry-After"] == "1"
    for stream in streams:
        await stream.read()
    assert [(s.token_ids, s.finish_reason) for s in streams] == solo

    # NOTE: streamed, the failure is the stream's last event, after the prefill's token
    resp = await stack.router.post("/v1/chat/completions", json=chat(doomed, max_tokens=3000, stream=True))
    events = [line[len(b"data: "):].strip() async for line in resp.content if line.startswith(b"data: ")]
    assert resp.status == 200 and events[-1] == b"[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 503 and error["stage"] == "decode" and "no memory" in error["message"]
    stats = (await (await stack.decode.get("/v1/stats")).json())["decode"]
    assert stats["running"] == stats["waiting"] == 0
    monkeypatch.undo()
    status, doc, _ = await complete(stack, chat(doomed, max_tokens=30))
    assert status == 200 and doc["usage"]["completion_tokens"] <= 30


# ---------------------------------------------------------------- a full decode queue


async def _prefill(stack: Stack, request_id: str, msgs: list[dict], sampling: dict) -> dict:
    resp = await stack.prefill.post("/v1/prefill", json={"request_id": request_id, "messages": msgs,
                                                         "sampling": sampling})
    doc = await resp.json()
    assert resp.status == 200, doc
    return doc


async def _events(resp, n: int) -> list[dict]:
    out = []
    while len(out) < n:
        line = await resp.content.readline()
        assert line, out
        if line.startswith(b"data: "):
            out.append(json.loads(line[len(b"data: "):]))
    return out


@module_loop
async def test_a_full_decode_queue_is_a_503_with_retry_after(stack, sidecar, monkeypatch):
    loop = stack.decode.app[SERVICE].decode_loop
    monkeypatch.setattr(loop, "max_batch", 1)
    monkeypatch.setattr(loop, "max_waiting", 1)
    greedy = {"max_tokens": 10, "temperature": 0}
    long = {"max_tokens": 3000, "temperature": 0}
    pres = {rid: await _prefill(stack, rid, messages(q), s) for rid, q, s in
            [("q-running", "Tell me a long story", long), ("q-waiting", "Hi there", greedy),
             ("q-refused", "Colors?", greedy), ("q-solo-waiting", "Hi there", greedy),
             ("q-solo-refused", "Colors?", greedy)]}

    def decode_body(rid: str, sampling: dict, stream: bool = False) -> dict:
        return {"request_id": rid, "sampling": {**sampling, "seed": pres[rid]["seed"]}, "stream": stream}
    solo = {}
    for rid in ("q-solo-waiting", "q-solo-refused"):
        solo[rid] = await (await stack.decode.post("/v1/decode", json=decode_body(rid, greedy))).json()

    running = await stack.decode.post("/v1/decode", json=decode_body("q-running", long, stream=True))
    await _events(running, 2)  # NOTE: the second event comes from a step: it is in the batch
    waiting = await stack.decode.post("/v1/decode", json=decode_body("q-waiting", greedy, stream=True))
    await _events(waiting, 1)  # NOTE: published as it was queued: the batch of one is taken
    assert loop.num_running == 1 and loop.num_waiting == 1

    resp = await stack.decode.post("/v1/decode", json=decode_body("q-refused", greedy))
    doc = await resp.json()
    assert resp.status == 503 and resp.headers["Retry-After"] == "1"
    assert "the decode worker is full" in doc["error"] and "max_waiting=1" in doc["error"]
    kv = pres["q-refused"]["kv"]
    with CacheClient(sidecar.unix_url) as c:  # NOTE: refused before reading it: a retry finds it
        assert c.exists(kv["namespace"], kv["hash"])
    # NOTE: an OpenAI client gets the 503 and the Retry-After through the router
    status, doc, headers = await complete(stack, chat(messages("Why?"), max_tokens=5))
    assert status == 503 and headers["Retry-After"] == "1", doc
    assert doc["error"]["stage"] == "decode" and doc["error"]["type"] == "server_error"
    assert "max_waiting=1" in doc["error"]["message"]

    running.close()  # NOTE: the running request leaves; the waiting one joins and finishes as alone
    events = [e async for e in _rest(waiting)]
    assert [e["token_id"] for e in events if "token_id" in e] == solo["q-solo-waiting"]["token_ids"][1:]
    assert events[-1]["finish_reason"] == solo["q-solo-waiting"]["finish_reason"]
    retried = await (await stack.decode.post("/v1/decode", json=decode_body("q-refused", greedy))).json()
    assert retried["token_ids"] == solo["q-solo-refused"]["token_ids"]


async def _rest(resp):
    async for line in resp.content:
        if line.startswith(b"data: {"):
            yield json.loads(line[len(b"data: "):])


# ---------------------------------------------------------------- a full cache


@module_loop
async def test_a_full_cache_is_a_503_with_retry_after_at_prefill_and_through_the_router(stack, monkeypatch):
    cache = stack.prefill.app[SERVICE].cache
    puts = []
    real_put = cache.put

    async def put(namespace, hash_hex, *args, **kwargs):
        puts.append(kwargs)
        raise CacheFull(f"{namespace}/{hash_hex}: no room now (injected)", retry_after_s=4.2)
    monkeypatch.setattr(cache, "put", put)
    msgs = messages("Full?", 1, seed=50)
    status, doc, headers = await complete(stack, chat(msgs, max_tokens=4))
    assert status == 503 and headers["Retry-After"] == "5", doc
    assert doc["error"]["stage"] == "prefill" and "the cache is full" in doc["error"]["message"]
    assert "no room now (injected)" in doc["error"]["message"]
    resp = await stack.prefill.post("/v1/prefill", json={"request_id": "full-direct", "messages": messages("Hi"),
                                                         "sampling": {"max_tokens": 4}})
    assert resp.status == 503 and resp.headers["Retry-After"] == "5"
    assert "the cache is full" in (await resp.json())["error"]
    # NOTE: the KV hand-off is host-only: put with persist=False
    assert puts and all(kw.get("persist") is False for kw in puts)
    monkeypatch.setattr(cache, "put", real_put)
    status, doc, _ = await complete(stack, chat(msgs, max_tokens=4))
    assert status == 200 and doc["usage"]["completion_tokens"] == 4


@module_loop
async def test_a_full_cache_is_a_503_with_retry_after_at_the_encoder_and_through_the_router(stack, monkeypatch):
    cache = stack.encoder.app[ENCODER_SERVICE].cache

    async def put(namespace, hash_hex, *args, **kwargs):
        raise CacheFull(f"{namespace}/{hash_hex}: no room now (injected)", retry_after_s=2)
    monkeypatch.setattr(cache, "put", put)
    uri = png_uri(60)
    resp = await stack.encoder.post("/v1/encode", json={"images": [uri]})
    doc = await resp.json()
    assert resp.status == 503 and resp.headers["Retry-After"] == "2" and "the cache is full" in doc["error"]
    status, doc, headers = await complete(stack, chat(messages("Full?", 1, seed=61), max_tokens=4))
    assert status == 503 and headers["Retry-After"] == "2", doc
    assert doc["error"]["stage"] == "encode" and "no room now (injected)" in doc["error"]["message"]
    monkeypatch.undo()
    resp = await stack.encoder.post("/v1/encode", json={"images": [uri]})
    assert resp.status == 200 and (await resp.json())["items"][0]["cached"] is False  # nothing was stored

"""The router against scripted workers: how images are split over encoders, retries on workers
that cannot be reached, errors naming their stage, the OpenAI request checks. (The real stack
behind the router is in ``test_stack.py``.)"""

from __future__ import annotations

import asyncio
import json

import huggingface_hub.constants
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from encoder_worker.models import ensure_model
from llm_worker.engine.prompt import template_ids
from llm_worker.router.router import Pool, RouterConfig
from llm_worker.router.app import ROUTER, create_app, load_tokenizer
from sidecar import refused_port

module_loop = pytest.mark.asyncio(loop_scope="module")
NS = "llava.clip336.f32.0123456789abcdef"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        return load_tokenizer(ensure_model("tiny-llava", tmp_path_factory.mktemp("models")))


class Script:
    """What the fake workers answer, and what they were sent."""

    def __init__(self):
        self.encoded: dict[str, list[list[str]]] = {}
        self.encode_error: dict[str, tuple[int, str]] = {}
        self.prefills: list[dict] = []
        self.prefill_missing = 0
        """Answer this many prefills with 409 'not in the cache'."""
        self.decode_tokens = 3
        self.decode_error: str | None = None
        self.first_text: str | None = None
        """The prefill's first-token text (a real prefill worker's answer has it); None: left out."""
        self.first_token = 10
        self.decode_held: asyncio.Event | None = None
        """Set: decode answers only once it is set."""
        self.decode_entered = asyncio.Event()
        """Set once a decode request has arrived."""
        self.decode_error_status: int | None = None
        """The worker's status in the stream's error event (a real decode worker sends it)."""
        self.error_headers: dict[str, str] = {}
        """Headers of the encoders' and prefill's error answers (e.g. Retry-After)."""
        self.prefill_error: tuple[int, str] | None = None


def fake_encoder(script: Script, name: str) -> web.Application:
    async def encode(request: web.Request) -> web.Response:
        images = (await request.json())["images"]
        script.encoded.setdefault(name, []).append(images)
        if name in script.encode_error:
            status, message = script.encode_error[name]
            return web.json_response({"error": message.format(last=len(images) - 1)}, status=status,
                                     headers=script.error_headers)
        return web.json_response({"namespace": NS, "items": [
            {"hash": f"{abs(hash(u)) % (1 << 64):064x}", "num_tokens": 576, "cached": False} for u in images]})
    app = web.Application()
    app.router.add_post("/v1/encode", encode)

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"encoded": len(script.encoded.get(name, []))})
    app.router.add_get("/v1/stats", stats)
    return app


def fake_prefill(script: Script) -> web.Application:
    async def prefill(request: web.Request) -> web.Response:
        body = await request.json()
        script.prefills.append(body)
        if script.prefill_missing:
            script.prefill_missing -= 1
            return web.json_response({"error": f"image {NS}/00 is not in the cache"}, status=409)
        if script.prefill_error is not None:
            status, message = script.prefill_error
            return web.json_response({"error": message}, status=status, headers=script.error_headers)
        answer = {"request_id": body["request_id"], "kv": {"namespace": "kv.x", "hash": "0" * 64},
                  "first_token": 5, "prompt_tokens": 600, "seed": 42}
        if script.first_text is not None:
            answer.update(first_token=script.first_token, first_text=script.first_text, first_finish_reason=None)
        return web.json_response(answer)
    app = web.Application()
    app.router.add_post("/v1/prefill", prefill)
    return app


def fake_decode(script: Script) -> web.Application:
    async def decode(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        assert body["stream"] is True and body["sampling"]["seed"] == 42
        script.decode_entered.set()
        if script.decode_held is not None:
            await script.decode_held.wait()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(script.decode_tokens):
            await response.write(f'data: {json.dumps({"text": f"t{i} ", "token_id": 10 + i})}\n\n'.encode())
        last = {"error": script.decode_error, "status": script.decode_error_status, "retry_after_s": 3} \
            if script.decode_error else \
            {"finish_reason": "length", "completion_tokens": script.decode_tokens, "prompt_tokens": 600}
        await response.write(f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode())
        return response
    app = web.Application()
    app.router.add_post("/v1/decode", decode)
    return app


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def workers():
    script = Script()
    servers = {name: TestServer(app) for name, app in (
        ("enc-a", fake_encoder(script, "enc-a")), ("enc-b", fake_encoder(script, "enc-b")),
        ("prefill", fake_prefill(script)), ("decode", fake_decode(script)))}
    for server in servers.values():
        await server.start_server()
    urls = {name: str(server.make_url("")).rstrip("/") for name, server in servers.items()}
    yield script, urls
    for server in servers.values():
        await server.close()


@pytest_asyncio.fixture(loop_scope="module")
async def router(workers, tokenizer):
    """A router over the fake workers plus, first in its list, an encoder URL nobody listens on."""
    script, urls = workers
    script.__init__()
    dead = f"http://127.0.0.1:{refused_port()}"
    config = RouterConfig(encoders=(dead, urls["enc-a"], urls["enc-b"]), prefill=(urls["prefill"],),
                          decode=(urls["decode"],), retry_down_s=60)
    client = TestClient(TestServer(create_app(config, *tokenizer)))
    await client.start_server()
    yield client, script, dead
    await client.close()


def body(urls: list[str], **extra) -> dict:
    return {"model": "tiny-llava", "max_tokens": 3, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, *({"type": "image_url", "image_url": {"url": u}} for u in urls)]}], **extra}


def uris(n: int, tag: str = "") -> list[str]:
    return [f"data:image/png;base64,{tag}{i:04d}" for i in range(n)]


@module_loop
def _owned_by(url: str, encoders, n: int) -> list[str]:
    """``n`` data URIs of which the first belongs to (rendezvous-hashes to) ``url``."""
    pool = Pool("encode", encoders, 60)
    tag = next(f"d{t}-" for t in range(10_000) if pool.owner(uris(1, f"d{t}-")[0]).url == url.rstrip("/"))
    return uris(n, tag)


@module_loop
async def test_images_split_in_order_and_unreachable_encoder_passed_over(router):
    client, script, dead = router
    images = _owned_by(dead, [b.url for b in client.server.app[ROUTER].pools["encode"].backends], 5)
    resp = await client.post("/v1/chat/completions", json=body(images))
    doc = await resp.json()
    assert resp.status == 200, doc
    assert doc["choices"][0]["message"]["content"] == "t0 t1 t2 " and doc["usage"]["prompt_tokens"] == 600
    # NOTE: each image went to the encoder owning its key (the dead encoder's to another one):
    # together they saw every image once, each run in the request's order.
    runs = script.encoded.get("enc-a", []) + script.encoded.get("enc-b", [])  # NOTE: one may have had none
    assert sorted(u for run in runs for u in run) == sorted(images)
    assert all(run == sorted(run, key=images.index) for run in runs)
    prefill = script.prefills[-1]
    assert [i["hash"] for i in prefill["images"]] == [f"{abs(hash(u)) % (1 << 64):064x}" for u in images]
    stats = await (await client.get("/v1/stats")).json()
    by_url = {e["url"]: e for e in stats["encoders"]}
    assert not by_url[dead]["healthy"] and by_url[dead]["failures"] == 1 and stats["router"]["retries"] == 1
    # NOTE: passed over for retry_down_s: the next request does not try it again.
    await client.post("/v1/chat/completions", json=body(uris(2, "x")))
    assert (await (await client.get("/v1/stats")).json())["router"]["retries"] == 1


@module_loop
async def test_prefill_ids_hold_one_placeholder_per_image(router, tokenizer):
    client, script, _ = router
    assert (await client.post("/v1/chat/completions", json=body(uris(3, "p")))).status == 200
    ids = script.prefills[-1]["prompt_ids"]
    assert ids.count(tokenizer[1].image) == 3
    assert tokenizer[0].decode(ids).count("<image>") == 3


@module_loop
async def test_an_encoders_400_names_the_image_of_the_request(router):
    client, script, _ = router
    script.encode_error["enc-a"] = script.encode_error["enc-b"] = (400, "image {last}: not a decodable image")
    resp = await client.post("/v1/chat/completions", json=body(uris(4, "e")))
    doc = await resp.json()
    assert resp.status == 400 and doc["error"]["stage"] == "encode"
    assert doc["error"]["type"] == "invalid_request_error"
    # NOTE: each encoder blamed the last image of its run; the router names it in the request.
    ends = {uris(4, "e").index(run[-1]) for runs in script.encoded.values() for run in runs}
    assert doc["error"]["message"] in {f"encode: image {i}: not a decodable image" for i in ends}
    assert ends != {0}, ends


@module_loop
async def test_no_encoder_left(router):
    client, script, _ = router
    script.encode_error.update({"enc-a": (500, "boom"), "enc-b": (503, "the cache is unavailable")})
    resp = await client.post("/v1/chat/completions", json=body(uris(1, "n")))
    doc = await resp.json()
    assert resp.status in (500, 503) and doc["error"]["stage"] == "encode" and doc["error"]["type"] == "server_error"
    script.encode_error.clear()
    assert (await client.post("/v1/chat/completions", json=body(uris(1, "n")))).status == 200


@module_loop
async def test_an_image_evicted_before_prefill_is_encoded_again(router):
    client, script, _ = router
    script.prefill_missing = 1
    resp = await client.post("/v1/chat/completions", json=body(uris(2, "r")))
    assert resp.status == 200, await resp.text()
    assert len(script.prefills) == 2 and sum(len(r) for r in script.encoded.values()) >= 2
    script.prefill_missing = 2  # NOTE: once only: a second miss is an error naming prefill
    resp = await client.post("/v1/chat/completions", json=body(uris(2, "r")))
    doc = await resp.json()
    assert resp.status == 502 and doc["error"]["stage"] == "prefill" and "not in the cache" in doc["error"]["message"]


@module_loop
async def test_decode_failing_mid_stream(router):
    client, script, _ = router
    script.decode_error = "a decode step failed"
    resp = await client.post("/v1/chat/completions", json=body([], stream=True))
    assert resp.status == 200
    events = [line.decode().strip()[len("data: "):] async for line in resp.content if line.startswith(b"data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["stage"] == "decode" and "a decode step failed" in error["message"]
    assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
    resp = await client.post("/v1/chat/completions", json=body([]))
    doc = await resp.json()
    assert resp.status == 500 and doc["error"]["stage"] == "decode"


@module_loop
async def test_stream_chunks_and_usage(router):
    client, _, _ = router
    resp = await client.post("/v1/chat/completions", json=body(uris(1, "s"), stream=True,
                                                             stream_options={"include_usage": True}))
    chunks = [json.loads(line[len(b"data: "):]) async for line in resp.content
              if line.startswith(b"data: {")]
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:4]] == ["t0 ", "t1 ", "t2 "]
    assert chunks[4]["choices"][0]["finish_reason"] == "length"
    assert chunks[5]["choices"] == [] and chunks[5]["usage"] == {"prompt_tokens": 600, "completion_tokens": 3,
                                                                "total_tokens": 603}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["object"] == "chat.completion.chunk"


@module_loop
async def test_the_prefills_first_token_streams_before_decode_answers(router):
    client, script, _ = router
    script.first_text, script.decode_held = "t0 ", asyncio.Event()
    resp = await client.post("/v1/chat/completions", json=body(uris(1, "f"), stream=True))
    lines = resp.content.__aiter__()
    chunks = []
    while len(chunks) < 2:  # the role chunk, then the first token, with decode still held
        line = await asyncio.wait_for(lines.__anext__(), 10)
        if line.startswith(b"data: {"):
            chunks.append(json.loads(line[len(b"data: "):]))
    assert chunks[1]["choices"][0]["delta"]["content"] == "t0 " and not script.decode_held.is_set()
    script.decode_held.set()
    chunks += [json.loads(line[len(b"data: "):]) async for line in lines if line.startswith(b"data: {")]
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:4]] == ["t0 ", "t1 ", "t2 "]
    assert chunks[4]["choices"][0]["finish_reason"] == "length" and len(chunks) == 5
    resp = await client.post("/v1/chat/completions", json=body(uris(1, "f")))  # not streamed: the same text
    assert (await resp.json())["choices"][0]["message"]["content"] == "t0 t1 t2 "


@module_loop
async def test_a_decode_that_begins_with_another_token_is_an_error(router):
    client, script, _ = router
    script.first_text, script.first_token = "x ", 99
    resp = await client.post("/v1/chat/completions", json=body([], stream=True))
    events = [line.decode().strip()[len("data: "):] async for line in resp.content if line.startswith(b"data: ")]
    assert json.loads(events[1])["choices"][0]["delta"]["content"] == "x "
    error = json.loads(events[-2])["error"]
    assert error["stage"] == "decode" and "not the prefill's token 99" in error["message"]


@module_loop
async def test_a_bare_path_reaches_the_encoders_as_a_file_url(router):
    client, script, _ = router
    assert (await client.post("/v1/chat/completions", json=body(["/data/img 1.png"]))).status == 200
    assert ["file:///data/img%201.png"] in script.encoded.get("enc-a", []) + script.encoded.get("enc-b", [])


@module_loop
@pytest.mark.parametrize("doc, status, param", [
    (b"not json", 400, None),
    ({**body([]), "model": "gpt-4o"}, 404, "model"),
    ({**body([]), "n": 2}, 400, "n"),
    ({**body([]), "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({**body([]), "tools": [{"type": "function"}]}, 400, "tools"),
    ({**body([]), "stop": ["a", 3]}, 400, "stop"),
    ({**body([]), "stream": "yes"}, 400, "stream"),
    ({"model": "tiny-llava", "messages": []}, 400, "messages"),
    ({"model": "tiny-llava", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages"),
    ({**body([]), "temperature": -1}, 400, None),
])
async def test_bad_requests(router, doc, status, param):
    client, _, _ = router
    kwargs = {"data": doc} if isinstance(doc, bytes) else {"json": doc}
    resp = await client.post("/v1/chat/completions", **kwargs)
    err = (await resp.json())["error"]
    assert resp.status == status and err["code"] == status and err["message"], err
    if param is not None:
        assert err["param"] == param
    assert (await client.post("/v1/chat/completions", json=body([]))).status == 200


@module_loop
async def test_unknown_routes_answer_openai_errors(router):
    client, _, _ = router
    resp = await client.get("/v1/completions")
    assert resp.status in (404, 405) and "error" in await resp.json()
    models = await (await client.get("/v1/models")).json()
    assert models["data"][0]["id"] == "tiny-llava" and models["object"] == "list"


# ---------------------------------------------------------------- bounds


@module_loop
async def test_max_tokens_past_the_context_is_a_400_among_normal_requests(router, tokenizer):
    client, script, _ = router
    tok, image_token_id, context = tokenizer
    ids = template_ids(tok, body(uris(1, "m"))["messages"], image_token_id)
    huge, exact = body(uris(1, "m"), max_tokens=10**8), body(uris(1, "m"), max_completion_tokens=context - len(ids))
    exact.pop("max_tokens")
    answers = await asyncio.gather(*(client.post("/v1/chat/completions", json=doc) for doc in (
        body(uris(2, "a")), huge, body([]), exact, body(uris(1, "b")))))
    docs = [await resp.json() for resp in answers]
    assert [resp.status for resp in answers] == [200, 400, 200, 400, 200], docs
    assert all(docs[i]["choices"][0]["message"]["content"] == "t0 t1 t2 " for i in (0, 2, 4))
    # NOTE: the first is refused on the template before any fetch (the image counted as one token),
    # the second once the encoder has said the image takes 576
    assert docs[1]["error"]["message"] == (f"max_tokens=100000000 exceeds the model's context of {context} minus "
                                           f"the prompt's {len(ids)} tokens (at most {context - len(ids)})")
    assert docs[1]["error"]["param"] == "max_tokens" and docs[1]["error"]["stage"] == "router"
    m = len(ids) - 1 + 576
    assert docs[3]["error"]["message"] == (f"max_completion_tokens={context - len(ids)} exceeds the model's context "
                                           f"of {context} minus the prompt's {m} tokens (at most {context - m})")
    sent = [u for runs in script.encoded.values() for run in runs for u in run]
    assert sent.count(uris(1, "m")[0]) == 1  # 'exact' was encoded, 'huge' reached no encoder
    assert len(script.prefills) == 3 and all(p["sampling"]["max_tokens"] == 3 for p in script.prefills)


@module_loop
async def test_a_default_max_tokens_is_cut_to_the_room_left(router, tokenizer):
    client, script, _ = router
    tok, image_token_id, context = tokenizer
    doc = body(uris(7, "d"))
    doc.pop("max_tokens")
    prompt = len(template_ids(tok, doc["messages"], image_token_id)) - 7 + 7 * 576
    assert (await client.post("/v1/chat/completions", json=doc)).status == 200
    assert script.prefills[-1]["sampling"]["max_tokens"] == context - prompt < 256
    doc["messages"][0]["content"] = doc["messages"][0]["content"][:2]
    assert (await client.post("/v1/chat/completions", json=doc)).status == 200
    assert script.prefills[-1]["sampling"]["max_tokens"] == 256  # the default: it fits


@module_loop
async def test_the_router_refuses_past_max_inflight_with_a_503(workers, tokenizer):
    script, urls = workers
    script.__init__()
    config = RouterConfig(encoders=(urls["enc-a"],), prefill=(urls["prefill"],), decode=(urls["decode"],),
                          max_inflight=1)
    async with TestClient(TestServer(create_app(config, *tokenizer))) as client:
        script.decode_held = asyncio.Event()
        held = asyncio.ensure_future(client.post("/v1/chat/completions", json=body(uris(1, "i"))))
        await asyncio.wait_for(script.decode_entered.wait(), 10)  # NOTE: the first request is in flight
        resp = await client.post("/v1/chat/completions", json=body([]))
        doc = await resp.json()
        assert resp.status == 503 and resp.headers["Retry-After"] == "1"
        assert doc["error"]["code"] == 503 and doc["error"]["type"] == "server_error"
        assert "max_inflight=1" in doc["error"]["message"] and len(script.prefills) == 1
        script.decode_held.set()
        assert (await held).status == 200
        assert (await client.post("/v1/chat/completions", json=body([]))).status == 200
        stats = (await (await client.get("/v1/stats")).json())["router"]
        assert stats["active"] == 0 and stats["errors"] == 1


@module_loop
@pytest.mark.parametrize("stage", ["encode", "prefill", "decode"])
async def test_a_workers_503_reaches_the_client_with_its_retry_after(router, stage):
    client, script, _ = router
    script.error_headers = {"Retry-After": "3"}
    message = "the cache is full (every byte leased): no room now"
    if stage == "encode":
        script.encode_error.update({"enc-a": (503, message), "enc-b": (503, message)})
    elif stage == "prefill":
        script.prefill_error = (503, message)
    else:
        script.decode_error, script.decode_error_status = message, 503
    resp = await client.post("/v1/chat/completions", json=body(uris(1, "c")))
    doc = await resp.json()
    assert resp.status == 503 and resp.headers["Retry-After"] == "3", doc
    assert doc["error"]["stage"] == stage and doc["error"]["message"] == f"{stage}: {message}"
    assert doc["error"]["code"] == 503 and doc["error"]["type"] == "server_error"


def test_pool_prefers_idle_and_up_workers():
    pool = Pool("encode", ["http://a", "http://b", "http://c"], retry_down_s=60)
    a, b, c = pool.backends
    a.inflight, b.inflight = 2, 1
    assert pool.pick(2) == [c, b]
    pool.failed(c, "refused")
    assert pool.pick(2) == [b, a] and pool.pick(3)[-1] is c  # NOTE: a down worker is still a last resort
    assert pool.pick(3, exclude=[a, b]) == [c]


def test_router_config_checks():
    with pytest.raises(ValueError, match="EPD needs"):
        RouterConfig(encoders=("http://e",))
    with pytest.raises(ValueError, match="either"):
        RouterConfig(generate=("http://g",), decode=("http://d",))
    with pytest.raises(ValueError, match="max_inflight=0"):
        RouterConfig(generate=("http://g",), max_inflight=0)
    assert RouterConfig(generate=("http://g",), model="/models/llava-1.5-7b-hf/").model_id == "llava-1.5-7b-hf"


@module_loop
async def test_an_image_always_meets_the_encoder_that_owns_its_key(workers, tokenizer):
    """Rendezvous hashing: each miss goes to the encoder that owns its key (here the URL: the
    test's data URIs do not decode, so the router cannot hash their bytes), the same one request
    after request, and two concurrent requests for one new image reach that one encoder (where
    its single flight waits)."""

    script, urls = workers
    script.__init__()
    encoders = (urls["enc-a"], urls["enc-b"])
    config = RouterConfig(encoders=encoders, prefill=(urls["prefill"],), decode=(urls["decode"],))
    client = TestClient(TestServer(create_app(config, *tokenizer)))
    await client.start_server()
    try:
        owners = Pool("encode", encoders, 60)
        name_of = {urls["enc-a"]: "enc-a", urls["enc-b"]: "enc-b"}
        images = uris(6, "own")
        expected = {"enc-a": set(), "enc-b": set()}
        for u in images:
            expected[name_of[owners.owner(u).url]].add(u)

        def seen() -> dict[str, set[str]]:
            return {name: {u for run in script.encoded[name] for u in run} for name in ("enc-a", "enc-b")}
        for order in (images, images[::-1]):
            resp = await client.post("/v1/chat/completions", json=body(order))
            assert resp.status == 200, await resp.text()
            assert seen() == expected
        new = uris(1, "new")
        r1, r2 = await asyncio.gather(*(client.post("/v1/chat/completions", json=body(new)) for _ in range(2)))
        assert r1.status == r2.status == 200
        assert [name for name, got in seen().items() if new[0] in got] == [name_of[owners.owner(new[0]).url]]
    finally:
        await client.close()

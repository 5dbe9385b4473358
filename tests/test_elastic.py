"""Role switching (``mmcache up --elastic``): the load signals, the role state machine, the
controller's decisions on synthetic signals; elastic workers in process (tiny-llava, a real
sidecar) behind a router: a switch while a decode streams drains it first, a request sent to the
draining worker is retried elsewhere, nothing is lost or answered differently; and the whole
stack through the OpenAI client, a workload shifting from image-heavy to text-only (slow)."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import aiohttp
import numpy as np
import openai
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer
from PIL import Image

from llm_worker.serve.config import LLMServeConfig
from llm_worker.elastic.role import ElasticRole, NotServing, SwitchInProgress
from llm_worker.elastic.controller import SwitchRefused
from llm_worker.elastic.app import ELASTIC, LLM, METER, create_app as create_elastic_app
from llm_worker.elastic.policy import Policy, StageLoad, WorkerLoad
from llm_worker.elastic.load import LoadMeter
from llm_worker.router.router import RouterConfig
from llm_worker.router.app import ROUTER, create_app as create_router_app, load_tokenizer
from mmcache.sidecar.config import ServeConfig
from mmcache.stack.up import Stack, StackConfig, _Node
from sidecar import ThreadedSidecar
from stack_process import up_for_tests

module_loop = pytest.mark.asyncio(loop_scope="module")


# -- the load signals ---------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_busy_is_the_share_of_the_window_the_compute_ran():
    clock = Clock()
    meter = LoadMeter(window_s=4.0, clock=clock)
    token = meter.begin()
    clock.now += 1.0
    meter.end(token)
    assert meter.busy() == pytest.approx(0.25)
    token = meter.begin()  # NOTE: a run in progress counts up to now
    clock.now += 2.0
    assert meter.busy() == pytest.approx(0.75)
    meter.end(token)
    clock.now += 3.0  # the first run has left the window, half of the second is in it
    assert meter.busy() == pytest.approx(0.25)
    clock.now += 10
    assert meter.busy() == 0.0


def test_queue_delay_fades_when_quiet_and_shows_a_stuck_queue_at_once():
    clock = Clock()
    meter = LoadMeter(window_s=2.0, alpha=0.5, clock=clock)
    assert meter.queue_delay_s() == 0.0
    meter.observe_wait(0.4)
    meter.observe_wait(0.2)
    assert meter.queue_delay_s() == pytest.approx(0.3)
    clock.now += 1.0  # one half-life
    assert meter.queue_delay_s() == pytest.approx(0.15)
    waiting = meter.metered(lambda: "done")  # NOTE: queued for the compute, not yet started
    clock.now += 5.0
    assert meter.queue_delay_s() == pytest.approx(5.0, rel=1e-3)
    assert waiting() == "done"
    faded = 0.3 * 0.5 ** 6  # NOTE: what is left of the old samples, mixed with the new one
    assert meter.queue_delay_s() == pytest.approx(faded + 0.5 * (5.0 - faded))
    meter.reset()
    meter.oldest_wait = lambda: 1.5
    assert meter.queue_delay_s() == 1.5


def test_decode_delay_is_what_sharing_the_batch_costs_a_request():
    clock = Clock()
    meter = LoadMeter(window_s=2.0, alpha=1.0, clock=clock)
    meter.observe_step(0.010)  # alone
    meter.observe_tokens(20)
    assert meter.queue_delay_s() == 0.0
    meter.observe_step(0.030)  # shared: every request in the step lost 20 ms, ~20 times over
    assert meter.queue_delay_s() == pytest.approx(0.4)
    meter.reset()
    assert meter.min_step_s == 0.010 and meter.queue_delay_s() == 0.0


# -- the role state machine ---------------------------------------------------------------------

async def test_a_switch_waits_for_the_old_roles_work_and_refuses_requests_meanwhile():
    batch = {"empty": False}
    role = ElasticRole("decode", idle={"decode": lambda: batch["empty"]})
    with role.serving("decode"):
        switch = asyncio.create_task(role.switch("prefill"))
        await asyncio.sleep(0)
        assert role.switching and role.target == "prefill" and not switch.done()
        for stage in ("decode", "prefill", "encode"):  # NOTE: neither the old role nor the new one
            with pytest.raises(NotServing):
                with role.serving(stage):
                    pass
        with pytest.raises(SwitchInProgress):
            await role.switch("encode")
    await asyncio.sleep(0.05)  # the request left, but the batch behind it still runs
    assert not switch.done() and role.role == "decode"
    batch["empty"] = True
    answer = await asyncio.wait_for(switch, 5)
    assert answer["role"] == "prefill" and answer["previous"] == "decode" and answer["drained_s"] >= 0.05
    assert role.role == "prefill" and not role.switching and role.switches == 1
    with role.serving("prefill"):
        assert role.inflight["prefill"] == 1
    assert role.history[-1]["ok"] and role.history[-1]["from"] == "decode"


async def test_no_op_unknown_role_and_an_abandoned_switch():
    seen = []
    role = ElasticRole("encode", on_switch=lambda old, new: seen.append((old, new)))
    assert await role.switch("encode") == {"role": "encode", "previous": "encode", "drained_s": 0.0}
    with pytest.raises(ValueError, match="generate"):
        await role.switch("generate")
    with pytest.raises(ValueError):
        ElasticRole("both")
    with role.serving("encode"):
        switch = asyncio.create_task(role.switch("decode"))
        await asyncio.sleep(0)
        switch.cancel()  # NOTE: the controller gave up: the worker serves its old role again
        with pytest.raises(asyncio.CancelledError):
            await switch
        assert role.role == "encode" and not role.switching
        with role.serving("encode"):
            pass
    assert seen == [] and not role.history[-1]["ok"]
    await role.switch("decode")
    assert seen == [("encode", "decode")]


# -- the controller's decisions -------------------------------------------------------------------

def loads(encode=(0.0, 0.0, 2), prefill=(0.0, 0.0, 1), decode=(0.0, 0.0, 1)) -> dict[str, StageLoad]:
    """(queue delay, busy, workers) per stage; worker i of a stage is ``stage-i`` with busy + i/100."""
    out = {}
    for stage, (delay, busy, n) in (("encode", encode), ("prefill", prefill), ("decode", decode)):
        out[stage] = StageLoad(n, tuple(WorkerLoad(f"{stage}-{i}", delay, busy + i / 100, 0) for i in range(n)))
    return out


def test_a_hot_stage_takes_a_worker_from_an_idle_one_after_sustained_ticks():
    policy = Policy(high_s=0.5, low=0.5, cooldown_s=5, sustain=2)
    signals = loads(encode=(0.0, 0.1, 2), prefill=(0.9, 0.95, 1))
    assert policy.decide(signals, now=0) is None  # one tick is not a trend
    move = policy.decide(signals, now=1)
    assert (move.url, move.src, move.dst) == ("encode-0", "encode", "prefill")  # the least busy encoder
    assert move.reason["hot"]["stage"] == "prefill" and move.reason["donor"]["busy_without_one"] == pytest.approx(0.21)


def test_hysteresis_a_one_tick_spike_does_not_switch():
    policy = Policy(high_s=0.5, low=0.5, cooldown_s=0, sustain=2)
    calm, spike = loads(encode=(0.0, 0.1, 2)), loads(encode=(0.0, 0.1, 2), decode=(2.0, 1.0, 1))
    for signals in (calm, spike, calm, spike, calm):
        assert policy.decide(signals, now=0) is None


def test_cooldown_is_respected():
    policy = Policy(high_s=0.5, low=0.5, cooldown_s=5, sustain=1)
    signals = loads(encode=(0.0, 0.0, 3), decode=(1.0, 1.0, 1))
    assert policy.decide(signals, now=10) is not None
    policy.switched(10)
    assert policy.decide(signals, now=12) is None
    assert policy.decide(signals, now=15.1) is not None


def test_never_the_last_worker_nor_a_donor_that_would_be_busy():
    policy = Policy(high_s=0.5, low=0.5, cooldown_s=0, sustain=1)
    assert policy.decide(loads(encode=(0.0, 0.0, 1), decode=(1.0, 1.0, 1)), now=0) is None  # each stage has one
    assert policy.decide(loads(encode=(0.0, 0.3, 2), decode=(1.0, 1.0, 1)), now=1) is None  # 0.3 x 2 / 1 > 0.5
    assert policy.decide(loads(encode=(0.3, 0.0, 2), decode=(1.0, 1.0, 1)), now=2) is None  # its delay is not low
    assert policy.decide(loads(encode=(0.0, 0.0, 2), decode=(0.4, 1.0, 1)), now=3) is None  # nothing is hot
    assert policy.decide(loads(encode=(0.0, 0.2, 2), decode=(1.0, 1.0, 1)), now=4).src == "encode"
    silent = {**loads(decode=(1.0, 1.0, 1)), "encode": StageLoad(2)}  # NOTE: no answers: no signal to give on
    assert policy.decide(silent, now=5) is None
    assert math.isinf(StageLoad(1).busy_without_one())


def test_the_hottest_stage_takes_the_idlest_donor():
    policy = Policy(high_s=0.5, low=0.9, cooldown_s=0, sustain=1)
    move = policy.decide(loads(encode=(0.0, 0.3, 2), prefill=(0.6, 1.0, 1), decode=(0.0, 0.05, 3)), now=0)
    assert (move.src, move.dst) == ("decode", "prefill")
    move = policy.decide(loads(encode=(0.9, 1.0, 2), prefill=(0.6, 1.0, 1), decode=(0.0, 0.05, 3)), now=1)
    assert (move.src, move.dst) == ("decode", "encode")


# -- the settings --------------------------------------------------------------------------------

def test_configs_refuse_what_elastic_cannot_do():
    with pytest.raises(ValueError, match="initial_role"):
        LLMServeConfig("elastic", cache_url="unix:///x.sock")
    with pytest.raises(ValueError, match="initial_role"):
        LLMServeConfig("decode", cache_url="unix:///x.sock", initial_role="decode")
    with pytest.raises(ValueError, match="cache_url"):
        LLMServeConfig("elastic", initial_role="encode")
    with pytest.raises(ValueError, match="not --generate"):
        RouterConfig(generate=("http://a",), elastic=True)
    epd = {"encoders": ("http://a",), "prefill": ("http://b",), "decode": ("http://c",), "elastic": True}
    for bad in ({"elastic_low": 0}, {"elastic_interval_s": math.nan}, {"elastic_interval_s": math.inf},
                {"elastic_high_s": math.nan}, {"elastic_cooldown_s": math.nan}, {"elastic_sustain": 0}):
        with pytest.raises(ValueError, match="elastic settings"):
            RouterConfig(**epd, **bad)
    with pytest.raises(ValueError, match="--nice"):
        StackConfig(elastic=True, nice=(("encoder", 10),))
    with pytest.raises(ValueError, match="--aggregated"):
        StackConfig(elastic=True, aggregated=True)
    with pytest.raises(ValueError, match="--nodes 1"):
        StackConfig(elastic=True, nodes=2)
    with pytest.raises(ValueError, match="are for --elastic"):
        StackConfig(elastic_high_s=0.1)


def test_up_elastic_starts_every_worker_elastic_and_the_router_with_the_knobs():
    stack = Stack(StackConfig(elastic=True, encoder_batch=2, elastic_high_s=0.05, elastic_sustain=3))
    argv = stack.args.elastic("encode", _Node("", "/d", "/d/s.sock"))
    assert argv[:3] == ["serve", "--role", "elastic"] and argv[argv.index("--initial-role") + 1] == "encode"
    assert argv[argv.index("--cache") + 1] == "unix:///d/s.sock" and argv[argv.index("--encoder-batch") + 1] == "2"
    assert stack.args.elastic_router() == ["--elastic", "--elastic-high", "0.05", "--elastic-sustain", "3"]


def test_elastic_flags_are_one_set_whose_defaults_are_the_routers(capsys):
    """``mmcache up`` names the router's defaults in its help without importing the workers;
    unset there, a flag stays None so the router's own default holds."""
    import argparse

    from llm_worker.cli import main as router_main
    from llm_worker.elastic.policy import ElasticPolicy
    from mmcache.cli import main as mmcache_main
    from mmcache.common.cli import ROUTER_ELASTIC_DEFAULTS, add_elastic_tuning

    policy = ElasticPolicy()
    assert ROUTER_ELASTIC_DEFAULTS == {"interval": policy.interval_s, "high": policy.high_s, "low": policy.low,
                                       "cooldown": policy.cooldown_s, "sustain": policy.sustain}
    up, router = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_elastic_tuning(up, ROUTER_ELASTIC_DEFAULTS, passed_on=True)
    add_elastic_tuning(router, ROUTER_ELASTIC_DEFAULTS)
    assert vars(up.parse_args([])) == dict.fromkeys(vars(up.parse_args([])), None)
    assert vars(router.parse_args(["--elastic-low", "0.25"]))["elastic_low"] == 0.25
    assert vars(router.parse_args([]))["elastic_sustain"] == policy.sustain
    with pytest.raises(SystemExit):
        mmcache_main(["up", "--help"])
    up_help = " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        router_main(["router", "--help"])
    router_help = " ".join(capsys.readouterr().out.split())
    for text in ("stays under F and its queue delay under half of --elastic-high (default: 0.5)",
                 "--elastic-sustain N with --elastic: polls in a row a stage must stay hot"):
        assert text in up_help and text in router_help


@pytest.mark.parametrize("flags, message", [(["--elastic", "--aggregated"], "--elastic is for the EPD stack"),
                                            (["--elastic", "--nodes", "2"], "use it with --nodes 1")])
def test_up_elastic_refuses_other_shapes_clearly(tmp_path, flags, message):
    proc = subprocess.run([sys.executable, "-m", "mmcache.cli", "up", "--data-dir", str(tmp_path), *flags],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


# -- elastic workers in process behind a router --------------------------------------------------

@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sidecar")
    sock_dir = tempfile.mkdtemp(prefix="mmc-el-", dir="/tmp")  # AF_UNIX paths are short
    config = ServeConfig(data_dir=str(tmp / "data"), port=0, socket=os.path.join(sock_dir, "s.sock"),
                         host_capacity_bytes=128 << 20, disk_capacity_bytes=256 << 20, arena_path=str(tmp / "arena"))
    sc = ThreadedSidecar(config).start()
    sc.unix_url = f"unix://{config.socket}"
    yield sc
    sc.stop()
    shutil.rmtree(sock_dir, ignore_errors=True)


ROLES = {"enc": "encode", "pre": "prefill", "dec-a": "decode", "dec-b": "decode"}
STACK_TOKEN = "test-stack-token"
CONTROL = {"Authorization": f"Bearer {STACK_TOKEN}"}
"""The stack's control credential, which the workers' POST /v1/role needs (mmcache up makes one)."""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def workers(sidecar, model_dir):
    """Four elastic workers, each with its own tiny-llava, as ``serve --role elastic`` loads them."""
    servers = {name: TestServer(create_elastic_app(LLMServeConfig(
        "elastic", cache_url=sidecar.unix_url, model=model_dir, data_dir=os.path.dirname(model_dir), device="cpu",
        initial_role=role, max_batch=8, stack_token=STACK_TOKEN))) for name, role in ROLES.items()}
    for server in servers.values():
        await server.start_server()
    yield {name: (server, str(server.make_url("")).rstrip("/")) for name, server in servers.items()}
    for server in servers.values():
        await server.close()


@module_loop
async def test_a_role_flip_needs_the_stack_token(workers):
    """The attack: POST /v1/role needed no credential (flipping every worker to encode every
    0.5 s let 121 of 6,221 chats through). Without the stack's token, or with a wrong one: 401,
    and the role stays."""
    _, url = workers["pre"]
    async with aiohttp.ClientSession() as http:
        for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": STACK_TOKEN}):
            async with http.post(url + "/v1/role", json={"role": "encode"}, headers=headers) as r:
                assert r.status == 401, await r.text()
                assert "stack" in (await r.json())["error"] and r.headers["WWW-Authenticate"] == "Bearer"
        async with http.get(url + "/v1/stats") as r:
            assert (await r.json())["role"] == "prefill"


@module_loop
async def test_an_elastic_worker_names_its_encoders_namespace_for_warm(workers):
    """``mmcache warm`` against ``mmcache up --elastic`` failed: the workers had no GET /v1/models."""
    from mmcache.ops.warm_target import namespace_of

    urls = [url for _, url in workers.values()]
    async with aiohttp.ClientSession() as http:
        namespace = await namespace_of(http, urls)
        async with http.get(urls[0] + "/v1/stats") as r:
            assert namespace == (await r.json())["encoder_namespace"]


@module_loop
async def test_a_worker_without_a_stack_token_has_its_control_routes_off(sidecar, model_dir):
    server = TestServer(create_elastic_app(LLMServeConfig(
        "elastic", cache_url=sidecar.unix_url, model=model_dir, data_dir=os.path.dirname(model_dir), device="cpu",
        initial_role="decode", max_batch=8)))
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(str(server.make_url("/v1/role")), json={"role": "encode"}, headers=CONTROL) as r:
                assert r.status == 401 and "without a stack token" in (await r.json())["error"]
    finally:
        await server.close()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


async def _start_router(workers, tokenizer, model_dir, **config) -> TestServer:
    urls = {name: url for name, (_, url) in workers.items()}
    shape = {"encoders": (urls["enc"],), "prefill": (urls["pre"],), "decode": (urls["dec-a"], urls["dec-b"])}
    server = TestServer(create_router_app(RouterConfig(
        model=model_dir, served_model_name="tiny-llava", stack_token=STACK_TOKEN, **{**shape, **config}), *tokenizer))
    await server.start_server()
    return server


@pytest_asyncio.fixture(loop_scope="module")
async def router(workers, tokenizer, model_dir):
    """A router with ``--elastic`` whose controller never ticks on its own (tests tick it or
    switch by hand); the workers are put back in their first roles afterwards."""
    server = await _start_router(workers, tokenizer, model_dir, elastic=True, elastic_interval_s=3600)
    yield server
    await server.close()
    await _first_roles(workers)


async def _first_roles(workers) -> None:
    """Every worker back in its first role (what the module's tests start from)."""
    async with aiohttp.ClientSession() as http:
        for name, (_, url) in workers.items():
            async with http.post(url + "/v1/role", json={"role": ROLES[name]}, headers=CONTROL) as r:
                assert r.status == 200, await r.text()


def _hold_steps(app) -> asyncio.Event:
    """Hold the worker's decode steps until the returned event is set (a barrier the test owns)."""
    loop = app[LLM].decode_loop
    gate, inner = asyncio.Event(), loop._run_forward

    async def gated(fn, *args):
        await gate.wait()
        return await inner(fn, *args)
    loop._run_forward = gated
    gate.inner = inner
    return gate


def _release(app, gate: asyncio.Event) -> None:
    gate.set()
    app[LLM].decode_loop._run_forward = gate.inner


def chat_body(text: str, **extra) -> dict:
    return {"model": "tiny-llava", "max_tokens": 6, "temperature": 0, "return_token_ids": True,
            "messages": [{"role": "user", "content": text}], **extra}


async def _chat(http: aiohttp.ClientSession, url: str, text: str) -> list[int]:
    async with http.post(url + "/v1/chat/completions", json=chat_body(text)) as r:
        doc = await r.json()
        assert r.status == 200, doc
        return doc["choices"][0]["token_ids"]


async def _until(predicate, timeout_s: float = 10.0) -> None:
    """Until ``predicate()`` holds: for a state another task reaches (a worker's batch, a drain)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


@module_loop
async def test_a_switch_drains_a_streaming_decode_and_a_request_for_the_draining_worker_is_retried(
        router, workers, tokenizer, model_dir):
    base = str(router.make_url("")).rstrip("/")
    question = "Tell me a story about the sea."
    async with aiohttp.ClientSession() as http:
        want = await _chat(http, base, question)
        gates = {name: _hold_steps(workers[name][0].app) for name in ("dec-a", "dec-b")}
        try:
            stream = await http.post(base + "/v1/chat/completions", json=chat_body(question, stream=True))
            assert stream.status == 200
            first = await stream.content.readline()
            while b"token_ids" not in first:  # the role chunk, then the prefill's token
                first = await stream.content.readline()
            await _until(lambda: any(workers[n][0].app[LLM].decode_loop.num_running for n in gates))
            held = next(n for n in gates if workers[n][0].app[LLM].decode_loop.num_running)
            other = next(n for n in gates if n != held)
            _release(workers[other][0].app, gates[other])
            server, url = workers[held]
            app = server.app
            switch = asyncio.ensure_future(http.post(base + "/v1/elastic/switch", json={"url": url, "role": "prefill"}))
            await _until(lambda: app[ELASTIC].switching)
            async with http.get(url + "/healthz") as r:
                assert (await r.json()) == {"status": "ok", "role": "decode", "elastic": True, "switching": True}
            body = {"request_id": "x", "kv": {"namespace": "kv.x", "hash": "0" * 64}}
            for path in ("/v1/decode", "/v1/prefill", "/v1/encode"):  # NOTE: neither old role nor new while draining
                async with http.post(url + path, json=body) as r:
                    assert r.status == 503 and int(r.headers["Retry-After"]) >= 1, await r.text()
            async with http.post(url + "/v1/role", json={"role": "encode"}, headers=CONTROL) as r:
                assert r.status == 409
            # NOTE: a router that still sends decode to the draining worker (this one lists it first):
            # the 503 is retried on the other decode worker, and the answer is the same.
            stale = await _start_router(workers, tokenizer, model_dir, decode=(url, workers[other][1]))
            try:
                assert await _chat(http, str(stale.make_url("")).rstrip("/"), question) == want
                assert stale.app[ROUTER].counters["retries"] >= 1
            finally:
                await stale.close()
            assert not switch.done() and app[LLM].decode_loop.num_running == 1  # still draining: the stream holds it
            _release(app, gates[held])
            events = [json.loads(line[5:]) for line in (await stream.read()).decode().splitlines()
                      if line.startswith("data:") and line != "data: [DONE]"]
            stream.close()
            streamed = [t for e in [json.loads(first.decode()[5:])] + events if e.get("choices")
                        for t in e["choices"][0].get("token_ids") or []]
            assert streamed == want and events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
            resp = await switch
            record = await resp.json()
            assert resp.status == 200 and record["ok"] and record["from"] == "decode" and record["to"] == "prefill"
            assert record["drained_s"] > 0 and record["reason"] == {"manual": True}
            assert app[ELASTIC].role == "prefill" and app[LLM].decode_loop.num_running == 0
            pools = router.app[ROUTER].groups[0].pools
            assert [b.url for b in pools["prefill"].backends] == [workers["pre"][1], url]
            assert [b.url for b in pools["decode"].backends] == [workers[other][1]]
            async with http.get(base + "/v1/stats") as r:
                stats = await r.json()
            assert stats["elastic"]["history"][-1]["url"] == url
            assert {w["url"]: w["role"] for w in stats["elastic"]["workers"]}[url] == "prefill"
            assert [w["url"] for w in stats["prefill"]] == [workers["pre"][1], url]
            for _ in range(3):  # the new shape serves the same answers (one prefill worker each turn)
                assert await _chat(http, base, question) == want
        finally:  # NOTE: a held step would hang the workers' shutdown
            for name, gate in gates.items():
                _release(workers[name][0].app, gate)


@module_loop
async def test_the_switch_routes_refuse_what_they_cannot_do(router, workers):
    base = str(router.make_url("")).rstrip("/")
    enc, pre = workers["enc"][1], workers["pre"][1]
    async with aiohttp.ClientSession() as http:
        for body, status in (({"url": enc, "role": "decode"}, 409),  # the last encoder
                             ({"url": "http://127.0.0.1:1", "role": "decode"}, 404),
                             ({"url": workers["dec-a"][1], "role": "generate"}, 400),
                             ({"url": enc}, 400)):
            async with http.post(base + "/v1/elastic/switch", json=body) as r:
                assert r.status == status, await r.text()
        async with http.post(base + "/v1/elastic/switch", json={"url": pre, "role": "prefill"}) as r:
            assert r.status == 200 and (await r.json())["noop"]
        async with http.post(pre + "/v1/role", json={"role": "prefill"}, headers=CONTROL) as r:
            assert await r.json() == {"role": "prefill", "previous": "prefill", "drained_s": 0.0}
        async with http.post(pre + "/v1/role", json={"role": "both"}, headers=CONTROL) as r:
            assert r.status == 400 and "both" in (await r.json())["error"]
        async with http.post(pre + "/v1/encode", json={"images": ["data:,"]}) as r:  # another role's route
            assert r.status == 503 and r.headers["Retry-After"] == "1"
        async with http.get(pre + "/v1/stats") as r:
            stats = await r.json()
        assert stats["role"] == "prefill" and stats["elastic"] and not stats["switching"]
        assert set(stats["load"]) == {"queue_delay_s", "busy", "inflight", "window_s"}


@module_loop
async def test_without_an_api_key_only_local_clients_switch(router, workers, monkeypatch):
    import llm_worker.router.app

    monkeypatch.setattr(llm_worker.router.app, "is_loopback", lambda host: False)  # NOTE: as from another host
    base = str(router.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as http:
        async with http.post(base + "/v1/elastic/switch", json={"url": workers["dec-b"][1], "role": "encode"}) as r:
            assert r.status == 403 and "API key" in (await r.json())["error"]["message"]
    assert router.app[ROUTER].elastic.find(workers["dec-b"][1]).role == "decode"


@module_loop
async def test_the_controller_moves_an_idle_worker_to_the_hot_stage(workers, tokenizer, model_dir):
    server = await _start_router(workers, tokenizer, model_dir, elastic=True, elastic_interval_s=3600,
                                 elastic_high_s=0.5, elastic_sustain=2, elastic_cooldown_s=0)
    controller = server.app[ROUTER].elastic
    base = str(server.make_url("")).rstrip("/")
    try:
        workers["pre"][0].app[METER].observe_wait(5.0)  # NOTE: prefill looks queued; decode (2 workers) is idle
        assert await controller.tick() is None  # one tick is not a trend
        move = await controller.tick()
        assert (move.src, move.dst) == ("decode", "prefill")
        assert controller.history[-1]["ok"] and controller.history[-1]["reason"]["hot"]["stage"] == "prefill"
        moved = next(server.app for server, url in workers.values() if url == move.url)
        assert moved[ELASTIC].role == "prefill"
        assert workers["pre"][0].app[METER].queue_delay_s() > 0.5
        assert await controller.tick() is None  # the decode stage is down to one worker: none to give
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/v1/stats") as r:
                elastic = (await r.json())["elastic"]
            assert elastic["stages"]["decode"]["workers"] == 1 and elastic["stages"]["prefill"]["workers"] == 2
            assert len(elastic["history"]) == 1
            assert await _chat(http, base, "Hello there.")
    finally:
        await server.close()
        await _first_roles(workers)
        workers["pre"][0].app[METER].reset()


@module_loop
async def test_a_switch_the_worker_refuses_puts_it_back(workers, tokenizer, model_dir):
    server = await _start_router(workers, tokenizer, model_dir, elastic=True, elastic_interval_s=3600)
    controller = server.app[ROUTER].elastic
    try:
        backend = controller.find(workers["dec-b"][1])
        backend.url = workers["dec-b"][1] + "/nowhere"  # NOTE: its /v1/role answers 404
        record = await controller.switch(backend, "encode", {"manual": True})
        assert not record["ok"] and "404" in record["error"]
        assert backend in controller.pools["decode"].backends and backend.role == "decode"
        assert controller.history[-1] is record
    finally:
        await server.close()

@module_loop
async def test_a_last_worker_serving_another_role_is_switched_back(workers, tokenizer, model_dir):
    """A restarted worker comes back in its first role; when it is its pool's last, the controller
    tells it to serve the pool's role again instead of leaving the stage without a worker."""
    server = await _start_router(workers, tokenizer, model_dir, elastic=True, elastic_interval_s=3600)
    controller = server.app[ROUTER].elastic
    base = str(server.make_url("")).rstrip("/")
    pre_url = workers["pre"][1]
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(pre_url + "/v1/role", json={"role": "encode"}, headers=CONTROL) as r:  # as a restart would
                assert r.status == 200
            await controller.tick()
            await _until(lambda: workers["pre"][0].app[ELASTIC].role == "prefill")
            assert controller.find(pre_url) in controller.pools["prefill"].backends
            assert any(h.get("reason", {}).get("restore") for h in controller.history)
            assert await _chat(http, base, "Hello again.")
            # an operator's switch of the only answering decode worker is refused while the other is dead
            dead = controller.find(workers["dec-b"][1])
            good_url, dead.url = dead.url, "http://127.0.0.1:9"  # NOTE: nothing listens there
            try:
                await controller.tick()
                assert controller.stages["decode"]["workers"] == 1
                with pytest.raises(SwitchRefused, match="last decode worker that answers"):
                    await controller.switch(controller.find(workers["dec-a"][1]), "prefill", {"manual": True})
            finally:
                dead.url = good_url
    finally:
        await server.close()
        await _first_roles(workers)


@module_loop
async def test_a_poll_that_overlapped_a_switch_does_not_undo_it(workers, tokenizer, model_dir):
    server = await _start_router(workers, tokenizer, model_dir, elastic=True, elastic_interval_s=3600)
    controller = server.app[ROUTER].elastic
    try:
        stale = await controller._poll()  # NOTE: taken before the switch: dec-b still says "decode"
        backend = controller.find(workers["dec-b"][1])
        real_poll = controller._poll

        async def overlapping():
            await controller.switch(backend, "encode", {"manual": True})
            return stale
        controller._poll = overlapping
        await controller.tick()
        controller._poll = real_poll
        assert backend.role == "encode" and backend in controller.pools["encode"].backends
    finally:
        await server.close()
        await _first_roles(workers)


# -- the whole stack through the OpenAI client (slow) --------------------------------------------

ELASTIC_FLAGS = ("--elastic", "--encoders", "2", "--prefill", "1", "--decode", "1", "--elastic-interval", "0.5",
                 "--elastic-high", "0.01", "--elastic-low", "0.9", "--elastic-cooldown", "2", "--elastic-sustain", "2")
"""A hair trigger: on tiny-llava a queue delay is milliseconds, and a stage that gets no work at all
(the encoders, once the requests carry no images) is the donor."""


@pytest.fixture(scope="module")
def elastic_stack(model_dir):
    with up_for_tests(model_dir, *ELASTIC_FLAGS, prefix="mmc-el-") as up:
        yield up
    assert up.proc.returncode == 0, "\n".join(up.output[-30:])


@pytest.fixture(scope="module")
def aggregated_stack(model_dir):
    with up_for_tests(model_dir, "--aggregated", prefix="mmc-el-agg-") as up:
        yield up
    assert up.proc.returncode == 0, "\n".join(up.output[-30:])


def _image_uri(seed: int) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _images_prompt(i: int) -> list[dict]:
    return [{"type": "text", "text": f"Describe picture set {i}."},
            *({"type": "image_url", "image_url": {"url": _image_uri(5000 + 3 * i + j)}} for j in range(3))]


def _openai_chat(up, content) -> list[int]:
    """Greedy token ids of one request; any failure raises (no retries: every request must succeed)."""
    client = openai.OpenAI(base_url=up.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    answer = client.chat.completions.create(model="tiny-llava", messages=[{"role": "user", "content": content}],
                                            max_tokens=8, temperature=0, extra_body={"return_token_ids": True})
    assert answer.choices[0].finish_reason in ("length", "stop")
    return answer.choices[0].to_dict()["token_ids"]


def _assert_same_as_aggregated(aggregated_stack, answered: dict) -> None:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        baseline = pool.map(lambda c: _openai_chat(aggregated_stack, c), [content for content, _ in answered.values()])
        for (key, (_, token_ids)), want in zip(answered.items(), baseline):
            assert token_ids == want, key


def _switches(up) -> list[dict]:
    return up.stats()["elastic"]["history"]


@pytest.mark.slow
def test_a_shift_from_images_to_text_moves_an_encoder_and_every_answer_stays_the_same(elastic_stack,
                                                                                      aggregated_stack):
    """Phase 1: concurrent requests of three images each; phase 2: text only, several at once,
    until the controller has given an encoder to another stage (the encoders get no work), then
    some more. Every request succeeds; greedy outputs equal the aggregated baseline's."""
    answered: dict[str, tuple] = {}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        contents = {f"images-{i}": _images_prompt(i) for i in range(12)}
        for key, ids in zip(contents, pool.map(lambda c: _openai_chat(elastic_stack, c), contents.values())):
            answered[key] = (contents[key], ids)
        deadline, after = time.monotonic() + 120, 3
        for rnd in range(10_000):
            contents = {f"text-{rnd}-{i}": f"Question {rnd}-{i}: tell me about the number {7 * i + rnd}."
                        for i in range(8)}
            for key, ids in zip(contents, pool.map(lambda c: _openai_chat(elastic_stack, c), contents.values())):
                answered[key] = (contents[key], ids)
            moved = [h for h in _switches(elastic_stack) if h["ok"] and h["from"] == "encode"]
            after -= bool(moved)
            if not after:
                break
            assert time.monotonic() < deadline, f"no encoder switched: {elastic_stack.stats()['elastic']}"
    stats = elastic_stack.stats()
    switch = moved[0]
    assert switch["to"] in ("prefill", "decode") and switch["reason"]["donor"]["stage"] == "encode"
    assert switch["reason"]["hot"]["queue_delay_s"] > 0.01 and isinstance(switch["drained_s"], float)
    roles = {w["url"]: w["role"] for w in stats["elastic"]["workers"]}
    assert len(stats["encoders"]) == 1 and roles[stats["encoders"][0]["url"]] == "encode"
    assert all(w["healthy"] for role in ("encoders", "prefill", "decode") for w in stats[role])
    assert stats["router"]["errors"] == 0
    _assert_same_as_aggregated(aggregated_stack, answered)


@pytest.mark.slow
def test_a_switch_forced_while_requests_are_in_flight_loses_none(elastic_stack, aggregated_stack):
    """``POST /v1/elastic/switch`` moves a worker while image and text requests are in flight."""
    def force() -> dict:
        stats = elastic_stack.stats()
        stage, workers = max(((s, stats[k]) for s, k in (("encode", "encoders"), ("prefill", "prefill"),
                                                         ("decode", "decode"))), key=lambda sw: len(sw[1]))
        to = "decode" if stage != "decode" else "prefill"
        req = urllib.request.Request(elastic_stack.url + "/v1/elastic/switch", method="POST",
                                     data=json.dumps({"url": workers[-1]["url"], "role": to}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.load(r)

    answered: dict[str, tuple] = {}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        contents = {f"mixed-{i}": _images_prompt(100 + i) if i % 2 else f"Mixed question {i}: why?" for i in range(18)}
        futures = {key: pool.submit(_openai_chat, elastic_stack, c) for key, c in contents.items()}
        for _ in range(40):  # NOTE: the controller may be switching a worker itself (409, or 404 for the
            try:             # one it has out of every pool): again once it is done
                record = force()
                break
            except urllib.error.HTTPError as e:
                assert e.code in (404, 409), e.read()
                time.sleep(0.25)
        for key, future in futures.items():
            answered[key] = (contents[key], future.result())
    assert record["ok"] and record["reason"] == {"manual": True}
    assert record in _switches(elastic_stack)
    _assert_same_as_aggregated(aggregated_stack, answered)

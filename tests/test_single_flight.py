"""Cluster-wide single-flight on real redis-server processes (a three-master cluster): encoders on
two sidecars that share the cluster encode a new image once, an owner killed mid-encode is taken
over within its claim's TTL, and a slow owner that is alive keeps its claim by renewing it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient, TestServer

from encoder_worker.app import SERVICE, create_app
from encoder_worker.config import EncoderServeConfig
from mmcache.sidecar.config import ServeConfig
from redis_servers import RedisClusterProcs, needs_redis
from sidecar import ThreadedSidecar, settled
from test_encoder_service import CountingEncoder, encode, png_uri

pytestmark = needs_redis
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    procs = RedisClusterProcs(str(tmp_path_factory.mktemp("sf-cluster")), masters=3).start()
    yield procs
    procs.stop()


def _sidecar(tmp_path, name: str, remote: str) -> ThreadedSidecar:
    sock_dir = tempfile.mkdtemp(prefix="mmc-sf-", dir="/tmp")
    config = ServeConfig(data_dir=str(tmp_path / name), port=0, socket=os.path.join(sock_dir, "s.sock"),
                         host_capacity_bytes=8 << 20, disk_capacity_bytes=64 << 20, remote=remote,
                         remote_timeout_ms=500, node=name)
    sc = ThreadedSidecar(config).start()
    sc.unix_url = f"unix://{config.socket}"
    return sc


@pytest.fixture
def two_nodes(tmp_path, cluster):
    a, b = _sidecar(tmp_path, "node-a", cluster.url), _sidecar(tmp_path, "node-b", cluster.url)
    yield a, b
    a.stop()
    b.stop()


async def _encoder(sidecar, ttl_s: float = 30.0) -> TestClient:
    model = CountingEncoder()
    cfg = EncoderServeConfig(cache_url=sidecar.unix_url, max_batch=8, max_wait_ms=20, claim_ttl_s=ttl_s)
    client = TestClient(TestServer(create_app(cfg, encoder=model)))
    await client.start_server()
    client.model = model
    assert await asyncio.to_thread(settled, lambda: client.app[SERVICE]._events_up, 10)
    return client


def _owner_process(sidecar, ttl_s: float, encode_s: float) -> tuple[subprocess.Popen, str]:
    """An encoder in its own process (``encoder_proc.py``) whose model takes ``encode_s`` per batch."""
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "encoder_proc.py"), sidecar.unix_url, str(ttl_s),
                             str(encode_s)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("ready "):
        proc.kill()
        raise AssertionError(f"the owner encoder did not start: {line!r}")
    return proc, f"http://127.0.0.1:{int(line.split()[1])}"


def _answer(ans: dict) -> str:
    return json.dumps([{k: v for k, v in item.items() if k != "cached"} for item in ans["items"]])


async def test_sixteen_requests_over_two_encoders_on_two_sidecars_encode_once(two_nodes):
    a, b = two_nodes
    ea, eb = await _encoder(a), await _encoder(b)
    try:
        ea.model.gate.clear()
        eb.model.gate.clear()
        uri = png_uri(201)
        tasks = [asyncio.create_task(encode(ea if i % 2 else eb, [uri])) for i in range(16)]
        await asyncio.to_thread(settled, lambda: ea.model.entered.is_set() or eb.model.entered.is_set(), 10)
        owner, waiter = (ea, eb) if ea.model.entered.is_set() else (eb, ea)
        assert await asyncio.to_thread(settled, lambda: waiter.app[SERVICE].counters["claims_waited"] >= 1, 10)
        ea.model.gate.set()
        eb.model.gate.set()
        answers = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert ea.model.batches + eb.model.batches == [1]
        assert len({_answer(x) for x in answers}) == 1
        so, sw = owner.app[SERVICE].counters, waiter.app[SERVICE].counters
        assert so["encoded"] == 1 and sw["encoded"] == 0
        assert so["claims_won"] == 1 and sw["claims_won"] == 0 and sw["claims_taken_over"] == 0
        again = await encode(waiter, [uri])
        assert again["items"][0]["cached"] is True and waiter.model.batches == []
    finally:
        await ea.close()
        await eb.close()


async def test_an_owner_killed_mid_encode_is_taken_over_within_the_claim_ttl(two_nodes):
    a, b = two_nodes
    ttl_s = 1.5
    proc, owner_url = _owner_process(a, ttl_s, 60)
    try:
        eb = await _encoder(b, ttl_s=ttl_s)
        uri = png_uri(202)
        async with ClientSession() as http:
            doomed = asyncio.create_task(http.post(owner_url + "/v1/encode", json={"images": [uri]}))
            # NOTE: the owner holds the claim (a's sidecar answered it "won") before anyone else asks
            assert await asyncio.to_thread(settled, lambda: a.store.claims.stats()["won"] >= 1, 10)
            waiters = [asyncio.create_task(encode(eb, [uri])) for _ in range(8)]
            assert await asyncio.to_thread(settled, lambda: eb.app[SERVICE].counters["claims_waited"] >= 1, 10)
            assert eb.model.batches == []
            t_kill = time.monotonic()
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            answers = await asyncio.wait_for(asyncio.gather(*waiters), 30)
            took = time.monotonic() - t_kill
            with pytest.raises(Exception):
                await doomed
        assert took < ttl_s + 3, took  # the waiters never wait past the claim's deadline (plus an encode)
        assert eb.model.batches == [1] and len({_answer(x) for x in answers}) == 1
        counters = eb.app[SERVICE].counters
        assert counters["claims_taken_over"] == 1 and counters["encoded"] == 1
        await eb.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


async def test_a_slow_owner_that_is_alive_renews_its_claim_and_is_not_taken_over(two_nodes):
    a, b = two_nodes
    ttl_s = 0.6
    proc, owner_url = _owner_process(a, ttl_s, 2.5)
    try:
        # NOTE: a waiter waits at most its own --claim-ttl (then encodes, whatever the owner does):
        # this one would wait 10 s, so only the owner's renewals of its 0.6 s claim are at stake
        eb = await _encoder(b, ttl_s=10.0)
        uri = png_uri(203)
        async with ClientSession() as http:
            first = asyncio.create_task(http.post(owner_url + "/v1/encode", json={"images": [uri]}))
            assert await asyncio.to_thread(settled, lambda: a.store.claims.stats()["won"] >= 1, 10)
            waiter = await asyncio.wait_for(encode(eb, [uri]), 30)  # 2.5 s encode, 4 TTLs: renewed
            resp = await first
            owned = await resp.json()
        assert resp.status == 200 and eb.model.batches == []
        assert _answer(owned) == _answer(waiter) and waiter["items"][0]["cached"] is True
        assert eb.app[SERVICE].counters["claims_taken_over"] == 0
        await eb.close()
    finally:
        proc.kill()
        proc.wait(10)


async def test_a_corrupt_remote_value_is_a_miss_deleted_and_encoded_again(two_nodes, cluster):
    from redis.cluster import RedisCluster

    a, b = two_nodes
    ea = await _encoder(a)
    uri = png_uri(204)
    try:
        first = await encode(ea, [uri])
    finally:
        await ea.close()
    a.store.remote.flush(10)
    key = f"mmc:v1:{first['namespace']}/{first['items'][0]['hash']}"
    raw = RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
    try:
        blob = bytearray(raw.get(key))
        blob[-1] ^= 0xFF  # one flipped byte in the embeddings
        raw.set(key, bytes(blob))
        eb = await _encoder(b)
        try:
            again = await encode(eb, [uri])
        finally:
            await eb.close()
        assert again["items"][0]["cached"] is False and eb.model.batches == [1]  # encoded again, on B
        assert _answer(again) == _answer(first)
        assert b.store.stats()["remote"]["corrupt"] >= 1
        b.store.remote.flush(10)
        assert raw.get(key) is not None and bytes(raw.get(key)) != bytes(blob)  # deleted, then B's good copy
    finally:
        raw.close()

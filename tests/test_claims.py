"""Claims and inventory events on one sidecar (no remote): the contract of ``mmcache.core.claims``
and ``mmcache.core.events`` over both transports, and two encoders on one sidecar encoding a new
image once. The cross-node cases (a Redis cluster, a killed owner) are in test_single_flight.py."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import tempfile
import threading
import time

import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer

from encoder_worker.app import SERVICE, create_app
from encoder_worker.config import EncoderServeConfig
from mmcache.sidecar.config import ServeConfig
from mmcache.core.events import EventBus
from mmcache_client import AsyncCacheClient, BadRequest, CacheClient, CacheUnavailable, content_hash
from sidecar import ThreadedSidecar, settled, unix_sidecar
from test_encoder_service import CountingEncoder, encode, png_uri

NS = "claims"


def key(name) -> str:
    return f"{NS}/{content_hash(str(name).encode())}"


@pytest.fixture
def sidecar(tmp_path):
    with unix_sidecar(str(tmp_path / "cache"), host_capacity_bytes=1 << 20, node="node-a") as sc:
        yield sc


@pytest.mark.parametrize("transport", ["unix", "http"])
def test_claim_won_wait_exists_renew_and_release(sidecar, transport):
    c = CacheClient(sidecar.unix_url if transport == "unix" else sidecar.url)
    k = key(transport)
    assert c.claim([k], "enc-1", ttl_ms=5000)[k] == {"state": "won", "ttl_ms": 5000}
    other = c.claim([k], "enc-2")[k]
    assert other["state"] == "wait" and 4000 < other["ttl_ms"] <= 5000  # the owner's deadline, not the asker's
    assert c.claim([k], "enc-1", ttl_ms=9000)[k] == {"state": "won", "ttl_ms": 9000}  # the owner renews
    assert c.release_claims([k], "enc-2") == 0  # only the owner gives a claim back
    assert c.claim([k], "enc-2")[k]["state"] == "wait"
    assert c.release_claims([k], "enc-1") == 1
    assert c.claim([k], "enc-2")[k]["state"] == "won"
    c.put(NS, k.split("/")[1], torch.ones(4, 8))  # the put ends the claim: everyone sees the entry
    assert c.claim([k], "enc-3")[k] == {"state": "exists"}
    stats = c.stats()["claims"]
    assert stats["held_here"] == 0 and stats["ended"] == 1 and stats["won"] >= 3 and stats["exists"] == 1


def test_a_dead_owners_claim_expires_and_is_taken_over(sidecar):
    c = CacheClient(sidecar.unix_url)
    k = key("expiry")
    assert c.claim([k], "dead", ttl_ms=150)[k]["state"] == "won"
    assert c.claim([k], "alive")[k]["state"] == "wait"
    assert settled(lambda: c.claim([k], "alive", ttl_ms=1000)[k]["state"] == "won", timeout=5)
    assert c.claim([k], "dead")[k]["state"] == "wait"  # the late owner is now a waiter


@pytest.mark.parametrize("transport", ["unix", "http"])
@pytest.mark.parametrize("body,needle", [
    ({"keys": ["claims/" + "0" * 64], "owner": ""}, "claim owner"),
    ({"keys": ["claims/" + "0" * 64], "owner": "x" * 200}, "claim owner"),
    ({"keys": ["claims/" + "0" * 64], "owner": 7}, "claim owner"),
    ({"keys": ["claims/" + "0" * 64], "owner": "a", "ttl_ms": 0}, "ttl_ms"),
    ({"keys": ["claims/" + "0" * 64], "owner": "a", "ttl_ms": 10**9}, "ttl_ms"),
    ({"keys": ["claims/" + "0" * 64], "owner": "a", "ttl_ms": True}, "ttl_ms"),
    ({"keys": ["not-a-key"], "owner": "a"}, "key"),
])
def test_bad_claims_are_refused_by_name_and_the_sidecar_serves_on(sidecar, transport, body, needle):
    c = CacheClient(sidecar.unix_url if transport == "unix" else sidecar.url)
    with pytest.raises(BadRequest, match=needle):
        if transport == "unix":
            c._call("claim", **body)
        else:
            c._request("POST", "/v1/claims", json.dumps(body), {"Content-Type": "application/json"})
    k = key("after-bad")
    assert c.claim([k], "fine")[k]["state"] in ("won",)
    assert c.stats()["claims"]["held_here"] == 1


def test_event_bus_follows_by_sequence_and_says_when_it_lost_some():
    bus = EventBus("n", capacity=4)
    start = bus.seq
    for i in range(3):
        bus.publish("stored", f"k{i}", "host", 10)
    events, lost = bus.since(start)
    assert [e.key for e in events] == ["k0", "k1", "k2"] and not lost
    for i in range(3, 10):
        bus.publish("evicted", f"k{i}", "host", 10)
    events, lost = bus.since(start)
    assert lost and [e.key for e in events] == ["k6", "k7", "k8", "k9"]
    assert bus.wait(bus.seq, 0.01) == ([], False)  # nothing new: a bounded wait, no event


async def _collect(client: AsyncCacheClient, n: int, out: list, ready: asyncio.Event | None = None) -> None:
    async for ev in client.events():
        if ev["kind"] == "subscribed":
            if ready is not None:
                ready.set()
            continue
        out.append(ev)
        if len(out) >= n:
            return


@pytest.mark.parametrize("transport", ["unix", "http"])
async def test_events_stream_stored_evicted_and_deleted(sidecar, transport):
    url = sidecar.unix_url if transport == "unix" else sidecar.url
    seen: list[dict] = []
    async with AsyncCacheClient(url) as follower, AsyncCacheClient(sidecar.unix_url) as writer:
        ready = asyncio.Event()
        task = asyncio.create_task(_collect(follower, 10_000, seen, ready))
        await asyncio.wait_for(ready.wait(), 10)  # NOTE: the stream follows from "now"
        probe = key(f"probe-{transport}")
        await writer.put(NS, probe.split("/")[1], torch.ones(2, 8))
        assert await asyncio.to_thread(settled, lambda: any(e.get("key") == probe for e in seen))
        # a 1 MiB arena: six 256 KiB entries evict the first ones
        keys = [key(f"ev-{transport}-{i}") for i in range(6)]
        for k in keys:
            await writer.put(NS, k.split("/")[1], torch.ones(256 * 1024 // 4 - 256, 1))
        await writer.delete(NS, keys[-1].split("/")[1])
        ok = await asyncio.to_thread(settled, lambda: any(e.get("kind") == "deleted" for e in seen), 10)
        task.cancel()
    assert ok, seen
    stored = {e["key"] for e in seen if e["kind"] == "stored" and e["tier"] == "host"}
    assert set(keys) <= stored
    evicted = [e for e in seen if e["kind"] == "evicted" and e["tier"] == "host"]
    assert evicted and all(e["key"] in set(keys) | {probe} for e in evicted) and all(e["bytes"] > 0 for e in evicted)
    deleted = [e for e in seen if e["kind"] == "deleted"]
    assert [e["key"] for e in deleted] == [keys[-1]]
    assert all(e["node"] == "node-a" for e in seen)
    seqs = [e["seq"] for e in seen]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


async def test_events_from_a_sequence_number_and_bad_queries(sidecar):
    c = CacheClient(sidecar.unix_url)
    k = key("replay")
    c.put(NS, k.split("/")[1], torch.ones(2, 8))
    got: list[dict] = []
    async with AsyncCacheClient(sidecar.url) as follower:
        task = asyncio.create_task(_collect_from(follower, 0, 1, got))
        await asyncio.wait_for(task, 10)
    assert got[0]["key"] == k and got[0]["kind"] == "stored"
    for query in ("since=-1", "since=x", "scope=mine"):
        status, _, body = CacheClient(sidecar.url)._request("GET", f"/v1/events?{query}", ok=(400,))
        assert status == 400 and "error" in json.loads(body)


async def _collect_from(client, since, n, out):
    async for ev in client.events(since=since):
        if ev["kind"] == "subscribed":
            assert ev["seq"] == since and ev["node"] == "node-a"
            continue
        out.append(ev)
        if len(out) >= n:
            return


async def test_open_event_streams_end_when_the_sidecar_stops_and_do_not_hold_it(tmp_path):
    sock_dir = tempfile.mkdtemp(prefix="mmc-cl-", dir="/tmp")
    cfg = ServeConfig(data_dir=str(tmp_path / "c"), port=0, socket=os.path.join(sock_dir, "s.sock"),
                      host_capacity_bytes=1 << 20, disk_capacity_bytes=64 << 20)
    sc = ThreadedSidecar(cfg).start()
    followers = []
    for url in (f"unix://{cfg.socket}", sc.url):
        client = AsyncCacheClient(url)
        gen = client.events()
        assert (await asyncio.wait_for(gen.__anext__(), 10))["kind"] == "subscribed"
        task = asyncio.create_task(gen.__anext__())
        followers.append((client, task))
    t0 = time.monotonic()
    await asyncio.to_thread(sc.stop)  # NOTE: open event streams must not hold the stop for long
    assert time.monotonic() - t0 < 8
    for client, task in followers:
        with pytest.raises(CacheUnavailable):
            await asyncio.wait_for(task, 5)
        await client.close()


async def _encoders(sidecar, n: int, ttl_s: float = 30.0):
    out = []
    for _ in range(n):
        model = CountingEncoder()
        cfg = EncoderServeConfig(cache_url=sidecar.unix_url, max_batch=8, max_wait_ms=20, claim_ttl_s=ttl_s)
        client = TestClient(TestServer(create_app(cfg, encoder=model)))
        await client.start_server()
        client.model = model
        out.append(client)
    return out


async def test_two_encoders_on_one_sidecar_encode_a_new_image_once(sidecar):
    a, b = await _encoders(sidecar, 2)
    try:
        for enc in (a, b):  # the event streams are up (else waiters poll, which is slower, not wrong)
            assert await asyncio.to_thread(settled, lambda: enc.app[SERVICE]._events_up, 10)
        a.model.gate.clear()
        b.model.gate.clear()
        uri = png_uri(101)
        tasks = [asyncio.create_task(encode(a if i % 2 else b, [uri])) for i in range(16)]
        await asyncio.to_thread(settled, lambda: a.model.entered.is_set() or b.model.entered.is_set(), 10)
        await asyncio.sleep(0.3)  # NOTE: let the other encoder's requests reach their claim
        a.model.gate.set()
        b.model.gate.set()
        answers = await asyncio.gather(*tasks)
        assert sorted(a.model.batches + b.model.batches) == [1], (a.model.batches, b.model.batches)
        items = {json.dumps({k: v for k, v in ans["items"][0].items() if k != "cached"}) for ans in answers}
        assert len(items) == 1
        sa, sb = a.app[SERVICE].counters, b.app[SERVICE].counters
        assert sa["encoded"] + sb["encoded"] == 1
        assert sa["claims_won"] + sb["claims_won"] == 1 and sa["claims_waited"] + sb["claims_waited"] >= 1
        assert sa["claims_taken_over"] + sb["claims_taken_over"] == 0
        stats = await (await a.get("/v1/stats")).json()
        assert {"claims_won", "claims_waited", "claims_taken_over", "encoded"} <= set(stats)
    finally:
        await a.close()
        await b.close()


async def test_a_failed_encode_gives_its_claim_back_and_a_waiter_encodes_at_once(sidecar):
    a, b = await _encoders(sidecar, 2)
    try:
        fail = threading.Event()

        def broken(images):
            a.model.entered.set()
            fail.wait(10)
            raise RuntimeError("the model broke (injected)")
        a.model.encode = broken
        uri = png_uri(102)
        first = asyncio.create_task(a.post("/v1/encode", json={"images": [uri]}))
        await asyncio.to_thread(a.model.entered.wait, 10)
        second = asyncio.create_task(encode(b, [uri]))
        assert await asyncio.to_thread(settled, lambda: b.app[SERVICE].counters["claims_waited"] == 1, 10)
        t0 = time.monotonic()
        fail.set()
        answer = await asyncio.wait_for(second, 10)
        assert time.monotonic() - t0 < 5  # the claim came back at once, not after its 30 s TTL
        assert (await first).status == 500
        assert answer["items"][0]["cached"] is False and b.model.batches == [1]
        counters = b.app[SERVICE].counters
        assert counters["claims_won"] == 1 and counters["claims_taken_over"] == 1
    finally:
        await a.close()
        await b.close()


async def test_a_key_won_is_encoded_at_once_not_after_the_keys_its_request_waits_on(sidecar):
    a, b = await _encoders(sidecar, 2)
    c = CacheClient(sidecar.unix_url)
    try:
        x, y = png_uri(103), png_uri(104)
        y_key = f"{CountingEncoder.namespace}/{content_hash(base64.b64decode(y.split(',', 1)[1]))}"
        assert c.claim([y_key], "someone-else", ttl_ms=60_000)[y_key]["state"] == "won"
        held = asyncio.create_task(encode(a, [x, y]))  # wins x, waits on y (someone else's for 60 s)
        assert await asyncio.to_thread(settled, lambda: a.app[SERVICE].counters["claims_waited"] == 1, 10)
        t0 = time.monotonic()
        other = await asyncio.wait_for(encode(b, [x]), 10)  # x must not wait for y's owner
        assert time.monotonic() - t0 < 5 and b.model.batches == []
        assert c.release_claims([y_key], "someone-else") == 1  # y's owner gives up: a takes it over
        answer = await asyncio.wait_for(held, 10)
        assert a.model.batches == [1, 1] and answer["items"][0]["hash"] == other["items"][0]["hash"]
        assert a.app[SERVICE].counters["claims_taken_over"] == 1
    finally:
        c.close()
        await a.close()
        await b.close()


async def test_a_sequence_number_from_before_a_restart_says_lost_and_follows_from_now(sidecar):
    got = []
    async with AsyncCacheClient(sidecar.url) as follower:
        async for ev in follower.events(since=10**9):
            got.append(ev)
            if len(got) == 2:
                break
    assert got[0]["kind"] == "subscribed" and got[0]["seq"] <= 10 and got[1] == {"kind": "lost"}

"""Claims are a shared resource with a cap and an answer past it.

The attacks as they were made: one client flooding claims (1.2 million accepted, +300 MiB), and a
claim with a 600 s TTL on a real key making encoders wait ten minutes."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest
from aiohttp.test_utils import TestClient, TestServer

from encoder_worker.app import SERVICE, create_app
from encoder_worker.config import EncoderServeConfig
from mmcache.core.claims import Claims
from mmcache_client import CacheClient, TooManyRequests, content_hash
from sidecar import SidecarProcess, unix_sidecar
from test_encoder_service import CountingEncoder, encode, png_uri, raw_of
from conftest import wait_until

NS = "caps"


def _keys(start: int, n: int) -> list[str]:
    return [f"{NS}/{content_hash(str(i).encode())}" for i in range(start, start + n)]


def _rss_anon_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


def test_one_owner_is_capped_and_others_still_claim():
    claims = Claims(lambda key: False, max_claims=1000, max_claims_per_owner=100)
    assert all(a["state"] == "won" for a in claims.claim(_keys(0, 100), "flood").values())
    with pytest.raises(TooManyRequests, match="max-claims-per-owner") as refused:
        claims.claim(_keys(100, 1), "flood")
    assert refused.value.retry_after_s >= 1
    assert claims.claim(_keys(0, 1), "other")[_keys(0, 1)[0]]["state"] == "wait"  # another owner: answered
    assert claims.claim(_keys(500, 50), "other")[_keys(500, 1)[0]]["state"] == "won"
    claims.release(_keys(0, 60), "flood")  # given back: room again
    assert claims.claim(_keys(100, 60), "flood")[_keys(100, 1)[0]]["state"] == "won"
    claims.stored(_keys(100, 1)[0])  # stored: the claim is over
    assert claims.stats()["live"] == 100 - 60 + 60 - 1 + 50


def _refused_no_more(claims, keys, owner) -> bool:
    try:
        return claims.claim(keys, owner)[keys[0]]["state"] == "won"
    except TooManyRequests:
        return False


def test_all_owners_together_are_capped_and_expired_claims_make_room():
    claims = Claims(lambda key: False, max_claims=300, max_claims_per_owner=100, ttl_max_ms=200)
    for owner in range(3):
        claims.claim(_keys(owner * 100, 100), f"o{owner}", ttl_ms=200)
    with pytest.raises(TooManyRequests, match="--max-claims"):
        claims.claim(_keys(1000, 1), "o9")
    t0 = time.monotonic()
    wait_until(lambda: _refused_no_more(claims, _keys(1000, 1), "o9"), 10, "the expired claims to make room")
    assert time.monotonic() - t0 >= 0.15  # not before the 200 ms TTL ran out


def test_a_long_ttl_is_clamped_so_a_waiter_takes_over_at_the_cap():
    claims = Claims(lambda key: False, ttl_max_ms=300)
    (key,) = _keys(0, 1)
    assert claims.claim([key], "squatter", ttl_ms=600_000)[key] == {"state": "won", "ttl_ms": 300}
    assert claims.claim([key], "encoder")[key]["state"] == "wait"
    t0 = time.monotonic()
    wait_until(lambda: claims.claim([key], "encoder")[key]["state"] == "won", 10, "the clamped claim to expire")
    assert time.monotonic() - t0 >= 0.25  # at the 300 ms cap, not the 600 s asked


def test_a_flood_of_claims_from_many_owners_is_bounded_in_memory_and_answered_429(tmp_path):
    """The attack: claims as fast as one client can send them, each batch under a new owner name
    (so the per-owner cap alone would not hold). Past --max-claims every claim is a 429 with
    Retry-After, and the sidecar's private memory stops growing."""
    sc = SidecarProcess("--data-dir", str(tmp_path / "d"), "--socket", str(tmp_path / "s.sock"),
                        "--max-claims", "20000", "--max-claims-per-owner", "1000").start()
    try:
        with CacheClient(f"unix://{tmp_path / 's.sock'}") as c:
            c.stats()
            before = _rss_anon_kib(sc.proc.pid)
            accepted = refused = 0
            for batch in range(200):  # 200,000 claims asked for
                try:
                    c.claim(_keys(batch * 1000, 1000), f"flood-{batch}", ttl_ms=600_000)
                    accepted += 1000
                except TooManyRequests as e:
                    refused += 1000
                    assert e.retry_after_s >= 1
            grown_kib = _rss_anon_kib(sc.proc.pid) - before
            stats = c.stats()["claims"]
        assert accepted == 20000 and refused == 180000
        assert stats["live"] == 20000 and stats["refused"] == 180
        assert grown_kib < 48 << 10, f"RssAnon grew {grown_kib} KiB for 20,000 live claims"
        req = urllib.request.Request(sc.url + "/v1/claims", method="POST", headers={"Content-Type": "application/json"},
                                     data=b'{"keys": ["' + _keys(999999, 1)[0].encode() + b'"], "owner": "http"}')
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(req, timeout=10)
        assert answer.value.code == 429 and int(answer.value.headers["Retry-After"]) >= 1
        assert b"--max-claims" in answer.value.read()
        with CacheClient(sc.url) as http:  # the SDK names it
            with pytest.raises(TooManyRequests):
                http.claim(_keys(999999, 1), "sdk")
            assert http.stats()["host"]["entries"] == 0  # and serves everything else
    finally:
        sc.stop()


async def test_an_encoder_waits_on_a_foreign_claim_no_longer_than_its_own_ttl(tmp_path):
    """A squatter claims a real image's key for 120 s; an encoder whose --claim-ttl is 1 s waits
    about that long, then encodes the image itself."""
    with unix_sidecar(str(tmp_path)) as sc:
        model = CountingEncoder()
        cfg = EncoderServeConfig(cache_url=sc.unix_url, max_batch=8, max_wait_ms=20, claim_ttl_s=1.0)
        client = TestClient(TestServer(create_app(cfg, encoder=model)))
        await client.start_server()
        try:
            uri = png_uri(4242)
            key = f"{client.app[SERVICE].namespace}/{content_hash(raw_of(uri))}"
            with CacheClient(sc.unix_url) as squatter:
                assert squatter.claim([key], "squatter", ttl_ms=120_000)[key]["state"] == "won"
            t0 = time.monotonic()
            answer = await asyncio.wait_for(encode(client, [uri]), 30)
            took = time.monotonic() - t0
            assert 0.9 < took < 5, took
            assert model.batches == [1] and answer["items"][0]["cached"] is False
            assert client.app[SERVICE].counters["claim_waits_ended"] == 1
        finally:
            await client.close()

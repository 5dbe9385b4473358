"""The sidecar's inventory, page by page (``GET /v1/entries``, the local ``list`` op,
``CacheClient.list_entries`` / ``iter_entries``): what ``mmcache export`` walks. Host and disk
entries alike, in key order, filtered by namespace, the same over HTTP and the Unix socket;
bad arguments are 400s that name them."""

from __future__ import annotations

import http.client
import json

import numpy as np
import pytest

from mmcache_client import AsyncCacheClient, BadRequest, CacheClient, content_hash
from sidecar import settled, unix_sidecar


def h(i) -> str:
    return content_hash(f"listing-{i}".encode())


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    # NOTE: 1 MiB of host for 40 entries of 64 KiB: most of them live on disk only
    with unix_sidecar(str(tmp_path_factory.mktemp("listing")), host_capacity_bytes=1 << 20) as sc:
        with CacheClient(sc.url) as c:
            for i in range(40):
                c.put("ns-a" if i % 4 else "ns-b", h(i), np.full((64, 256), i, dtype=np.float32))
        sc.store.flush()
        yield sc


def _get(sc, path):
    conn = http.client.HTTPConnection("127.0.0.1", sc.port, timeout=30)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, json.loads(body)


def test_every_entry_is_listed_once_in_key_order_from_host_and_disk(sidecar):
    with CacheClient(sidecar.url) as c:
        entries = list(c.iter_entries(page=7))
    keys = [e["key"] for e in entries]
    expected = sorted([f"ns-a/{h(i)}" for i in range(40) if i % 4] + [f"ns-b/{h(i)}" for i in range(0, 40, 4)])
    assert keys == expected
    tiers = {e["tier"] for e in entries}
    assert tiers == {"host", "disk"}, tiers  # the small arena holds a few, disk the rest
    assert all(e["nbytes"] > 64 * 256 * 4 for e in entries)
    host = {e["key"] for e in entries if e["tier"] == "host"}
    assert all(sidecar.store.host.contains(k) for k in host)


def test_a_namespace_alone_and_pages_that_end_with_next_null(sidecar):
    with CacheClient(sidecar.url) as c:
        first = c.list_entries("ns-b", limit=4)
        assert len(first["entries"]) == 4 and first["next"] == first["entries"][-1]["key"]
        rest = c.list_entries("ns-b", after=first["next"], limit=100)
        assert len(rest["entries"]) == 6 and rest["next"] is None
        assert {e["key"] for e in first["entries"] + rest["entries"]} == {f"ns-b/{h(i)}" for i in range(0, 40, 4)}
        assert c.list_entries("ns-none")["entries"] == []


def test_the_unix_socket_and_the_async_client_list_the_same(sidecar):
    with CacheClient(sidecar.url) as http_client, CacheClient(sidecar.unix_url) as local:
        assert list(local.iter_entries("ns-a", page=5)) == list(http_client.iter_entries("ns-a", page=5))


async def test_async_iter_entries(sidecar):
    async with AsyncCacheClient(sidecar.unix_url) as c:
        keys = [e["key"] async for e in c.iter_entries("ns-a", page=9)]
    assert len(keys) == 30 and keys == sorted(keys)


def test_an_entry_deleted_or_stored_is_seen_by_the_next_page(sidecar):
    with CacheClient(sidecar.url) as c:
        page = c.list_entries("ns-c", limit=10)
        assert page["entries"] == []
        c.put("ns-c", h("new"), np.ones((4, 4), dtype=np.float32))
        assert [e["key"] for e in c.list_entries("ns-c")["entries"]] == [f"ns-c/{h('new')}"]
        assert c.delete("ns-c", h("new"))
        assert settled(lambda: c.list_entries("ns-c")["entries"] == [])


@pytest.mark.parametrize("query, word", [
    ("limit=0", "limit"), ("limit=10001", "limit"), ("limit=many", "limit"), ("namespace=a%2Fb", "namespace"),
    ("after=" + "x" * 600, "after"), ("colour=red", "colour")])
def test_bad_arguments_are_400s_that_name_them(sidecar, query, word):
    status, doc = _get(sidecar, f"/v1/entries?{query}")
    assert status == 400 and word in doc["error"], doc


def test_bad_arguments_over_the_socket_raise_bad_request(sidecar):
    with CacheClient(sidecar.unix_url) as c:
        with pytest.raises(BadRequest, match="limit"):
            c.list_entries(limit=0)
        with pytest.raises(BadRequest, match="namespace"):
            c.list_entries("bad/ns")
        assert c.stats()["host"]["entries"] >= 1  # the connection still serves


async def test_an_async_scan_reads_lower_tiers_in_place(tmp_path):
    """``get_many(promote=False)`` over the socket (the ``scan`` lease): disk entries come back
    read where they lie, and host's keys stay as they were."""
    with unix_sidecar(str(tmp_path), host_capacity_bytes=1 << 20) as sc:
        with CacheClient(sc.unix_url) as c:
            for i in range(40):
                c.put("scan", h(f"s{i}"), np.full((64, 256), i, dtype=np.float32), durable=True)
            keys = [e["key"] for e in c.iter_entries("scan")]
            before = c.lookup(keys)
        async with AsyncCacheClient(sc.unix_url) as a:
            for i in range(0, 40, 4):
                async with await a.get_many(keys[i:i + 4], promote=False) as entries:
                    assert [e.tier for e in entries] == [before[k] for k in keys[i:i + 4]]
                    assert all(float(e.array[0, 0]) == float(e.array[-1, -1]) for e in entries)
        with CacheClient(sc.unix_url) as c:
            assert c.lookup(keys) == before and c.stats()["host"]["promotions"] == 0

"""The sidecar's HTTP API (docs/sidecar.md) against a ThreadedSidecar."""

from __future__ import annotations

import http.client
import json
import os
import socket
import time

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pytest
import safetensors.torch
import torch

from mmcache.sidecar.config import ServeConfig
from mmcache_client import AuthError, CacheClient, content_hash
from entries import encode_entry
from mmcache_client.format import read_entry
from sidecar import ThreadedSidecar
from conftest import wait_until

NS = "test-ns"
TOKEN = "s3cret-token"
REQUIRED_META = ("format", "namespace", "hash", "checksum", "created_at", "encode_ms")


def h(i: int | str) -> str:
    return content_hash(f"server-test-{i}".encode())


def emb(i: int, num_tokens: int = 4, hidden: int = 16, dtype=torch.float32) -> torch.Tensor:
    return (torch.arange(num_tokens * hidden, dtype=torch.float32).reshape(num_tokens, hidden) + i).to(dtype)


def plain_body(t: torch.Tensor) -> bytes:
    """A safetensors file as any tool writes it: no mmcache metadata at all."""
    return safetensors.torch.save({"embeddings": t})


def make_sidecar(tmp_path, **kw) -> ThreadedSidecar:
    kw.setdefault("host_capacity_bytes", 16 << 20)
    kw.setdefault("disk_capacity_bytes", 64 << 20)
    config = ServeConfig(data_dir=str(tmp_path / "data"), port=0, arena_path=str(tmp_path / "arena"), **kw)
    return ThreadedSidecar(config).start()


@pytest.fixture
def sidecar(tmp_path):
    sc = make_sidecar(tmp_path)
    yield sc
    sc.stop()
    assert not os.path.exists(tmp_path / "arena")


def request(sc: ThreadedSidecar, method: str, path: str, body=None, headers=None, token: str | None = None):
    """One request on a fresh connection: (status, headers, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", sc.port, timeout=30)
    try:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def error_of(status_body) -> str:
    doc = json.loads(status_body)
    assert isinstance(doc, dict) and isinstance(doc.get("error"), str) and doc["error"], doc
    return doc["error"]


def entry_path(i, ns: str = NS) -> str:
    return f"/v1/entries/{ns}/{h(i)}"


def host_leases(sc: ThreadedSidecar) -> int:
    sc.store.flush(30)  # the disk writer pins fresh entries until their batch commits
    return sc.store.stats()["host"]["leases"]


# ---------------------------------------------------------------- entries


def test_put_get_head_delete_roundtrip(sidecar):
    t = emb(1)
    status, hdrs, body = request(sidecar, "PUT", entry_path(1), plain_body(t))
    assert status == 201, body
    assert hdrs["content-type"].startswith("application/json")
    doc = json.loads(body)
    assert doc["created"] is True and doc["key"] == f"{NS}/{h(1)}" and doc["tier"] == "host"

    status, _, body = request(sidecar, "PUT", entry_path(1), plain_body(t))
    assert status == 200 and json.loads(body)["created"] is False

    status, hdrs, body = request(sidecar, "GET", entry_path(1))
    assert status == 200
    assert hdrs["x-mmcache-tier"] == "host"
    assert int(hdrs["content-length"]) == len(body)
    entry = read_entry(body, verify=True)
    assert torch.equal(entry.tensor, t)
    meta = entry.metadata
    for k in REQUIRED_META:
        assert k in meta, k
    assert meta["namespace"] == NS and meta["hash"] == h(1)
    assert len(meta["checksum"]) == 16
    float(meta["created_at"]), float(meta["encode_ms"])

    status, hdrs, body = request(sidecar, "HEAD", entry_path(1))
    assert status == 200 and body == b"" and hdrs["x-mmcache-tier"] == "host"
    assert request(sidecar, "HEAD", entry_path(2))[0] == 404

    assert request(sidecar, "DELETE", entry_path(1))[0] == 204
    status, _, body = request(sidecar, "DELETE", entry_path(1))
    assert status == 404
    error_of(body)
    status, hdrs, body = request(sidecar, "GET", entry_path(1))
    assert status == 404 and hdrs["content-type"].startswith("application/json")
    assert h(1) in error_of(body)
    assert request(sidecar, "HEAD", entry_path(1))[0] == 404
    assert not sidecar.store.contains(f"{NS}/{h(1)}")


def test_put_keeps_client_metadata_and_fills_the_rest(sidecar):
    t = emb(3, dtype=torch.bfloat16)
    grid = torch.tensor([[1, 2, 2]], dtype=torch.int64)
    body = safetensors.torch.save({"embeddings": t, "image_grid_thw": grid},
                                  metadata={"model": "tiny", "encode_ms": "12.5"})
    assert request(sidecar, "PUT", entry_path(3), body)[0] == 201
    status, _, got = request(sidecar, "GET", entry_path(3))
    assert status == 200
    entry = read_entry(got)
    assert torch.equal(entry.tensor, t) and entry.tensor.dtype == torch.bfloat16
    assert torch.equal(entry.get_tensor("image_grid_thw"), grid)
    assert entry.metadata["model"] == "tiny" and float(entry.metadata["encode_ms"]) == 12.5
    assert entry.metadata["namespace"] == NS and entry.metadata["hash"] == h(3)


def test_put_accepts_a_complete_mmcache_entry(sidecar):
    blob = encode_entry(NS, h(4), {"embeddings": emb(4)}, encode_ms=3.0)
    assert request(sidecar, "PUT", entry_path(4), blob)[0] == 201
    status, _, got = request(sidecar, "GET", entry_path(4))
    assert status == 200
    assert read_entry(got).metadata["checksum"] == read_entry(blob).metadata["checksum"]


# ---------------------------------------------------------------- PUT errors


def _bad_puts():
    t = emb(5)
    good = plain_body(t)
    blob = bytearray(encode_entry(NS, h(5), {"embeddings": t}))
    blob[-1] ^= 0xFF  # data changed, recorded checksum kept
    return [
        ("bad hash", f"/v1/entries/{NS}/{'A' * 64}", good),
        ("xxh3-128 width", f"/v1/entries/{NS}/{'a' * 32}", good),
        ("short hash", f"/v1/entries/{NS}/abc123", good),
        ("bad namespace", f"/v1/entries/bad%20ns!/{h(5)}", good),
        ("garbage body", entry_path(5), b"\x00this is not a safetensors file at all" * 10),
        ("empty body", entry_path(5), b""),
        ("no embeddings", entry_path(5), safetensors.torch.save({"other": t})),
        ("1-D embeddings", entry_path(5), safetensors.torch.save({"embeddings": torch.zeros(8)})),
        ("namespace contradicts URL", entry_path(5),
         safetensors.torch.save({"embeddings": t}, metadata={"namespace": "other-ns"})),
        ("hash contradicts URL", entry_path(5), safetensors.torch.save({"embeddings": t}, metadata={"hash": h(6)})),
        ("wrong checksum", entry_path(5), bytes(blob)),
        ("checksum not hex", entry_path(5),
         safetensors.torch.save({"embeddings": t}, metadata={"checksum": "zz"})),
    ]


@pytest.mark.parametrize("case", range(len(_bad_puts())), ids=[c[0] for c in _bad_puts()])
def test_put_rejects_bad_requests_with_400(sidecar, case):
    _name, path, body = _bad_puts()[case]
    status, hdrs, got = request(sidecar, "PUT", path, body)
    assert status == 400, got
    assert hdrs["content-type"].startswith("application/json")
    error_of(got)
    assert sidecar.store.stats()["host"]["entries"] == 0
    assert sidecar.store.stats()["host"]["reservations"] == 0
    # the server keeps serving
    assert request(sidecar, "GET", "/healthz")[0] == 200
    assert request(sidecar, "PUT", entry_path(5), plain_body(emb(5)))[0] == 201


@pytest.fixture
def small_sidecar(tmp_path):
    sc = make_sidecar(tmp_path, max_entry_size_bytes=64 << 10)
    yield sc
    sc.stop()


def test_put_too_large_with_content_length_is_413(small_sidecar):
    body = plain_body(emb(7, num_tokens=64, hidden=512))  # 128 KiB of data
    assert len(body) > 64 << 10
    status, hdrs, got = request(small_sidecar, "PUT", entry_path(7), body)
    assert status == 413
    assert "limit" in error_of(got)
    assert request(small_sidecar, "HEAD", entry_path(7))[0] == 404
    assert request(small_sidecar, "GET", "/healthz")[0] == 200
    assert request(small_sidecar, "PUT", entry_path(8), plain_body(emb(8)))[0] == 201


def test_put_too_large_chunked_is_413(small_sidecar):
    body = plain_body(emb(9, num_tokens=64, hidden=512))
    chunks = [body[i:i + 8192] for i in range(0, len(body), 8192)]
    conn = http.client.HTTPConnection("127.0.0.1", small_sidecar.port, timeout=30)
    try:
        conn.request("PUT", entry_path(9), body=iter(chunks), encode_chunked=True)
        resp = conn.getresponse()
        got = resp.read()
    finally:
        conn.close()
    assert status_ok(resp.status, 413)
    error_of(got)
    assert request(small_sidecar, "HEAD", entry_path(9))[0] == 404
    assert request(small_sidecar, "GET", "/healthz")[0] == 200
    # a chunked body under the limit is fine
    small = plain_body(emb(10))
    conn = http.client.HTTPConnection("127.0.0.1", small_sidecar.port, timeout=30)
    try:
        conn.request("PUT", entry_path(10), body=iter([small[:100], small[100:]]), encode_chunked=True)
        assert conn.getresponse().status == 201
    finally:
        conn.close()


def status_ok(got: int, want: int) -> bool:
    assert got == want, got
    return True


def test_body_over_one_mib_is_accepted(sidecar):
    t = emb(11, num_tokens=576, hidden=1024)  # 2.25 MiB > aiohttp's 1 MiB default
    assert request(sidecar, "PUT", entry_path(11), plain_body(t))[0] == 201
    status, _, got = request(sidecar, "GET", entry_path(11))
    assert status == 200 and torch.equal(read_entry(got).tensor, t)


def test_durable_put_is_on_disk_when_answered(sidecar):
    for i in range(5):
        status, _, body = request(sidecar, "PUT", entry_path(f"d{i}") + "?durable=1", plain_body(emb(i)))
        assert status == 201
        assert json.loads(body)["durable"] is True
        assert sidecar.store.disk.contains(f"{NS}/{h(f'd{i}')}")


# ---------------------------------------------------------------- lookup / batch_get


def test_lookup(sidecar):
    assert request(sidecar, "PUT", entry_path(20), plain_body(emb(20)))[0] == 201
    keys = [f"{NS}/{h(20)}", f"{NS}/{h(21)}", f"other/{h(20)}"]
    status, _, body = request(sidecar, "POST", "/v1/lookup", json.dumps({"keys": keys}),
                              {"Content-Type": "application/json"})
    assert status == 200
    doc = json.loads(body)
    assert doc["tiers"] == {keys[0]: "host", keys[1]: None, keys[2]: None}
    assert doc["found"] == 1


@pytest.mark.parametrize("body", [
    b"not json", b"[1, 2]", b'{"keys": "ns/abc"}', b'{"nokeys": []}',
    json.dumps({"keys": [f"{NS}/xyz"]}).encode(), json.dumps({"keys": ["no-slash"]}).encode(),
    json.dumps({"keys": [17]}).encode(),
], ids=["garbage", "list", "keys-str", "no-keys", "bad-hash", "no-slash", "not-str"])
@pytest.mark.parametrize("route", ["/v1/lookup", "/v1/batch_get"])
def test_lookup_and_batch_get_reject_bad_bodies(sidecar, route, body):
    status, _, got = request(sidecar, "POST", route, body, {"Content-Type": "application/json"})
    assert status == 400, got
    error_of(got)


def test_batch_get(sidecar):
    tensors = {i: emb(i, num_tokens=3 + i) for i in range(30, 34)}
    for i, t in tensors.items():
        assert request(sidecar, "PUT", entry_path(i), plain_body(t))[0] == 201
    keys = [f"{NS}/{h(i)}" for i in (30, 99, 31, 32, 98, 33, 30)]
    status, hdrs, body = request(sidecar, "POST", "/v1/batch_get", json.dumps({"keys": keys}),
                                 {"Content-Type": "application/json"})
    assert status == 200
    table = pa.ipc.open_stream(body).read_all()
    assert table.column_names == ["key", "tier", "entry"]
    assert table.column("key").to_pylist() == [f"{NS}/{h(i)}" for i in (30, 31, 32, 33)]
    assert set(table.column("tier").to_pylist()) == {"host"}
    for i, blob in zip((30, 31, 32, 33), table.column("entry").to_pylist()):
        entry = read_entry(blob)
        assert torch.equal(entry.tensor, tensors[i])
        assert entry.metadata["hash"] == h(i)
    assert host_leases(sidecar) == 0

    status, _, body = request(sidecar, "POST", "/v1/batch_get", json.dumps({"keys": [f"{NS}/{h(97)}"]}))
    assert status == 200
    assert pa.ipc.open_stream(body).read_all().num_rows == 0
    assert host_leases(sidecar) == 0


# ---------------------------------------------------------------- stats / metrics / health


def test_stats_metrics_healthz(sidecar):
    assert request(sidecar, "PUT", entry_path(40) + "?durable=1", plain_body(emb(40)))[0] == 201
    assert request(sidecar, "GET", entry_path(40))[0] == 200
    assert request(sidecar, "GET", entry_path(41))[0] == 404
    status, hdrs, body = request(sidecar, "GET", "/v1/stats")
    assert status == 200 and hdrs["content-type"].startswith("application/json")
    stats = json.loads(body)
    for tier in ("host", "disk"):
        for field in ("entries", "bytes", "capacity_bytes", "hits", "misses", "evictions"):
            assert isinstance(stats[tier][field], int), (tier, field)
    assert stats["host"]["capacity_bytes"] == 16 << 20
    assert stats["disk"]["capacity_bytes"] == 64 << 20
    assert stats["host"]["entries"] == 1 and stats["disk"]["entries"] == 1
    assert stats["host"]["bytes"] > 0 and stats["host"]["hits"] >= 1 and stats["host"]["misses"] >= 1
    assert stats["host"]["leases"] == 0

    status, hdrs, body = request(sidecar, "GET", "/metrics")
    assert status == 200 and hdrs["content-type"].startswith("text/plain")
    text = body.decode()
    assert 'mmcache_tier_entries{tier="host"} 1.0' in text
    assert 'mmcache_tier_capacity_bytes{tier="disk"}' in text
    assert "mmcache_http_request_seconds" in text
    assert 'mmcache_tier_queue_full_total{tier="disk"} 0.0' in text
    assert 'mmcache_tier_max_queued_bytes{tier="disk"}' in text
    for name in ("refused", "evicted_idle", "header_timeouts", "write_timeouts"):
        assert f"mmcache_http_{name}_total 0.0" in text
    assert stats["http"] == dict(refused=0, evicted_idle=0, header_timeouts=0, write_timeouts=0, streams=0)

    status, _, body = request(sidecar, "GET", "/healthz")
    assert status == 200


def test_unknown_route_is_404_json(sidecar):
    status, _, body = request(sidecar, "GET", "/v1/nothing")
    assert status == 404
    error_of(body)
    status, _, body = request(sidecar, "POST", "/v1/stats")
    assert status == 405
    error_of(body)


# ---------------------------------------------------------------- auth


@pytest.fixture
def auth_sidecar(tmp_path):
    sc = make_sidecar(tmp_path, token=TOKEN)
    yield sc
    sc.stop()


def _routes():
    keys = json.dumps({"keys": [f"{NS}/{h(50)}"]})
    return [
        ("PUT", entry_path(51), plain_body(emb(51))),
        ("GET", entry_path(50), None),
        ("HEAD", entry_path(50), None),
        ("DELETE", entry_path(50), None),
        ("POST", "/v1/lookup", keys),
        ("POST", "/v1/batch_get", keys),
        ("GET", "/v1/stats", None),
        ("GET", "/metrics", None),
    ]


def test_auth(auth_sidecar):
    sc = auth_sidecar
    assert request(sc, "PUT", entry_path(50), plain_body(emb(50)), token=TOKEN)[0] == 201
    for method, path, body in _routes():
        for bad in (None, "wrong", TOKEN + "x", ""):
            status, hdrs, got = request(sc, method, path, body, token=bad)
            assert status == 401, (method, path, bad)
            if method != "HEAD":
                error_of(got)
        raw = request(sc, method, path, body, headers={"Authorization": TOKEN})  # not "Bearer ..."
        assert raw[0] == 401
    assert sc.store.contains(f"{NS}/{h(50)}") and not sc.store.contains(f"{NS}/{h(51)}")
    assert request(sc, "GET", "/healthz")[0] == 200

    expected = {"PUT": 201, "GET": 200, "HEAD": 200, "DELETE": 204, "POST": 200}
    for method, path, body in _routes():
        status, _, _ = request(sc, method, path, body, token=TOKEN)
        assert status == expected[method], (method, path, status)


def test_sdk_with_and_without_token(auth_sidecar):
    with CacheClient(auth_sidecar.url, token=TOKEN) as c:
        assert c.put(NS, h(60), emb(60)) is True
        with c.get(NS, h(60)) as e:
            assert torch.equal(e.tensor, emb(60))
        assert c.stats()["host"]["entries"] == 1
    with CacheClient(auth_sidecar.url, retries=0) as c:
        with pytest.raises(AuthError):
            c.stats()
        with pytest.raises(AuthError):
            c.get(NS, h(60))
        with pytest.raises(AuthError):
            c.put(NS, h(61), emb(61))
    with CacheClient(auth_sidecar.url, token="wrong", retries=0) as c:
        with pytest.raises(AuthError):
            c.exists(NS, h(60))


# ---------------------------------------------------------------- tiers


def test_eviction_to_disk_then_promotion(tmp_path):
    sc = make_sidecar(tmp_path, host_capacity_bytes=1 << 20)
    try:
        tensors = {i: emb(i, num_tokens=64, hidden=256) for i in range(24)}  # 64 KiB each
        for i, t in tensors.items():
            assert request(sc, "PUT", entry_path(i) + "?durable=1", plain_body(t))[0] == 201
        stats = sc.store.stats()
        assert stats["host"]["evictions"] > 0
        assert stats["disk"]["entries"] == 24
        assert request(sc, "HEAD", entry_path(0))[1]["x-mmcache-tier"] == "disk"

        status, hdrs, body = request(sc, "GET", entry_path(0))
        assert status == 200 and hdrs["x-mmcache-tier"] == "disk"
        assert torch.equal(read_entry(body).tensor, tensors[0])
        status, hdrs, body = request(sc, "GET", entry_path(0))
        assert status == 200 and hdrs["x-mmcache-tier"] == "host"
        assert torch.equal(read_entry(body).tensor, tensors[0])
        # every entry still readable, from wherever it is
        for i, t in tensors.items():
            status, hdrs, body = request(sc, "GET", entry_path(i))
            assert status == 200 and hdrs["x-mmcache-tier"] in ("host", "disk")
            assert torch.equal(read_entry(body).tensor, t)
        wait_until(lambda: host_leases(sc) == 0)  # NOTE: released just after the body is sent
    finally:
        sc.stop()


def test_entry_larger_than_host_tier_is_served_from_disk(tmp_path):
    sc = make_sidecar(tmp_path, host_capacity_bytes=64 << 10)
    try:
        t = emb(70, num_tokens=64, hidden=512)  # 128 KiB > the arena
        status, _, body = request(sc, "PUT", entry_path(70) + "?durable=1", plain_body(t))
        assert status == 201 and json.loads(body)["tier"] == "disk"
        status, hdrs, body = request(sc, "GET", entry_path(70))
        assert status == 200 and hdrs["x-mmcache-tier"] == "disk"
        assert torch.equal(read_entry(body).tensor, t)
        assert request(sc, "PUT", entry_path(71) + "?durable=1", plain_body(emb(71)))[0] == 201
        keys = [f"{NS}/{h(i)}" for i in (71, 70, 72)]
        status, _, body = request(sc, "POST", "/v1/batch_get", json.dumps({"keys": keys}))
        assert status == 200
        table = pa.ipc.open_stream(body).read_all()
        assert table.column("key").to_pylist() == keys[:2]
        assert table.column("tier").to_pylist() == ["host", "disk"]
        assert torch.equal(read_entry(table.column("entry")[0].as_py()).tensor, emb(71))
        assert torch.equal(read_entry(table.column("entry")[1].as_py()).tensor, t)
        wait_until(lambda: host_leases(sc) == 0)  # NOTE: released just after the body is sent
    finally:
        sc.stop()


def test_entry_larger_than_host_tier_does_not_flush_the_host_tier(tmp_path):
    sc = make_sidecar(tmp_path, host_capacity_bytes=1 << 20)
    try:
        for i in range(10):
            assert request(sc, "PUT", entry_path(i) + "?durable=1", plain_body(emb(i)))[0] == 201
        big = plain_body(emb(70, num_tokens=512, hidden=1024))  # 2 MiB > the arena
        assert request(sc, "PUT", entry_path(70) + "?durable=1", big)[0] == 201
        assert request(sc, "GET", entry_path(70))[0] == 200
        stats = sc.store.stats()["host"]
        assert stats["entries"] == 10 and stats["evictions"] == 0
    finally:
        sc.stop()


def test_client_disconnecting_mid_get_leaks_no_lease(sidecar):
    t = emb(80, num_tokens=1024, hidden=1024)  # 4 MiB: more than the socket buffers take at once
    assert request(sidecar, "PUT", entry_path(80) + "?durable=1", plain_body(t))[0] == 201
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", sidecar.port))
        s.sendall(f"GET {entry_path(80)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        s.recv(100)
        s.close()
    status, _, body = request(sidecar, "GET", entry_path(80))
    assert status == 200 and np.array_equal(read_entry(body).array, t.numpy())
    wait_until(lambda: host_leases(sidecar) == 0)


def test_durable_put_of_an_existing_entry_waits_for_disk(sidecar):
    """A durable PUT answered 200 (the key existed) still promises the entry is on disk."""
    for i in range(20):
        body = plain_body(emb(i))
        assert request(sidecar, "PUT", entry_path(f"e{i}"), body)[0] == 201  # not durable
        status, _, got = request(sidecar, "PUT", entry_path(f"e{i}") + "?durable=1", body)
        assert status == 200 and json.loads(got)["created"] is False
        assert sidecar.store.disk.contains(f"{NS}/{h(f'e{i}')}")


def test_misses_are_counted_once(sidecar):
    before = sidecar.store.stats()
    assert request(sidecar, "GET", entry_path("nothing"))[0] == 404
    after = sidecar.store.stats()
    assert after["host"]["misses"] - before["host"]["misses"] == 1
    assert after["disk"]["misses"] - before["disk"]["misses"] == 1
    assert request(sidecar, "PUT", entry_path("once") + "?durable=1", plain_body(emb(1)))[0] == 201
    assert request(sidecar, "GET", entry_path("once"))[0] == 200
    final = sidecar.store.stats()
    assert final["host"]["hits"] - after["host"]["hits"] == 1
    assert final["host"]["misses"] == after["host"]["misses"]
    assert final["disk"]["misses"] == after["disk"]["misses"]

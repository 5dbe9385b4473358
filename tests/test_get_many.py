"""``get_many``: a batch of keys leased in one round trip over ``unix://`` and
fetched with one ``POST /v1/batch_get`` over HTTP; order kept, misses None, one lease per found
key, every lease given back when the batch closes or its process dies."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import numpy as np
import pytest

from mmcache_client import AsyncCacheClient, CacheClient, Key, content_hash
from sidecar import unix_sidecar
from conftest import wait_until

NS = "many"
SPAWN = multiprocessing.get_context("spawn")


def h(name) -> str:
    return content_hash(str(name).encode())


def emb(i: int, n: int = 16) -> np.ndarray:
    a = np.full((n, 32), float(i), dtype=np.float32)
    return a


@pytest.fixture
def sidecar(tmp_path):
    with unix_sidecar(str(tmp_path / "data")) as sc:
        yield sc


def leases(sc) -> int:
    """Readers' leases (after the write-through to disk, whose own leases pin entries until then)."""
    sc.store.flush()
    s = sc.store.stats()
    return s["host"]["leases"] + s["disk"]["leases"]


@pytest.mark.parametrize("transport", ["unix", "http"])
def test_get_many_keeps_order_misses_and_repeats(sidecar, transport):
    url = sidecar.unix_url if transport == "unix" else sidecar.url
    with CacheClient(url) as c:
        for i in range(5):
            assert c.put(NS, h(i), emb(i))
        keys = [f"{NS}/{h(3)}", Key(NS, h(0)), f"{NS}/{h('missing')}", f"{NS}/{h(3)}", f"{NS}/{h(4)}"]
        with c.get_many(keys) as batch:
            assert len(batch) == 5 and batch[2] is None
            assert [float(e.array[0, 0]) for e in batch if e is not None] == [3.0, 0.0, 3.0, 4.0]
            assert batch[1].key == f"{NS}/{h(0)}"
            if transport == "unix":
                assert leases(sidecar) == 4  # one each, the repeated key twice
                assert all(e.tier == "host" for e in batch if e is not None)
        wait_until(lambda: leases(sidecar) == 0, 10, "the one-way release")
        assert batch.closed and all(e.closed for e in batch if e is not None)
        assert len(c.get_many([])) == 0


def test_get_many_over_unix_is_one_round_trip_each_way(sidecar, monkeypatch):
    from mmcache_client.local import LocalConnection

    calls = []
    real = LocalConnection.call

    def counting(self, op, **fields):
        calls.append(op)
        return real(self, op, **fields)

    with CacheClient(sidecar.unix_url) as c:
        for i in range(10):
            c.put(NS, h(i), emb(i))
        c.exists(NS, h(0))  # the connection is up
        monkeypatch.setattr(LocalConnection, "call", counting)
        with c.get_many([f"{NS}/{h(i)}" for i in range(10)]) as batch:
            assert sum(e is not None for e in batch) == 10
        assert calls == ["lease", "release"]


def test_a_disk_entry_in_a_batch_is_read_in_place_and_released(sidecar):
    big = np.random.default_rng(0).standard_normal((40_000, 64)).astype(np.float32)  # 10 MiB: over the arena
    with CacheClient(sidecar.url) as w:
        assert w.put(NS, h("big"), big)
        assert w.put(NS, h("small"), emb(1))
    with CacheClient(sidecar.unix_url) as c, c.get_many([f"{NS}/{h('big')}", f"{NS}/{h('small')}"]) as batch:
        assert batch[0].tier == "disk" and np.array_equal(batch[0].array, big)
        assert float(batch[1].array[0, 0]) == 1.0
        assert leases(sidecar) == 2
    wait_until(lambda: leases(sidecar) == 0, 10, "the one-way release")


async def test_async_get_many_over_both_transports(sidecar):
    for url in (sidecar.unix_url, sidecar.url):
        async with AsyncCacheClient(url) as c:
            for i in range(3):
                await c.put(NS, h(i), emb(i))
            async with await c.get_many([f"{NS}/{h(2)}", f"{NS}/{h('nope')}", f"{NS}/{h(0)}"]) as batch:
                assert batch[1] is None
                assert [float(batch[0].array[0, 0]), float(batch[2].array[0, 0])] == [2.0, 0.0]
            wait_until(lambda: leases(sidecar) == 0, 10, "the one-way release")


def _hold_a_batch_and_die(url: str, keys: list[str], ready) -> None:
    c = CacheClient(url)
    batch = c.get_many(keys)
    assert all(e is not None for e in batch)
    ready.set()
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_process_killed_holding_a_batch_frees_every_lease(sidecar):
    with CacheClient(sidecar.unix_url) as c:
        for i in range(6):
            c.put(NS, h(i), emb(i))
    ready = SPAWN.Event()
    p = SPAWN.Process(target=_hold_a_batch_and_die,
                      args=(sidecar.unix_url, [f"{NS}/{h(i)}" for i in range(6)], ready))
    p.start()
    assert ready.wait(60)
    p.join(60)
    assert p.exitcode == -signal.SIGKILL
    wait_until(lambda: leases(sidecar) == 0, 30, "the dead process's leases to go")
    with CacheClient(sidecar.unix_url) as c:  # and the space is usable: every entry can go
        assert all(c.delete(NS, h(i)) for i in range(6))


@pytest.mark.parametrize("transport", ["unix", "http"])
def test_lookup_detail_describes_a_hit_without_a_lease(sidecar, transport):
    url = sidecar.unix_url if transport == "unix" else sidecar.url
    big = np.random.default_rng(0).standard_normal((40_000, 64)).astype(np.float32)  # over the arena: disk
    with CacheClient(url) as c, CacheClient(sidecar.url) as w:
        assert c.put(NS, h("grid"), emb(1, n=12), extras={"image_grid_thw": np.array([[1, 6, 8]], dtype=np.int64)})
        assert w.put(NS, h("big"), big)
        keys = [f"{NS}/{h('grid')}", f"{NS}/{h('nope')}", f"{NS}/{h('big')}"]
        before = sidecar.store.stats()["host"]["hits"]
        items = c.lookup(keys, detail=True)
        assert items[keys[0]] == {"tier": "host", "num_tokens": 12, "image_grid_thw": [[1, 6, 8]]}
        assert items[keys[1]] is None
        assert items[keys[2]] == {"tier": "disk", "num_tokens": 40_000}
        assert leases(sidecar) == 0 and sidecar.store.stats()["host"]["hits"] == before  # not a client read (no lease taken)
        assert not sidecar.store.host.contains(keys[2])  # nothing promoted


def test_queued_releases_ride_on_the_next_request_and_an_idle_client_pins_nothing(sidecar, monkeypatch):
    """Releases are queued (no wake-up of the sidecar per release): the next request carries
    them in the same send, the same connection sees them done at once, and a client that goes
    idle has them sent by the flusher within milliseconds: nothing stays pinned behind it."""
    from mmcache_client import local, wire

    with CacheClient(sidecar.unix_url) as c:
        for i in range(3):
            c.put(NS, h(i), emb(i))
        wait_until(lambda: leases(sidecar) == 0, 5, "the puts' write-through")
        monkeypatch.setattr(local, "RELEASE_DELAY_S", 30.0)  # NOTE: no flusher in the way of this part
        sends: list[bytes] = []
        c._local._sock = _CountingSocket(c._local._sock, sends)
        with c.get(NS, h(0)) as e:
            assert float(e.array[0, 0]) == 0.0
        assert len(sends) == 1 and sidecar.store.stats()["host"]["leases"] == 1  # queued, not sent
        with c.get_many([f"{NS}/{h(1)}", f"{NS}/{h(2)}"]) as batch:
            assert len(sends) == 2  # the release of h(0) rode on this lease: one send
            codes = [f[8] for f in _frames(sends[1])]
            assert codes == [wire.OP_CODES["release"], wire.OP_CODES["lease"]]
            assert c.stats()["host"]["leases"] == 2  # served in order: h(0) is free
        assert len(batch) == 2
        c.stats()
    monkeypatch.undo()
    with CacheClient(sidecar.unix_url) as c:
        with c.get(NS, h(1)):
            pass
        t0 = time.monotonic()
        wait_until(lambda: leases(sidecar) == 0, 5, "the flusher to send an idle client's release")
        assert time.monotonic() - t0 < 1.0
        assert not c._local._releases


def _frames(data: bytes) -> list[bytes]:
    from mmcache_client.wire import HEAD

    out, at = [], 0
    while at < len(data):
        blen = HEAD.unpack_from(data, at)[0]
        out.append(data[at:at + HEAD.size + blen])
        at += HEAD.size + blen
    return out


def test_a_burst_of_releases_is_sent_past_the_queue_cap(sidecar):
    from mmcache_client import local

    with CacheClient(sidecar.unix_url) as c:
        c.put(NS, h(0), emb(0))
        entries = [c.get(NS, h(0)) for _ in range(local.MAX_QUEUED_RELEASES + 10)]
        for e in entries:
            e.close()
        assert c._local._queued_keys < local.MAX_QUEUED_RELEASES  # the cap sent them, no flusher needed
    wait_until(lambda: leases(sidecar) == 0, 5, "the releases")


def test_a_batch_that_fails_below_host_gives_back_its_host_leases(sidecar, monkeypatch):
    """The host hits of a batch are leased in one go; when a key below host then fails (a
    store error), every lease of the batch is given back, not only the ones already packed."""
    big = np.random.default_rng(1).standard_normal((40_000, 64)).astype(np.float32)  # only on disk
    with CacheClient(sidecar.url) as w:
        assert w.put(NS, h("big"), big)
    with CacheClient(sidecar.unix_url) as c:
        for i in range(3):
            c.put(NS, h(i), emb(i))
        wait_until(lambda: leases(sidecar) == 0, 5, "the puts' write-through")

        def broken(key, owner, promote=True):
            raise ValueError("the disk read failed")
        monkeypatch.setattr(sidecar.store, "lease", broken)
        keys = [f"{NS}/{h(0)}", f"{NS}/{h(1)}", f"{NS}/{h('big')}", f"{NS}/{h(2)}", f"{NS}/{h(0)}"]
        with pytest.raises(Exception, match="disk read failed"):
            c.get_many(keys)
        assert c.stats()["host"]["leases"] == 0
        monkeypatch.undo()
        with c.get_many(keys) as batch:  # and the connection is in step
            assert [float(e.array[0, 0]) for e in batch if e.tier == "host"] == [0.0, 1.0, 2.0, 0.0]
            assert np.array_equal(batch[2].array, big)


class _CountingSocket:
    """A socket whose ``sendall`` calls are recorded (the rest passes through)."""

    def __init__(self, sock, sends: list):
        self._sock, self._sends = sock, sends

    def sendall(self, data):
        self._sends.append(bytes(data))
        return self._sock.sendall(data)

    def __getattr__(self, name):
        return getattr(self._sock, name)


def _spilled(sc) -> tuple[list[str], dict]:
    """24 entries of 256 KiB into a sidecar with 1 MiB of host: most on disk only; their keys and tiers."""
    with CacheClient(sc.url) as c:
        for i in range(24):
            assert c.put(NS, h(i), emb(i, n=1024), durable=True)
        keys = [f"{NS}/{h(i)}" for i in range(24)]
        return keys, c.lookup(keys)


def test_get_many_over_http_without_promotion_reads_disk_in_place(tmp_path):
    """``promote=False`` (a scan: ``mmcache export``): disk entries come back whole, host's keys
    stay as they were and nothing is promoted; the default still promotes."""
    import http.client
    import json

    with unix_sidecar(str(tmp_path / "data"), host_capacity_bytes=1 << 20) as sc:
        keys, before = _spilled(sc)
        with CacheClient(sc.url) as c:
            on_disk = [k for k in keys if before[k] == "disk"]
            assert on_disk and "host" in before.values()
            with c.get_many(keys, promote=False) as entries:
                assert [float(e.array[0, 0]) for e in entries] == [float(i) for i in range(24)]
                assert {e.tier for e, k in zip(entries, keys) if k in on_disk} == {"disk"}
            assert c.lookup(keys) == before and sc.store.stats()["host"]["promotions"] == 0
            with c.get_many(on_disk[:1]) as entries:  # the default promotes as before
                assert entries[0] is not None
            assert sc.store.stats()["host"]["promotions"] == 1
        conn = http.client.HTTPConnection("127.0.0.1", sc.port, timeout=30)
        conn.request("POST", "/v1/batch_get", body=json.dumps({"keys": keys[:1], "promote": "no"}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 400 and "promote" in json.loads(resp.read())["error"]
        conn.close()


async def test_async_get_many_over_http_without_promotion(tmp_path):
    with unix_sidecar(str(tmp_path / "data"), host_capacity_bytes=1 << 20) as sc:
        keys, before = _spilled(sc)
        assert "disk" in before.values()
        async with AsyncCacheClient(sc.url) as a:
            async with await a.get_many(keys, promote=False) as entries:
                assert [float(e.array[0, 0]) for e in entries] == [float(i) for i in range(24)]
        with CacheClient(sc.url) as c:
            assert c.lookup(keys) == before and sc.store.stats()["host"]["promotions"] == 0

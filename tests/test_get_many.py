"""``get_many`` (issue 18 item 1): a batch of keys leased in one round trip over ``unix://`` and
fetched with one ``POST /v1/batch_get`` over HTTP; order kept, misses None, one lease per found
key, every lease given back when the batch closes or its process dies."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time

import numpy as np
import pytest

from mmcache.config import ServeConfig
from mmcache_client import AsyncCacheClient, CacheClient, Key, content_hash
from sidecar import ThreadedSidecar

NS = "many"
SPAWN = multiprocessing.get_context("spawn")


def h(name) -> str:
    return content_hash(str(name).encode())


def emb(i: int, n: int = 16) -> np.ndarray:
    a = np.full((n, 32), float(i), dtype=np.float32)
    return a


@pytest.fixture
def sidecar(tmp_path):
    sock_dir = f"/tmp/mmc-gm-{os.getpid()}-{random.randrange(1 << 30)}"
    os.makedirs(sock_dir)
    config = ServeConfig(data_dir=str(tmp_path / "data"), port=0, socket=os.path.join(sock_dir, "s.sock"),
                         host_capacity_bytes=8 << 20, disk_capacity_bytes=64 << 20)
    sc = ThreadedSidecar(config).start()
    sc.unix_url = f"unix://{config.socket}"
    yield sc
    sc.stop()
    os.rmdir(sock_dir)


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(2 * delay, 0.1)


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

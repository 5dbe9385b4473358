"""The Python SDK (CacheClient / AsyncCacheClient) over unix:// (zero-copy) and http:// against a
ThreadedSidecar."""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import pytest
import safetensors.torch
import torch

from mmcache_client import (AsyncCacheClient, AsyncEntry, BadRequest, CacheClient, CacheUnavailable, CorruptEntry,
                            Entry, EntryTooLarge, content_hash)
from sidecar import ThreadedSidecar, refused_port, unix_sidecar
from conftest import wait_until

NS = "client-ns"
MAX_ENTRY = 256 << 10


def h(i) -> str:
    return content_hash(f"client-test-{i}".encode())


@pytest.fixture
def sidecar(tmp_path):
    with unix_sidecar(str(tmp_path / "data"), host_capacity_bytes=16 << 20, max_entry_size_bytes=MAX_ENTRY,
                      arena_path=str(tmp_path / "arena")) as sc:
        sock = sc.config.socket
        yield sc
    assert not os.path.exists(sock), "the socket is removed on stop"
    assert not os.path.exists(tmp_path / "arena"), "the arena is unlinked on stop"


def url_of(sc: ThreadedSidecar, transport: str) -> str:
    return sc.unix_url if transport == "unix" else sc.url


def leases(sc: ThreadedSidecar) -> int:
    """Live host leases, once the disk writer's pins on fresh entries are gone."""
    sc.store.flush(30)
    return sc.store.stats()["host"]["leases"]


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "bf16": torch.randn(5, 32, generator=g).to(torch.bfloat16),
        "fp16": torch.randn(7, 24, generator=g).to(torch.float16),
        "fp32": torch.randn(3, 40, generator=g),
    }


TRANSPORTS = ["unix", "http"]


# ---------------------------------------------------------------- blocking client


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sync_roundtrip(sidecar, transport):
    with CacheClient(url_of(sidecar, transport)) as c:
        for i, (name, t) in enumerate(tensors().items()):
            assert c.put(NS, h(name), t, metadata={"model": "tiny", "dtype": name}, encode_ms=1.5) is True
            assert c.put(NS, h(name), t) is False
            with c.get(NS, h(name)) as e:
                assert isinstance(e, Entry)
                assert e.tier == "host"
                assert e.tensor.dtype == t.dtype and torch.equal(e.tensor, t)
                assert e.metadata["model"] == "tiny" and e.metadata["dtype"] == name
                assert e.metadata["namespace"] == NS and e.metadata["hash"] == h(name)
                assert e.metadata["encode_ms"] == 1.5 and isinstance(e.metadata["created_at"], float)
                assert e.names == ["embeddings"]
                if name != "bf16":
                    assert np.array_equal(e.array, t.numpy())
                else:
                    assert np.array_equal(e.array, t.view(torch.int16).numpy().view(np.uint16))

        a = np.random.default_rng(1).standard_normal((6, 16), dtype=np.float32)
        grid = torch.tensor([[1, 2, 3]], dtype=torch.int64)
        assert c.put(NS, h("np"), a, extras={"image_grid_thw": grid}) is True
        with c.get(NS, h("np")) as e:
            assert np.array_equal(e.array, a)
            assert torch.equal(e.tensor, torch.from_numpy(a))
            assert torch.equal(e.get_tensor("image_grid_thw"), grid)
            assert np.array_equal(e.get_array("image_grid_thw"), grid.numpy())
            assert set(e.names) == {"embeddings", "image_grid_thw"}

        assert c.get(NS, h("missing")) is None
        assert c.exists(NS, h("np")) and not c.exists(NS, h("missing"))
        keys = [f"{NS}/{h('np')}", f"{NS}/{h('missing')}"]
        assert c.lookup(keys) == {keys[0]: "host", keys[1]: None}
        stats = c.stats()
        assert stats["host"]["entries"] == 4 and stats["host"]["capacity_bytes"] == 16 << 20
        assert c.delete(NS, h("np")) is True
        assert c.delete(NS, h("np")) is False
        assert c.get(NS, h("np")) is None and not c.exists(NS, h("np"))
    wait_until(lambda: leases(sidecar) == 0)  # NOTE: a release is one-way


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_put_blob(sidecar, transport, tmp_path):
    t = torch.randn(4, 8)
    path = tmp_path / "entry.safetensors"
    safetensors.torch.save_file({"embeddings": t}, str(path))
    with CacheClient(url_of(sidecar, transport)) as c:
        assert c.put_blob(NS, h("blob"), path.read_bytes()) is True
        assert c.put_blob(NS, h("blob"), path.read_bytes()) is False
        with c.get(NS, h("blob")) as e:
            assert torch.equal(e.tensor, t)
            blob = bytes(e.buffer)
        # what get returns is itself a valid put_blob body (mmcache get → mmcache put)
        assert c.delete(NS, h("blob")) is True
        assert c.put_blob(NS, h("blob"), blob) is True
        with c.get(NS, h("blob")) as e:
            assert bytes(e.buffer) == blob
        with pytest.raises(BadRequest):  # its metadata names its own key
            c.put_blob(NS, h("blob2"), blob)
        with pytest.raises(BadRequest):
            c.put_blob(NS, h("blob3"), b"garbage" * 4)
        bad = safetensors.torch.save({"embeddings": t}, metadata={"namespace": "other"})
        with pytest.raises(BadRequest):
            c.put_blob(NS, h("blob3"), bad)
        assert not c.exists(NS, h("blob3"))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_durable_put(sidecar, transport):
    with CacheClient(url_of(sidecar, transport)) as c:
        assert c.put(NS, h("durable"), torch.ones(2, 4), durable=True) is True
        assert sidecar.store.disk.contains(f"{NS}/{h('durable')}")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_bad_keys_raise_value_error(sidecar, transport):
    with CacheClient(url_of(sidecar, transport)) as c:
        for ns, hh in (("bad ns", h(1)), (NS, "xyz"), (NS, h(1).upper()), ("", h(1))):
            with pytest.raises(ValueError):
                c.put(ns, hh, torch.ones(2, 2))
            with pytest.raises(ValueError):
                c.get(ns, hh)
            with pytest.raises(ValueError):
                c.exists(ns, hh)
        with pytest.raises(ValueError):
            c.lookup(["no-slash"])
        with pytest.raises(ValueError):  # embeddings must be 2-D
            c.put(NS, h(2), torch.ones(4))
        # the client still works
        assert c.put(NS, h(3), torch.ones(2, 2)) is True


def test_entry_too_large_over_http(sidecar):
    with CacheClient(sidecar.url) as c:
        big = torch.zeros(128, 1024)  # 512 KiB > MAX_ENTRY
        with pytest.raises(EntryTooLarge):
            c.put(NS, h("big"), big)
        assert not c.exists(NS, h("big"))
        assert c.put(NS, h("small"), torch.zeros(2, 2)) is True


def test_entry_larger_than_arena_over_unix(sidecar):
    with CacheClient(sidecar.unix_url) as c:
        with pytest.raises(EntryTooLarge):
            c.put(NS, h("huge"), torch.zeros(5000, 1024))  # 20 MB > the 16 MiB arena
        assert not c.exists(NS, h("huge"))
        assert sidecar.store.stats()["host"]["reservations"] == 0
        assert c.put(NS, h("small"), torch.zeros(2, 2)) is True


# ---------------------------------------------------------------- zero-copy and leases


def test_local_get_is_zero_copy(sidecar):
    t = torch.randn(16, 64)
    with CacheClient(sidecar.unix_url) as c:
        assert c.put(NS, h("zc"), t) is True
        with c.get(NS, h("zc")) as e:
            arena = c._local.arena
            lo, hi = arena.base_address, arena.base_address + arena.capacity_bytes
            arr, ten = e.array, e.tensor
            assert lo <= arr.ctypes.data and arr.ctypes.data + arr.nbytes <= hi
            assert lo <= ten.data_ptr() and ten.data_ptr() + ten.numel() * ten.element_size() <= hi
            assert arr.ctypes.data == ten.data_ptr()
            assert arr.ctypes.data % 64 == 0
            assert not arr.flags.writeable
            with pytest.raises(ValueError):
                arr[0, 0] = 1.0
            assert torch.equal(ten, t)
            del arr, ten


def test_http_get_owns_its_bytes(sidecar):
    t = torch.randn(4, 8)
    with CacheClient(sidecar.url) as c:
        c.put(NS, h("owned"), t)
        e = c.get(NS, h("owned"))
        c.delete(NS, h("owned"))
        assert torch.equal(e.tensor, t)  # no lease, no mapping: still valid
        e.close()


def test_leases_follow_entries(sidecar):
    with CacheClient(sidecar.unix_url) as c:
        c.put(NS, h("a"), torch.ones(2, 8), durable=True)
        c.put(NS, h("b"), torch.ones(2, 8), durable=True)
        wait_until(lambda: leases(sidecar) == 0)  # NOTE: a release is one-way
        with c.get(NS, h("a")) as e1:
            assert leases(sidecar) >= 1
            assert c.stats()["host"]["leases"] >= 1
            with c.get(NS, h("a")) as e2, c.get(NS, h("b")):
                assert leases(sidecar) == 3
                assert torch.equal(e1.tensor, e2.tensor)
            wait_until(lambda: leases(sidecar) == 1)  # NOTE: releases ride on the next request
            assert c.stats()["host"]["leases"] == 1  # the same connection sees its releases done at once
        wait_until(lambda: leases(sidecar) == 0)  # NOTE: a release is one-way
        e = c.get(NS, h("a"))
        e.close()
        e.close()  # idempotent: one release only
        wait_until(lambda: leases(sidecar) == 0)  # NOTE: a release is one-way


def test_closing_the_client_keeps_open_entries_until_they_close(sidecar):
    """A view is valid exactly as long as its lease: closing the client does not pull the
    connection from under an open entry; the last entry to close closes it."""
    c = CacheClient(sidecar.unix_url)
    c.put(NS, h("c"), torch.ones(2, 8), durable=True)
    entry = c.get(NS, h("c"))
    view = entry.tensor
    assert leases(sidecar) == 1
    c.close()  # the entry is still open
    assert leases(sidecar) == 1 and torch.equal(entry.tensor, torch.ones(2, 8))
    entry.close()
    wait_until(lambda: leases(sidecar) == 0)
    entry.close()  # idempotent
    del view
    wait_until(lambda: leases(sidecar) == 0)  # NOTE: a release is one-way
    # a leased entry cannot be evicted; once released it can be deleted
    with CacheClient(sidecar.unix_url) as c2:
        assert c2.delete(NS, h("c")) is True


def test_delete_while_leased_keeps_the_view_valid(sidecar):
    t = torch.randn(8, 32)
    with CacheClient(sidecar.unix_url) as c:
        c.put(NS, h("d"), t, durable=True)
        with c.get(NS, h("d")) as e:
            assert c.delete(NS, h("d")) is True
            assert not c.exists(NS, h("d"))
            assert c.put(NS, h("other"), torch.zeros(8, 32)) is True
            assert torch.equal(e.tensor, t)
        wait_until(lambda: leases(sidecar) == 0)  # NOTE: a release is one-way


def test_unix_and_http_clients_see_the_same_entries(sidecar):
    t = torch.randn(3, 8, dtype=torch.float16)
    with CacheClient(sidecar.unix_url) as u, CacheClient(sidecar.url) as w:
        assert u.put(NS, h("x"), t) is True
        assert w.put(NS, h("x"), t) is False
        with w.get(NS, h("x")) as e:
            assert torch.equal(e.tensor, t)
        assert w.put(NS, h("y"), t) is True
        with u.get(NS, h("y")) as e:
            assert torch.equal(e.tensor, t)


def _scribble(sc: ThreadedSidecar, key: str, index: int) -> None:
    """Flip one byte of a host entry in the sidecar's arena (a damaged entry)."""
    loc = sc.store.host.lease(key, "test-scribbler", count=False)
    try:
        view = sc.store.host.view(loc)
        view[index] ^= 0xFF
    finally:
        sc.store.host.release(loc)


def test_corrupt_entries_raise_corrupt_entry(sidecar):
    with CacheClient(sidecar.url) as w, CacheClient(sidecar.unix_url) as u:
        w.put(NS, h("bad-data"), torch.ones(4, 8), durable=True)
        w.put(NS, h("bad-header"), torch.ones(4, 8), durable=True)
        _scribble(sidecar, f"{NS}/{h('bad-data')}", -1)  # tensor bytes: the checksum catches it
        _scribble(sidecar, f"{NS}/{h('bad-header')}", 8)  # the JSON header's first byte
        with pytest.raises(CorruptEntry):
            w.get(NS, h("bad-data"))
        for c in (w, u):
            with pytest.raises(CorruptEntry):
                c.get(NS, h("bad-header"))
        wait_until(lambda: leases(sidecar) == 0)  # NOTE: a release is one-way


async def test_async_corrupt_entries_raise_corrupt_entry(sidecar):
    async with AsyncCacheClient(sidecar.url) as w, AsyncCacheClient(sidecar.unix_url) as u:
        await w.put(NS, h("bad-data"), torch.ones(4, 8), durable=True)
        await w.put(NS, h("bad-header"), torch.ones(4, 8), durable=True)
        _scribble(sidecar, f"{NS}/{h('bad-data')}", -1)
        _scribble(sidecar, f"{NS}/{h('bad-header')}", 8)
        with pytest.raises(CorruptEntry):
            await w.get(NS, h("bad-data"))
        for c in (w, u):
            with pytest.raises(CorruptEntry):
                await c.get(NS, h("bad-header"))
        wait_until(lambda: leases(sidecar) == 0)  # NOTE: a release is one-way


# ---------------------------------------------------------------- unreachable sidecar


def test_unavailable_unix(tmp_path):
    c = CacheClient(f"unix://{tmp_path}/nobody.sock", retries=1, backoff_s=0.01)
    with pytest.raises(CacheUnavailable):
        c.stats()
    with pytest.raises(CacheUnavailable):
        c.get(NS, h(1))
    c.close()


def test_unavailable_http():
    c = CacheClient(f"http://127.0.0.1:{refused_port()}", retries=1, backoff_s=0.01)
    with pytest.raises(CacheUnavailable):
        c.stats()
    with pytest.raises(CacheUnavailable):
        c.put(NS, h(1), torch.ones(2, 2))
    c.close()


@pytest.mark.parametrize("url", ["unix:///tmp/mmcache-test-nobody-here.sock", "http"])
async def test_unavailable_async(url):
    if url == "http":
        url = f"http://127.0.0.1:{refused_port()}"
    async with AsyncCacheClient(url, retries=1, backoff_s=0.01) as c:
        with pytest.raises(CacheUnavailable):
            await c.stats()
        with pytest.raises(CacheUnavailable):
            await c.exists(NS, h(1))


@pytest.mark.parametrize("url", ["ftp://x", "unix://", "http://", "localhost:8470", ""])
def test_bad_url(url):
    with pytest.raises(ValueError):
        CacheClient(url)
    with pytest.raises(ValueError):
        AsyncCacheClient(url)


# ---------------------------------------------------------------- async client


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_async_roundtrip(sidecar, transport):
    async with AsyncCacheClient(url_of(sidecar, transport)) as c:
        for name, t in tensors().items():
            assert await c.put(NS, h(name), t, metadata={"dtype": name}) is True
            assert await c.put(NS, h(name), t) is False
            e = await c.get(NS, h(name))
            assert isinstance(e, AsyncEntry)
            async with e:
                assert e.tier == "host"
                assert e.tensor.dtype == t.dtype and torch.equal(e.tensor, t)
                assert e.metadata["dtype"] == name and e.metadata["hash"] == h(name)

        a = np.arange(40, dtype=np.float32).reshape(5, 8)
        grid = torch.tensor([[1, 4, 4]], dtype=torch.int64)
        assert await c.put(NS, h("np"), a, extras={"image_grid_thw": grid}) is True
        async with await c.get(NS, h("np")) as e:
            assert np.array_equal(e.array, a)
            assert torch.equal(e.get_tensor("image_grid_thw"), grid)
            if transport == "unix":
                assert leases(sidecar) >= 1
                assert not e.array.flags.writeable
        assert await c.get(NS, h("missing")) is None
        assert await c.exists(NS, h("np")) and not await c.exists(NS, h("missing"))
        keys = [f"{NS}/{h('np')}", f"{NS}/{h('missing')}"]
        assert await c.lookup(keys) == {keys[0]: "host", keys[1]: None}
        assert (await c.stats())["host"]["entries"] == 4

        path_blob = safetensors.torch.save({"embeddings": torch.ones(2, 4)})
        assert await c.put_blob(NS, h("blob"), path_blob) is True
        assert await c.put_blob(NS, h("blob"), path_blob) is False
        with pytest.raises(BadRequest):
            await c.put_blob(NS, h("bad"), b"nope" * 8)
        with pytest.raises(ValueError):
            await c.get(NS, "not-a-hash")

        assert await c.delete(NS, h("np")) is True
        assert await c.delete(NS, h("np")) is False
        assert await c.get(NS, h("np")) is None
    wait_until(lambda: leases(sidecar) == 0)  # NOTE: a release is one-way


async def test_async_entry_sync_close_releases(sidecar):
    async with AsyncCacheClient(sidecar.unix_url) as c:
        await c.put(NS, h("sc"), torch.ones(2, 8), durable=True)
        e = await c.get(NS, h("sc"))
        e.close()  # not awaited: the release goes out in the background
        assert await _async_leases_become(sidecar, 0)
        with await c.get(NS, h("sc")) as e:  # a plain with-block works too
            assert torch.equal(e.tensor, torch.ones(2, 8))
        assert await _async_leases_become(sidecar, 0)


async def test_async_closing_the_client_keeps_open_entries_until_they_close(sidecar):
    c = AsyncCacheClient(sidecar.unix_url)
    await c.put(NS, h("ac"), torch.ones(2, 8), durable=True)
    e = await c.get(NS, h("ac"))
    assert leases(sidecar) == 1
    await c.close()
    assert leases(sidecar) == 1 and torch.equal(e.tensor, torch.ones(2, 8))
    await e.aclose()
    wait_until(lambda: leases(sidecar) == 0)


async def test_async_entry_too_large_over_http(sidecar):
    async with AsyncCacheClient(sidecar.url) as c:
        with pytest.raises(EntryTooLarge):
            await c.put(NS, h("big"), torch.zeros(128, 1024))
        assert await c.put(NS, h("small"), torch.zeros(2, 2)) is True


async def _async_leases_become(sc: ThreadedSidecar, want: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while leases(sc) != want:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)  # the client's clean-up runs on this loop
    return True


async def test_async_cancelled_get_does_not_poison_the_connection(sidecar):
    async with AsyncCacheClient(sidecar.unix_url) as c:
        await c.put(NS, h("za"), torch.zeros(2, 4), durable=True)
        await c.put(NS, h("ob"), torch.ones(2, 4), durable=True)
        held = await c.get(NS, h("ob"))  # an open entry keeps its lease throughout
        for ticks in range(8):
            task = asyncio.ensure_future(c.get(NS, h("za")))
            for _ in range(ticks):
                await asyncio.sleep(0)
            task.cancel()
            try:
                await (await task).aclose()  # finished before the cancel landed
            except asyncio.CancelledError:
                pass
            async with await c.get(NS, h("ob")) as e:  # answered for its own key, not the cancelled one
                assert e.key == f"{NS}/{h('ob')}" and torch.equal(e.tensor, torch.ones(2, 4))
            async with await c.get(NS, h("za")) as e:
                assert torch.equal(e.tensor, torch.zeros(2, 4))
            assert await _async_leases_become(sidecar, 1), "a cancelled get's lease is given back"
        assert torch.equal(held.tensor, torch.ones(2, 4))
        await held.aclose()
        assert await _async_leases_become(sidecar, 0)


async def test_async_cancelled_put_leaves_no_reservation(sidecar):
    async with AsyncCacheClient(sidecar.unix_url) as c:
        for ticks in range(8):
            task = asyncio.ensure_future(c.put(NS, h(f"cp{ticks}"), torch.full((4, 8), float(ticks))))
            for _ in range(ticks):
                await asyncio.sleep(0)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            assert await c.put(NS, h("after"), torch.ones(2, 2)) in (True, False)
        deadline = time.monotonic() + 10
        while sidecar.store.stats()["host"]["reservations"]:
            assert time.monotonic() < deadline, "a cancelled put's reservation is aborted"
            await asyncio.sleep(0.01)
        for ticks in range(8):  # each put either happened completely or not at all
            e = await c.get(NS, h(f"cp{ticks}"))
            if e is not None:
                async with e:
                    assert torch.equal(e.tensor, torch.full((4, 8), float(ticks)))


def test_a_timeout_keeps_the_session_and_its_leases(sidecar):
    """A slow sidecar: the call times out, open entries stay pinned, the next call is in step."""
    import threading

    from mmcache_client import CacheTimeout

    t = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    with CacheClient(url_of(sidecar, "unix"), timeout=0.3) as c:
        c.put("ns", h(1), t)
        c.put("ns", h(2), t * 2)
        entry = c.get("ns", h(1))
        unblock = threading.Event()
        real_lease = sidecar.store.lease_host_many
        # NOTE: the store is now slow (the Unix socket is served apart from the HTTP loop, so a
        # stuck loop would no longer stall it)
        sidecar.store.lease_host_many = lambda k, o: (unblock.wait(30), real_lease(k, o))[1]
        try:
            with pytest.raises(CacheTimeout):
                c.get("ns", h(2))
        finally:
            unblock.set()
            del sidecar.store.lease_host_many
        assert torch.equal(entry.tensor, t)  # still pinned: the session survived
        with c.get("ns", h(2)) as e2:  # the late answer is skipped, this one is ours
            assert torch.equal(e2.tensor, t * 2)
        assert leases(sidecar) >= 1
        entry.close()


async def test_concurrent_first_puts_share_one_local_connection(tmp_path):
    """Tasks that put at once through a fresh async client open one connection between them:
    with one each, a put's ``seal`` went on another task's connection and found no reservation."""
    with unix_sidecar(str(tmp_path)) as sc:
        async with AsyncCacheClient(sc.unix_url) as c:
            created = await asyncio.gather(*(c.put("conc", content_hash(f"c{i}".encode()),
                                                   np.full((4, 8), i, dtype=np.float32)) for i in range(16)))
        assert all(created)
        assert sc.store.stats()["host"]["entries"] == 16

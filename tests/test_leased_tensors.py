"""``CacheClient.get_tensors``: arena views that own their leases, given back when the last tensor
sharing the memory is garbage (for holders that pop rather than close, such as vLLM's encoder
cache)."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

from mmcache_client import CacheClient, CacheFull, content_hash
from sidecar import settled, unix_sidecar

NS = "leased"


def _leases(sc) -> int:
    return sc.store.stats()["host"]["leases"]


def _quiet(sc) -> None:
    """The write-down to disk holds a lease per new entry for a moment: wait it out."""
    sc.store.flush(30)
    assert settled(lambda: _leases(sc) == 0)


@pytest.fixture
def sidecar(tmp_path):
    with unix_sidecar(str(tmp_path)) as sc:
        yield sc


def _value(rows: int, cols: int, i: int) -> torch.Tensor:
    """Small integers: exact in bf16 too."""
    return (torch.arange(rows * cols, dtype=torch.float32) % 128).view(rows, cols) + i


def _put(client, n: int, rows: int = 16, cols: int = 32, dtype=torch.bfloat16) -> list[str]:
    keys = []
    for i in range(n):
        h = content_hash(f"img-{i}-{rows}".encode())
        client.put(NS, h, _value(rows, cols, i).to(dtype))
        keys.append(f"{NS}/{h}")
    return keys


@pytest.mark.parametrize("holder", ["storage", "numpy"])
def test_views_hold_their_lease_until_the_last_reference_goes(sidecar, holder, monkeypatch):
    """Both ways a lease is tied to the memory: a finalizer on the tensor's storage (this torch)
    or on a numpy array of the bytes (a torch without one Python object per storage)."""
    from mmcache_client import leased_tensors

    assert leased_tensors._storage_lives_with_its_views()
    monkeypatch.setattr(leased_tensors, "_STORAGE_CHECK", [holder == "storage"])
    with CacheClient(sidecar.unix_url) as c:
        keys = _put(c, 3)
        _quiet(sidecar)
        missing = f"{NS}/{content_hash(b'nope')}"
        tensors = c.get_tensors([keys[0], missing, keys[1], keys[2]])
        assert tensors[1] is None
        assert tensors[0].dtype == torch.bfloat16 and tensors[0].shape == (16, 32)
        assert torch.equal(tensors[2].float(), _value(16, 32, 1))
        base = c._local.arena.base_address
        assert base <= tensors[0].data_ptr() < base + c._local.arena.capacity_bytes  # a view, not a copy
        assert _leases(sidecar) == 3
        cache = {k: t for k, t in zip(keys, [tensors[0], tensors[2], tensors[3]])}
        del tensors
        piece = cache[keys[0]][2:5]  # a slice outlives the tensor it was cut from
        cache.pop(keys[0])
        cache.pop(keys[1])
        gc.collect()
        assert settled(lambda: _leases(sidecar) == 2)
        assert torch.equal(piece.float(), _value(16, 32, 0)[2:5])
        del piece
        assert settled(lambda: _leases(sidecar) == 1)
        cache.clear()
        assert settled(lambda: _leases(sidecar) == 0)


def test_a_leased_view_blocks_eviction_and_its_release_frees_room(sidecar):
    """8 MiB of host: a tensor that still lives keeps its entry; once dropped, room comes back."""
    with CacheClient(sidecar.unix_url) as c:
        big = [f"{NS}/{content_hash(f'big-{i}'.encode())}" for i in range(3)]
        for k in big:
            c.put(NS, k.split("/")[1], torch.ones(1024, 1024, dtype=torch.bfloat16))  # 2 MiB each
        _quiet(sidecar)
        held = c.get_tensors(big)
        with pytest.raises(CacheFull):
            for i in range(4):
                c.put(NS, content_hash(f"more-{i}".encode()), torch.ones(1024, 1024, dtype=torch.bfloat16))
        assert all(torch.equal(t, torch.ones(1024, 1024, dtype=torch.bfloat16)) for t in held)
        del held
        assert settled(lambda: _leases(sidecar) == 0)
        c.put(NS, content_hash(b"fits-now"), torch.ones(1024, 1024, dtype=torch.bfloat16))


def test_release_from_another_thread_and_from_inside_a_call(sidecar):
    """A finalizer may run on any thread; it takes no lock, so none can deadlock."""
    with CacheClient(sidecar.unix_url) as c:
        keys = _put(c, 8)
        _quiet(sidecar)
        tensors = c.get_tensors(keys)
        box = [tensors[:4]]
        del tensors[:4]
        t = threading.Thread(target=box.clear)
        t.start()
        t.join(10)
        assert not t.is_alive()
        c._local.state  # the connection is in use below while the rest are dropped
        del tensors
        assert c.exists(NS, keys[0].split("/")[1])
        assert settled(lambda: _leases(sidecar) == 0)


def test_http_gives_owned_copies(sidecar):
    with CacheClient(sidecar.url) as c:
        keys = _put(c, 2, dtype=torch.float32)
        a, b = c.get_tensors(keys)
        assert torch.equal(b, _value(16, 32, 1))
        assert c.get_tensors([]) == []


def test_a_closed_client_keeps_the_views_readable_until_they_go(sidecar):
    c = CacheClient(sidecar.unix_url)
    keys = _put(c, 1, dtype=torch.float32)
    _quiet(sidecar)
    (t,) = c.get_tensors(keys)
    c.close()  # detached: the connection stays open for the live view
    assert t[0, 1].item() == 1.0 and torch.equal(t, _value(16, 32, 0))
    assert _leases(sidecar) == 1
    del t
    assert settled(lambda: _leases(sidecar) == 0)


@pytest.mark.gpu
def test_device_tensors_are_copies_of_their_own_on_the_gpu(sidecar):
    """``device=``: the SDK's pinned-arena copy path (a view of a device tier would be cloned);
    no host lease outlives the call."""
    with CacheClient(sidecar.unix_url) as c:
        keys = _put(c, 2, dtype=torch.float16)
        _quiet(sidecar)
        a, b = c.get_tensors(keys, device="cuda")
        assert a.is_cuda and torch.equal(b.cpu().float(), _value(16, 32, 1))
        assert _leases(sidecar) == 0


def test_an_entry_deleted_between_its_disk_lease_and_the_read_is_a_miss(sidecar):
    """A delete does not wait for disk leases: a reader whose LMDB read comes after it finds
    nothing, and that is a miss (it was a ``CorruptEntry``, which failed a churn test once)."""
    from mmcache_client import EntryBatch, Entry, core
    from mmcache_client.client import _sync_release

    with CacheClient(sidecar.unix_url) as c:
        conn = c._connect()
        keys = []
        for name in (b"single", b"batch"):
            h = content_hash(b"on-disk-only-" + name)
            c.put(NS, h, torch.ones(4, 8), durable=True)
            sidecar.store.host.delete(f"{NS}/{h}")  # NOTE: now on disk only: a scan leases it in place
            keys.append(f"{NS}/{h}")
        locs = conn.lease(keys, "scan")
        assert all(loc is not None and loc.offset < 0 for loc in locs)
        for key in keys:
            assert c.delete(*key.split("/"))
        sidecar.store.flush(30)  # NOTE: the deletes committed to LMDB, as the churn had them
        assert c._entry(conn, keys[0], locs[0]) is None
        with core.local_batch(conn, keys[1:], locs[1:], EntryBatch, Entry, _sync_release) as batch:
            assert list(batch) == [None]
        assert conn.lease(keys, "scan") == [None, None]  # and fresh leases agree

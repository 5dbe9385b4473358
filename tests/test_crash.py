"""kill -9 of the sidecar mid-stream: durable entries survive, nothing corrupt is served, the
stale arena is cleaned up, and one data dir never gets two sidecars."""

from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest

from mmcache.core.data_dir import DataDirInUse
from mmcache.core.store import StoreConfig
from mmcache.tiers.wiring import open_store
from mmcache_client import CacheClient, CacheUnavailable, content_hash
from mmcache_client.format import read_entry
from sidecar import SidecarProcess

NS = "crash"


def _emb(i: int) -> np.ndarray:
    a = np.random.default_rng(i).standard_normal((128, 256), dtype=np.float32)
    a[:, 0] = i
    return a


def test_kill_9_mid_stream_keeps_every_durable_entry(tmp_path):
    data = str(tmp_path / "data")
    args = ["--data-dir", data, "--host-capacity", "16MiB", "--disk-capacity", "256MiB"]
    sc = SidecarProcess(*args).start()
    durable, acked, stop = [], [], threading.Event()

    def stream():  # non-durable puts keep the disk writer busy while we kill
        with CacheClient(sc.url, retries=0) as c:
            i = 10_000
            while not stop.is_set():
                try:
                    c.put(NS, content_hash(str(i).encode()), _emb(i))
                except CacheUnavailable:
                    return
                acked.append(i)
                i += 1

    with CacheClient(sc.url) as c:
        for i in range(30):
            assert c.put(NS, content_hash(str(i).encode()), _emb(i), durable=True)
            durable.append(i)
    t = threading.Thread(target=stream)
    t.start()
    while len(acked) < 50:  # the stream is running; bounded by the sidecar's pace
        if not t.is_alive():
            break
        t.join(0.01)
    arena = next(iter(open(os.path.join(data, "arena.path")).read().split()), None)
    assert sc.stop(signal.SIGKILL) == -signal.SIGKILL
    stop.set()
    t.join(30)
    assert arena and os.path.exists(arena)  # kill -9 leaves the arena behind ...

    sc2 = SidecarProcess(*args).start()
    try:
        assert not os.path.exists(arena)  # ... and the next sidecar on the data dir removes it
        with CacheClient(sc2.url) as c:
            for i in durable:
                with c.get(NS, content_hash(str(i).encode())) as e:
                    assert e.tier == "disk" and np.array_equal(e.array, _emb(i))
            stats = c.stats()["disk"]
            assert stats["corrupt"] == 0
            found = 0
            for i in acked:  # acknowledged but not durable: present and valid, or absent
                e = c.get(NS, content_hash(str(i).encode()))
                if e is not None:
                    with e:
                        assert np.array_equal(e.array, _emb(i))
                        found += 1
            assert stats["entries"] == len(durable) + found
    finally:
        sc2.stop()


def test_one_data_dir_one_store(tmp_path):
    cfg = StoreConfig(data_dir=str(tmp_path), host_capacity_bytes=1 << 20, disk_capacity_bytes=8 << 20,
                      arena_path=str(tmp_path / "a1"))
    first = open_store(cfg)
    try:
        with pytest.raises(DataDirInUse, match="in use"):
            open_store(StoreConfig(data_dir=str(tmp_path), host_capacity_bytes=1 << 20,
                                    disk_capacity_bytes=8 << 20, arena_path=str(tmp_path / "a2")))
    finally:
        first.close()
    assert not (tmp_path / "a1").exists()
    second = open_store(cfg)  # the lock went with the first store
    second.close()


def test_entries_read_back_from_lmdb_directly_are_all_valid(tmp_path):
    """After a clean restart every record in LMDB verifies (a direct look, not through the tier)."""
    import lmdb

    cfg = StoreConfig(data_dir=str(tmp_path), host_capacity_bytes=1 << 20, disk_capacity_bytes=8 << 20)
    store = open_store(cfg)
    for i in range(20):
        store.put(f"{NS}/{content_hash(str(i).encode())}", {"embeddings": _emb(i)})
    store.close()
    env = lmdb.open(str(tmp_path / "lmdb"), readonly=True, lock=False)
    with env.begin(buffers=True) as txn:
        records = [(bytes(k).decode(), read_entry(v).array[0, 0]) for k, v in txn.cursor()]
    env.close()
    assert sorted(int(v) for _, v in records) == list(range(20))

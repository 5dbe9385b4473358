"""The LMDB disk tier: write-behind puts, reopen, eviction, corruption, concurrency, kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import lmdb
import numpy as np
import pytest
import torch

from mmcache.core.tier import PutStatus
from mmcache.tiers.disk import DiskTier, DiskTierConfig
from mmcache.core.policies import POLICIES
from entries import encode_entry
from mmcache_client.format import read_entry

NS = "test-ns"


def key_of(i: int) -> str:
    return f"{NS}/{i:064x}"


def blob_of(i: int, num_tokens: int = 4, hidden: int = 8, encode_ms: float = 1.0) -> bytes:
    emb = torch.arange(num_tokens * hidden, dtype=torch.float32).reshape(num_tokens, hidden) + i
    return encode_entry(NS, f"{i:064x}", {"embeddings": emb}, encode_ms=encode_ms)


def open_tier(path, **kw) -> DiskTier:
    kw.setdefault("capacity_bytes", 1 << 20)
    return DiskTier(DiskTierConfig(path=str(path), **kw))


@pytest.fixture
def tier(tmp_path):
    t = open_tier(tmp_path / "db")
    yield t
    t.close()


def flip_bit(blob: bytes, offset: int) -> bytes:
    b = bytearray(blob)
    b[offset] ^= 0x01
    return bytes(b)


def raw_put(path, key: str, value: bytes) -> None:
    """Write a record behind the tier's back (the tier must be closed: one env per process)."""
    env = lmdb.open(str(path), map_size=1 << 30, subdir=True)
    with env.begin(write=True) as txn:
        txn.put(key.encode(), value)
    env.close()


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("field,value", [("capacity_bytes", 0), ("capacity_bytes", -1), ("policy", "mru"),
                                         ("max_readers", 0), ("batch_max_entries", 0),
                                         ("flush_interval_ms", -1.0), ("map_size_bytes", 0)])
def test_config_rejects_bad_values(tmp_path, field, value):
    kw = dict(path=str(tmp_path), capacity_bytes=1024)
    kw[field] = value
    with pytest.raises(ValueError, match=field):
        DiskTierConfig(**kw)


def test_default_map_size_is_large_up_front(tmp_path):
    cfg = DiskTierConfig(path=str(tmp_path), capacity_bytes=10 << 30)
    assert cfg.resolved_map_size_bytes >= 2 * cfg.capacity_bytes


# ------------------------------------------------------------------ put / view


def test_put_then_view_round_trips(tier):
    blob = blob_of(1)
    assert not tier.contains(key_of(1))
    assert tier.put(key_of(1), blob, cost_ms=3.0).result(timeout=5) is PutStatus.CREATED
    assert tier.contains(key_of(1))
    with tier.view(key_of(1)) as entry:
        assert entry is not None
        assert bytes(entry.buffer) == blob
        assert torch.equal(entry.tensor, read_entry(blob).tensor)
        assert entry.metadata["hash"] == f"{1:064x}"
    assert tier.get_bytes(key_of(1)) == blob
    s = tier.stats()
    assert (s["entries"], s["bytes"], s["hits"], s["misses"], s["pending_writes"]) == (1, len(blob), 2, 0, 0)


def test_second_put_keeps_the_first(tier):
    first = blob_of(1, encode_ms=1.0)
    second = blob_of(1, encode_ms=2.0)
    assert first != second
    assert tier.put(key_of(1), first).result(timeout=5) is PutStatus.CREATED
    assert tier.put(key_of(1), second).result(timeout=5) is PutStatus.EXISTS
    assert tier.get_bytes(key_of(1)) == first


def test_duplicate_puts_in_one_batch_first_wins(tier):
    first, second = blob_of(1, encode_ms=1.0), blob_of(1, encode_ms=2.0)
    futures = [tier.put(key_of(1), first), tier.put(key_of(1), second)]
    assert [f.result(timeout=5) for f in futures] == [PutStatus.CREATED, PutStatus.EXISTS]
    assert tier.get_bytes(key_of(1)) == first


def test_miss_is_none(tier):
    with tier.view(key_of(9)) as entry:
        assert entry is None
    assert tier.get_bytes(key_of(9)) is None
    assert tier.stats()["misses"] == 2


def test_put_accepts_a_memoryview_without_copy(tier):
    shared = bytearray(blob_of(2))
    assert tier.put(key_of(2), memoryview(shared)).result(timeout=5) is PutStatus.CREATED
    assert tier.get_bytes(key_of(2)) == bytes(shared)


def test_put_rejects_malformed_key_and_cost(tier):
    with pytest.raises(ValueError):
        tier.put("no-slash", blob_of(1))
    with pytest.raises(ValueError, match="cost_ms"):
        tier.put(key_of(1), blob_of(1), cost_ms=-1.0)
    assert tier.stats()["pending_writes"] == 0


def test_view_after_close_raises(tmp_path):
    t = open_tier(tmp_path / "db")
    t.close()
    with pytest.raises(RuntimeError, match="closed"):
        with t.view(key_of(1)):
            pass


def test_delete(tier):
    tier.put(key_of(1), blob_of(1))
    assert tier.delete(key_of(1)) is True  # ordered after the queued put
    assert not tier.contains(key_of(1))
    assert tier.delete(key_of(1)) is False
    assert tier.stats()["bytes"] == 0
    assert tier.put(key_of(1), blob_of(1)).result(timeout=5) is PutStatus.CREATED  # can be put again


def test_view_stays_valid_while_the_entry_is_deleted(tier):
    """A view is an LMDB snapshot: a delete committed meanwhile does not pull it away."""
    tier.put(key_of(1), blob_of(1)).result(timeout=5)
    with tier.view(key_of(1)) as entry:
        assert tier.delete(key_of(1)) is True
        assert torch.equal(entry.tensor, read_entry(blob_of(1)).tensor)
    with tier.view(key_of(1)) as entry:
        assert entry is None


def test_flush_waits_for_queued_puts(tier):
    futures = [tier.put(key_of(i), blob_of(i)) for i in range(50)]
    tier.flush(timeout=5)
    assert all(f.done() and f.result() for f in futures)
    assert tier.stats()["entries"] == 50 and tier.stats()["pending_writes"] == 0


def test_close_is_idempotent_and_commits_the_queue(tmp_path):
    t = open_tier(tmp_path / "db")
    futures = [t.put(key_of(i), blob_of(i)) for i in range(10)]
    t.close()
    t.close()
    assert all(f.result(timeout=0) for f in futures)
    with pytest.raises(RuntimeError):
        t.put(key_of(99), blob_of(99))


# ------------------------------------------------------------------ reopen


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_reopen_rebuilds_the_index(tmp_path, policy):
    blobs = {key_of(i): blob_of(i, encode_ms=float(i)) for i in range(20)}
    with open_tier(tmp_path / "db", policy=policy) as t:
        for k, b in blobs.items():
            t.put(k, b)
    with open_tier(tmp_path / "db", policy=policy) as t:
        s = t.stats()
        assert s["entries"] == 20 and s["bytes"] == sum(map(len, blobs.values()))
        assert sorted(t.keys()) == sorted(blobs)
        for k, b in blobs.items():
            assert t.get_bytes(k) == b
        assert len(t.state.policy) == 20 and t.state.policy.total_bytes == s["bytes"]


def test_reopen_with_smaller_capacity_trims(tmp_path):
    size = len(blob_of(0))
    with open_tier(tmp_path / "db") as t:
        for i in range(10):
            t.put(key_of(i), blob_of(i))
    with open_tier(tmp_path / "db", capacity_bytes=3 * size) as t:
        t.flush(timeout=5)
        assert t.stats()["bytes"] <= 3 * size
        assert sorted(t.keys()) == [key_of(i) for i in (7, 8, 9)]  # created_at order = LRU order


# ------------------------------------------------------------------ eviction


def test_lru_evicts_the_least_recently_viewed(tmp_path):
    size = len(blob_of(0))
    with open_tier(tmp_path / "db", capacity_bytes=3 * size + size // 2) as t:
        for i in range(3):
            assert t.put(key_of(i), blob_of(i)).result(timeout=5)
        with t.view(key_of(0)) as e:  # 0 is now more recent than 1 and 2
            assert e is not None
        assert t.put(key_of(3), blob_of(3)).result(timeout=5)
        assert sorted(t.keys()) == [key_of(0), key_of(2), key_of(3)]
        assert t.stats()["evictions"] == 1
        for i in range(4, 20):
            t.put(key_of(i), blob_of(i))
        t.flush(timeout=5)
        s = t.stats()
        assert s["bytes"] <= s["capacity_bytes"] and s["entries"] == 3 and s["evictions"] == 17
    with open_tier(tmp_path / "db") as t:  # evictions reached LMDB, not just the index
        assert t.stats()["entries"] == 3


def test_batch_larger_than_capacity_is_split(tmp_path):
    size = len(blob_of(0))
    with open_tier(tmp_path / "db", capacity_bytes=2 * size, flush_interval_ms=50.0) as t:
        futures = [t.put(key_of(i), blob_of(i)) for i in range(7)]
        assert all(f.result(timeout=5) for f in futures)
        assert sorted(t.keys()) == [key_of(5), key_of(6)]


def test_oversize_entry_is_rejected(tier):
    big = blob_of(1, num_tokens=1024, hidden=512)  # 2 MiB > 1 MiB capacity
    assert tier.put(key_of(1), big).result(timeout=5) is PutStatus.TOO_LARGE
    assert tier.stats()["too_large"] == 1
    assert not tier.contains(key_of(1)) and tier.stats()["pending_writes"] == 0


def test_map_full_evicts_and_retries(tmp_path):
    with open_tier(tmp_path / "db", capacity_bytes=64 << 20, map_size_bytes=1 << 20) as t:
        for i in range(40):  # ~64 KiB each: the 1 MiB map fills long before the capacity
            assert t.put(key_of(i), blob_of(i, num_tokens=64, hidden=256)).result(timeout=5) is PutStatus.CREATED
        s = t.stats()
        assert s["evictions"] > 0 and key_of(39) in t.keys()


def test_map_full_fails_the_future_not_hangs(tmp_path):
    with open_tier(tmp_path / "db", capacity_bytes=64 << 20, map_size_bytes=1 << 20) as t:
        with pytest.raises(lmdb.MapFullError):
            t.put(key_of(1), blob_of(1, num_tokens=1024, hidden=512)).result(timeout=5)
        assert t.put(key_of(2), blob_of(2)).result(timeout=5) is PutStatus.CREATED  # still usable


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_keeps_bytes_under_capacity(tmp_path, policy):
    size = len(blob_of(0))
    with open_tier(tmp_path / "db", capacity_bytes=5 * size, policy=policy) as t:
        futures = [t.put(key_of(i), blob_of(i), cost_ms=float(i % 7)) for i in range(30)]
        assert all(f.result(timeout=5) for f in futures)
        s = t.stats()
        assert s["entries"] == 5 and s["bytes"] <= s["capacity_bytes"] and s["evictions"] == 25


def test_failed_batch_fails_its_futures(tier, monkeypatch):
    def boom(ops):
        raise OSError("disk on fire")

    monkeypatch.setattr(tier._writer, "_try_commit", boom)
    with pytest.raises(OSError, match="on fire"):
        tier.put(key_of(1), blob_of(1)).result(timeout=5)
    assert tier.stats()["pending_writes"] == 0 and not tier.contains(key_of(1))
    monkeypatch.undo()
    assert tier.put(key_of(1), blob_of(1)).result(timeout=5) is PutStatus.CREATED


# ------------------------------------------------------------------ corruption


def test_bit_flipped_entry_is_a_miss_and_deleted(tmp_path):
    blob, other = blob_of(1), blob_of(2)
    with open_tier(tmp_path / "db") as t:
        t.put(key_of(1), blob).result(timeout=5)
        t.put(key_of(2), other).result(timeout=5)
    raw_put(tmp_path / "db", key_of(1), flip_bit(blob, len(blob) - 3))  # data bit: header still parses
    with open_tier(tmp_path / "db") as t:
        assert t.contains(key_of(1))
        with t.view(key_of(1)) as entry:
            assert entry is None
        t.flush(timeout=5)
        assert not t.contains(key_of(1))
        s = t.stats()
        assert (s["corrupt"], s["hits"], s["entries"]) == (1, 0, 1)
        assert t.get_bytes(key_of(2)) == other
    env = lmdb.open(str(tmp_path / "db"), subdir=True)
    with env.begin() as txn:
        assert txn.get(key_of(1).encode()) is None
    env.close()


@pytest.mark.parametrize("value", [b"not safetensors at all", b"", b"\xff" * 8 + b"{}"])
def test_garbage_value_is_deleted_at_open(tmp_path, value):
    with open_tier(tmp_path / "db") as t:
        t.put(key_of(2), blob_of(2)).result(timeout=5)
    raw_put(tmp_path / "db", key_of(1), value)
    raw_put(tmp_path / "db", key_of(3), blob_of(4))  # a valid entry under the wrong key
    with open_tier(tmp_path / "db") as t:
        assert t.keys() == [key_of(2)] and t.stats()["corrupt"] == 2
        assert t.get_bytes(key_of(1)) is None and t.get_bytes(key_of(3)) is None
        t.flush(timeout=5)
    env = lmdb.open(str(tmp_path / "db"), subdir=True)
    with env.begin() as txn:
        assert [bytes(k) for k, _ in txn.cursor()] == [key_of(2).encode()]
    env.close()


def test_corruption_while_open_is_detected_at_read(tier):
    """Rewrite a committed record under the running tier (stands in for bit rot)."""
    blob = blob_of(1)
    tier.put(key_of(1), blob).result(timeout=5)
    for value in (flip_bit(blob, len(blob) - 1), b"garbage"):
        with tier._env.begin(write=True) as txn:
            txn.put(key_of(1).encode(), value)
        with tier.view(key_of(1)) as entry:
            assert entry is None
        tier.flush(timeout=5)
        assert not tier.contains(key_of(1))
        tier.put(key_of(1), blob).result(timeout=5)
    assert tier.stats()["corrupt"] == 2
    assert tier.get_bytes(key_of(1)) == blob


# ------------------------------------------------------------------ concurrency


def test_readers_while_the_writer_commits_and_evicts(tmp_path):
    size = len(blob_of(0))
    expected = {i: read_entry(blob_of(i)).array.copy() for i in range(200)}
    errors: list[BaseException] = []
    stop = threading.Event()
    with open_tier(tmp_path / "db", capacity_bytes=40 * size, batch_max_entries=8) as t:
        for i in range(20):
            t.put(key_of(i), blob_of(i))
        t.flush(timeout=5)

        def reader(seed: int) -> None:
            rng = np.random.default_rng(seed)
            try:
                while not stop.is_set():
                    i = int(rng.integers(0, 200))
                    with t.view(key_of(i)) as entry:
                        if entry is not None:
                            np.testing.assert_array_equal(entry.array, expected[i])
            except BaseException as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=reader, args=(s,)) for s in range(6)]
        for th in threads:
            th.start()
        futures = [t.put(key_of(i), blob_of(i)) for i in range(20, 200)]
        results = [f.result(timeout=10) for f in futures]
        stop.set()
        for th in threads:
            th.join(timeout=10)
        assert not errors, errors
        assert all(results)
        s = t.stats()
        assert s["bytes"] <= s["capacity_bytes"] and s["corrupt"] == 0 and s["hits"] > 0


# ------------------------------------------------------------------ crash


CHILD = textwrap.dedent("""
    import sys, torch
    from mmcache.tiers.disk import DiskTier, DiskTierConfig
    from mmcache.core.tier import PutStatus
    from mmcache_client.format import plan_entry
    tier = DiskTier(DiskTierConfig(path=sys.argv[1], capacity_bytes=1 << 30, batch_max_entries=16))
    i = 0
    while True:
        batch = []
        for _ in range(16):
            h = f"{i:064x}"
            blob = plan_entry("crash", h, {"embeddings": torch.full((64, 256), float(i))}).to_bytes()
            batch.append((f"crash/{h}", blob, tier.put(f"crash/{h}", blob)))
            i += 1
        for key, blob, fut in batch:
            assert fut.result() is PutStatus.CREATED
            sys.stdout.write(key + "\\n")
            sys.stdout.flush()
""")


def test_kill_9_loses_only_unacknowledged_puts(tmp_path):
    path = str(tmp_path / "db")
    child = subprocess.Popen([sys.executable, "-c", CHILD, path], stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(30, child.kill)
    watchdog.start()
    acked = []
    try:
        while len(acked) < 100:
            line = child.stdout.readline()
            assert line, f"child exited early with {child.wait()}"
            acked.append(line.strip())
        os.kill(child.pid, signal.SIGKILL)  # mid-stream: writes are still in flight
        child.wait()
    finally:
        watchdog.cancel()
        child.kill()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL

    env = lmdb.open(path, subdir=True)  # every record on disk is a whole, valid entry
    with env.begin() as txn:
        on_disk = {bytes(k).decode(): bytes(v) for k, v in txn.cursor()}
    env.close()
    for key, value in on_disk.items():
        entry = read_entry(value)
        assert f"crash/{entry.metadata['hash']}" == key
    with open_tier(path, capacity_bytes=1 << 30) as t:
        assert set(acked) <= set(t.keys())
        for key in acked:
            with t.view(key) as entry:
                assert entry is not None
                assert entry.tensor[0, 0].item() == float(int(key.split("/")[1], 16))
        assert t.stats()["corrupt"] == 0 and t.stats()["entries"] == len(on_disk)

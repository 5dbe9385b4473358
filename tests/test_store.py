"""The host tier's accounting and the tiered store: visibility, leases, eviction, promotion,
write-back, durability across restarts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmcache.core.tier import EntryExists
from mmcache.tiers.host import HostTier
from mmcache.core.tier import PutStatus
from mmcache.core.store import StoreConfig
from mmcache.tiers.wiring import open_store
from mmcache_client import Key, content_hash
from mmcache_client.format import plan_entry, read_entry

NS = "ns"


def key(i: int) -> str:
    return f"{NS}/{content_hash(str(i).encode())}"


def blob_plan(i: int, num_tokens: int = 64, hidden: int = 32, encode_ms: float = 1.0):
    k = Key.from_string(key(i))
    emb = np.full((num_tokens, hidden), i, dtype=np.float32)
    return plan_entry(k.namespace, k.hash, {"embeddings": emb}, encode_ms=encode_ms)


@pytest.fixture
def host(tmp_path):
    h = HostTier(str(tmp_path / "arena"), 64 << 10, alignment=256)
    yield h
    h.close()


def fill(host: HostTier, i: int, owner="w", num_tokens=64) -> str:
    plan = blob_plan(i, num_tokens)
    res = host.reserve(key(i), plan.total_bytes, owner, 1.0)
    assert not isinstance(res, PutStatus)
    plan.write_into(host.buffer(res))
    host.seal(res)
    return key(i)


# ---------------------------------------------------------------- host tier

def test_unsealed_entries_are_invisible(host):
    plan = blob_plan(1)
    res = host.reserve(key(1), plan.total_bytes, "w")
    assert not host.contains(key(1)) and host.lease(key(1), "r") is None
    with pytest.raises(EntryExists):
        host.reserve(key(1), 100, "other")
    plan.write_into(host.buffer(res))
    host.seal(res)
    loc = host.lease(key(1), "r")
    assert read_entry(host.view(loc)).array[0, 0] == 1
    host.release_key(key(1), "r")
    with pytest.raises(EntryExists):
        host.reserve(key(1), 100, "other")


def test_eviction_skips_leased_entries_and_reports_no_space(host):
    keys = [fill(host, i) for i in range(7)]  # ~8.5 KiB each in 64 KiB
    for k in keys:
        assert host.lease(k, "reader") is not None
    assert host.reserve(key(100), 40 << 10, "w") is PutStatus.NO_SPACE  # all leased: an answer, not an error
    host.release_owner("reader")
    res = host.reserve(key(100), 40 << 10, "w")
    assert not isinstance(res, PutStatus) and host.evictions >= 4
    assert all(host.contains(k) for k in keys[host.evictions:])  # LRU: oldest went first


def test_delete_while_leased_frees_space_at_last_release(host):
    k = fill(host, 1)
    used = host.allocator.used_bytes
    host.lease(k, "a")
    host.lease(k, "b")
    assert host.delete(k) and not host.contains(k)
    assert host.lease(k, "c") is None
    assert host.allocator.used_bytes == used  # bytes still pinned by a and b
    host.release_key(k, "a")
    assert host.allocator.used_bytes == used
    host.release_owner("b")
    assert host.allocator.used_bytes == 0


def test_release_owner_drops_reservations_and_leases(host):
    fill(host, 1)
    host.lease(key(1), "dead")
    host.lease(key(1), "dead")
    host.reserve(key(2), 1000, "dead")
    assert host.release_owner("dead") == 3
    s = host.stats()
    assert s["leases"] == 0 and s["reservations"] == 0 and s["entries"] == 1


def test_abort_and_seal_reject_foreign_reservations(host):
    plan = blob_plan(1)
    res = host.reserve(key(1), plan.total_bytes, "w")
    host.abort(res)
    assert host.allocator.used_bytes == 0
    with pytest.raises(ValueError):
        host.seal(res)
    with pytest.raises(ValueError):
        host.reserve(key(2), 0, "w")


# ---------------------------------------------------------------- tiered store

@pytest.fixture
def make_store(tmp_path):
    stores = []

    def make(host_bytes=64 << 10, disk_bytes=1 << 20, **kw):
        s = open_store(StoreConfig(data_dir=str(tmp_path / "data"), host_capacity_bytes=host_bytes,
                                    disk_capacity_bytes=disk_bytes, arena_path=str(tmp_path / f"arena{len(stores)}"), **kw))
        stores.append(s)
        return s
    yield make
    for s in stores:
        s.close()


def test_put_get_and_second_put_keeps_the_first(make_store):
    store = make_store()
    t = torch.randn(16, 8).to(torch.bfloat16)
    assert store.put(key(1), {"embeddings": t}, encode_ms=5).created
    again = store.put(key(1), {"embeddings": torch.zeros(16, 8, dtype=torch.bfloat16)})
    assert not again.created
    with store.get(key(1)) as e:
        assert torch.equal(e.tensor, t) and e.metadata["encode_ms"] == "5.000"
    with store.get(key(2)) as e:
        assert e is None


def test_eviction_writes_back_what_disk_dropped(make_store):
    store = make_store(disk_bytes=20 << 10)  # disk holds only ~2 entries: it evicts too
    for i in range(12):
        store.put_plan(key(i), blob_plan(i))
    store.flush()
    s = store.stats()
    assert s["host"]["evictions"] > 0 and s["disk"]["evictions"] > 0
    assert s["disk"]["write_backs"] > 0  # host evictions of entries disk had dropped
    assert s["disk"]["persist_errors"] == 0


def test_host_evicts_clean_entries_and_a_disk_hit_is_promoted(make_store):
    store = make_store()  # disk holds everything: host evictions need no write-back
    for i in range(12):
        store.put_plan(key(i), blob_plan(i))
    store.flush()
    s = store.stats()
    assert s["host"]["evictions"] > 0 and s["disk"]["write_backs"] == 0
    on_disk_only = [i for i in range(12) if store.tier_of(key(i)) == "disk"]
    assert on_disk_only, s
    i = on_disk_only[0]
    lease = store.lease(key(i), "reader")
    assert lease.tier == "disk" and lease.served_from == "host" and store.tier_of(key(i)) == "host"
    assert read_entry(lease.view).array[0, 0] == i
    store.release(lease)
    assert store.stats()["disk"]["hits"] == 1 and store.stats()["host"]["hits"] == 0  # one client read


def test_durable_puts_survive_a_restart(make_store, tmp_path):
    store = make_store()
    for i in range(5):
        r = store.put_plan(key(i), blob_plan(i), durable=True)
        assert r.durable.done()
    store.close()
    store2 = make_store()
    assert store2.stats()["disk"]["entries"] == 5
    for i in range(5):
        assert store2.tier_of(key(i)) == "disk"
        with store2.get(key(i)) as e:
            assert e.array[0, 0] == i


def test_delete_removes_from_every_tier(make_store):
    store = make_store()
    store.put_plan(key(1), blob_plan(1), durable=True)
    assert store.tier_of(key(1)) == "host" and store.disk.contains(key(1))
    assert store.delete(key(1))
    assert store.tier_of(key(1)) is None and not store.delete(key(1))


def test_seal_validates_what_the_writer_wrote(make_store):
    store = make_store()
    plan = blob_plan(1)
    res = store.reserve(key(1), plan.total_bytes, "w")
    plan.write_into(store.host.buffer(res))
    store.host.buffer(res)[-1] ^= 0xFF  # corrupt one payload byte
    with pytest.raises(ValueError):
        store.seal(res)
    assert not store.contains(key(1)) and store.host.allocator.used_bytes == 0
    other = blob_plan(2)  # a valid entry, but under the wrong key
    res = store.reserve(key(1), other.total_bytes, "w")
    other.write_into(store.host.buffer(res))
    with pytest.raises(ValueError):
        store.seal(res)
    assert not store.contains(key(1))


def test_entry_larger_than_the_arena_goes_to_disk(make_store):
    store = make_store(host_bytes=16 << 10)
    big = blob_plan(1, num_tokens=256, hidden=64)  # 64 KiB
    r = store.put_plan(key(1), big, durable=True)
    assert r.created and r.tier == "disk"
    with store.get(key(1)) as e:
        assert e.array.shape == (256, 64)


@pytest.mark.parametrize("policy", ["lru", "gdsf"])
def test_both_policies_drive_the_store(make_store, policy):
    store = make_store(host_policy=policy, disk_policy=policy)
    for i in range(20):
        store.put_plan(key(i), blob_plan(i, encode_ms=float(i)))
    store.flush()
    assert store.stats()["host"]["evictions"] > 0
    assert store.stats()["host"]["bytes"] <= 64 << 10


def test_a_request_that_cannot_fit_evicts_nothing(host):
    keys = [fill(host, i) for i in range(6)]
    assert host.reserve(key(99), 128 << 10, "w") is PutStatus.TOO_LARGE  # larger than the arena
    host.lease(keys[0], "r")
    assert host.reserve(key(98), 60 << 10, "w") is PutStatus.NO_SPACE  # fits only if the leased one went
    assert host.evictions == 0 and all(host.contains(k) for k in keys)


def test_owner_index_tracks_leases_and_reservations(host):
    k1, k2 = fill(host, 1), fill(host, 2)
    host.lease(k1, "a")
    host.lease(k1, "a")
    host.lease(k2, "a")
    host.lease(k2, "b")
    res = host.reserve(key(3), 1000, "a")
    assert host.leases_of("a") == 3 and host.stats()["leases"] == 4
    host.release_key(k1, "a")
    assert host.leases_of("a") == 2
    assert host.release_owner("a") == 3  # one lease on k1, one on k2, the reservation
    assert host.leases_of("a") == 0 and host.stats()["leases"] == 1
    assert not host.leases.keys_of("a") and host.stats()["reservations"] == 0
    with pytest.raises(ValueError):
        host.seal(res)  # gone with its owner
    host.release_key(k2, "b")
    assert host.leases.total == 0 and host.stats()["leases"] == 0


def test_host_only_entries_never_reach_disk(tmp_path):
    """``persist=False`` entries (the KV hand-off) live in the arena only: no write-through, no write-back."""
    store = open_store(StoreConfig(data_dir=str(tmp_path / "data"), host_capacity_bytes=64 << 10,
                                    arena_path=str(tmp_path / "arena")))
    try:
        kv_keys = [f"kv.model/{content_hash(f'kv{i}'.encode())}" for i in range(12)]
        for i, k in enumerate(kv_keys):
            emb = np.full((64, 32), i, dtype=np.float32)  # 8 KiB: the 64 KiB arena holds a few
            result = store.put(k, {"embeddings": emb}, encode_ms=1.0, persist=False)
            assert result.created and result.tier == "host" and result.durable is None
        store.put(key(0), {"embeddings": np.zeros((4, 4), np.float32)}, durable=True)
        store.flush(30)
        stats = store.stats()
        assert stats["host"]["evictions"] > 0 and stats["disk"]["write_backs"] == 0
        assert stats["disk"]["entries"] == 1  # only the ordinary entry
        assert store.lookup([kv_keys[0]]) == {kv_keys[0]: None}  # evicted, and gone: no disk copy
        assert store.lookup([kv_keys[-1]]) == {kv_keys[-1]: "host"}
        with store.get(kv_keys[-1]) as entry:
            assert float(entry.array[0, 0]) == 11.0
    finally:
        store.close()

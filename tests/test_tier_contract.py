"""One contract, every tier: host (shared arena), disk (LMDB), device (CPU fake; CUDA under ``gpu``).

What ``mmcache.core.tier.Tier`` promises, checked the same way on each: puts answer a ``PutStatus``
(no room is an answer, not an exception), the first put wins, a lease pins its entry against
eviction and deletion, an owner that goes away drops every lease, and the stats carry the
common counters.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmcache.tiers.device import DeviceTier, DeviceTierConfig, cuda_available
from mmcache.tiers.disk import DiskTier, DiskTierConfig
from mmcache.tiers.host import HostTier
from mmcache.core.tier import PutStatus, Tier, TierLease
from mmcache_client import content_hash
from entries import encode_entry
from mmcache_client.format import read_entry

NS = "contract"
CAPACITY = 64 << 10
TIERS = ["host", "disk", "device", pytest.param("cuda", marks=pytest.mark.gpu)]


def key(i: int) -> str:
    return f"{NS}/{content_hash(f'entry-{i}'.encode())}"


def blob(i: int, num_tokens: int = 64, hidden: int = 32) -> bytes:
    """About 8.5 KiB: seven fit the 64 KiB tiers."""
    k = key(i).split("/")[1]
    return encode_entry(NS, k, {"embeddings": np.full((num_tokens, hidden), i, np.float32)}, encode_ms=1.0)


@pytest.fixture(params=TIERS)
def tier(request, tmp_path) -> Tier:
    if request.param == "host":
        t = HostTier(str(tmp_path / "arena"), CAPACITY)
    elif request.param == "disk":
        t = DiskTier(DiskTierConfig(path=str(tmp_path / "lmdb"), capacity_bytes=CAPACITY, flush_interval_ms=0.5))
    elif request.param == "device":
        t = DeviceTier.fake(DeviceTierConfig(capacity_bytes=CAPACITY))
    else:
        if not cuda_available():
            pytest.skip("needs a CUDA GPU")
        t = DeviceTier(DeviceTierConfig(capacity_bytes=CAPACITY))
    yield t
    t.close()


def put(t: Tier, i: int, **kw) -> PutStatus:
    return t.put(key(i), memoryview(blob(i, **kw)), 1.0).result(timeout=10)


def first_value(lease: TierLease) -> float:
    """The leased entry's embeddings[0, 0], whatever the tier holds it as."""
    if lease.view is not None:
        return float(read_entry(lease.view).array[0, 0])
    return float(lease.handle["embeddings"][0, 0])


def test_put_then_lease_reads_it_back(tier):
    b = blob(1)
    assert tier.put(key(1), memoryview(b), 1.0).result(timeout=10) is PutStatus.CREATED
    assert tier.contains(key(1)) and not tier.contains(key(2))
    lease = tier.lease(key(1), "reader")
    assert lease is not None and lease.tier == tier.name and lease.key == key(1)
    assert first_value(lease) == 1.0
    if lease.view is not None:
        assert bytes(lease.view) == b
    assert tier.stats()["leases"] == 1 and tier.stats()["hits"] == 1
    assert tier.release(lease) and tier.stats()["leases"] == 0
    assert not tier.release(lease)  # once only


def test_a_miss_is_none_and_counted(tier):
    assert tier.lease(key(9), "reader") is None
    assert tier.stats()["misses"] == 1
    assert tier.lease(key(9), "reader", count=False) is None and tier.stats()["misses"] == 1


def test_the_first_put_wins(tier):
    assert put(tier, 1) is PutStatus.CREATED
    other = encode_entry(NS, key(1).split("/")[1], {"embeddings": np.zeros((64, 32), np.float32)})
    assert tier.put(key(1), memoryview(other)).result(timeout=10) is PutStatus.EXISTS
    lease = tier.lease(key(1), "r")
    assert first_value(lease) == 1.0
    tier.release(lease)


def test_too_large_is_an_answer(tier):
    assert put(tier, 1, num_tokens=1024, hidden=128) is PutStatus.TOO_LARGE  # 512 KiB > 64 KiB
    assert not tier.contains(key(1)) and tier.stats()["entries"] == 0


def test_a_leased_entry_survives_pressure_and_no_space_when_all_is_leased(tier):
    leases = []
    while (status := put(tier, len(leases))) is PutStatus.CREATED:
        leases.append(tier.lease(key(len(leases)), "reader"))
    assert status is PutStatus.NO_SPACE and len(leases) >= 6  # everything leased: nothing evicted
    assert all(tier.contains(key(i)) for i in range(len(leases))) and tier.stats()["evictions"] == 0
    for lease in leases[1:]:
        tier.release(lease)
    for i in range(100, 110):  # churn: only unleased entries go
        assert put(tier, i) is PutStatus.CREATED
    assert tier.contains(key(0)) and first_value(leases[0]) == 0.0
    assert tier.stats()["evictions"] > 0
    tier.release(leases[0])


def test_delete_hides_at_once_and_a_lease_keeps_its_view(tier):
    put(tier, 1)
    lease = tier.lease(key(1), "reader")
    assert tier.delete(key(1)) and not tier.contains(key(1))
    assert tier.lease(key(1), "other") is None and not tier.delete(key(1))
    assert first_value(lease) == 1.0  # still readable under the lease
    tier.release(lease)
    assert tier.stats()["entries"] == 0 and tier.stats()["leases"] == 0


def test_release_owner_drops_every_lease_of_the_owner(tier):
    put(tier, 1), put(tier, 2)
    a = [tier.lease(key(1), "dead"), tier.lease(key(1), "dead"), tier.lease(key(2), "dead")]
    kept = tier.lease(key(2), "alive")
    assert tier.release_owner("dead") == 3
    assert tier.stats()["leases"] == 1 and all(x is not None for x in a)
    tier.release(kept)
    assert tier.stats()["leases"] == 0


def test_stats_carry_the_common_counters(tier):
    put(tier, 1)
    stats = tier.stats()
    for name in ("entries", "bytes", "capacity_bytes", "hits", "misses", "evictions", "leases"):
        assert isinstance(stats[name], int), name
    assert stats["entries"] == 1 and 0 < stats["bytes"] <= stats["capacity_bytes"]


def test_device_fake_needs_no_cuda_context():
    t = DeviceTier.fake(DeviceTierConfig(capacity_bytes=CAPACITY))
    t.put(key(1), memoryview(blob(1))).result()
    assert t.lease(key(1), "r").handle["embeddings"].device == torch.device("cpu")
    assert not torch.cuda.is_initialized()

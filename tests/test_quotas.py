"""Tenant quotas: in ``--tenants FILE`` a token may map to
``{tenant = NAME, quota = BYTES}``; the tenant then holds at most ``quota`` bytes in host and at
most ``quota`` on disk, a put past it evicts only the tenant's own entries (or gets 503), and its
entries are never evicted for another tenant (``mmcache.core.quotas``).

The attack as reported: one tenant's flood evicted all 20 of another tenant's durable entries.
Reproduced against a real ``mmcache serve`` process, with quotas (every entry survives, the
flooder stays within its quota on both tiers) and without (the same flood evicts them: the test
can fail)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mmcache.tiers.disk import DiskTier, DiskTierConfig
from mmcache.tiers.host import HostTier
from mmcache.core.quotas import TenantLedger, tenant_of
from mmcache.common.tenants import Tenants
from mmcache.core.tier import PutStatus
from mmcache_client import CacheClient, CacheFull, content_hash
from entries import encode_entry
from sidecar import SidecarProcess

NS = "quota"
ALICE, BOB, ADMIN = "alice-token-0123456789abcdef", "bob-token-0123456789abcdef", "admin-token-0123456789abcdef"
KiB, MiB = 1 << 10, 1 << 20


def h(name) -> str:
    return content_hash(str(name).encode())


def blob(key: str, rows: int = 16) -> bytes:
    """A valid entry for ``key`` (``[tenant@]ns/hash``) of about ``rows`` KiB."""
    ns, _, hx = key.rpartition("@")[2].partition("/")
    return encode_entry(ns, hx, {"embeddings": np.full((rows, 256), 1.0, dtype=np.float32)})


# ------------------------------------------------------------------ the tenants file


def write(tmp_path, text: str, name: str = "tenants.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


def test_a_token_maps_to_a_name_or_to_a_table_with_a_quota(tmp_path):
    t = Tenants.load(write(tmp_path, f'"{ALICE}" = {{tenant = "alice", quota = "4GiB"}}\n'
                                     f'"{BOB}" = "bob"\n"carol-token-0123456789" = {{tenant = "carol", quota = 1000}}\n'))
    assert t.quotas == {"alice": 4 << 30, "carol": 1000}
    assert t.names == ["alice", "bob", "carol"]
    assert t.authenticate(ALICE).tenant == "alice" and t.authenticate(BOB).tenant == "bob"
    j = Tenants.load(write(tmp_path, json.dumps({"tokens": {ALICE: {"tenant": "alice", "quota": "512MiB"}}}), "t.json"))
    assert j.quotas == {"alice": 512 << 20}
    # two tokens of one tenant: its quota said once, or the same each time
    two = Tenants({ALICE: {"tenant": "alice", "quota": 10}, BOB: {"tenant": "alice"}})
    assert two.quotas == {"alice": 10} and two.authenticate(BOB).tenant == "alice"


@pytest.mark.parametrize("value, message", [
    ({"tenant": "alice", "quota": 0}, "must be > 0"),
    ({"tenant": "alice", "quota": -5}, "must be"),
    ({"tenant": "alice", "quota": "lots"}, "size 'lots'"),
    ({"tenant": "alice", "quota": True}, "bytes or a size"),
    ({"tenant": "alice", "quota": 1.5}, "bytes or a size"),
    ({"tenant": "alice", "quota": 10, "burst": 2}, "unknown field"),
    ({"quota": 10}, "'tenant'"),
    ({"tenant": "no spaces allowed", "quota": 10}, "tenant"),
    (["alice"], "tenant's name or to"),
])
def test_a_bad_quota_is_refused_with_a_message_that_names_it(value, message):
    with pytest.raises(ValueError, match=message):
        Tenants({ALICE: value})


def test_one_tenant_given_two_different_quotas_is_refused():
    with pytest.raises(ValueError, match="two quotas"):
        Tenants({ALICE: {"tenant": "alice", "quota": 10}, BOB: {"tenant": "alice", "quota": 20}})


def test_the_ledger_counts_only_quotad_tenants_and_says_who_may_evict_whom():
    ledger = TenantLedger({"a": 100})
    assert tenant_of("a@ns/x") == "a" and tenant_of("ns/x") is None
    ledger.charge("a@ns/1", 60)
    ledger.charge("b@ns/1", 1000)  # no quota: not counted
    assert ledger.held("a") == 60 and ledger.excess("a@ns/2", 30) == 0 and ledger.excess("a@ns/2", 50) == 10
    assert ledger.excess("b@ns/2", 10**9) == 0 and ledger.excess("ns/2", 10**9) == 0
    may = ledger.may_evict("b@ns/9")
    assert not may("a@ns/1") and may("b@ns/1") and may("ns/1") and may("c@ns/1")
    assert ledger.may_evict("a@ns/9")("a@ns/1")
    ledger.credit("a@ns/1", 60)
    assert ledger.held("a") == 0
    with pytest.raises(ValueError, match="positive"):
        TenantLedger({"a": 0})


# ------------------------------------------------------------------ host tier


@pytest.fixture
def host(tmp_path):
    tier = HostTier(str(tmp_path / "arena"), 64 * KiB, alignment=256,
                    ledger=TenantLedger({"a": 16 * KiB, "b": 16 * KiB}))
    yield tier
    tier.close()


def fill(tier, key: str, n: int = 4 * KiB):
    return tier.put(key, memoryview(bytes(n))).result()


def test_host_a_tenant_over_its_quota_evicts_its_own_oldest_and_no_one_elses(host):
    for i in range(4):
        assert fill(host, f"b@ns/{i}") is PutStatus.CREATED
    for i in range(4):
        assert fill(host, f"ns/{i}") is PutStatus.CREATED  # the default tenant's
    for i in range(40):  # a flood of a's
        assert fill(host, f"a@ns/{i}") is PutStatus.CREATED
        assert host.ledger.held("a") <= 16 * KiB
    assert all(host.contains(f"b@ns/{i}") for i in range(4))
    assert [i for i in range(40) if host.contains(f"a@ns/{i}")] == [36, 37, 38, 39]  # LRU: its newest four


def test_host_a_tenant_whose_own_entries_are_leased_gets_no_space_and_evicts_nothing(host):
    for i in range(4):
        fill(host, f"a@ns/{i}")
    leases = [host.lease(f"a@ns/{i}", "reader") for i in range(4)]
    for i in range(4):
        fill(host, f"ns/{i}")
    before = host.stats()["evictions"]
    assert fill(host, "a@ns/new") is PutStatus.NO_SPACE
    assert host.stats()["evictions"] == before and host.stats()["quota_refused"] == 1
    assert all(host.contains(f"ns/{i}") for i in range(4))
    host.release(leases[0])
    assert fill(host, "a@ns/new") is PutStatus.CREATED and not host.contains("a@ns/0")


def test_host_a_full_tier_evicts_unquotad_entries_for_anyone_but_guarded_ones_for_no_one_else(host):
    for i in range(4):
        fill(host, f"a@ns/{i}")
        fill(host, f"b@ns/{i}")
    for i in range(8):
        fill(host, f"ns/{i}")  # the tier is full: 16 KiB a, 16 KiB b, 32 KiB default
    assert host.allocator.used_bytes == 64 * KiB
    for i in range(8, 20):  # the default tenant's puts evict only the default tenant's entries
        assert fill(host, f"ns/{i}") is PutStatus.CREATED
    assert all(host.contains(f"a@ns/{i}") and host.contains(f"b@ns/{i}") for i in range(4))
    for i in range(4):
        host.delete(f"a@ns/{i}")
    for i in range(4, 8):  # a, within its quota, makes room out of the shared part, not out of b's
        assert fill(host, f"a@ns/{i}") is PutStatus.CREATED
    assert all(host.contains(f"b@ns/{i}") for i in range(4))
    assert host.ledger.held("a") == 16 * KiB


def test_host_reservations_count_and_every_way_out_gives_the_bytes_back(host):
    res = host.reserve("a@ns/r", 12 * KiB, "writer")
    assert host.ledger.held("a") == 12 * KiB
    assert host.reserve("a@ns/s", 8 * KiB, "writer") is PutStatus.NO_SPACE  # nothing of a's is evictable
    host.abort(res)
    assert host.ledger.held("a") == 0
    host.reserve("a@ns/r", 12 * KiB, "writer")
    host.release_owner("writer")
    assert host.ledger.held("a") == 0
    fill(host, "a@ns/x")
    lease = host.lease("a@ns/x", "reader")
    host.delete("a@ns/x")  # hidden at once, freed at its last release: no longer a's
    assert host.ledger.held("a") == 0
    host.release(lease)


# ------------------------------------------------------------------ disk tier


@pytest.fixture
def disk(tmp_path):
    one = len(blob("a@ns/" + h(0)))
    tier = DiskTier(DiskTierConfig(path=str(tmp_path / "lmdb"), capacity_bytes=12 * one, map_size_bytes=64 * MiB),
                    TenantLedger({"a": 4 * one, "b": 4 * one}))
    tier.one = one
    yield tier
    tier.close()


def dput(tier, key):
    return tier.put(key, blob(key)).result(30)


def test_disk_a_tenant_over_its_quota_evicts_its_own_and_another_tenants_durable_entries_survive(disk):
    b_keys = [f"b@{NS}/{h(('b', i))}" for i in range(4)]
    d_keys = [f"{NS}/{h(('d', i))}" for i in range(4)]
    for key in b_keys + d_keys:
        assert dput(disk, key) is PutStatus.CREATED
    a_keys = [f"a@{NS}/{h(('a', i))}" for i in range(30)]
    for key in a_keys:
        assert dput(disk, key) is PutStatus.CREATED
        assert disk.ledger.held("a") <= 4 * disk.one
    assert all(disk.contains(k) for k in b_keys + d_keys)
    assert [k for k in a_keys if disk.contains(k)] == a_keys[-4:]
    # the default tenant fills the tier: it evicts its own, never a's or b's
    more = [f"{NS}/{h(('d2', i))}" for i in range(10)]
    for key in more:
        assert dput(disk, key) is PutStatus.CREATED
    assert all(disk.contains(k) for k in b_keys + a_keys[-4:])
    assert disk.stats()["bytes"] <= 12 * disk.one


def test_disk_a_tenant_whose_own_entries_are_leased_gets_no_space(disk):
    a_keys = [f"a@{NS}/{h(('a', i))}" for i in range(4)]
    for key in a_keys:
        dput(disk, key)
    leases = [disk.lease(k, "reader") for k in a_keys]
    assert dput(disk, f"a@{NS}/{h('new')}") is PutStatus.NO_SPACE
    assert all(disk.contains(k) for k in a_keys) and disk.stats()["quota_refused"] == 1
    disk.release(leases[0])
    assert dput(disk, f"a@{NS}/{h('new')}") is PutStatus.CREATED and not disk.contains(a_keys[0])
    for lease in leases[1:]:
        disk.release(lease)


def test_disk_a_batch_past_the_quota_keeps_the_newest_and_the_count_survives_a_reopen(tmp_path):
    one = len(blob("a@ns/" + h(0)))
    config = DiskTierConfig(path=str(tmp_path / "lmdb"), capacity_bytes=100 * one, map_size_bytes=64 * MiB,
                            flush_interval_ms=50)
    tier = DiskTier(config, TenantLedger({"a": 3 * one}))
    keys = [f"a@{NS}/{h(i)}" for i in range(10)]
    futures = [tier.put(k, blob(k)) for k in keys]  # one batch: its own puts make room once committed
    assert [f.result(30) for f in futures] == [PutStatus.CREATED] * 10
    assert tier.ledger.held("a") == 3 * one and [k for k in keys if tier.contains(k)] == keys[-3:]
    tier.close()
    again = DiskTier(config, TenantLedger({"a": 3 * one}))
    try:
        assert again.ledger.held("a") == 3 * one
    finally:
        again.close()


# ------------------------------------------------------------------ the flood, end to end


def flood(tmp_path, tenants_text: str):
    """B stores 20 durable entries; A then floods 200; answers what survived and the stats."""
    path = write(tmp_path, tenants_text)
    sc = SidecarProcess("--data-dir", str(tmp_path / "d"), "--host-capacity", "4MiB", "--disk-capacity", "8MiB",
                        "--tenants", path, "--token", ADMIN).start()
    try:
        bob = CacheClient(sc.url, token=BOB, retries=0)
        alice = CacheClient(sc.url, token=ALICE, retries=0)
        value = lambda i: np.full((64, 256), float(i), dtype=np.float32)  # noqa: E731 - 64 KiB each
        for i in range(20):
            assert bob.put(NS, h(("bob", i)), value(i), durable=True)
        refused = 0
        for i in range(200):
            try:
                alice.put(NS, h(("alice", i)), value(1000 + i), durable=True)
            except CacheFull as e:
                assert e.retry_after_s > 0
                refused += 1
        survived = []
        for i in range(20):
            got = bob.get(NS, h(("bob", i)))
            if got is not None:
                assert np.array_equal(np.asarray(got.tensor), value(i))
                survived.append(i)
        admin = CacheClient(sc.url, token=ADMIN)
        stats = admin.stats()
        for c in (bob, alice, admin):
            c.close()
        return survived, refused, stats
    finally:
        assert sc.stop() == 0


def test_one_tenants_flood_evicts_none_of_anothers_durable_entries_and_stays_within_its_quota(tmp_path):
    quotas = (f'"{ALICE}" = {{tenant = "alice", quota = "2MiB"}}\n'
              f'"{BOB}" = {{tenant = "bob", quota = "2MiB"}}\n')
    survived, refused, stats = flood(tmp_path, quotas)
    assert survived == list(range(20)), f"bob's durable entries lost: {sorted(set(range(20)) - set(survived))}"
    alice = stats["tenants"]["alice"]
    assert alice["quota_bytes"] == 2 * MiB
    assert alice["usage"]["host"]["bytes"] <= 2 * MiB and alice["usage"]["disk"]["bytes"] <= 2 * MiB
    assert alice["usage"]["disk"]["entries"] >= 20  # it kept storing, out of its own room
    assert refused < 200


def test_without_quotas_the_same_flood_evicts_the_other_tenants_entries(tmp_path):
    survived, _, stats = flood(tmp_path, f'"{ALICE}" = "alice"\n"{BOB}" = "bob"\n')
    assert len(survived) < 20  # what the quota prevents: the test above can fail
    assert "quota_bytes" not in stats["tenants"]["alice"]

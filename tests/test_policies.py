"""Eviction policies: a shared contract for every entry of POLICIES, then per-policy behaviour."""

from __future__ import annotations

import random

import pytest

from mmcache.core.policies import POLICIES, CostLFUPolicy, EvictionPolicy, GDSFPolicy, LRUPolicy, make_policy


@pytest.fixture(params=sorted(POLICIES))
def policy(request) -> EvictionPolicy:
    return POLICIES[request.param]()


def fill(policy: EvictionPolicy, n: int = 5, size_bytes: int = 100) -> list[str]:
    keys = [f"ns/{i}" for i in range(n)]
    for key in keys:
        policy.on_insert(key, size_bytes, cost_ms=1.0)
    return keys


# -- contract: every policy ----------------------------------------------------------------


def test_name_matches_registry():
    for name, cls in POLICIES.items():
        assert cls.name == name
        assert isinstance(make_policy(name), cls)


def test_make_policy_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="lru"):
        make_policy("fifo")


def test_total_bytes_len_contains(policy):
    assert len(policy) == 0 and policy.total_bytes == 0
    policy.on_insert("a", 10, 1.0)
    policy.on_insert("b", 32, 0.0)
    assert len(policy) == 2 and policy.total_bytes == 42
    assert "a" in policy and "c" not in policy
    assert policy.size_of("b") == 32
    policy.on_remove("a", evicted=True)
    assert len(policy) == 1 and policy.total_bytes == 32 and "a" not in policy
    policy.on_remove("b", evicted=False)
    assert len(policy) == 0 and policy.total_bytes == 0
    assert list(policy.iter_victims()) == []


def test_duplicate_insert_raises(policy):
    policy.on_insert("a", 10)
    with pytest.raises(ValueError, match="already tracked"):
        policy.on_insert("a", 10)
    assert len(policy) == 1 and policy.total_bytes == 10
    policy.on_remove("a", evicted=False)
    policy.on_insert("a", 20)  # re-insert after removal is fine
    assert policy.total_bytes == 20


@pytest.mark.parametrize(
    "size_bytes, cost_ms",
    [(-1, 0.0), (1.5, 0.0), (True, 0.0), (1, -1.0), (1, float("nan")), (1, float("inf")), (1, "1")],
)
def test_bad_insert_values_raise(policy, size_bytes, cost_ms):
    with pytest.raises(ValueError, match="must be"):
        policy.on_insert("a", size_bytes, cost_ms)
    assert len(policy) == 0 and policy.total_bytes == 0


def test_unknown_keys_are_ignored(policy):
    fill(policy, 3)
    before = list(policy.iter_victims())
    policy.on_access("missing")
    policy.on_remove("missing", evicted=True)
    policy.on_remove("missing", evicted=False)
    assert list(policy.iter_victims()) == before
    assert len(policy) == 3 and policy.total_bytes == 300


def test_iter_victims_covers_every_key_once(policy):
    keys = fill(policy, 6)
    policy.on_access(keys[2])
    assert sorted(policy.iter_victims()) == sorted(keys)


def test_choose_victims_has_no_side_effects(policy):
    keys = fill(policy, 6)
    policy.on_access(keys[0])
    order = list(policy.iter_victims())
    first = policy.choose_victims(250)
    second = policy.choose_victims(250)
    assert first == second == order[:3]
    assert list(policy.iter_victims()) == order
    assert len(policy) == 6 and policy.total_bytes == 600
    assert all(key in policy for key in keys)


def test_choose_victims_nonpositive_need_is_empty(policy):
    fill(policy, 3)
    assert policy.choose_victims(0) == []
    assert policy.choose_victims(-5) == []
    with pytest.raises(ValueError, match="need_bytes"):
        policy.choose_victims(1.5)  # type: ignore[arg-type]


def test_choose_victims_stops_once_enough(policy):
    for i, size in enumerate([10, 20, 30, 40]):
        policy.on_insert(f"k{i}", size, 1.0)
    order = list(policy.iter_victims())
    for need in (1, 10, 25, 60, 100):
        victims = policy.choose_victims(need)
        freed = sum(policy.size_of(k) for k in victims)
        assert freed >= need
        assert freed - policy.size_of(victims[-1]) < need  # minimal prefix
        assert victims == order[: len(victims)]


def test_choose_victims_respects_can_evict(policy):
    keys = fill(policy, 5)
    leased = {keys[0], keys[3]}
    order = [k for k in policy.iter_victims() if k not in leased]
    victims = policy.choose_victims(200, can_evict=lambda k: k not in leased)
    assert victims == order[:2]
    assert not leased & set(victims)


def test_choose_victims_returns_all_evictable_when_short(policy):
    keys = fill(policy, 4)
    victims = policy.choose_victims(10_000, can_evict=lambda k: k != keys[1])
    assert sorted(victims) == sorted(set(keys) - {keys[1]})
    assert policy.choose_victims(1, can_evict=lambda k: False) == []


def test_keys_need_not_be_orderable(policy):
    keys = [object() for _ in range(4)]
    for key in keys:
        policy.on_insert(key, 8, 1.0)  # equal H for GDSF: ties must not compare keys
    policy.on_access(keys[1])
    policy.on_remove(keys[2])
    assert len(policy.choose_victims(100)) == 3


# -- LRU -------------------------------------------------------------------------------------


def test_lru_evicts_least_recently_used():
    policy = LRUPolicy()
    keys = fill(policy, 4)  # a0..a3 by insertion
    policy.on_access(keys[0])
    policy.on_access(keys[2])
    assert list(policy.iter_victims()) == [keys[1], keys[3], keys[0], keys[2]]
    assert policy.choose_victims(150) == [keys[1], keys[3]]


def test_lru_ignores_size_and_cost():
    policy = LRUPolicy()
    policy.on_insert("big-cheap", 1000, 0.0)
    policy.on_insert("small-dear", 1, 1e6)
    assert policy.choose_victims(1) == ["big-cheap"]


# -- GDSF ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [GDSFPolicy, CostLFUPolicy])
def test_cost_aware_prefers_cheap_large_rare_victims(cls):
    policy = cls()
    policy.on_insert("dear", 100, 100.0)
    policy.on_insert("cheap", 100, 1.0)
    policy.on_insert("large", 100_000, 100.0)
    policy.on_insert("frequent", 100, 10.0)
    policy.on_insert("rare", 100, 10.0)
    for _ in range(3):
        policy.on_access("frequent")
    assert list(policy.iter_victims()) == ["large", "cheap", "rare", "frequent", "dear"]


def test_gdsf_zero_cost_still_ranks_by_size_and_hits():
    policy = GDSFPolicy()
    policy.on_insert("big", 1000, 0.0)
    policy.on_insert("small", 10, 0.0)
    policy.on_insert("hit", 1000, 0.0)
    policy.on_access("hit")
    assert list(policy.iter_victims()) == ["big", "hit", "small"]


def test_gdsf_ties_go_to_older_touch():
    policy = GDSFPolicy()
    keys = fill(policy, 3)  # all equal H
    assert list(policy.iter_victims()) == keys


def test_gdsf_inflation_rises_only_on_eviction_and_never_falls():
    policy = GDSFPolicy()
    policy.on_insert("a", 10, 10.0)  # H = 1
    policy.on_insert("b", 10, 50.0)  # H = 5
    policy.on_insert("c", 10, 20.0)  # H = 2
    policy.on_remove("b", evicted=False)
    assert policy.inflation == 0.0
    policy.on_remove("c", evicted=True)
    assert policy.inflation == pytest.approx(2.0)
    policy.on_remove("a", evicted=True)  # lower H than L: L stays
    assert policy.inflation == pytest.approx(2.0)
    policy.on_insert("d", 10, 10.0)
    assert policy.priority("d") == pytest.approx(3.0)


def test_gdsf_aging_makes_stale_high_priority_entry_evictable():
    policy = GDSFPolicy()
    policy.on_insert("old-dear", 100, 1000.0)  # H = 10
    for _ in range(4):
        policy.on_access("old-dear")  # H = 50, then never touched again
    evictions = 0
    for i in range(200):  # a stream of cheaper, newer entries, evicted one by one
        policy.on_insert(f"new/{i}", 100, 500.0)  # H = L + 5
        victim = policy.choose_victims(1)[0]
        if victim == "old-dear":
            break
        policy.on_remove(victim, evicted=True)
        evictions += 1
    else:
        pytest.fail("old high-priority entry never aged out")
    assert evictions > 0  # it was protected at first
    assert policy.inflation > 40.0


# -- cost-lfu --------------------------------------------------------------------------------


def _evict_one(policy: EvictionPolicy, key: str) -> str:
    """Insert ``key`` into a full policy and evict the best victim other than ``key``."""
    policy.on_insert(key, 100, 1.0)  # the size and cost of fill()'s keys
    victim = next(k for k in policy.iter_victims() if k != key)
    policy.on_remove(victim, evicted=True)
    return victim


def test_cost_lfu_keeps_a_frequent_key_through_a_scan_that_lru_evicts():
    for cls, survives in ((CostLFUPolicy, True), (LRUPolicy, False)):
        policy = cls()
        fill(policy, 8)
        for _ in range(5):
            policy.on_access("ns/0")
        victims = [_evict_one(policy, f"scan/{i}") for i in range(50)]
        assert ("ns/0" not in victims) == survives, cls.name


def test_cost_lfu_ages_a_key_that_stopped_being_requested():
    policy = CostLFUPolicy()
    fill(policy, 4)
    for _ in range(20):
        policy.on_access("ns/0")
    victims = []
    for i in range(2000):  # new keys, each requested twice, long after ns/0's last hit
        key = f"new/{i}"
        victims.append(_evict_one(policy, key))
        policy.on_access(key)
        if victims[-1] == "ns/0":
            break
    assert victims[-1] == "ns/0", "a stale key was never aged out"
    assert len(victims) > 50  # ... but it was protected for a while (about log2(20) half-lives)


def test_cost_lfu_resumes_an_evicted_keys_history_and_forgets_a_deleted_one():
    policy = CostLFUPolicy()
    policy.on_insert("popular", 100, 10.0)
    for _ in range(5):
        policy.on_access("popular")
    policy.on_remove("popular", evicted=True)
    policy.on_insert("fresh", 100, 10.0)
    policy.on_insert("popular", 100, 10.0)
    assert list(policy.iter_victims()) == ["fresh", "popular"]
    assert policy.priority("popular") > 5 * policy.priority("fresh")
    policy.on_remove("popular", evicted=False)
    policy.on_insert("popular", 100, 10.0)
    assert list(policy.iter_victims()) == ["fresh", "popular"]  # newer touch only
    assert policy.priority("popular") == pytest.approx(policy.priority("fresh"), rel=0.1)


def test_cost_lfu_ghost_history_is_bounded():
    policy = CostLFUPolicy()
    fill(policy, 4)
    for i in range(200):
        _evict_one(policy, f"k/{i}")
    assert len(policy._ghost) == CostLFUPolicy.GHOST_PER_KEY * 5  # 5: the peak, with the newcomer


def test_cost_lfu_rescaling_keeps_the_ranking():
    rng = random.Random(7)
    plain, rescaled = CostLFUPolicy(), CostLFUPolicy()
    rescaled.RESCALE_EXPONENT = 0.5  # every 32 events with the minimum half-life of 64
    entries = [(f"k/{i}", rng.randint(1, 1000), rng.uniform(0.0, 100.0)) for i in range(30)]
    for policy in (plain, rescaled):
        for key, size_bytes, cost_ms in entries:
            policy.on_insert(key, size_bytes, cost_ms)
    for _ in range(500):
        key = f"k/{rng.randrange(30)}"
        for policy in (plain, rescaled):
            policy.on_access(key)
    assert list(rescaled.iter_victims()) == list(plain.iter_victims())
    assert rescaled._log2_weight < 0.5 < plain._log2_weight
    assert max(rescaled.priority(k) for k in rescaled._count) < max(plain.priority(k) for k in plain._count)


# -- simulation: cost saved on a skewed trace --------------------------------------------------


def _trace(seed: int, n_requests: int) -> list[tuple[str, int, float]]:
    """Half the requests: a Zipf-reused hot set of small, expensive embeddings (video/image).
    The other half: a wide pool of large, cheap ones, rarely seen twice."""
    rng = random.Random(seed)
    hot = [(f"hot/{i}", rng.randint(8_000, 32_000), rng.uniform(50.0, 200.0)) for i in range(200)]
    cold = [(f"cold/{i}", rng.randint(32_000, 128_000), rng.uniform(1.0, 10.0)) for i in range(5000)]
    weights = [1.0 / (i + 1) for i in range(len(hot))]
    return [rng.choices(hot, weights)[0] if rng.random() < 0.5 else rng.choice(cold) for _ in range(n_requests)]


def _saved_cost_ms(policy: EvictionPolicy, trace, capacity_bytes: int) -> float:
    saved_ms = 0.0
    for key, size_bytes, cost_ms in trace:
        if key in policy:
            policy.on_access(key)
            saved_ms += cost_ms
            continue
        for victim in policy.choose_victims(policy.total_bytes + size_bytes - capacity_bytes):
            policy.on_remove(victim, evicted=True)
        policy.on_insert(key, size_bytes, cost_ms)
        assert policy.total_bytes <= capacity_bytes
    return saved_ms


@pytest.mark.parametrize("cls", [GDSFPolicy, CostLFUPolicy])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cost_aware_saves_more_encode_cost_than_lru_on_skewed_trace(seed, cls):
    trace = _trace(seed, 8000)
    lru_ms = _saved_cost_ms(LRUPolicy(), trace, capacity_bytes=1_000_000)
    gdsf_ms = _saved_cost_ms(cls(), trace, capacity_bytes=1_000_000)
    assert gdsf_ms > 1.5 * lru_ms, (lru_ms, gdsf_ms)

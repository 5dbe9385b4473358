"""The policy benchmark (benchmarks/policy.py): its simulators against hand-computed and
brute-force answers, its trace generator, and its CLI."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from mmcache.core.policies import GDSFPolicy

BENCH_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "policy.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("policy_bench", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # NOTE: dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


pb = _load_bench()


def hand_trace(keys: list[int], sizes: list[int]) -> "pb.Trace":
    """A trace over images ``0..len(sizes)-1`` with the given byte sizes, every cost 1 ms."""
    return pb.Trace(keys=np.array(keys, dtype=np.int64), num_tokens=np.array(sizes, dtype=np.int64),
                    size_bytes=np.array(sizes, dtype=np.int64), cost_ms=np.ones(len(sizes)),
                    zipf_s=0.0, seed=0, hidden=1)


def unit_trace(keys: list[int]) -> "pb.Trace":
    return hand_trace(keys, [1] * (max(keys) + 1))


def brute_force_max_hits(keys: list[int], capacity: int) -> int:
    """The true optimum for unit sizes when a miss may bypass the cache: search every choice."""

    @functools.lru_cache(maxsize=None)
    def best(i: int, cached: frozenset) -> int:
        if i == len(keys):
            return 0
        key = keys[i]
        if key in cached:
            return 1 + best(i + 1, cached)
        options = [best(i + 1, cached)]  # bypass
        if len(cached) < capacity:
            options.append(best(i + 1, cached | {key}))
        else:
            options += [best(i + 1, (cached - {victim}) | {key}) for victim in cached]
        return max(options)

    return best(0, frozenset())


# -- Belady ----------------------------------------------------------------------------------

# The textbook reference string (Silberschatz et al.): with 3 frames, OPT takes 9 page faults.
CLASSIC = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]


def test_belady_demand_paging_matches_textbook_opt():
    result = pb.belady(unit_trace(CLASSIC), capacity_bytes=3, bypass=False)
    assert result.requests - result.hits == 9
    assert result.hits == 11 and result.hit_bytes == 11 and result.requested_bytes == 20


def test_belady_bypass_beats_demand_paging_when_it_should():
    # One slot, a b a: demand paging must load b over a; bypass keeps a for its next use.
    assert pb.belady(unit_trace([0, 1, 0]), 1, bypass=False).hits == 0
    assert pb.belady(unit_trace([0, 1, 0]), 1).hits == 1


@pytest.mark.parametrize("seed", range(6))
def test_belady_bypass_is_optimal_for_unit_sizes(seed):
    rng = random.Random(seed)
    keys = [rng.randrange(5) for _ in range(14)]
    capacity = rng.choice([1, 2, 3])
    assert pb.belady(unit_trace(keys), capacity).hits == brute_force_max_hits(keys, capacity)


def test_belady_classic_with_bypass_is_optimal():
    assert pb.belady(unit_trace(CLASSIC), 3).hits == brute_force_max_hits(CLASSIC, 3)


def test_belady_never_admits_what_cannot_fit():
    result = pb.belady(hand_trace([0, 1, 0, 1], [2, 5]), capacity_bytes=4)
    assert (result.hits, result.hit_bytes, result.requested_bytes) == (1, 2, 14)


def test_belady_size_equals_belady_for_unit_sizes():
    trace = replace(small_zipf_trace(), size_bytes=np.ones(300, dtype=np.int64))
    assert pb.belady_size(trace, 40).hits == pb.belady(trace, 40).hits


def small_zipf_trace(**kwargs) -> "pb.Trace":
    return pb.make_trace(**{"num_requests": 6000, "pool": 300, "zipf_s": 0.9, "seed": 3, "reuse": 1.0, **kwargs})


@pytest.mark.parametrize("capacity", [10, 40, 120])
def test_belady_beats_every_policy_for_unit_sizes(capacity):
    trace = replace(small_zipf_trace(), size_bytes=np.ones(300, dtype=np.int64))
    best = pb.belady(trace, capacity)
    others = [pb.simulate(name, trace, capacity) for name in ("lru", "gdsf")]
    others.append(pb.static_popularity(trace, capacity))
    assert all(best.hits > other.hits for other in others), [(o.policy, o.hits, best.hits) for o in others]


def test_variable_sizes_rank_lru_below_gdsf_below_belady():
    trace = small_zipf_trace()
    capacity_bytes = trace.pool_bytes // 10
    lru, gdsf, best = (pb.simulate("lru", trace, capacity_bytes), pb.simulate("gdsf", trace, capacity_bytes),
                       pb.belady(trace, capacity_bytes))
    assert lru.byte_hit_ratio < gdsf.byte_hit_ratio < best.byte_hit_ratio
    assert 0 < pb.gap_closed(gdsf, lru, best) < 1


# -- LRU through the real policy ---------------------------------------------------------------


def test_simulate_lru_matches_hand_computed_trace():
    # capacity 4; sizes a=1 b=1 c=2 d=3 e=5; keys a b c a d a b e a
    a, b, c, d, e = range(5)
    trace = hand_trace([a, b, c, a, d, a, b, e, a], [1, 1, 2, 3, 5])
    # a b c fill it; a hits; d evicts b then c (LRU order b, c, a); a hits; b evicts d;
    # e (5 bytes) never fits and evicts nothing; a hits.
    result = pb.simulate("lru", trace, capacity_bytes=4)
    assert (result.hits, result.hit_bytes, result.requests, result.requested_bytes) == (3, 3, 9, 16)
    assert result.hit_ratio == pytest.approx(3 / 9) and result.byte_hit_ratio == pytest.approx(3 / 16)


def test_simulate_takes_a_policy_object_and_respects_capacity():
    trace = small_zipf_trace()
    policy = GDSFPolicy()
    result = pb.simulate(policy, trace, trace.pool_bytes // 20)
    assert result.policy == "gdsf"
    assert 0 < policy.total_bytes <= trace.pool_bytes // 20


def test_static_popularity_pins_the_top_ranks():
    trace = unit_trace([0, 1, 2, 0, 1, 2, 3, 0])  # capacity 2 pins images 0 and 1
    result = pb.static_popularity(trace, 2)
    assert result.hits == 3  # 0, 1, 0 after their first (missed) requests


# -- GDSF's frequency history (the change benchmarks/policy.py motivated) ---------------------


def test_gdsf_remembers_frequency_of_evicted_keys_only():
    policy = GDSFPolicy()
    policy.on_insert("hot", 100, 10.0)
    for _ in range(3):
        policy.on_access("hot")  # freq 4
    policy.on_insert("other", 100, 10.0)
    policy.on_remove("hot", evicted=True)
    policy.on_insert("hot", 100, 10.0)
    assert policy.priority("hot") == pytest.approx(policy.inflation + 5 * 0.1)
    policy.on_remove("hot", evicted=False)  # deleted: forgotten
    policy.on_insert("hot", 100, 10.0)
    assert policy.priority("hot") == pytest.approx(policy.inflation + 0.1)


def test_gdsf_history_is_bounded_by_peak_key_count():
    policy = GDSFPolicy()
    policy.on_insert("old", 10, 1.0)
    policy.on_access("old")  # freq 2
    policy.on_remove("old", evicted=True)
    for i in range(3):  # peak: 3 keys tracked at once
        policy.on_insert(i, 10, 1.0)
        policy.on_access(i)  # freq 2
    for i in range(3):
        policy.on_remove(i, evicted=True)  # history now holds 0, 1, 2; "old" is dropped
    policy.on_insert("old", 10, 1.0)
    policy.on_insert(0, 10, 1.0)
    assert policy.priority("old") == pytest.approx(policy.inflation + 0.1)  # starts over
    assert policy.priority(0) == pytest.approx(policy.inflation + 3 * 0.1)  # resumes


# -- trace generator ---------------------------------------------------------------------------


def test_make_trace_is_seeded_and_realistic():
    one, two = small_zipf_trace(), small_zipf_trace()
    assert np.array_equal(one.keys, two.keys) and np.array_equal(one.num_tokens, two.num_tokens)
    other = small_zipf_trace(seed=4)
    assert not np.array_equal(one.keys, other.keys)
    tokens = one.num_tokens
    assert tokens.min() >= pb.QWEN_MIN_TOKENS and tokens.max() <= pb.QWEN_MAX_TOKENS
    assert (tokens == pb.LLAVA_TOKENS).any() and tokens.max() > 3000 and tokens.min() < 400
    assert np.array_equal(one.size_bytes, tokens * one.hidden * 2)
    assert np.all(np.diff(one.cost_ms[np.argsort(tokens)]) >= 0) and one.cost_ms.min() > 0
    assert one.keys.min() >= 0 and one.keys.max() < 300
    counts = np.bincount(one.keys, minlength=300)
    assert counts[:10].sum() > 5 * counts[-10:].sum()  # Zipf: the head dominates the tail


def test_make_trace_mixes_one_off_images_at_the_reuse_share():
    pure, mixed = small_zipf_trace(), small_zipf_trace(reuse=0.5)
    assert pure.pool_size == mixed.pool_size == 300 and pure.pool_bytes == mixed.pool_bytes
    one_off = mixed.keys >= 300
    assert 0.45 < one_off.mean() < 0.55  # Bernoulli(0.5) over 6000 requests
    assert np.bincount(mixed.keys[one_off]).max() == 1  # each one-off image is requested once
    assert len(mixed.num_tokens) == 300 + one_off.sum()
    assert np.array_equal(mixed.num_tokens[:300], pure.num_tokens)  # the pool's images are the same
    assert np.array_equal(mixed.keys[~one_off], pure.keys[~one_off])  # and so are its draws
    assert mixed.repeat_share < 0.5 < pure.repeat_share
    tokens = mixed.num_tokens[300:]
    assert tokens.min() >= pb.QWEN_MIN_TOKENS and (tokens == pb.LLAVA_TOKENS).any() and tokens.max() > 3000


def test_static_popularity_never_pins_one_off_images():
    trace = small_zipf_trace(reuse=0.5)
    full = pb.static_popularity(trace, trace.pool_bytes * 10)  # room for every image, one-offs too
    hit_keys = set(np.flatnonzero(np.bincount(trace.keys) > 1).tolist())
    assert all(key < 300 for key in hit_keys)
    assert full.hits == len(trace.keys) - len(np.unique(trace.keys))  # every repeat hits, nothing else


def test_cost_lfu_closes_more_of_the_gap_with_one_off_images():
    """One-off uploads pollute LRU and leave a count-based policy almost untouched."""
    gaps = {}
    for reuse in (1.0, 0.5):
        trace = small_zipf_trace(reuse=reuse, num_requests=20_000)
        capacity = int(trace.pool_bytes * 0.1)
        lru, lfu = pb.simulate("lru", trace, capacity), pb.simulate("cost-lfu", trace, capacity)
        gaps[reuse] = pb.gap_closed(lfu, lru, pb.belady(trace, capacity))
    assert gaps[0.5] > gaps[1.0] and gaps[0.5] > 0.5


def test_qwen2vl_tokens_follow_smart_resize():
    width, height = np.array([1024, 640, 4032, 200]), np.array([768, 480, 3024, 100])
    # 37x27 and 23x17 28-pixel cells; a 12 MP photo scaled under 4096 cells; a thumbnail scaled up
    assert pb.qwen2vl_tokens(width, height).tolist() == [999, 391, 4015, 276]


def test_make_trace_rejects_bad_parameters():
    with pytest.raises(ValueError, match="pool"):
        pb.make_trace(num_requests=10, pool=0)
    with pytest.raises(ValueError, match="zipf_s"):
        pb.make_trace(num_requests=10, pool=10, zipf_s=-1.0)
    for reuse in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="reuse"):
            pb.make_trace(num_requests=10, pool=10, reuse=reuse)


# -- CLI ---------------------------------------------------------------------------------------


def test_cli_prints_tables_and_verdict_and_writes_json(tmp_path):
    out_path = tmp_path / "policy.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH_PATH), "--requests", "3000", "--pool", "300", "--capacities", "0.05,0.2",
         "--json", str(out_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("machine: ") and "3,000 requests over a pool of 300 images" in out
    assert "reuse 0.5: " in out and "% of requests repeats" in out  # the 50% by default
    assert f"{os.cpu_count()} cores" in out.splitlines()[0]
    assert out.count("hit ratio byte hit ratio gap closed") == 2
    for name in ("lru", "gdsf", "cost-lfu", "static-popularity", "belady", "belady-size"):
        assert f"\n  {name} " in out
    for name in ("gdsf", "cost-lfu"):
        assert f"target: {name} closes >= 0.5" in out
    assert out.count("-> PASS") + out.count("-> MISS") == 2
    report = json.loads(out_path.read_text())
    assert [c["capacity_fraction"] for c in report["capacities"]] == [0.05, 0.2]
    assert report["trace"]["reuse"] == 0.5 and 0.3 < report["trace"]["repeat_share"] < 0.5
    rows = report["capacities"][0]["results"]
    assert [r["policy"] for r in rows] == ["lru", "gdsf", "cost-lfu", "static-popularity", "belady", "belady-size"]
    assert rows[0]["hit_ratio"] == pytest.approx(rows[0]["hits"] / 3000)
    for name in ("gdsf", "cost-lfu"):
        assert report["passed"][name] == (f"target: {name}" in out and out.split(f"target: {name}")[1]
                                          .split("\n")[0].endswith("PASS"))


def test_cli_rejects_bad_capacities():
    proc = subprocess.run([sys.executable, str(BENCH_PATH), "--capacities", "0,2"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "fractions" in proc.stderr


def test_cli_rejects_bad_reuse():
    proc = subprocess.run([sys.executable, str(BENCH_PATH), "--reuse", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "reuse" in proc.stderr and "Traceback" not in proc.stderr

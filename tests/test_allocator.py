"""ArenaAllocator: validation, rounding, best fit, coalescing, invariants under random ops, churn."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from mmcache.core.allocator import ArenaAllocator

KiB, MiB = 1 << 10, 1 << 20


def check_invariants(a: ArenaAllocator, live: dict[int, int] | None = None) -> None:
    """Free and allocated blocks tile the arena exactly; free blocks are coalesced and indexed."""
    assert a.used_bytes + a.free_bytes == a.capacity_bytes
    free = a.free_blocks()
    # NOTE: reads private state on purpose: the allocation map and the free-block indexes must
    # agree with each other, and a stale size index would break best fit silently.
    allocated = sorted(a._allocated.items())
    assert a.num_allocations == len(allocated)
    assert a.used_bytes == sum(size for _, size in allocated)
    if live is not None:
        assert sorted(live) == [off for off, _ in allocated]
        for off, nbytes in live.items():
            assert a.size_of(off) == -(-nbytes // a.alignment) * a.alignment
    assert a.free_bytes == sum(size for _, size in free)
    assert a.largest_free_bytes == max((size for _, size in free), default=0)
    # Tiling: walking all blocks by offset covers [0, capacity) with no gap and no overlap.
    pos = 0
    prev_free = False
    for off, size, is_free in sorted([(o, s, True) for o, s in free] + [(o, s, False) for o, s in allocated]):
        assert off == pos, "gap or overlap"
        assert size > 0 and off % a.alignment == 0 and size % a.alignment == 0
        assert not (prev_free and is_free), "adjacent free blocks were not coalesced"
        pos, prev_free = off + size, is_free
    assert pos == a.capacity_bytes
    assert a._free_sorted == sorted((size, off) for off, size in free)
    assert a._free_by_end == {off + size: off for off, size in free}
    assert 0.0 <= a.fragmentation < 1.0


# -- validation --------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [0, -64, 1.5, True, "4096", None, 63])
def test_bad_capacity_raises(capacity):
    with pytest.raises(ValueError, match="capacity_bytes"):
        ArenaAllocator(capacity, alignment=64)


@pytest.mark.parametrize("alignment", [0, 1, 2, 4, 48, 100, -64, 64.0, True])
def test_bad_alignment_raises(alignment):
    with pytest.raises(ValueError, match="alignment"):
        ArenaAllocator(4096, alignment=alignment)


@pytest.mark.parametrize("nbytes", [0, -1, 1.5, True, None])
def test_bad_nbytes_raises(nbytes):
    a = ArenaAllocator(4096)
    for method in (a.allocate, a.can_allocate):
        with pytest.raises(ValueError, match="nbytes"):
            method(nbytes)
    check_invariants(a, {})


def test_unknown_and_double_free_raise_value_error():
    a = ArenaAllocator(4096, alignment=64)
    off = a.allocate(200)
    with pytest.raises(ValueError):
        a.free(off + 64)  # inside the block, not its start
    with pytest.raises(ValueError):
        a.free(9999)
    with pytest.raises(ValueError):
        a.size_of(off + 64)
    assert a.free(off) == 256
    with pytest.raises(ValueError):
        a.free(off)
    with pytest.raises(ValueError):
        a.size_of(off)
    check_invariants(a, {})


# -- rounding, alignment, capacity -------------------------------------------------------


def test_capacity_rounds_down_and_sizes_round_up():
    a = ArenaAllocator(1000, alignment=64)
    assert a.capacity_bytes == 960 and a.free_bytes == 960 and a.used_bytes == 0
    assert a.fragmentation == 0.0 and a.largest_free_bytes == 960
    live = {}
    for nbytes, rounded in [(1, 64), (64, 64), (65, 128), (300, 320)]:
        off = a.allocate(nbytes)
        assert off % 64 == 0
        assert a.size_of(off) == rounded
        live[off] = nbytes
    assert a.used_bytes == 64 + 64 + 128 + 320
    check_invariants(a, live)


def test_larger_than_capacity_is_none_not_error():
    a = ArenaAllocator(4096)
    assert a.allocate(4097) is None and not a.can_allocate(4097)
    assert a.can_allocate(4096) and a.allocate(4096) == 0


def test_full_arena_returns_none_until_a_free():
    a = ArenaAllocator(64 * 10, alignment=64)
    offs = [a.allocate(64) for _ in range(10)]
    assert sorted(offs) == [64 * i for i in range(10)]
    assert a.free_bytes == 0 and a.largest_free_bytes == 0 and a.fragmentation == 0.0
    assert not a.can_allocate(1) and a.allocate(1) is None
    a.free(offs[3])
    assert a.can_allocate(64) and not a.can_allocate(65)
    assert a.allocate(64) == offs[3]


# -- best fit and coalescing ------------------------------------------------------------


def test_best_fit_picks_smallest_fitting_block_then_lowest_offset():
    a = ArenaAllocator(64 * 20, alignment=64)
    offs = [a.allocate(64) for _ in range(20)]
    for i in (1, 2, 3, 6, 7, 10, 11, 14, 15, 16):  # holes: 3 @1, 2 @6, 2 @10, 3 @14
        a.free(offs[i])
    assert a.fragmentation == pytest.approx(1 - 3 / 10)
    assert a.allocate(128) == 64 * 6   # the 2-unit holes fit exactly; lower offset wins
    assert a.allocate(65) == 64 * 10   # the other 2-unit hole
    assert a.allocate(64) == 64 * 1    # 3-unit holes now the smallest; head of the lower one
    assert a.allocate(192) == 64 * 14
    assert a.allocate(129) is None     # only 2 units left, at 2..3
    check_invariants(a)


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_freeing_all_neighbours_coalesces_to_one_block(order):
    a = ArenaAllocator(1 << 20, alignment=64)
    blocks = [a.allocate(100_000), a.allocate(300_000), a.allocate(a.capacity_bytes - 100_032 - 300_032)]
    assert a.free_bytes == 0 and a.num_allocations == 3
    for i in order:
        a.free(blocks[i])
        check_invariants(a)
    assert a.free_blocks() == [(0, a.capacity_bytes)]
    assert a.largest_free_bytes == a.capacity_bytes and a.fragmentation == 0.0


def test_free_a_and_c_then_b_leaves_one_full_block():
    a = ArenaAllocator(3 * 4096, alignment=64)
    blk_a, blk_b, blk_c = (a.allocate(4096) for _ in range(3))
    a.free(blk_a)
    a.free(blk_c)
    assert a.largest_free_bytes == 4096 and a.fragmentation == pytest.approx(0.5)
    a.free(blk_b)
    assert a.largest_free_bytes == a.capacity_bytes == 3 * 4096


# -- random operation sequences ---------------------------------------------------------


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate/free against a model; checks best fit and every invariant after each op."""

    @initialize(alignment=st.sampled_from([8, 64, 256]), units=st.integers(1, 64), extra=st.integers(0, 7))
    def setup(self, alignment, units, extra):
        self.a = ArenaAllocator(units * alignment + extra, alignment)
        self.live: dict[int, int] = {}
        self.freed: set[int] = set()

    @rule(frac=st.floats(0.0, 1.0), bump=st.integers(1, 300))
    def allocate(self, frac, bump):
        # NOTE: frac**3 skews toward small blocks; the top end asks for more than the capacity.
        nbytes = max(1, int(frac**3 * 1.3 * self.a.capacity_bytes)) + bump % self.a.alignment
        size = -(-nbytes // self.a.alignment) * self.a.alignment
        fits = sorted((s, o) for o, s in self.a.free_blocks() if s >= size)
        assert self.a.can_allocate(nbytes) == bool(fits)
        off = self.a.allocate(nbytes)
        if not fits:
            assert off is None and self.a.largest_free_bytes < size
            return
        assert off == fits[0][1]  # best fit: smallest block, then lowest offset
        self.live[off] = nbytes
        self.freed.discard(off)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        off = data.draw(st.sampled_from(sorted(self.live)))
        nbytes = self.live.pop(off)
        assert self.a.free(off) == -(-nbytes // self.a.alignment) * self.a.alignment
        self.freed.add(off)

    @precondition(lambda self: self.freed)
    @rule(data=st.data())
    def double_free_raises(self, data):
        off = data.draw(st.sampled_from(sorted(self.freed)))
        with pytest.raises(ValueError):
            self.a.free(off)

    @invariant()
    def consistent(self):
        check_invariants(self.a, self.live)


AllocatorMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)
TestAllocatorMachine = AllocatorMachine.TestCase


# -- churn: fragmentation stays bounded ---------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_churn_keeps_fragmentation_bounded(seed):
    """20k ops, 64 KiB..4 MiB log-uniform, 256 MiB arena kept ~80% full by random frees.

    Measured (seeds 0..19): mean fragmentation 0.746..0.788, allocation failures <= 216 of
    ~14k, free_bytes at a failure <= 27x the request, mean fill at a failure >= 0.726.
    Non-coalescing / one-sided coalescing / worst fit: mean fragmentation >= 0.936, >= 7,200
    failures, free_bytes at a failure >= 50x the request.
    NOTE: 1 - largest/free is inherently high (~0.75) at 80% fill with random lifetimes: the
    free 20% lies in ~100 holes. First fit measures ~0.82; compaction is the only way lower.
    """
    rng = random.Random(seed)
    a = ArenaAllocator(256 * MiB, alignment=64)
    live: list[int] = []
    lo, hi = math.log(64 * KiB), math.log(4 * MiB)
    attempts = failures = 0
    frag_sum = 0.0
    worst_ratio = 0.0
    fill_at_failure: list[float] = []

    def free_random_victim() -> None:
        i = rng.randrange(len(live))
        live[i], live[-1] = live[-1], live[i]
        a.free(live.pop())

    for _ in range(20_000):
        if live and (a.used_bytes > 0.8 * a.capacity_bytes or rng.random() < 0.3):
            free_random_victim()
        else:
            nbytes = int(math.exp(rng.uniform(lo, hi)))
            attempts += 1
            off = a.allocate(nbytes)
            while off is None:
                assert live, f"empty arena cannot fit {nbytes=}"
                failures += 1
                worst_ratio = max(worst_ratio, a.free_bytes / nbytes)
                fill_at_failure.append(a.used_bytes / a.capacity_bytes)
                free_random_victim()
                off = a.allocate(nbytes)
            live.append(off)
        frag_sum += a.fragmentation
    check_invariants(a)
    assert a.num_allocations == len(live)
    mean_frag = frag_sum / 20_000
    assert mean_frag < 0.85, mean_frag
    assert failures < 0.05 * attempts, (failures, attempts)
    assert worst_ratio < 40, worst_ratio
    assert not fill_at_failure or sum(fill_at_failure) / len(fill_at_failure) > 0.7

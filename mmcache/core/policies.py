"""Eviction policies: which cached entries to drop first when a tier runs out of bytes.

A policy does accounting only. It tracks keys (hashable, opaque; in practice ``"ns/hash"``
strings) and their byte sizes, never the data. The owning tier tells it what happened
(``on_insert`` / ``on_access`` / ``on_remove``) and asks it what to drop (``choose_victims``);
the tier does the actual deletion and then reports it back with ``on_remove``.
"""

from __future__ import annotations

import abc
import bisect
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import ClassVar

__all__ = ["EvictionPolicy", "LRUPolicy", "GDSFPolicy", "CostLFUPolicy", "POLICIES", "make_policy"]


def _always(key: Hashable) -> bool:
    return True


class EvictionPolicy(abc.ABC):
    """Base class: tracks ``key -> size_bytes`` and ranks keys as eviction victims.

    Lifecycle of a key: ``on_insert`` once (a second insert without ``on_remove`` in between is
    a ``ValueError``), any number of ``on_access`` (hits), then ``on_remove`` once, whether it was
    evicted or deleted. ``on_access`` / ``on_remove`` on an unknown key are ignored, so a tier may
    report races (e.g. a delete of something already evicted) without checking first.

    Units: ``size_bytes`` is an int >= 0; ``cost_ms`` is the time it took to compute the entry
    (e.g. the encoder forward pass), a finite float >= 0. Policies that ignore cost still
    validate it.

    Invariants: ``len(p)`` equals the number of tracked keys, ``p.total_bytes`` their size sum,
    and ``iter_victims`` / ``choose_victims`` never change either (nor the ranking).
    Not thread-safe: the owning tier serialises calls.
    """

    name: ClassVar[str]

    def __init__(self) -> None:
        self._sizes: dict[Hashable, int] = {}
        self._total_bytes = 0

    # -- events from the tier ------------------------------------------------------------

    def on_insert(self, key: Hashable, size_bytes: int, cost_ms: float = 0.0) -> None:
        """Start tracking ``key``, newly cached with ``size_bytes`` that took ``cost_ms`` to make."""
        if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes < 0:
            raise ValueError(f"{size_bytes=} must be an int >= 0")
        if isinstance(cost_ms, bool) or not isinstance(cost_ms, (int, float)):
            raise ValueError(f"{cost_ms=} must be a finite number >= 0")
        if not math.isfinite(cost_ms) or cost_ms < 0:
            raise ValueError(f"{cost_ms=} must be a finite number >= 0")
        if key in self._sizes:
            raise ValueError(f"{key=} is already tracked; on_remove it before inserting again")
        self._sizes[key] = size_bytes
        self._total_bytes += size_bytes
        self._insert(key, size_bytes, float(cost_ms))

    def on_access(self, key: Hashable) -> None:
        """Record a hit on ``key``; unknown keys are ignored."""
        if key in self._sizes:
            self._access(key)

    def on_remove(self, key: Hashable, evicted: bool = True) -> None:
        """Stop tracking ``key``: ``evicted=True`` if the policy's choice, False if deleted.

        Unknown keys are ignored.
        """
        size_bytes = self._sizes.pop(key, None)
        if size_bytes is None:
            return
        self._total_bytes -= size_bytes
        self._remove(key, evicted)

    # -- queries -------------------------------------------------------------------------

    @abc.abstractmethod
    def iter_victims(self) -> Iterator[Hashable]:
        """Yield every tracked key, best victim first. No side effects.

        Lazy over live state: do not call ``on_*`` while iterating (``choose_victims`` is safe).
        """

    def choose_victims(
        self, need_bytes: int, can_evict: Callable[[Hashable], bool] = _always
    ) -> list[Hashable]:
        """Keys to evict, in order, whose sizes sum to >= ``need_bytes``. No side effects.

        Keys with ``can_evict(key) is False`` (e.g. leased to a reader) are skipped. If the
        evictable keys cannot free ``need_bytes``, all of them are returned and the caller
        decides (fail the insert, or evict anyway). ``need_bytes <= 0`` returns ``[]``.
        """
        if isinstance(need_bytes, bool) or not isinstance(need_bytes, int):
            raise ValueError(f"{need_bytes=} must be an int")
        victims: list[Hashable] = []
        freed_bytes = 0
        if need_bytes <= 0:
            return victims
        for key in self.iter_victims():
            if not can_evict(key):
                continue
            victims.append(key)
            freed_bytes += self._sizes[key]
            if freed_bytes >= need_bytes:
                break
        return victims

    def size_of(self, key: Hashable) -> int:
        """Tracked ``size_bytes`` of ``key``; ``KeyError`` if unknown."""
        return self._sizes[key]

    @property
    def total_bytes(self) -> int:
        """Sum of ``size_bytes`` over tracked keys."""
        return self._total_bytes

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    # -- hooks: called only for valid events, after the base bookkeeping -----------------

    @abc.abstractmethod
    def _insert(self, key: Hashable, size_bytes: int, cost_ms: float) -> None: ...

    @abc.abstractmethod
    def _access(self, key: Hashable) -> None: ...

    @abc.abstractmethod
    def _remove(self, key: Hashable, evicted: bool) -> None: ...


class LRUPolicy(EvictionPolicy):
    """Least recently used: victims in order of oldest insert-or-hit. Ignores size and cost.

    All events are O(1); ``iter_victims`` walks an ``OrderedDict`` from its oldest end.
    """

    name: ClassVar[str] = "lru"

    def __init__(self) -> None:
        super().__init__()
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def iter_victims(self) -> Iterator[Hashable]:
        return iter(self._order)

    def _insert(self, key: Hashable, size_bytes: int, cost_ms: float) -> None:
        self._order[key] = None

    def _access(self, key: Hashable) -> None:
        self._order.move_to_end(key)

    def _remove(self, key: Hashable, evicted: bool) -> None:
        del self._order[key]


class _Ranking:
    """Keys ordered by ``(priority, seq)``, lowest first; ``seq`` (a counter) breaks ties in
    favour of the older put. A sorted list kept with ``bisect``: iteration is a plain walk, a put
    or pop is an O(log n) search plus an O(n) memmove, fine for the entry counts of one tier."""

    def __init__(self) -> None:
        self._seq = 0
        self._ranked: list[tuple[float, int, Hashable]] = []
        self._entry: dict[Hashable, tuple[float, int, Hashable]] = {}

    def __iter__(self) -> Iterator[Hashable]:
        return (key for _, _, key in self._ranked)

    def priority(self, key: Hashable) -> float:
        return self._entry[key][0]

    def put(self, key: Hashable, priority: float) -> None:
        entry = (priority, self._seq, key)
        self._seq += 1
        self._entry[key] = entry
        # NOTE: search by the (priority, seq) prefix; seq is unique, so keys (maybe not
        # orderable) are never compared.
        self._ranked.insert(bisect.bisect_left(self._ranked, entry[:2]), entry)

    def pop(self, key: Hashable) -> float:
        """Remove ``key``; its priority."""
        entry = self._entry.pop(key)
        del self._ranked[bisect.bisect_left(self._ranked, entry[:2])]
        return entry[0]

    def scale(self, factor: float) -> None:
        """Multiply every priority by ``factor`` > 0: the order stays as it is."""
        self._ranked = [(priority * factor, seq, key) for priority, seq, key in self._ranked]
        self._entry = {entry[2]: entry for entry in self._ranked}


class _CountingPolicy(EvictionPolicy):
    """What GDSF and cost-lfu share: ``H(k)`` from a per-key request count and the key's value
    ``cost / size`` (``cost`` in ms floored at ``MIN_COST_MS``, ``size`` in bytes floored at 1),
    ranked lowest first with ties to the older touch; and the counts of the most recently evicted
    keys remembered (``GHOST_PER_KEY`` times the most keys ever tracked) and resumed when a key
    is inserted again. A deleted key (``evicted=False``) is forgotten.

    Subclasses say how a request changes a count (``_counted``) and what ``H`` is (``_priority``).
    """

    # NOTE: a zero cost would give every zero-cost entry the same H regardless of size and
    # hits; a tiny floor keeps size and frequency meaningful for them.
    MIN_COST_MS: ClassVar[float] = 1e-3
    GHOST_PER_KEY: ClassVar[int] = 1

    def __init__(self) -> None:
        super().__init__()
        self._ranking = _Ranking()
        self._count: dict[Hashable, float] = {}
        self._value: dict[Hashable, float] = {}  # cost_ms / size_bytes, fixed at insert
        self._ghost: OrderedDict[Hashable, float] = OrderedDict()  # evicted key -> count, oldest first
        self._max_tracked = 0

    def priority(self, key: Hashable) -> float:
        """Current ``H`` of ``key``; ``KeyError`` if unknown."""
        return self._ranking.priority(key)

    def iter_victims(self) -> Iterator[Hashable]:
        return iter(self._ranking)

    @abc.abstractmethod
    def _counted(self, count: float) -> float:
        """The count after one more request (an insert starts from the remembered count or 0)."""

    @abc.abstractmethod
    def _priority(self, count: float, value: float) -> float: ...

    def _evicted(self, priority: float) -> None:
        """Hook: an entry of this priority was evicted."""

    def _rank(self, key: Hashable) -> None:
        self._ranking.put(key, self._priority(self._count[key], self._value[key]))

    def _insert(self, key: Hashable, size_bytes: int, cost_ms: float) -> None:
        self._max_tracked = max(self._max_tracked, len(self))
        self._count[key] = self._counted(self._ghost.pop(key, 0))
        self._value[key] = max(cost_ms, self.MIN_COST_MS) / max(size_bytes, 1)
        self._rank(key)

    def _access(self, key: Hashable) -> None:
        self._ranking.pop(key)
        self._count[key] = self._counted(self._count[key])
        self._rank(key)

    def _remove(self, key: Hashable, evicted: bool) -> None:
        priority = self._ranking.pop(key)
        count = self._count.pop(key)
        del self._value[key]
        if evicted:
            self._evicted(priority)
            self._ghost[key] = count
            # NOTE: bounded by the peak, not the current, key count: a burst of evictions to
            # make room for one large entry must not wipe the list.
            while len(self._ghost) > self.GHOST_PER_KEY * self._max_tracked:
                self._ghost.popitem(last=False)


class GDSFPolicy(_CountingPolicy):
    """GreedyDual-Size-Frequency: keep what is expensive to recompute per byte and often hit.

    Priority ``H(k) = L + freq(k) * cost(k) / size(k)``, with ``cost`` in ms (floored at
    ``MIN_COST_MS``), ``size`` in bytes (floored at 1) and ``freq`` the number of inserts-or-hits
    (starts at 1). ``H`` is recomputed with the current ``L`` on each hit. Victims go lowest
    ``H`` first; ties go to the older insert-or-hit.

    ``freq`` outlives an eviction: the counts of the most recently evicted keys (a ghost list,
    as many as the most keys ever tracked, as in ARC) are remembered, and a key inserted again
    resumes from its count. A deleted key (``evicted=False``) is forgotten.

    ``L`` (``inflation``) ages entries: on each eviction it rises to the evicted entry's ``H``
    and it never decreases, so newcomers start above entries that stopped being hit, and an
    old high-priority entry becomes a victim once ``L`` has overtaken it.

    Ranking: a ``_Ranking`` by ``H``.

    NOTE: the ghost list is a departure from the published GDSF, whose frequency is in-cache
    only. Forgetting a popular key's count each time it is evicted makes it re-enter as a
    newcomer and be evicted again before it can earn its place. On ``benchmarks/policy.py``'s
    Zipf(0.9) trace of 256..4096-token embeddings, the share of the LRU-to-Belady gap in byte
    hit ratio that GDSF closes goes from 0.29..0.41 to 0.35..0.46 with it (capacities 1..20% of
    the pool). Bounding it by the tracked-key count keeps the remembered counts recent, so
    aging still applies to them.
    """

    name: ClassVar[str] = "gdsf"

    def __init__(self) -> None:
        super().__init__()
        self._inflation = 0.0

    @property
    def inflation(self) -> float:
        """The aging term ``L``: the highest ``H`` evicted so far (0.0 initially)."""
        return self._inflation

    def _counted(self, count: float) -> float:
        return count + 1

    def _priority(self, count: float, value: float) -> float:
        return self._inflation + count * value

    def _evicted(self, priority: float) -> None:
        # NOTE: max(), not assignment: with can_evict skipping leased keys the evicted entry
        # need not be the minimum, and L must never decrease.
        self._inflation = max(self._inflation, priority)


class CostLFUPolicy(_CountingPolicy):
    """Cost-aware, decayed frequency: keep what is expensive per byte and requested often lately.

    Priority ``H(k) = crf(k) * cost(k) / size(k)``: ``cost`` and ``size`` as in GDSF, and ``crf``
    (LRFU's combined recency and frequency, Lee et al. 2001) the sum over the key's inserts and
    hits of ``2 ** (t / half_life)``, with ``t`` counting every insert and hit of the policy. A
    request counts as 1 now, and half of that ``half_life`` events later: counts age smoothly,
    not through GDSF's inflation, which a single eviction of a valuable entry can raise past
    every entry's frequency. ``half_life = HALF_LIFE_PER_KEY`` times the most keys ever tracked
    (at least ``MIN_HALF_LIFE``): long enough that the ranking estimates popularity, short
    enough that a shift in popularity is followed within a few times the cache's contents.
    Victims go lowest ``H`` first; ties go to the older insert-or-hit.

    The ``crf`` of evicted keys is remembered (``GHOST_PER_KEY`` times the most keys ever
    tracked, newest kept; a few hundred bytes each) and resumed on a later insert, so that a
    popular key evicted in a burst returns with its history. A deleted key is forgotten.

    Weights grow as ``2 ** (t / half_life)``; every ``RESCALE_EXPONENT`` half-lives all stored
    values are divided by the current weight (one O(n) pass), which changes no ranking.

    NOTE: on ``benchmarks/policy.py``'s Zipf trace this closes more of the LRU-to-Belady gap in
    byte hit ratio than GDSF at every capacity (see the README); GDSF stays for workloads whose
    popularity shifts fast, which its inflation follows at once.
    """

    name: ClassVar[str] = "cost-lfu"
    HALF_LIFE_PER_KEY: ClassVar[float] = 20.0
    MIN_HALF_LIFE: ClassVar[float] = 64.0
    GHOST_PER_KEY: ClassVar[int] = 8
    RESCALE_EXPONENT: ClassVar[float] = 256.0

    def __init__(self) -> None:
        super().__init__()
        self._log2_weight = 0.0  # log2 of the weight a request counts with now

    @property
    def half_life(self) -> float:
        """Events (inserts + hits) after which a request counts half as much."""
        return max(self.HALF_LIFE_PER_KEY * self._max_tracked, self.MIN_HALF_LIFE)

    def _counted(self, count: float) -> float:
        """``count`` plus the weight of a request now; advances time by one event."""
        self._log2_weight += 1.0 / self.half_life
        if self._log2_weight >= self.RESCALE_EXPONENT:
            count *= 2.0 ** -self._log2_weight  # NOTE: the caller's copy, outside the stores rescaled below
            self._rescale()
        return count + 2.0 ** self._log2_weight

    def _priority(self, count: float, value: float) -> float:
        return count * value

    def _rescale(self) -> None:
        scale = 2.0 ** -self._log2_weight
        self._log2_weight = 0.0
        for store in (self._count, self._ghost):
            for key in store:
                store[key] *= scale
        self._ranking.scale(scale)


POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy, "gdsf": GDSFPolicy, "cost-lfu": CostLFUPolicy}


def make_policy(name: str) -> EvictionPolicy:
    """A fresh policy by its ``name`` (one of ``POLICIES``)."""
    cls = POLICIES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"{name=} must be one of {sorted(POLICIES)}")
    return cls()

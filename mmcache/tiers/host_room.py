"""Where a put fits in the arena (``HostRoom``, owned by ``HostTier``): when no free block fits,
the window of free blocks and evictable entries that holds the request and whose worst victim
the policy ranks best; for a tenant past its quota, which of its own entries to evict first.

It plans and never evicts: the tier evicts what it names (under the tier's lock, which every
call here runs under). Entries not yet written below are queued for write-back (``dirty``) and
skipped, and nothing leased, reserved, quarantined or outside the window is ever named
(``docs/architecture.md``, invariant 5).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable, Mapping

from mmcache.core.allocator import ArenaAllocator
from mmcache.core.leases import LeaseTable
from mmcache.core.policies import EvictionPolicy
from mmcache.core.quotas import TenantLedger, anything

logger = logging.getLogger("mmcache.tiers.host")

_QUARANTINED = object()
"""Marks an allocated block held by a quarantined reservation in the eviction scan."""


class HostRoom:
    """Room-making over the tier's allocator, index, leases, policy and ledger. ``entries``
    (key → entry: ``offset``, ``nbytes``, ``sealed``, ``clean``, ``writing_back``) and
    ``blocks`` (allocated offset → key, None for a pinned block no key names) are the tier's
    own maps, read here; ``persisted`` says whether the tiers below hold a key."""

    def __init__(self, allocator: ArenaAllocator, policy: EvictionPolicy, leases: LeaseTable,
                 entries: Mapping[str, Any], blocks: Mapping[int, str | None], ledger: TenantLedger,
                 persisted: Callable[[str], bool]):
        self.allocator, self.policy, self.leases, self.ledger = allocator, policy, leases, ledger
        self.entries, self.blocks = entries, blocks
        self.persisted = persisted

    def own_victims(self, key: str, nbytes: int, dirty: list[str]) -> list[str] | None:
        """``key``'s tenant's own entries to evict (policy order) so that ``nbytes`` more fit in
        its quota (``mmcache.core.quotas``): [] when they fit, None when they cannot."""
        excess = self.ledger.excess(key, nbytes)
        if not excess:
            return []
        own, victims, freed = self.ledger.own(key), [], 0
        for victim in self.policy.iter_victims():
            if freed >= excess:
                break
            if own(victim) and self.evictable(victim, dirty):
                victims.append(victim)
                freed += self.entries[victim].nbytes
        if freed < excess:
            self.ledger.refused += 1
            return None
        return victims

    def window(self, nbytes: int, dirty: list[str], allowed: Callable[[str], bool] = anything
               ) -> tuple[int, list[str]] | None:
        """The address window of free blocks and evictable entries (those ``allowed`` lets this
        put evict) that holds ``nbytes`` and whose worst victim the policy ranks best (fewest
        evicted bytes on a tie): its start and its entries, or None."""
        size = self.allocator.round_up(nbytes)
        rank = {key: i for i, key in enumerate(self.policy.iter_victims())}
        segments = [(start, length, None) for start, length in self.allocator.free_blocks()]
        for offset, key in self.blocks.items():
            segments.append((offset, self.allocator.size_of(offset), _QUARANTINED if key is None else key))
        segments.sort()
        best: tuple[tuple[int, int], int, list[str]] | None = None
        window: deque[tuple[int, int, Any]] = deque()
        ranks: deque[tuple[int, int]] = deque()  # (position, rank), ranks increasing: max at front
        total = evicted = 0
        for pos, (start, length, key) in enumerate(segments):
            if window and window[-1][0] + window[-1][1] != start:
                raise AssertionError("arena segments do not tile")
            r = self._rank(key, rank, dirty, allowed)
            if r is None:  # a pinned block ends every window through it
                window.clear()
                ranks.clear()
                total = evicted = 0
                continue
            window.append((start, length, key))
            total += length
            evicted += length if key is not None else 0
            while ranks and ranks[-1][1] <= r:
                ranks.pop()
            ranks.append((pos, r))
            while total - window[0][1] >= size:  # shrink from the left while it still fits
                s0, l0, k0 = window.popleft()
                total -= l0
                evicted -= l0 if k0 is not None else 0
                while ranks and ranks[0][0] < pos - len(window) + 1:
                    ranks.popleft()
            if total >= size:
                cost = (ranks[0][1] if ranks else -1, evicted)
                if best is None or cost < best[0]:
                    best = (cost, window[0][0], [k for _, _, k in window if k is not None])
        if dirty:
            logger.debug("host tier: %d entries await write-back before they can be evicted", len(dirty))
        return None if best is None else (best[1], best[2])

    def _rank(self, key: Any, rank: dict[str, int], dirty: list[str], allowed: Callable[[str], bool]) -> int | None:
        """-1 for free space, the policy rank of an evictable entry, None for a pinned block
        (leased, reserved, quarantined, awaiting write-back, or another quota'd tenant's)."""
        if key is None:
            return -1
        if key is _QUARANTINED or not allowed(key) or not self.evictable(key, dirty):
            return None
        return rank.get(key)

    def evictable(self, key: str, dirty: list[str]) -> bool:
        """Sealed, unleased and held below (else queued in ``dirty`` for write-back)."""
        entry = self.entries.get(key)
        if entry is None or not entry.sealed or self.leases.is_leased((key, entry.offset)):
            return False
        if not entry.clean and not self.persisted(key):
            if not entry.writing_back and len(dirty) < 64:
                entry.writing_back = True
                dirty.append(key)
            return False
        return True

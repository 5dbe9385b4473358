"""Making room in the arena (``HostRoom``, a part of ``HostTier``): when no free block fits, the
window of free blocks and evictable entries that holds the request and whose worst victim the
policy ranks best; entries not yet written below are written back first (off the lock), and
nothing leased, reserved or outside the window is evicted (``docs/architecture.md``,
invariant 5)."""

from __future__ import annotations

import logging
from collections import deque

from mmcache.core.quotas import _anything
from mmcache.core.tier import PutStatus

logger = logging.getLogger("mmcache.tiers.host")

_QUARANTINED = object()
"""Marks an allocated block held by a quarantined reservation in the eviction scan."""


class HostRoom:
    """Room-making over the tier's allocator, index, leases and policy (under its lock)."""

    def _allocate(self, nbytes: int, dirty: list[str], allowed=_anything) -> int | PutStatus | None:
        """Room for ``nbytes``, evicting only entries ``allowed`` says this put may evict."""
        if nbytes > self.allocator.capacity_bytes:
            return PutStatus.TOO_LARGE
        offset = self.allocator.allocate(nbytes)
        if offset is not None:
            return offset
        window = self._best_window(self.allocator._round_up(nbytes), dirty, allowed)
        if window is None:
            return None
        start, victims = window
        for key in victims:
            self._evict(key)
        if not self.allocator.allocate_at(start, nbytes):
            raise AssertionError(f"evicted window at {start} does not hold {nbytes} bytes")
        return start

    def _within_quota(self, key: str, nbytes: int, dirty: list[str]) -> bool:
        """Evict ``key``'s tenant's own entries (policy order) until ``nbytes`` more fit in its
        quota (``mmcache.core.quotas``); False, evicting nothing, when they cannot."""
        excess = self.ledger.excess(key, nbytes)
        if not excess:
            return True
        own, victims, freed = self.ledger.own(key), [], 0
        for victim in self.policy.iter_victims():
            if freed >= excess:
                break
            if own(victim) and self._evictable(victim, dirty):
                victims.append(victim)
                freed += self._key_to_entry[victim].nbytes
        if freed < excess:
            self.ledger.refused += 1
            return False
        for victim in victims:
            self._evict(victim)
        return True

    def _best_window(self, size: int, dirty: list[str], allowed=_anything) -> tuple[int, list[str]] | None:
        """The address window of free blocks and evictable entries that holds ``size`` bytes
        and whose worst victim the policy ranks best (fewest evicted bytes on a tie)."""
        rank = {key: i for i, key in enumerate(self.policy.iter_victims())}
        segments = [(start, length, None) for start, length in self.allocator.free_blocks()]
        for offset, key in self._offset_to_key.items():
            segments.append((offset, self.allocator.size_of(offset), _QUARANTINED if key is None else key))
        segments.sort()
        best: tuple[tuple[int, int], int, list[str]] | None = None
        window: deque[tuple[int, int, str | None]] = deque()
        ranks: deque[tuple[int, int]] = deque()  # (position, rank), ranks increasing: max at front
        total = evicted = 0
        for pos, (start, length, key) in enumerate(segments):
            if window and window[-1][0] + window[-1][1] != start:
                raise AssertionError("arena segments do not tile")
            r = self._victim_rank(key, rank, dirty, allowed)
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

    def _victim_rank(self, key: str | object | None, rank: dict[str, int], dirty: list[str],
                     allowed=_anything) -> int | None:
        """-1 for free space, the policy rank of an evictable entry, None for a pinned block
        (leased, reserved, quarantined, awaiting write-back, or another quota'd tenant's)."""
        if key is None:
            return -1
        if key is _QUARANTINED or not allowed(key) or not self._evictable(key, dirty):
            return None
        return rank.get(key)

    def _evictable(self, key: str, dirty: list[str]) -> bool:
        """Sealed, unleased and held below (else queued in ``dirty`` for write-back)."""
        entry = self._key_to_entry.get(key)
        if entry is None or not entry.sealed or self.leases.is_leased((key, entry.offset)):
            return False
        if not entry.clean and not self.persisted(key):
            if not entry.writing_back and len(dirty) < 64:
                entry.writing_back = True
                dirty.append(key)
            return False
        return True

    def _write_back(self, keys: list[str]) -> None:
        for key in keys:
            if self.on_dirty is None:
                self.mark_clean(key)
            else:
                self.on_dirty(key)

    def written_down(self, key: str, ok: bool) -> None:
        """The store's write-down of ``key`` ended; a failed one makes it evictable all the same."""
        with self._lock:
            entry = self._key_to_entry.get(key)
            if entry is not None:
                entry.writing_back = False
                entry.clean |= not ok

    def mark_clean(self, key: str) -> None:
        """Evictable without write-back from now on."""
        self.written_down(key, ok=False)

    def _evict(self, key: str) -> None:
        entry = self._key_to_entry[key]
        self.evictions += 1
        self.evicted_bytes += entry.nbytes
        self.policy.on_remove(key, evicted=True)
        self._free(key)
        if self.on_evict is not None:
            self.on_evict(key, entry.nbytes)

    def _free(self, key: str) -> None:
        entry = self._unindex(key)
        del self._offset_to_key[entry.offset]
        self.allocator.free(entry.offset)

"""The host tier: accounting (index, allocator, leases, policy) over one shared-memory arena.

Lifecycle of an entry: ``reserve`` (space allocated, invisible) → the writer fills the bytes in
place → ``seal`` (visible, evictable) → ``lease``/``release`` by readers → evicted or deleted.

Invariants:
- Only sealed entries are visible to ``lease``/``contains``.
- An entry with a live lease is never evicted and its bytes are never reused; a ``delete`` of a
  leased entry hides it at once and frees its space when the last lease goes.
- Every reservation and lease belongs to an owner (a connection); ``release_owner`` drops all of
  them, so a client that dies leaks nothing (Plasma's rule).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Hashable

from mmcache.allocator import ArenaAllocator
from mmcache.policies import make_policy
from mmcache_client.arena import SharedArena

logger = logging.getLogger(__name__)

Owner = Hashable


class EntryExists(Exception):
    """The key is already sealed or being written; entries are immutable."""


@dataclass
class HostEntry:
    offset: int
    nbytes: int
    """Exact entry length (the allocation may be rounded up)."""
    cost_ms: float
    sealed: bool = False
    doomed: bool = False
    """Deleted while leased: invisible, freed at the last release."""
    lease_counts: dict[Owner, int] = field(default_factory=dict)
    writer: Owner | None = None

    @property
    def leases(self) -> int:
        return sum(self.lease_counts.values())


@dataclass(frozen=True)
class Location:
    """Where a sealed entry lies in the arena."""

    offset: int
    nbytes: int


@dataclass(frozen=True)
class Reservation:
    key: str
    offset: int
    nbytes: int
    owner: Owner


EvictHook = Callable[[str, memoryview, float], None]
"""Called with (key, bytes in place, cost_ms) just before an entry's space is freed by eviction."""


class HostTier:
    """Entries in a shared arena, addressed by key strings ``ns/hash``. Thread-safe."""

    def __init__(
        self,
        arena_path: str,
        capacity_bytes: int,
        *,
        policy: str = "lru",
        alignment: int = 256,
        on_evict: EvictHook | None = None,
    ):
        self.allocator = ArenaAllocator(capacity_bytes, alignment)
        self.arena = SharedArena(arena_path, capacity_bytes, create=True)
        self.policy = make_policy(policy)
        self.on_evict = on_evict
        self._key_to_entry: dict[str, HostEntry] = {}
        self._owner_to_keys: dict[Owner, set[str]] = {}
        """Keys each owner leases or reserves, so dropping an owner costs O(its keys)."""
        self.live_leases = 0
        self._lock = threading.RLock()
        self.hits = self.misses = self.evictions = 0

    # ------------------------------------------------------------ writing
    def reserve(self, key: str, nbytes: int, owner: Owner, cost_ms: float = 0.0) -> Reservation | None:
        """Allocate ``nbytes`` for ``key``, evicting unleased entries if needed.

        Returns None when the space cannot be found (everything else leased, or larger than the
        arena). Raises ``EntryExists`` when the key is sealed or reserved already.
        """
        if nbytes <= 0:
            raise ValueError(f"{nbytes=} must be > 0")
        with self._lock:
            if key in self._key_to_entry:
                raise EntryExists(key)
            offset = self._allocate(nbytes)
            if offset is None:
                return None
            self._key_to_entry[key] = HostEntry(offset, nbytes, cost_ms, writer=owner)
            self._owner_to_keys.setdefault(owner, set()).add(key)
            return Reservation(key, offset, nbytes, owner)

    def buffer(self, reservation: Reservation) -> memoryview:
        """The reserved bytes, writable, for the writer to fill in place."""
        return self.arena.view(reservation.offset, reservation.nbytes)

    def seal(self, reservation: Reservation) -> None:
        """Make a filled reservation visible."""
        with self._lock:
            entry = self._reserved(reservation)
            entry.sealed, entry.writer = True, None
            self._forget(reservation.owner, reservation.key, entry)
            self.policy.on_insert(reservation.key, entry.nbytes, entry.cost_ms)

    def abort(self, reservation: Reservation) -> None:
        """Drop a reservation that will not be sealed; its space is free again."""
        with self._lock:
            entry = self._reserved(reservation)
            entry.writer = None
            self._forget(reservation.owner, reservation.key, entry)
            self._free(reservation.key)

    def _reserved(self, reservation: Reservation) -> HostEntry:
        entry = self._key_to_entry.get(reservation.key)
        if entry is None or entry.sealed or entry.offset != reservation.offset:
            raise ValueError(f"no open reservation for {reservation.key!r} at offset {reservation.offset}")
        return entry

    def _allocate(self, nbytes: int) -> int | None:
        offset = self.allocator.allocate(nbytes)
        while offset is None:
            victims = self.policy.choose_victims(nbytes, self._evictable)
            reclaimable = self.allocator.free_bytes + sum(self._key_to_entry[k].nbytes for k in victims)
            if not victims or reclaimable < nbytes:
                # NOTE: never evict for a request that cannot fit anyway (larger than the arena,
                # or everything else leased): that would empty the tier for nothing.
                return None
            for key in victims:
                self._evict(key)
            offset = self.allocator.allocate(nbytes)
        return offset

    def _evictable(self, key: str) -> bool:
        entry = self._key_to_entry.get(key)
        return entry is not None and entry.sealed and not entry.lease_counts

    def _evict(self, key: str) -> None:
        entry = self._key_to_entry[key]
        if self.on_evict is not None:
            # NOTE: write-back runs under the lock so the bytes cannot be reused while copied.
            self.on_evict(key, self.arena.view(entry.offset, entry.nbytes), entry.cost_ms)
        self.evictions += 1
        self.policy.on_remove(key, evicted=True)
        self._free(key)

    def _free(self, key: str) -> None:
        entry = self._key_to_entry.pop(key)
        self.allocator.free(entry.offset)

    # ------------------------------------------------------------ reading
    def lease(self, key: str, owner: Owner, *, count: bool = True) -> Location | None:
        """Pin a sealed entry for ``owner`` and say where it lies; None on a miss.

        ``count=False`` pins without touching hit/miss counters or recency (internal pins).
        """
        with self._lock:
            entry = self._key_to_entry.get(key)
            if entry is None or not entry.sealed or entry.doomed:
                self.misses += count
                return None
            entry.lease_counts[owner] = entry.lease_counts.get(owner, 0) + 1
            self._owner_to_keys.setdefault(owner, set()).add(key)
            self.live_leases += 1
            if count:
                self.hits += 1
                self.policy.on_access(key)
            return Location(entry.offset, entry.nbytes)

    def release(self, key: str, owner: Owner) -> bool:
        """Drop one lease of ``owner`` on ``key``; False if it held none."""
        with self._lock:
            entry = self._key_to_entry.get(key)
            count = entry.lease_counts.get(owner, 0) if entry else 0
            if count == 0:
                return False
            self.live_leases -= 1
            if count == 1:
                del entry.lease_counts[owner]
                self._forget(owner, key, entry)
            else:
                entry.lease_counts[owner] = count - 1
            if entry.doomed and not entry.lease_counts:
                self._free(key)
            return True

    def release_owner(self, owner: Owner) -> int:
        """Drop every lease and open reservation of ``owner`` (it disconnected or died)."""
        dropped = 0
        with self._lock:
            for key in self._owner_to_keys.pop(owner, ()):
                entry = self._key_to_entry.get(key)
                if entry is None:
                    continue
                if not entry.sealed and entry.writer == owner:
                    self._free(key)
                    dropped += 1
                    continue
                count = entry.lease_counts.pop(owner, 0)
                dropped += count
                self.live_leases -= count
                if count and entry.doomed and not entry.lease_counts:
                    self._free(key)
        return dropped

    def _forget(self, owner: Owner, key: str, entry: HostEntry) -> None:
        """``owner`` holds nothing more on ``key``: drop it from the owner index."""
        if owner in entry.lease_counts or entry.writer == owner:
            return
        keys = self._owner_to_keys.get(owner)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._owner_to_keys[owner]

    def leases_of(self, owner: Owner) -> int:
        """How many leases ``owner`` holds."""
        with self._lock:
            return sum(self._key_to_entry[k].lease_counts.get(owner, 0)
                       for k in self._owner_to_keys.get(owner, ()) if k in self._key_to_entry)

    def view(self, location: Location) -> memoryview:
        return self.arena.view(location.offset, location.nbytes)

    # ------------------------------------------------------------ queries
    def contains(self, key: str) -> bool:
        with self._lock:
            entry = self._key_to_entry.get(key)
            return entry is not None and entry.sealed and not entry.doomed

    def cost_ms(self, key: str) -> float:
        with self._lock:
            return self._key_to_entry[key].cost_ms

    def delete(self, key: str) -> bool:
        """Remove a sealed entry; if leased it vanishes now and its space frees at last release."""
        with self._lock:
            entry = self._key_to_entry.get(key)
            if entry is None or not entry.sealed or entry.doomed:
                return False
            self.policy.on_remove(key, evicted=False)
            if entry.lease_counts:
                entry.doomed = True
            else:
                self._free(key)
            return True

    def stats(self) -> dict:
        with self._lock:
            visible = [e for e in self._key_to_entry.values() if e.sealed and not e.doomed]
            return {
                "entries": len(visible),
                "bytes": sum(e.nbytes for e in visible),
                "capacity_bytes": self.allocator.capacity_bytes,
                "used_bytes": self.allocator.used_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "leases": self.live_leases,
                "reservations": sum(1 for e in self._key_to_entry.values() if not e.sealed),
                "fragmentation": round(self.allocator.fragmentation, 4),
            }

    def close(self) -> None:
        self.arena.close()
        self.arena.unlink()

"""The host tier: accounting (index, allocator, leases, policy) over one shared-memory arena.

Lifecycle of an entry: ``reserve`` (space allocated, invisible) → the writer fills the bytes in
place → ``seal`` (visible) → ``lease``/``release`` by readers → evicted or deleted.

Its invariants (docs/architecture.md, "Invariants"): only sealed entries are visible; a leased
entry is never evicted nor its bytes reused; eviction frees one contiguous window and nothing
outside it (``HostRoom`` plans it); an entry is evicted only once the tier below holds it; a
dead writer's reservation is quarantined until its process exits.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from typing import Callable, Hashable

from mmcache.core.allocator import ArenaAllocator
from mmcache.core.leases import LeaseTable
from mmcache.core.policies import make_policy
from mmcache.tiers.host_room import HostRoom
from mmcache.core.quotas import TenantLedger, usage_by_tenant
from mmcache.tiers.host_entry import DirtyHook, EvictHook, HostEntry, Location, embeddings_layout
from mmcache.core.tier import EntryExists, Owner, PutStatus, Reservation, Tier, TierLease, done
from mmcache_client.arena import SharedArena
from mmcache_client.format import EntryFormatError, read_entry
from mmcache_client.wire import Layout

logger = logging.getLogger(__name__)



class HostTier(Tier):
    """Entries in a shared arena, addressed by key strings ``ns/hash``. Thread-safe."""

    name = "host"

    def __init__(self, arena_path: str, capacity_bytes: int, *, policy: str = "lru", alignment: int = 256,
                 on_dirty: DirtyHook | None = None, persisted: Callable[[str], bool] | None = None,
                 on_evict: EvictHook | None = None, ledger: TenantLedger | None = None):
        self.allocator = ArenaAllocator(capacity_bytes, alignment)
        self.arena = SharedArena(arena_path, capacity_bytes, create=True)
        self.policy = make_policy(policy)
        self.on_dirty, self.on_evict = on_dirty, on_evict
        self.persisted: Callable[[str], bool] = persisted or (lambda key: True)
        """Whether the tiers below hold a key (an entry they lack is written back before eviction)."""
        self.leases = LeaseTable()
        self.ledger = ledger if ledger is not None else TenantLedger()
        """Tenants' bytes here against their quotas (``mmcache.core.quotas``), reservations included."""
        self._key_to_entry: dict[str, HostEntry] = {}
        self._offset_to_key: dict[int, str | None] = {}
        """Every allocated block: its key, or None for a pinned block no key names (a quarantined
        reservation, an entry deleted while leased)."""
        self._doomed: dict[int, HostEntry] = {}
        self._doomed_keys: dict[int, str] = {}
        """Entries deleted while leased, by offset: invisible (the key may be put again at once),
        freed at their last release. Leases are keyed by ``(key, offset)`` for this reason."""
        self._writer_keys: dict[Owner, set[str]] = {}
        self._quarantine: dict[Hashable, list[int]] = {}
        self._lock = threading.RLock()
        self.room = HostRoom(self.allocator, self.policy, self.leases, self._key_to_entry, self._offset_to_key,
                             self.ledger, lambda key: self.persisted(key))  # NOTE: it plans; this tier evicts
        self.hits = self.misses = self.evictions = self.evicted_bytes = self.no_space = 0

    # ------------------------------------------------------------ writing
    def reserve(self, key: str, nbytes: int, owner: Owner, cost_ms: float = 0.0, *,
                persist: bool = True) -> Reservation | PutStatus:
        """Allocate ``nbytes`` for ``key``, evicting only what makes contiguous room.

        Answers ``PutStatus.TOO_LARGE`` (never fits) or ``NO_SPACE`` (no room now); raises
        ``EntryExists`` when the key is sealed or reserved already.
        """
        if nbytes <= 0:
            raise ValueError(f"{nbytes=} must be > 0")
        dirty: list[str] = []
        with self._lock:
            if key in self._key_to_entry:
                raise EntryExists(key)
            offset = self._make_room(key, nbytes, dirty)
            if isinstance(offset, int):
                # NOTE: with no tier below (no on_dirty hook) there is nothing to write back to.
                clean = not persist or self.on_dirty is None
                self._key_to_entry[key] = HostEntry(offset, nbytes, cost_ms, persist, clean=clean, writer=owner)
                self.ledger.charge(key, nbytes)
                self._offset_to_key[offset] = key
                self._writer_keys.setdefault(owner, set()).add(key)
        self._write_back(dirty)
        if isinstance(offset, int):
            return Reservation(key, offset, nbytes, owner)
        if offset is None:
            self.no_space += 1
            return PutStatus.NO_SPACE
        return offset

    def _make_room(self, key: str, nbytes: int, dirty: list[str]) -> int | PutStatus | None:
        """An offset for ``nbytes`` of ``key``, evicting what ``room`` names: ``TOO_LARGE``
        (never fits), or None (no room now: nothing evicted but the tenant's own past its quota)."""
        if nbytes > self.allocator.capacity_bytes:
            return PutStatus.TOO_LARGE
        own = self.room.own_victims(key, nbytes, dirty) if self.ledger else []
        if own is None:
            return None
        for victim in own:
            self._evict(victim)
        offset = self.allocator.allocate(nbytes)
        if offset is not None:
            return offset
        window = self.room.window(nbytes, dirty, self.ledger.may_evict(key))
        if window is None:
            return None
        start, victims = window
        for victim in victims:
            self._evict(victim)
        if not self.allocator.allocate_at(start, nbytes):
            raise AssertionError(f"evicted window at {start} does not hold {nbytes} bytes")
        return start

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

    def buffer(self, reservation: Reservation) -> memoryview:
        """The reserved bytes, writable, for the writer to fill in place."""
        return self.arena.view(reservation.offset, reservation.nbytes)

    def seal(self, reservation: Reservation, cost_ms: float | None = None) -> None:
        """Make a filled reservation visible. A cost the policy refuses (NaN, negative) raises
        ValueError and frees the reservation: no error path leaves a sealed entry behind."""
        with self._lock:
            entry = self._reserved(reservation)
            if cost_ms is not None:
                entry.cost_ms = cost_ms
            try:
                self.policy.on_insert(reservation.key, entry.nbytes, entry.cost_ms)
            except ValueError:
                self._drop_reservation(reservation, entry)
                raise
            entry.sealed, entry.writer = True, None
            self._forget_writer(reservation.owner, reservation.key)

    def abort(self, reservation: Reservation) -> None:
        """Drop a reservation that will not be sealed; its space is free again."""
        with self._lock:
            self._drop_reservation(reservation, self._reserved(reservation))

    def _drop_reservation(self, reservation: Reservation, entry: HostEntry) -> None:
        self._forget_writer(reservation.owner, reservation.key)
        self._free(reservation.key)

    def _reserved(self, reservation: Reservation) -> HostEntry:
        entry = self._key_to_entry.get(reservation.key)
        if entry is None or entry.sealed or entry.offset != reservation.offset:
            raise ValueError(f"no open reservation for {reservation.key!r} at offset {reservation.offset}")
        return entry

    def _forget_writer(self, owner: Owner, key: str) -> None:
        keys = self._writer_keys.get(owner)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._writer_keys[owner]

    def put(self, key: str, blob: memoryview, cost_ms: float = 0.0, *, persist: bool = True,
            verify: bool = False) -> Future:
        """Copy ``blob`` in as a sealed entry (promotion from a lower tier; tests)."""
        data = memoryview(blob).cast("B")
        if verify:
            try:
                read_entry(data, verify=True)
            except EntryFormatError as e:
                failed: Future = Future()
                failed.set_exception(e)
                return failed
        try:
            res = self.reserve(key, data.nbytes, ("put", threading.get_ident()), cost_ms, persist=persist)
        except EntryExists:
            return done(PutStatus.EXISTS)
        if isinstance(res, PutStatus):
            return done(res)
        try:
            self.buffer(res)[:] = data
        except BaseException:
            self.abort(res)
            raise
        self.seal(res)
        return done(PutStatus.CREATED)

    # ------------------------------------------------------------ reading
    def lease(self, key: str, owner: Owner, *, count: bool = True) -> TierLease | None:
        """Pin a sealed entry for ``owner``; None on a miss. ``count=False``: the cache's own
        read (no hit/miss, no recency)."""
        with self._lock:
            entry = self._key_to_entry.get(key)
            if entry is None or not entry.sealed:
                self.misses += count
                return None
            self.leases.acquire((key, entry.offset), owner)
            if count:
                self.hits += 1
                self.policy.on_access(key)
            offset, nbytes = entry.offset, entry.nbytes
        return TierLease(self.name, key, owner, nbytes, self.arena.view(offset, nbytes), offset)

    def lease_many(self, keys: list[str], owner: Owner) -> list[tuple[int, int, Layout | None] | None]:
        """``lease`` for a batch under one lock, without a view per key (the local protocol's
        fast path): per key ``(offset, nbytes, layout)`` or None (a miss here). Give each back
        with ``release_many`` (or ``release_owner``)."""
        out: list[tuple[int, int, Layout | None] | None] = []
        with self._lock:
            entries, acquire, on_access = self._key_to_entry, self.leases.acquire, self.policy.on_access
            for key in keys:
                entry = entries.get(key)
                if entry is None or not entry.sealed:
                    out.append(None)  # NOTE: counted by the ``lease`` the caller falls back to
                    continue
                acquire((key, entry.offset), owner)
                self.hits += 1
                on_access(key)
                out.append((entry.offset, entry.nbytes, entry.layout))
        for i, (key, got) in enumerate(zip(keys, out)):
            if got is not None and got[2] is None:  # NOTE: parsed once per entry, outside the lock
                offset, nbytes, _ = got
                out[i] = (offset, nbytes, self.layout(TierLease(self.name, key, owner, nbytes,
                                                                self.arena.view(offset, nbytes), offset)))
        return out

    def release_many(self, leases: list[tuple[str, int]], owner: Owner) -> int:
        """Give back ``(key, offset)`` leases of ``owner`` taken by ``lease_many``; how many it held."""
        with self._lock:
            return sum(self._release(key, offset, owner) for key, offset in leases)

    def layout(self, lease: TierLease) -> Layout | None:
        """Where the leased entry's ``embeddings`` lie in it, for the local protocol's lease
        answer: parsed from the header once per entry, then kept with it. None: not laid out
        as an embeddings entry (never for a sealed one; the store validates at seal)."""
        entry = self._key_to_entry.get(lease.key)
        if entry is not None and entry.offset == lease.offset and entry.layout is not None:
            return entry.layout
        layout = embeddings_layout(lease.view)
        if layout is not None and entry is not None and entry.offset == lease.offset:
            entry.layout = layout
        return layout

    def release(self, lease: TierLease) -> bool:
        with self._lock:
            return self._release(lease.key, lease.offset, lease.owner)

    def release_key(self, key: str, owner: Owner) -> bool:
        """Drop one lease of ``owner`` on ``key`` (the live entry's, else a deleted one's)."""
        with self._lock:
            entry = self._key_to_entry.get(key)
            if entry is not None and self._release(key, entry.offset, owner):
                return True
            return any(self._release(key, off, owner) for off, k in list(self._doomed_keys.items()) if k == key)

    def _release(self, key: str, offset: int, owner: Owner) -> bool:
        if not self.leases.release((key, offset), owner):
            return False
        if offset in self._doomed and not self.leases.is_leased((key, offset)):
            self._free_doomed(offset)
        return True

    def _free_doomed(self, offset: int) -> None:
        del self._doomed[offset]
        del self._doomed_keys[offset]
        del self._offset_to_key[offset]
        self.allocator.free(offset)

    def release_owner(self, owner: Owner, *, quarantine: Hashable | None = None) -> int:
        """Drop every lease and open reservation of ``owner``. With ``quarantine`` (a token),
        its open reservations keep their space until ``free_quarantine(token)``: their writer
        may still be writing."""
        with self._lock:
            dropped = self.leases.release_owner(owner)
            for key, offset in dropped:
                if offset in self._doomed and not self.leases.is_leased((key, offset)):
                    self._free_doomed(offset)
            reservations = self._writer_keys.pop(owner, set())
            for key in reservations:
                entry = self._unindex(key)
                if quarantine is None:
                    del self._offset_to_key[entry.offset]
                    self.allocator.free(entry.offset)
                else:
                    self._offset_to_key[entry.offset] = None
                    self._quarantine.setdefault(quarantine, []).append(entry.offset)
            return sum(dropped.values()) + len(reservations)

    def free_quarantine(self, token: Hashable) -> int:
        """The writer behind ``token`` is gone: reuse its quarantined space; returns bytes freed."""
        with self._lock:
            freed = 0
            for offset in self._quarantine.pop(token, ()):
                del self._offset_to_key[offset]
                freed += self.allocator.free(offset)
            return freed

    def _unindex(self, key: str) -> HostEntry:
        """Drop ``key`` from the index (its space is the caller's to free or pin)."""
        entry = self._key_to_entry.pop(key)
        self.ledger.credit(key, entry.nbytes)
        return entry

    def leases_of(self, owner: Owner) -> int:
        with self._lock:
            return self.leases.leases_of(owner)

    def view(self, location: Location) -> memoryview:
        return self.arena.view(location.offset, location.nbytes)

    # ------------------------------------------------------------ queries
    def contains(self, key: str) -> bool:
        with self._lock:
            entry = self._key_to_entry.get(key)
            return entry is not None and entry.sealed

    def inventory(self) -> list[tuple[str, int]]:
        """``(key, nbytes)`` of every sealed entry, a snapshot (unordered)."""
        with self._lock:
            return [(k, e.nbytes) for k, e in self._key_to_entry.items() if e.sealed]

    def usage_by_tenant(self) -> dict[str | None, list[int]]:
        """``{tenant: [entries, bytes]}`` over sealed entries (None: the default tenant)."""
        return usage_by_tenant(self.inventory())

    def persists(self, key: str) -> bool:
        with self._lock:
            entry = self._key_to_entry.get(key)
            return entry is not None and entry.persist

    def nbytes(self, key: str) -> int:
        """The entry's size, 0 when host does not hold it."""
        with self._lock:
            entry = self._key_to_entry.get(key)
            return entry.nbytes if entry is not None else 0

    def cost_ms(self, key: str) -> float:
        with self._lock:
            return self._key_to_entry[key].cost_ms

    def delete(self, key: str) -> bool:
        """Remove a sealed entry; if leased it vanishes now and its space frees at last release."""
        with self._lock:
            entry = self._key_to_entry.get(key)
            if entry is None or not entry.sealed:
                return False
            self.policy.on_remove(key, evicted=False)
            if self.leases.is_leased((key, entry.offset)):
                self._unindex(key)
                self._doomed[entry.offset], self._doomed_keys[entry.offset] = entry, key
                self._offset_to_key[entry.offset] = None
            else:
                self._free(key)
            return True

    def stats(self) -> dict:
        with self._lock:
            visible = [e for e in self._key_to_entry.values() if e.sealed]
            a = self.allocator
            return dict(entries=len(visible), bytes=sum(e.nbytes for e in visible), capacity_bytes=a.capacity_bytes,
                        used_bytes=a.used_bytes, hits=self.hits, misses=self.misses, evictions=self.evictions,
                        evicted_bytes=self.evicted_bytes, no_space=self.no_space, quota_refused=self.ledger.refused,
                        leases=self.leases.total,
                        reservations=sum(1 for e in self._key_to_entry.values() if not e.sealed),
                        quarantined_bytes=sum(a.size_of(o) for offsets in self._quarantine.values() for o in offsets),
                        fragmentation=round(a.fragmentation, 4))

    def close(self) -> None:
        self.arena.close()
        self.arena.unlink()

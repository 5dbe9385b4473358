"""Lease accounting: who pins which key how many times. Accounting only, never bytes.

One ``LeaseTable`` per pinning tier (host, device, and disk for entries served in place from
LMDB); the tier serialises calls under its own lock. A lease is a counted reference held by an
owner (a connection, a request, the disk writer); an owner that goes away drops all of its
leases at once (``release_owner``), so a client that dies pins nothing (Plasma's rule).
"""

from __future__ import annotations

from typing import Hashable, Iterable

Owner = Hashable


class LeaseTable:
    """``key -> {owner: count}`` plus ``owner -> keys``, so dropping an owner costs O(its keys).

    Invariant: ``total == sum of every count``; a key with no leases has no entry here.
    Not thread-safe: the owning tier serialises.
    """

    def __init__(self) -> None:
        self._key_to_counts: dict[str, dict[Owner, int]] = {}
        self._owner_to_keys: dict[Owner, set[str]] = {}
        self.total = 0

    def acquire(self, key: str, owner: Owner) -> None:
        counts = self._key_to_counts.setdefault(key, {})
        counts[owner] = counts.get(owner, 0) + 1
        self._owner_to_keys.setdefault(owner, set()).add(key)
        self.total += 1

    def release(self, key: str, owner: Owner) -> bool:
        """Drop one lease of ``owner`` on ``key``; False (changing nothing) if it held none."""
        counts = self._key_to_counts.get(key)
        count = counts.get(owner, 0) if counts else 0
        if count == 0:
            return False
        self.total -= 1
        if count > 1:
            counts[owner] = count - 1
            return True
        del counts[owner]
        if not counts:
            del self._key_to_counts[key]
        keys = self._owner_to_keys[owner]
        keys.discard(key)
        if not keys:
            del self._owner_to_keys[owner]
        return True

    def release_owner(self, owner: Owner) -> dict[str, int]:
        """Drop every lease of ``owner``; returns ``key -> leases dropped``."""
        dropped: dict[str, int] = {}
        for key in self._owner_to_keys.pop(owner, ()):
            counts = self._key_to_counts[key]
            dropped[key] = counts.pop(owner)
            if not counts:
                del self._key_to_counts[key]
        self.total -= sum(dropped.values())
        return dropped

    def is_leased(self, key: str) -> bool:
        return key in self._key_to_counts

    def count(self, key: str) -> int:
        return sum(self._key_to_counts.get(key, {}).values())

    def leases_of(self, owner: Owner) -> int:
        return sum(self._key_to_counts[k][owner] for k in self._owner_to_keys.get(owner, ()))

    def keys_of(self, owner: Owner) -> Iterable[str]:
        return tuple(self._owner_to_keys.get(owner, ()))

    def drop_key(self, key: str) -> int:
        """Forget every lease on ``key`` (its tier is closing it down); returns how many."""
        counts = self._key_to_counts.pop(key, {})
        for owner in counts:
            keys = self._owner_to_keys[owner]
            keys.discard(key)
            if not keys:
                del self._owner_to_keys[owner]
        n = sum(counts.values())
        self.total -= n
        return n

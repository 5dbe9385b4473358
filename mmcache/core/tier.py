"""The one small interface every tier implements (device, host, disk; a remote plugs in the same way).

A tier stores immutable entry blobs (the safetensors format of ``mmcache_client.format``) under
``"ns/hash"`` key strings and knows nothing of the tiers around it: ``TieredStore`` composes a
list of them (fastest first) and decides promotion, write-through and write-back.

Contract (``tests/test_tier_contract.py`` runs it over every tier):
- ``put`` answers a ``PutStatus``; running out of room is an answer (``NO_SPACE``: retry later,
  ``TOO_LARGE``: never fits), not an exception. A second put of a key keeps the first (``EXISTS``).
  Asynchronous tiers (disk) return a Future that resolves when the entry is readable.
- ``lease(key, owner)`` pins a readable entry and returns a ``TierLease`` whose ``view`` is valid
  until ``release``; None is a miss. A leased entry is never evicted nor its bytes reused;
  ``delete`` of a leased entry hides it at once.
- ``release_owner`` drops all of an owner's leases (it disconnected or died).
- ``stats`` has at least ``entries``, ``bytes``, ``capacity_bytes``, ``hits``, ``misses``,
  ``evictions``, ``leases``.
"""

from __future__ import annotations

import abc
import enum
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, ClassVar, Hashable

Owner = Hashable


class PutStatus(enum.Enum):
    CREATED = "created"
    EXISTS = "exists"
    NO_SPACE = "no_space"
    """No room now (everything evictable is leased or being written); retry later."""
    TOO_LARGE = "too_large"
    """Larger than the tier's capacity: it never fits."""


class EntryExists(Exception):
    """The key is already sealed or being written; entries are immutable."""


@dataclass(frozen=True)
class Reservation:
    """Room taken in the read tier for an in-place put: the writer fills ``nbytes`` at ``offset``
    of the arena, then the store seals it (reserve → fill in place → seal)."""

    key: str
    offset: int
    nbytes: int
    owner: Owner


@dataclass(frozen=True)
class TierLease:
    """One reader's pin on an entry of ``tier``; ``view`` is the blob in place (None for tiers
    whose entries are not host bytes, e.g. device tensors: see ``handle``)."""

    tier: str
    key: str
    owner: Owner
    nbytes: int
    view: memoryview | None = None
    offset: int = -1
    """Offset of the blob in the tier's shared mapping (host arena), or -1."""
    handle: Any = None
    """Tier-specific: the LMDB read transaction, device tensors, ..."""


def done(value: Any) -> Future:
    """A Future that is already resolved with ``value`` (synchronous tiers)."""
    fut: Future = Future()
    fut.set_result(value)
    return fut


class Tier(abc.ABC):
    """See the module docstring for the contract. Thread-safe."""

    name: ClassVar[str]
    durable: ClassVar[bool] = True
    """Whether host may treat an entry this tier holds as persisted (evict it without write-back),
    and a put asks it whether a key exists. A shared remote store is not: best effort, behind."""

    @abc.abstractmethod
    def contains(self, key: str) -> bool: ...

    @abc.abstractmethod
    def lease(self, key: str, owner: Owner, *, count: bool = True) -> TierLease | None:
        """Pin ``key`` for ``owner``; ``count=False`` for the cache's own reads (no hit/miss)."""

    @abc.abstractmethod
    def release(self, lease: TierLease) -> bool: ...

    @abc.abstractmethod
    def release_owner(self, owner: Owner) -> int: ...

    @abc.abstractmethod
    def put(self, key: str, blob: memoryview, cost_ms: float = 0.0, *, verify: bool = False) -> Future:
        """Store ``blob`` as ``key``: a Future of ``PutStatus``. The blob is not kept after
        the Future resolves (the tier copies it). ``verify``: check the blob's checksum first (a
        mismatch fails the Future with ``ChecksumMismatch`` and stores nothing)."""

    @abc.abstractmethod
    def delete(self, key: str) -> bool: ...

    @abc.abstractmethod
    def stats(self) -> dict: ...

    def touch(self, key: str) -> None:
        """A client read ``key`` from a tier above this one: keep it warm here too."""

    def touch_many(self, keys: list[str]) -> None:
        """``touch`` for a batch (a tier with a lock takes it once)."""
        for key in keys:
            self.touch(key)

    def flush(self, timeout: float | None = None) -> None:
        """Block until every accepted put is readable (asynchronous tiers)."""

    def close(self) -> None: ...


def check_key(key: str, view: Any) -> None:
    """A lower tier's entry must be the one asked for (a tenant's key is ``tenant@ns/hash``)."""
    own = f"{view.metadata['namespace']}/{view.metadata['hash']}"
    if own != key.rpartition("@")[2]:
        raise ValueError(f"entry names {own!r}, stored under {key!r}")

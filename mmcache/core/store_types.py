"""What the store takes and gives: its config, a put's result, a reader's lease."""

from __future__ import annotations

import concurrent.futures
import os
import secrets
from dataclasses import dataclass, field
from typing import Mapping

from mmcache.core.data_dir import ARENA_PREFIX, arena_dir
from mmcache.core.tier import Owner, TierLease

RETRY_AFTER_S = 1
"""What a put that found no room is told to wait (HTTP ``Retry-After``), in seconds."""


@dataclass(frozen=True)
class StoreConfig:
    """Sizes in bytes. ``arena_path`` defaults to a fresh file under /dev/shm."""

    data_dir: str
    """Directory for the LMDB environment (``<data_dir>/lmdb``)."""
    host_capacity_bytes: int = 1 << 30
    """Size of the shared-memory arena."""
    disk_capacity_bytes: int = 16 << 30
    """Payload bytes kept on disk before eviction."""
    arena_path: str | None = None
    """Arena file; default ``/dev/shm/mmcache-<pid>-<random>.arena``."""
    host_policy: str = "lru"
    """Eviction policy of the host tier: ``lru``, ``gdsf`` or ``cost-lfu``."""
    disk_policy: str = "lru"
    """Eviction policy of the disk tier."""
    disk_flush_interval_ms: float = 2.0
    """Longest wait of the disk writer to gather a batch, in milliseconds."""
    disk_max_queued_bytes: int = 1 << 30
    """Bytes of puts that host cannot take queued for the disk writer at most (then 503)."""
    remote: "RemoteConfig | None" = None  # noqa: F821 - mmcache.tiers.remote_config (core does not import tiers)
    """A Redis/Valkey server or cluster below disk, shared by many sidecars (``mmcache.tiers.remote``)."""
    node: str = ""
    """This sidecar's name in inventory events (``mmcache.core.events``); default ``host:pid``."""
    device_capacity_bytes: int = 0
    """GPU memory for the device tier above host (``mmcache.tiers.device_front``); 0: no device tier
    (and no CUDA context). Needs a CUDA GPU."""
    device: str = "cuda:0"
    """The GPU holding the device tier."""
    device_policy: str = "lru"
    """Eviction policy of the device tier."""
    max_claims: int = 100_000
    """Live claims granted through this sidecar at most (``mmcache.core.claims``); past it: 429."""
    max_claims_per_owner: int = 4096
    """Live claims of one owner at most; past it: 429."""
    max_event_followers: int = 256
    """Event followers at most (HTTP streams and local ones); past it: 429."""
    max_event_followers_per_tenant: int = 64
    """Event followers of one tenant (or of the default one) at most; past it: 429."""
    claim_ttl_max_ms: int = 120_000
    """Longest claim TTL granted (longer asks are clamped): the longest anyone can make encoders wait."""
    tenant_quotas: Mapping[str, int] = field(default_factory=dict)
    """Tenant → bytes it may hold in host and, separately, on disk (``mmcache.core.quotas``)."""

    def __post_init__(self) -> None:
        for name in ("host_capacity_bytes", "disk_capacity_bytes", "disk_max_queued_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.device_capacity_bytes < 0:
            raise ValueError(f"device_capacity_bytes={self.device_capacity_bytes} must be >= 0")

    def resolved_arena_path(self) -> str:
        if self.arena_path:
            return self.arena_path
        return os.path.join(arena_dir(self.data_dir), f"{ARENA_PREFIX}{os.getpid()}-{secrets.token_hex(4)}.arena")


@dataclass(frozen=True)
class PutResult:
    created: bool
    """False when the key existed (the first put is kept)."""
    tier: str
    durable: concurrent.futures.Future | None = None
    """Resolves once the entry is on disk (None when it already was, or never will be)."""


@dataclass(frozen=True)
class Lease:
    """A reader's pin on an entry; give it back with ``TieredStore.release``."""

    key: str
    owner: Owner
    tier: str
    """Where the entry was found: ``host``; ``disk`` when this read promoted it or (``served_from``
    ``disk``) when host had no room and it is read in place from LMDB."""
    view: memoryview
    """The entry's bytes in place, valid until ``TieredStore.release(lease)``."""
    tier_lease: TierLease

    @property
    def served_from(self) -> str:
        """The tier whose memory ``view`` points into."""
        return self.tier_lease.tier

    @property
    def offset(self) -> int:
        """Offset of the blob in the host arena, or -1 when it is served from a lower tier."""
        return self.tier_lease.offset

    @property
    def nbytes(self) -> int:
        return self.tier_lease.nbytes

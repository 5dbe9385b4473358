"""The tiered store: host (shared arena) over disk (LMDB), the cache the sidecar serves.

- ``get``/``lease`` search host → disk; a disk hit is verified and promoted into the host tier.
- Puts land in the host tier (visible once sealed) and reach disk write-behind in batches; the
  host entry stays leased by the disk writer until the batch commits, so it cannot be evicted
  before it is persisted. ``durable=True`` waits for that commit.
- Eviction from host writes the entry back to disk when disk lacks it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import logging
import os
import secrets
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from mmcache.disk import DiskTier, DiskTierConfig
from mmcache.host import EntryExists, HostTier, Location, Owner, Reservation
from mmcache_client.format import EntryPlan, EntryView, parse_entry, plan_entry, read_entry, verify_checksum
from mmcache_client.keys import Key

logger = logging.getLogger(__name__)

_ARENA_RECORD = "arena.path"
_DISK_WRITER = "mmcache.disk-writer"
"""Owner of the leases that keep not-yet-persisted host entries in place."""


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
    host_only_namespaces: tuple[str, ...] = ("kv.",)
    """Namespace prefixes whose entries live in the host tier only: never written to disk,
    dropped on eviction. The default covers the per-request KV hand-off entries of
    ``llm_worker`` (deleted once decode has them; writing each to LMDB would only cost a copy)."""

    def __post_init__(self) -> None:
        for name in ("host_capacity_bytes", "disk_capacity_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")

    def resolved_arena_path(self) -> str:
        if self.arena_path:
            return self.arena_path
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else os.path.join(self.data_dir, "shm")
        os.makedirs(shm, exist_ok=True)
        return os.path.join(shm, f"mmcache-{os.getpid()}-{secrets.token_hex(4)}.arena")


@dataclass(frozen=True)
class PutResult:
    created: bool
    """False when the key existed (the first put is kept)."""
    tier: str
    durable: concurrent.futures.Future | None = None
    """Resolves once the entry is on disk (None when it already was)."""


@dataclass(frozen=True)
class Lease:
    """A reader's pin on a host entry; give it back with ``TieredStore.release``."""

    key: str
    owner: Owner
    location: Location
    tier: str
    """Where the entry was found: ``host``, or ``disk`` when this read promoted it."""
    view: memoryview | None = None
    """The entry's bytes in place, valid until ``TieredStore.release(lease)``."""


def _lock_data_dir(data_dir: str) -> int:
    """One sidecar per data dir: an exclusive flock held for the store's lifetime."""
    fd = os.open(os.path.join(data_dir, "LOCK"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(f"data dir {data_dir!r} is in use by another mmcache process") from None
    return fd


def _key_str(key: Key | str) -> str:
    return key if isinstance(key, str) else key.to_string()


class TieredStore:
    """Host and disk tiers behind one interface. Thread-safe; one per sidecar process."""

    def __init__(self, config: StoreConfig):
        self.config = config
        os.makedirs(config.data_dir, exist_ok=True)
        self._lock_fd = _lock_data_dir(config.data_dir)
        self._remove_stale_arena()
        self.disk = DiskTier(
            DiskTierConfig(
                path=os.path.join(config.data_dir, "lmdb"),
                capacity_bytes=config.disk_capacity_bytes,
                policy=config.disk_policy,
                flush_interval_ms=config.disk_flush_interval_ms,
            )
        )
        self.host = HostTier(
            config.resolved_arena_path(),
            config.host_capacity_bytes,
            policy=config.host_policy,
            on_evict=self._write_back,
        )
        with open(os.path.join(self.config.data_dir, _ARENA_RECORD), "w") as f:
            f.write(self.host.arena.path)
        self._promote_lock = threading.Lock()
        self.write_backs = 0

    def _remove_stale_arena(self) -> None:
        """An arena recorded in the data dir whose sidecar died (kill -9) is ours to remove."""
        record = os.path.join(self.config.data_dir, _ARENA_RECORD)
        try:
            with open(record) as f:
                stale = f.read().strip()
        except FileNotFoundError:
            return
        if stale and os.path.exists(stale):
            logger.warning("removing the arena %s left by a sidecar that did not stop cleanly", stale)
            os.unlink(stale)

    @property
    def arena_path(self) -> str:
        return self.host.arena.path

    # ------------------------------------------------------------ writes
    def put(self, key: Key | str, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None,
            *, encode_ms: float = 0.0, durable: bool = False) -> PutResult:
        """Store tensors (``embeddings`` required) under ``key``; the tensors are copied once."""
        k = Key.from_string(key) if isinstance(key, str) else key
        plan = plan_entry(k.namespace, k.hash, tensors, metadata, encode_ms=encode_ms)
        return self.put_plan(k.to_string(), plan, durable=durable)

    def put_plan(self, key: str, plan: EntryPlan, *, durable: bool = False) -> PutResult:
        """Write a laid-out entry into the host tier in place, then to disk (write-behind)."""
        if self.contains(key):
            return PutResult(False, self.tier_of(key) or "host")
        cost_ms = float(plan.metadata.get("encode_ms", 0.0))
        owner = ("put", threading.get_ident())
        try:
            res = self._reserve_host(key, plan.total_bytes, owner, cost_ms)
        except EntryExists:
            return PutResult(False, "host")
        if res is None:  # host full of leased entries, or entry larger than the arena
            blob = plan.to_bytes()
            fut = self.disk.put(key, blob, cost_ms)
            if durable:
                fut.result()
            return PutResult(True, "disk", fut)
        try:
            plan.write_into(self.host.buffer(res))
        except BaseException:
            self.host.abort(res)
            raise
        return self._seal_and_persist(res, cost_ms, durable)

    def reserve(self, key: Key | str, nbytes: int, owner: Owner, cost_ms: float = 0.0, *,
                wait_for_disk: bool = True) -> Reservation | None:
        """Phase one of a client's in-place put. Raises ``EntryExists`` if the key is present.

        None when the arena has no room; with ``wait_for_disk`` it first waits (milliseconds) for
        pending disk writes, whose entries pin their space until committed.
        """
        key = _key_str(key)
        if self.disk.contains(key):
            raise EntryExists(key)
        return self._reserve_host(key, nbytes, owner, cost_ms, wait_for_disk)

    def _reserve_host(self, key: str, nbytes: int, owner: Owner, cost_ms: float,
                      wait_for_disk: bool = True) -> Reservation | None:
        res = self.host.reserve(key, nbytes, owner, cost_ms)
        if res is None and wait_for_disk and self.host.leases_of(_DISK_WRITER):
            # NOTE: wait for the batch to commit rather than refuse a put under a burst of writes.
            self.disk.flush()
            res = self.host.reserve(key, nbytes, owner, cost_ms)
        return res

    def seal(self, res: Reservation, *, durable: bool = False) -> PutResult:
        """Phase two: validate what the (untrusted) writer put in place, then make it visible.

        A blob that fails validation is dropped (its space freed) and the error re-raised.
        """
        try:
            view = self.host.buffer(res)
            parsed = parse_entry(view)
            verify_checksum(view, parsed)
            k = Key.from_string(res.key)
            if (parsed.metadata["namespace"], parsed.metadata["hash"]) != (k.namespace, k.hash):
                raise ValueError(f"entry metadata names {parsed.metadata['namespace']}/{parsed.metadata['hash']}, key is {res.key}")
            cost_ms = float(parsed.metadata["encode_ms"])
        except BaseException:
            self.host.abort(res)
            raise
        return self._seal_and_persist(res, cost_ms, durable)

    def abort(self, res: Reservation) -> None:
        self.host.abort(res)

    def _host_only(self, key: str) -> bool:
        return key.startswith(self.config.host_only_namespaces)

    def _seal_and_persist(self, res: Reservation, cost_ms: float, durable: bool) -> PutResult:
        self.host.seal(res)
        if self._host_only(res.key):
            return PutResult(True, "host", None)
        loc = self.host.lease(res.key, _DISK_WRITER, count=False)
        fut = self.disk.put(res.key, self.host.view(loc), cost_ms)
        fut.add_done_callback(lambda _f, key=res.key: self.host.release(key, _DISK_WRITER))
        if durable:
            fut.result()
        return PutResult(True, "host", fut)

    def _write_back(self, key: str, data: memoryview, cost_ms: float) -> None:
        if not self._host_only(key) and not self.disk.contains(key):
            self.write_backs += 1
            self.disk.put(key, bytes(data), cost_ms)  # the arena bytes are freed right after

    # ------------------------------------------------------------ reads
    def lease(self, key: Key | str, owner: Owner) -> Lease | None:
        """Pin ``key`` in the host tier for ``owner`` (promoting it from disk); None on a miss."""
        key = _key_str(key)
        loc = self.host.lease(key, owner)
        if loc is not None:
            return Lease(key, owner, loc, "host", self.host.view(loc))
        with self._promote_lock:
            loc = self.host.lease(key, owner, count=False)  # promoted by a racing reader?
            if loc is not None:
                return Lease(key, owner, loc, "host", self.host.view(loc))
            with self.disk.view(key) as entry:
                if entry is None:
                    return None
                data = memoryview(entry.buffer).cast("B")
                try:
                    res = self._reserve_host(key, data.nbytes, owner, float(entry.metadata["encode_ms"]))
                except EntryExists:
                    return None
                if res is None:
                    return None
                self.host.buffer(res)[:] = data
                self.host.seal(res)
            loc = self.host.lease(key, owner, count=False)
            return Lease(key, owner, loc, "disk", self.host.view(loc))

    def release(self, lease: Lease) -> None:
        self.host.release(lease.key, lease.owner)

    def release_owner(self, owner: Owner) -> int:
        return self.host.release_owner(owner)

    @contextmanager
    def get(self, key: Key | str) -> Iterator[EntryView | None]:
        """In-process read: an ``EntryView`` over the arena (or the LMDB map), or None."""
        owner = ("get", threading.get_ident(), secrets.token_hex(4))
        lease = self.lease(key, owner)
        if lease is None:
            if not self.disk.contains(_key_str(key)):
                yield None
                return
            with self.disk.view(_key_str(key)) as entry:  # host could not take it: read in place
                yield entry
            return
        try:
            yield read_entry(self.host.view(lease.location), verify=False)
        finally:
            self.release(lease)

    # ------------------------------------------------------------ queries
    def tier_of(self, key: Key | str) -> str | None:
        key = _key_str(key)
        if self.host.contains(key):
            return "host"
        if self.disk.contains(key):
            return "disk"
        return None

    def contains(self, key: Key | str) -> bool:
        return self.tier_of(key) is not None

    def lookup(self, keys: list[str]) -> dict[str, str | None]:
        return {k: self.tier_of(k) for k in keys}

    def delete(self, key: Key | str) -> bool:
        key = _key_str(key)
        in_host = self.host.delete(key)
        in_disk = self.disk.delete(key)
        return in_host or in_disk

    def flush(self, timeout: float | None = None) -> None:
        self.disk.flush(timeout)

    def stats(self) -> dict:
        disk = self.disk.stats()
        return {"host": self.host.stats(), "disk": {**disk, "write_backs": self.write_backs}}

    def close(self) -> None:
        """Flush disk writes, close LMDB, remove the arena file. Idempotent."""
        if self._lock_fd < 0:
            return
        self.disk.close()
        self.host.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.config.data_dir, _ARENA_RECORD))
        os.close(self._lock_fd)  # releases the flock
        self._lock_fd = -1

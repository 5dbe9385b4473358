"""The tiered store: a list of tiers, fastest first, behind one interface; the cache the sidecar serves.

The store knows tiers only through ``mmcache.core.tier.Tier``; the one it treats specially is the
*read tier* (host: the shared arena same-node readers map), where puts land and reads promote to.
Every tier below it is a *lower* tier (disk today; a remote store plugs in the same way).

- ``lease``: host → each lower tier in turn. A lower hit is verified (by the tier), promoted into
  host and leased there; when host has no room (or the reader asks ``promote=False``: a scan) it
  is served in place from the lower tier (an LMDB view under a read transaction), never reported
  as a miss.
- Puts land in host (visible once sealed) and are written through to the lower tiers behind, the
  host entry pinned until they hold it (``clean``), so it is never evicted unpersisted. A put
  that host cannot take lands in the lower tier and is acknowledged once readable there. An entry
  with ``persist=False`` (a KV hand-off) stays in host only.
- Eviction from host never copies under the host lock: an entry that is not clean is written
  back first (``_write_back``, off the lock) and becomes evictable when the lower tier holds it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

from mmcache.core import inventory
from mmcache.core.claims import Claims
from mmcache.core.data_dir import forget_arena
from mmcache.core.events import EventBus, relayed_event
from mmcache.core.store_types import RETRY_AFTER_S, Lease, PutResult, StoreConfig  # noqa: F401 - the store's own names
from mmcache.core.tier import EntryExists, Owner, PutStatus, Reservation, Tier, TierLease
from mmcache.core.write_down import WriteDown
from mmcache_client.errors import CacheFull, EntryTooLarge
from mmcache_client.format import EntryPlan, EntryView, parse_entry, plan_entry, read_entry, verify_checksum
from mmcache_client.keys import Key

logger = logging.getLogger(__name__)

def _key_str(key: Key | str) -> str:
    return key if isinstance(key, str) else key.to_string()


def _cost(metadata: Mapping[str, str]) -> float:
    cost_ms = float(metadata.get("encode_ms", 0.0))
    if not math.isfinite(cost_ms) or cost_ms < 0:
        raise ValueError(f"encode_ms={metadata.get('encode_ms')!r} must be a finite number >= 0")
    return cost_ms


class TieredStore:
    """Host over the lower tiers behind one interface, and a device tier in front where one is
    attached (``mmcache.tiers.device_front``: promoted into on a reader's ask). Thread-safe; one
    per sidecar process. Built by ``mmcache.tiers.wiring.open_store``, which opens the tiers
    ``config`` asks for and hands them here; the store owns them from then on (``close``).

    ``host``: the read tier (the shared arena), ``disk``: the durable tier below it, ``events``:
    the inventory bus, ``lock_fd``: the data dir's lock, held until ``close``."""

    def __init__(self, config: StoreConfig, *, host: Any, disk: Tier, events: EventBus, lock_fd: int):
        self.config = config
        self._lock_fd = lock_fd
        self.events = events
        self.host, self.disk = host, disk
        self.remote: Tier | None = None
        self.lower: list[Tier] = [disk]
        """Tiers below host, in the order reads search them."""
        self.durable: list[Tier] = [t for t in self.lower if t.durable]
        """The lower tiers host relies on (evicts into) and puts consult; not the remote."""
        self.best_effort: list[Tier] = []
        """Lower tiers written behind, waited for by no one (the remote)."""
        self.tiers: list[Tier] = [host, *self.lower]
        self._counts_lock = threading.Lock()
        self.counts = dict(write_backs=0, persist_errors=0, promotions=0, served_in_place=0, relays_refused=0)
        self.writer = WriteDown(host, self.durable, self.best_effort, count=self._count, stored=self._stored,
                                delete=self.delete, persisted=self._persisted)
        host.on_dirty, host.persisted = self.writer.write_back, self._persisted
        host.on_evict = lambda key, n: self.events.publish("evicted", key, "host", n)
        disk.on_evict = lambda key, n: self.events.publish("evicted", key, "disk", n)
        self.claims = Claims(self.contains, None, max_claims=config.max_claims,
                             max_claims_per_owner=config.max_claims_per_owner, ttl_max_ms=config.claim_ttl_max_ms)
        self.device: Any = None
        """The device tier's front (``DeviceFront``), when one is attached."""

    def attach_remote(self, remote: Tier) -> None:
        """Put the shared remote below disk: read after it, written behind, its events relayed."""
        self.remote = remote
        self.lower.append(remote)
        self.tiers.append(remote)
        self.best_effort.append(remote)
        self.claims.remote = remote
        self.events.sink = remote.emit

    def relay(self, doc: dict) -> None:
        """Another node's event, read from the remote's stream: published here under its node,
        once it passed ``relayed_event``'s checks (anyone who can write the stream could send
        anything; followers must see only well-formed events). Refused ones are counted."""
        event = relayed_event(doc)
        if event is None:
            self._count("relays_refused")
            return
        self.events.publish(*event[:4], node=event[4], ts=event[5])

    def remote_stored(self, key: str, nbytes: int) -> None:
        self.events.publish("stored", key, "remote", nbytes)

    def holds_locally(self, key: str) -> bool:
        """Host or a durable tier below holds ``key`` (no network call)."""
        return self.host.contains(key) or any(t.contains(key) for t in self.durable)

    def _stored(self, key: str, tier: str, nbytes: int) -> None:
        """``key`` is readable from ``tier`` now: end its local claim, tell the followers."""
        self.claims.stored(key)
        self.events.publish("stored", key, tier, nbytes)

    def _persisted(self, key: str) -> bool:
        return all(t.contains(key) for t in self.durable)

    @property
    def arena_path(self) -> str:
        return self.host.arena.path

    def _count(self, name: str, n: int = 1) -> None:
        with self._counts_lock:
            self.counts[name] += n

    # ------------------------------------------------------------ writes
    def put(self, key: Key | str, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None,
            *, encode_ms: float = 0.0, durable: bool = False, persist: bool = True) -> PutResult:
        """Store tensors (``embeddings`` required) under ``key``; the tensors are copied once."""
        k = Key.from_string(key) if isinstance(key, str) else key
        plan = plan_entry(k.namespace, k.hash, tensors, metadata, encode_ms=encode_ms)
        return self.put_plan(k.to_string(), plan, durable=durable, persist=persist)

    def put_plan(self, key: str, plan: EntryPlan, *, durable: bool = False, persist: bool = True) -> PutResult:
        """Write a laid-out entry into host in place (or, with no room there, into disk), then
        through to the lower tiers. Raises ``CacheFull`` (no room now), ``EntryTooLarge``."""
        if durable and not persist:
            raise ValueError("durable=1 needs persist: a host-only entry never reaches disk")
        cost_ms = _cost(plan.metadata)
        existing = self._local_tier_of(key)
        if existing is not None:
            return PutResult(False, existing)
        owner = ("put", threading.get_ident())
        try:
            res = self.reserve(key, plan.total_bytes, owner, cost_ms, persist=persist)
        except EntryExists:
            return PutResult(False, self._local_tier_of(key) or "host")
        if isinstance(res, PutStatus):
            return self._put_below(key, plan, cost_ms, persist, res)
        try:
            plan.write_into(self.host.buffer(res))
            self.host.seal(res, cost_ms)
        except BaseException:
            with contextlib.suppress(ValueError):  # seal frees a reservation it refuses itself
                self.host.abort(res)
            raise
        return self.writer.through(key, cost_ms, durable)

    def _check_persistable(self, key: str, nbytes: int, persist: bool) -> None:
        if persist and nbytes > self.disk.config.capacity_bytes:
            raise EntryTooLarge(f"entry {key} of {nbytes} bytes exceeds the disk tier's {self.disk.config.capacity_bytes} "
                                f"bytes and could never be persisted; put it with persist=0 to keep it in host only")

    def _put_below(self, key: str, plan: EntryPlan, cost_ms: float, persist: bool, why: PutStatus) -> PutResult:
        """Host cannot take the entry: land it on disk and answer once it is readable there."""
        if not persist:
            if why is PutStatus.TOO_LARGE:
                raise EntryTooLarge(f"host-only entry {key} of {plan.total_bytes} bytes exceeds the "
                                    f"{self.host.allocator.capacity_bytes}-byte arena")
            raise CacheFull(f"no room for {plan.total_bytes} bytes of host-only entry {key}: everything else "
                            f"is leased or being written", RETRY_AFTER_S)
        if not self.disk.admits(plan.total_bytes):  # before the copy below
            raise CacheFull(f"no room for {plan.total_bytes} bytes of {key} in host now, and the disk "
                            f"queue is full ({self.disk.config.max_queued_bytes} bytes)", RETRY_AFTER_S)
        blob = plan.to_bytes()
        fut = self.disk.put(key, blob, cost_ms, bounded=True)
        status = fut.result()  # NOTE: a 201 means every reader sees it: wait for the commit
        if status is PutStatus.EXISTS:
            return PutResult(False, "disk")
        if status is not PutStatus.CREATED:
            raise CacheFull(f"no room for {plan.total_bytes} bytes of {key} in host or disk now", RETRY_AFTER_S)
        self._stored(key, "disk", plan.total_bytes)
        if self.remote is not None:  # NOTE: shared too (and its claim ends once the remote holds it)
            self.remote.put(key, memoryview(blob), cost_ms)
        return PutResult(True, "disk", None)

    def reserve(self, key: Key | str, nbytes: int, owner: Owner, cost_ms: float = 0.0, *, persist: bool = True,
                wait_for_disk: bool = True) -> Reservation | PutStatus:
        """Phase one of an in-place put: a ``Reservation``, or ``PutStatus.NO_SPACE`` /
        ``TOO_LARGE``. Raises ``EntryExists`` if a tier holds the key. With ``wait_for_disk`` a
        full host first waits (milliseconds) for pending write-throughs, whose entries pin space."""
        key = _key_str(key)
        self._check_persistable(key, nbytes, persist)
        if any(t.contains(key) for t in self.durable):
            raise EntryExists(key)
        res = self.host.reserve(key, nbytes, owner, cost_ms, persist=persist)
        if res is PutStatus.NO_SPACE and wait_for_disk and self.writer.pending():
            # NOTE: wait for the batch to commit rather than refuse a put under a burst of writes.
            self.flush()
            res = self.host.reserve(key, nbytes, owner, cost_ms, persist=persist)
        return res

    def seal(self, res: Reservation, *, durable: bool = False, verify: bool = True) -> PutResult:
        """Phase two: validate what the (untrusted) writer put in place, then make it visible.

        A blob that fails validation is dropped (its space freed) and the error re-raised: no
        error path leaves a sealed entry. ``verify``: a checksum pass too (call it off the event
        loop). A local writer's seal skips it (``verify=False``, the structure is still checked):
        the writer fused its checksum into the fill, readers of the arena never verify, and the
        disk writer verifies every copy from the arena before it commits, so a wrong checksum is
        never made durable (``checksum_mismatch``) and a read from disk stays verified.
        """
        try:
            view = self.host.buffer(res)
            parsed = parse_entry(view)
            if verify:
                verify_checksum(view, parsed)
            k = Key.from_string(res.key)
            if (parsed.metadata["namespace"], parsed.metadata["hash"]) != (k.namespace, k.hash):
                raise ValueError(f"entry metadata names {parsed.metadata['namespace']}/{parsed.metadata['hash']}, key is {res.key}")
            cost_ms = _cost(parsed.metadata)
            self.host.seal(res, cost_ms)
        except BaseException:
            with contextlib.suppress(ValueError):
                self.host.abort(res)
            raise
        return self.writer.through(res.key, cost_ms, durable)

    def abort(self, res: Reservation) -> None:
        self.host.abort(res)

    def lease(self, key: Key | str, owner: Owner, *, promote: bool = True) -> Lease | None:
        """Pin ``key`` for ``owner`` (promoting it into host where there is room); None on a miss.
        May copy (promotion) and verify a checksum: call it off the event loop unless
        ``host.contains(key)``. ``promote=False`` (a sequential scan: an export) serves a lower
        tier's entry in place, as when host has no room, so the scan leaves host's hot set be."""
        key = _key_str(key)
        tl = self.host.lease(key, owner)
        if tl is not None:
            for t in self.lower:
                t.touch(key)
            return Lease(key, owner, "host", tl.view, tl)
        for tier in self.lower:
            below = tier.lease(key, owner)
            if below is None:
                continue
            promoted = self._promote(key, below, owner) if promote else None
            if promoted is not None:
                tier.release(below)
                if not tier.durable and self.host.persists(key):  # a remote hit lands on disk too
                    self.writer.copy_down(key, tiers=self.durable)
                return promoted
            self._count("served_in_place")
            return Lease(key, owner, tier.name, below.view, below)
        return None

    def _promote(self, key: str, below: TierLease, owner: Owner) -> Lease | None:
        try:
            cost_ms = float(read_entry(below.view, verify=False).metadata["encode_ms"])
            res = self.host.reserve(key, below.nbytes, ("promote", threading.get_ident()), cost_ms)
        except (EntryExists, ValueError):
            return None  # a racing reader promotes it; this one reads in place
        if isinstance(res, PutStatus):
            return None
        try:
            self.host.buffer(res)[:] = below.view
            self.host.seal(res, cost_ms)
        except BaseException:
            with contextlib.suppress(ValueError):
                self.host.abort(res)
            raise
        self._count("promotions")
        self._stored(key, "host", below.nbytes)
        tl = self.host.lease(key, owner, count=False)
        return None if tl is None else Lease(key, owner, below.tier, tl.view, tl)

    def lease_host_many(self, keys: list[str], owner: Owner) -> list[tuple[int, int, Any] | None]:
        """Pin the keys host holds, in one go (``HostTier.lease_many``): per key ``(offset,
        nbytes, layout)`` or None where host misses (``lease`` it then: it may be below). The
        lower tiers are touched for the hits as ``lease`` does. Give back with
        ``release_host_many``."""
        got = self.host.lease_many(keys, owner)
        hits = [k for k, g in zip(keys, got) if g is not None]
        if hits:
            for t in self.lower:
                t.touch_many(hits)
        return got

    def release_host_many(self, leases: list[tuple[str, int]], owner: Owner) -> int:
        return self.host.release_many(leases, owner)

    def release(self, lease: Lease) -> None:
        tier = self.host if lease.served_from == "host" else next(t for t in self.lower if t.name == lease.served_from)
        tier.release(lease.tier_lease)

    def release_owner(self, owner: Owner, *, quarantine: Any = None) -> int:
        dropped = self.device.release_owner(owner) if self.device is not None else 0
        return dropped + self.host.release_owner(owner, quarantine=quarantine) + \
            sum(t.release_owner(owner) for t in self.lower)

    @contextmanager
    def get(self, key: Key | str) -> Iterator[EntryView | None]:
        """In-process read: an ``EntryView`` over the arena (or the LMDB map), or None."""
        lease = self.lease(key, ("get", threading.get_ident(), secrets.token_hex(4)))
        if lease is None:
            yield None
            return
        try:
            yield read_entry(lease.view, verify=False)
        finally:
            self.release(lease)

    # ------------------------------------------------------------ queries
    def tier_of(self, key: Key | str) -> str | None:
        """The first tier holding ``key`` (the remote too: a network call; off the event loop)."""
        key = _key_str(key)
        return next((t.name for t in self.tiers if t.contains(key)), None)

    def _local_tier_of(self, key: str) -> str | None:
        return next((t.name for t in (self.host, *self.durable) if t.contains(key)), None)

    def contains(self, key: Key | str) -> bool:
        return self.tier_of(key) is not None

    def lookup(self, keys: list[str]) -> dict[str, str | None]:
        return {k: self.tier_of(k) for k in keys}

    def describe(self, keys: list[str]) -> dict[str, dict | None]:
        """Per key ``{"tier", "num_tokens"[, "image_grid_thw"]}`` or None (``inventory.describe``)."""
        return inventory.describe(self.host, self.lower, keys)

    def delete(self, key: Key | str) -> bool:
        """Remove from every tier; never waits for a disk commit."""
        key = _key_str(key)
        found = [t.delete(key) for t in self.tiers]
        if self.device is not None:
            found.append(self.device.delete(key))
        if any(found):
            self.events.publish("deleted", key, "all", 0)
        return any(found)

    def flush(self, timeout: float | None = None) -> None:
        for t in self.durable:
            t.flush(timeout)

    def list_entries(self, prefix: str = "", after: str = "", limit: int = 1000) -> list[tuple[str, str, int]]:
        """One page of the local entries in key order (``inventory.list_entries``); off the loop."""
        return inventory.list_entries(self.host, self.disk, prefix, after, limit)

    def usage_by_tenant(self) -> dict[str | None, dict[str, dict[str, int]]]:
        """``{tenant: {tier: {"entries", "bytes"}}}`` for host and disk; off the loop."""
        return inventory.usage_by_tenant(self.host, self.disk)

    def stats(self) -> dict:
        doc = {t.name: t.stats() for t in self.tiers}
        if self.device is not None:
            doc["device"] = self.device.stats()
        doc["claims"] = self.claims.stats()
        doc["events"] = self.events.stats()
        with self._counts_lock:
            doc["disk"].update(write_backs=self.counts["write_backs"], persist_errors=self.counts["persist_errors"])
            doc["host"].update(promotions=self.counts["promotions"], served_in_place=self.counts["served_in_place"])
            doc["events"]["relays_refused"] = self.counts["relays_refused"]
        return doc

    def close(self) -> None:
        """Flush disk writes, close LMDB, remove the arena file. Idempotent."""
        if self._lock_fd < 0:
            return
        if getattr(self, "device", None) is not None:
            self.device.close()
            self.device = None
        for t in self.lower:
            t.close()
        self.host.close()
        forget_arena(self.config.data_dir)
        os.close(self._lock_fd)  # releases the flock
        self._lock_fd = -1

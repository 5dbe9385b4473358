"""The device tier in front of the store: GPU copies of the entries that readers ask for on a GPU.

``TieredStore`` makes one where a device tier is configured (``mmcache serve --device-capacity``
on a machine with a GPU; ``DeviceTier.fake`` in the CPU tests). Lifecycle of an entry here:

    lease (miss) → the store leases it (host, else disk or remote, promoting into host) → its
    tensors are copied onto the device from the arena (pinned: ``cudaHostRegister``) → leased
    → exported to a same-node reader (CUDA IPC, ``mmcache_client.cuda``) → released → evicted
    (demoted into host first if no tier below holds it any more) or deleted.

Invariants: a device entry is a copy of an entry that was sealed below (same tensors, same
metadata); a leased entry is never evicted; an entry deleted while it was being promoted is
dropped from the device, never resurrected; a reader's imported tensors stay valid past a
delete or an eviction (torch's IPC ref-counter keeps the block until the last reader drops it),
so no reader ever sees its GPU memory reused. Pressure is an answer: a device that cannot make
room answers ``None`` from ``lease`` and the caller reads from host instead.

Trust: an IPC handle opens the caching allocator's whole segment, writable, so a reader can
see the segment's other entries: the device tier is for readers the sidecar's user trusts (as
the arena file, 0600, is), and ``--tenants`` refuses it. A handle exported but never imported
(a reader that died between the answer and its import) keeps its block in torch's IPC limbo
until the sidecar exits, so real GPU use can exceed ``--device-capacity`` by such blocks.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import TYPE_CHECKING, Any, Hashable

from mmcache.core.tier import EntryExists
from mmcache.core.tier import PutStatus
from mmcache_client.format import plan_entry, read_entry
from mmcache_client.keys import Key

if TYPE_CHECKING:
    from mmcache.tiers.device import DeviceTier
    from mmcache.core.store import TieredStore

logger = logging.getLogger(__name__)

Owner = Hashable


class DeviceFront:
    """Promotion onto the device, leases and exports, demotion on eviction. Thread-safe."""

    def __init__(self, store: "TieredStore", tier: "DeviceTier"):
        self.store, self.tier = store, tier
        self._lock = threading.Lock()
        self._metadata: dict[str, dict[str, str]] = {}
        """Each device entry's metadata (tensors alone cannot be demoted or described)."""
        self._deletes: dict[str, int] = {}
        """Per key, deletes seen while a promotion of it was in flight (``_promote`` checks)."""
        self._promoting: dict[str, int] = {}
        self.promotions = self.demotions = self.full = 0
        self.gpu_uuid = _gpu_uuid(tier)
        """The device's UUID: a reader maps an IPC handle only onto the same GPU (its own
        numbering may differ: ``CUDA_VISIBLE_DEVICES``)."""
        tier.on_evict = self._evicted

    # ------------------------------------------------------------ reading
    def lease(self, key: str, owner: Owner) -> dict[str, Any] | None:
        """Pin ``key`` on the device for ``owner``, promoting it there on a miss: its device
        tensors, or None (no tier holds it, or the device has no room now: read it from host)."""
        got = self.tier.lease(key, owner)
        if got is not None:
            return got.handle
        if not self._promote(key):
            return None
        got = self.tier.lease(key, owner, count=False)
        return None if got is None else got.handle

    def export(self, key: str, owner: Owner) -> dict | None:
        """``lease`` for a reader in another process of this node: per tensor a CUDA IPC handle
        as data (``mmcache_client.cuda.handle_doc``) and the entry's metadata, or None."""
        from torch.multiprocessing.reductions import reduce_tensor

        from mmcache_client.cuda import handle_doc

        tensors = self.lease(key, owner)
        if tensors is None:
            return None
        try:
            return {"tensors": {name: handle_doc(reduce_tensor(t)) for name, t in tensors.items()},
                    "metadata": self.metadata(key), "gpu": self.gpu_uuid}
        except BaseException:
            self.tier.release_key(key, owner)
            raise

    def metadata(self, key: str) -> dict[str, str]:
        with self._lock:
            return dict(self._metadata.get(key, {}))

    def _promote(self, key: str) -> bool:
        owner = ("device-promote", threading.get_ident())
        below = self.store.lease(key, owner)
        if below is None:
            return False
        with self._lock:
            self._promoting[key] = self._promoting.get(key, 0) + 1
            deletes = self._deletes.get(key, 0)
        try:
            view = read_entry(below.view, verify=False)  # NOTE: the store verified what came from disk or the network
            with self._lock:  # NOTE: before the put: an export right after it names the metadata
                self._metadata.setdefault(key, dict(view.metadata))
            status = self.tier.put(key, below.view, float(view.metadata.get("encode_ms", 0.0))).result()
            with self._lock:
                deleted = self._deletes.get(key, 0) != deletes
                if status is PutStatus.CREATED and not deleted:
                    self.promotions += 1
                elif status is not PutStatus.EXISTS or deleted:
                    self.full += status is not PutStatus.EXISTS and status is not PutStatus.CREATED
                    if not self.tier.contains(key) or deleted:
                        self._metadata.pop(key, None)
            if deleted:  # NOTE: deleted while it was copied up: it must not come back
                self.tier.delete(key)
                return False
            return status in (PutStatus.CREATED, PutStatus.EXISTS)
        finally:
            with self._lock:
                left = self._promoting[key] - 1
                if left:
                    self._promoting[key] = left
                else:
                    del self._promoting[key]
                    self._deletes.pop(key, None)
            self.store.release(below)

    # ------------------------------------------------------------ giving back, removing
    def release(self, key: str, owner: Owner) -> bool:
        return self.tier.release_key(key, owner)

    def release_owner(self, owner: Owner) -> int:
        return self.tier.release_owner(owner)

    def delete(self, key: str) -> bool:
        with self._lock:
            self._metadata.pop(key, None)
            if key in self._promoting:
                self._deletes[key] = self._deletes.get(key, 0) + 1
        return self.tier.delete(key)

    def _evicted(self, key: str, tensors: dict[str, Any], cost_ms: float) -> None:
        """The device evicts ``key`` (under its lock): demote it into host unless a tier below
        still holds it (a host-only entry that host evicted meanwhile would be lost)."""
        with self._lock:
            metadata = self._metadata.pop(key, None)
        if metadata is None or self.store.holds_locally(key):
            return
        k = Key.from_string(key.rpartition("@")[2])
        meta = {m: v for m, v in metadata.items() if m not in ("checksum", "format", "namespace", "hash")}
        host = self.store.host
        try:
            # NOTE: laid out around the device tensors themselves, so the one copy is GPU →
            # arena, straight into a reservation (no host staging tensor, no blob in between)
            plan = plan_entry(k.namespace, k.hash, {n: t.detach() for n, t in tensors.items()}, meta,
                              encode_ms=cost_ms)
            res = host.reserve(key, plan.total_bytes, ("device-demote", threading.get_ident()), cost_ms,
                               persist=False)
        except (EntryExists, ValueError) as e:  # NOTE: host took it meanwhile, or it cannot be laid out
            logger.debug("device tier: not demoting %s: %s", key, e)
            return
        if isinstance(res, PutStatus):  # NOTE: an eviction never fails the put that caused it
            logger.warning("device tier: no room in host to demote %s (%s); it is dropped", key, res.value)
            return
        try:
            plan.write_into(host.buffer(res))
            host.seal(res, cost_ms)
        except (ValueError, OSError, RuntimeError) as e:
            with contextlib.suppress(ValueError):
                host.abort(res)
            logger.warning("device tier: demoting %s into host failed: %s", key, e)
            return
        with self._lock:
            self.demotions += 1
        self.store.events.publish("stored", key, "host", plan.total_bytes)

    def stats(self) -> dict:
        doc = self.tier.stats()
        with self._lock:
            doc.update(promotions=self.promotions, demotions=self.demotions, no_room=self.full)
        return doc

    def close(self) -> None:
        self.tier.close()


def _gpu_uuid(tier: "DeviceTier") -> str | None:
    """The UUID of the tier's GPU (None for the CPU fake)."""
    if tier.device.type != "cuda":
        return None
    import torch

    return str(torch.cuda.get_device_properties(tier.device).uuid)

"""Opening a store: the tiers a ``StoreConfig`` asks for, opened and wired into a ``TieredStore``.

``open_store`` is the one place that knows every tier class. It takes the data dir's lock,
removes an arena a dead sidecar left, opens disk (LMDB), host (the shared arena), the remote
(Redis) and the device tier (CUDA) in turn, and hands them to the store, which owns them from
then on. A step that fails closes, in reverse order, everything opened before it (one
``ExitStack``), so a failed start leaves no lock held, no LMDB open and no arena in /dev/shm.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Any

from mmcache.core.data_dir import forget_arena, lock_data_dir, record_arena, remove_stale_arena
from mmcache.core.events import EventBus
from mmcache.core.quotas import TenantLedger
from mmcache.core.store import TieredStore
from mmcache.core.tier import check_key
from mmcache.core.store_types import StoreConfig
from mmcache.tiers.disk import DiskTier, DiskTierConfig
from mmcache.tiers.host import HostTier

logger = logging.getLogger("mmcache.core.store")


def open_store(config: StoreConfig, *, device_tier: Any = None) -> TieredStore:
    """The store ``config`` describes, its tiers open and wired. ``device_tier``: a device tier
    made by the caller (the CPU tests pass ``DeviceTier.fake``) instead of the one ``config``
    asks for."""
    _warn_oversubscribed(config)
    os.makedirs(config.data_dir, mode=0o700, exist_ok=True)
    with contextlib.ExitStack() as undo:
        lock_fd = lock_data_dir(config.data_dir)
        undo.callback(os.close, lock_fd)
        remove_stale_arena(config.data_dir, config.arena_path)
        events = EventBus(config.node or f"{socket.gethostname()}:{os.getpid()}",
                          max_followers=config.max_event_followers,
                          max_followers_per_tenant=config.max_event_followers_per_tenant)
        disk = DiskTier(DiskTierConfig(
            path=os.path.join(config.data_dir, "lmdb"), capacity_bytes=config.disk_capacity_bytes,
            policy=config.disk_policy, flush_interval_ms=config.disk_flush_interval_ms,
            max_queued_bytes=config.disk_max_queued_bytes), TenantLedger(config.tenant_quotas))
        undo.callback(disk.close)
        host = HostTier(config.resolved_arena_path(), config.host_capacity_bytes, policy=config.host_policy,
                        ledger=TenantLedger(config.tenant_quotas))
        undo.callback(host.close)
        store = TieredStore(config, host=host, disk=disk, events=events, lock_fd=lock_fd)
        if config.remote is not None:
            from mmcache.tiers.remote import RemoteTier  # NOTE: redis-py only with --remote

            remote = RemoteTier(config.remote, verify_key=check_key, node=events.node, on_event=store.relay,
                                on_stored=store.remote_stored)
            undo.callback(remote.close)
            store.attach_remote(remote)
        record_arena(config.data_dir, host.arena.path)
        undo.callback(forget_arena, config.data_dir)
        _attach_device(store, config, device_tier)
        undo.pop_all()
    return store


def _attach_device(store: TieredStore, config: StoreConfig, tier: Any) -> None:
    """The device tier, if any, and the arena pinned for it (host → GPU at pinned speed).
    NOTE: nothing here touches CUDA without a device tier: no context on a CPU-only node."""
    if tier is None and config.device_capacity_bytes == 0:
        return
    from mmcache.tiers.device import DeviceTier, DeviceTierConfig, cuda_available
    from mmcache.tiers.device_front import DeviceFront

    if tier is None:
        if not cuda_available():
            raise ValueError(f"a device tier of {config.device_capacity_bytes} bytes needs a CUDA GPU, and "
                             "none is visible: leave --device-capacity at 0 on this machine")
        tier = DeviceTier(DeviceTierConfig(config.device_capacity_bytes, config.device, config.device_policy))
        store.host.arena.pin()  # NOTE: host → GPU promotions at pinned speed; unpinned when host closes
    store.device = DeviceFront(store, tier)


def _warn_oversubscribed(config: StoreConfig) -> None:
    """Quotas are guarantees too: past a tier's capacity, a full tier answers 503 to tenants
    with nothing of their own to evict."""
    total = sum(config.tenant_quotas.values())
    for tier, capacity in (("host", config.host_capacity_bytes), ("disk", config.disk_capacity_bytes)):
        if total > capacity:
            logger.warning("tenant quotas add up to %s bytes, more than the %s tier's %s: a tenant's entries within "
                           "its quota are evicted only for that tenant, so a full %s tier can refuse others' puts (503)",
                           total, tier, capacity, tier)

"""Writing down: how an entry sealed in host reaches the tiers below it (``WriteDown``, owned by
``TieredStore``, which hands it the tiers and the few hooks it calls back). Write-through to the durable tiers from the arena in place, the entry pinned
by the store's own lease until they hold it; write-behind to best-effort tiers (the remote);
write-back of an entry host wants to evict that a lower tier has dropped. A write-down that
fails fails the durable future (``?durable=1`` is never acknowledged for it), and an entry the
disk writer refused as corrupt is deleted from the arena too.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import Any, Callable

from mmcache.core.store_types import RETRY_AFTER_S, PutResult
from mmcache.core.tier import PutStatus, Tier
from mmcache_client.errors import CacheFull
from mmcache_client.format import EntryFormatError

logger = logging.getLogger("mmcache.core.store")

WRITER = "mmcache.write-through"
"""Owner of the host leases that keep entries in place until the lower tiers hold them."""
_BEHIND = ("writer", "behind")
"""Owner of the host leases that keep entries in place while a best-effort tier copies them."""


def _write_down_error(key: str, f: concurrent.futures.Future) -> BaseException | None:
    """Why a lower tier did not take ``key`` (None: it holds it now)."""
    error = f.exception()
    if error is not None:
        return error
    if f.result() in (PutStatus.CREATED, PutStatus.EXISTS):
        return None
    if f.result() is PutStatus.NO_SPACE:
        return CacheFull(f"{key}: no room on disk now", RETRY_AFTER_S)
    return CacheFull(f"{key}: the disk tier refused it ({f.result()})", RETRY_AFTER_S)


class WriteDown:
    """Copies host's entries to the tiers below: ``durable`` ones (waited for, the entry pinned
    until they hold it) and ``best_effort`` ones (the remote: nothing waits). ``count`` bumps a
    store counter, ``stored`` says a key is readable from a tier, ``delete`` removes a key from
    every tier, ``persisted`` says whether the durable tiers hold a key."""

    def __init__(self, host: Any, durable: list[Tier], best_effort: list[Tier], *, count: Callable[[str], None],
                 stored: Callable[[str, str, int], None], delete: Callable[[str], bool],
                 persisted: Callable[[str], bool]):
        self.host, self.durable, self.best_effort = host, durable, best_effort
        self._count, self._stored, self._delete, self._persisted = count, stored, delete, persisted

    def pending(self) -> bool:
        """Write-throughs under way (their entries pin host space until they end)."""
        return self.host.leases_of(WRITER) > 0

    def through(self, key: str, cost_ms: float, durable: bool) -> PutResult:
        """``key`` was sealed in host: copy it down (waiting for the durable tiers if ``durable``)."""
        self._stored(key, "host", self.host.nbytes(key))
        if not self.host.persists(key):
            return PutResult(True, "host", None)
        fut = self.copy_down(key, cost_ms)
        if durable and fut is not None:
            fut.result()
        return PutResult(True, "host", fut)

    def _copy_behind(self, tier: Tier, key: str, cost_ms: float) -> None:
        """Write host's ``key`` to a best-effort tier (the remote) from the arena in place: its
        own lease holds the bytes until that write is done, and nothing waits for it."""
        lease = self.host.lease(key, _BEHIND, count=False)
        if lease is None:
            return
        try:
            fut = tier.put(key, lease.view, cost_ms)
        except BaseException:
            self.host.release(lease)
            raise
        fut.add_done_callback(lambda _f: self.host.release(lease))

    def copy_down(self, key: str, cost_ms: float | None = None, tiers: list[Tier] | None = None
                  ) -> concurrent.futures.Future | None:
        """Write host's ``key`` to the lower tiers from the arena in place (the disk writer copies
        it into LMDB); the entry stays leased, so unevictable, until they hold it."""
        lease = self.host.lease(key, WRITER, count=False)
        if lease is None:
            return None
        cost_ms = self.host.cost_ms(key) if cost_ms is None else cost_ms
        # NOTE: verify=True: arena entries may have been sealed on their writer's word (see seal)
        futures = [t.put(key, lease.view, cost_ms, verify=True) for t in tiers or self.durable]
        if tiers is None:
            for t in self.best_effort:
                self._copy_behind(t, key, cost_ms)
        all_done: concurrent.futures.Future = concurrent.futures.Future()
        remaining = [len(futures)]
        lock = threading.Lock()

        failures: list[BaseException] = []

        def one_done(f: concurrent.futures.Future) -> None:
            error = _write_down_error(key, f)
            if error is not None:
                self._count("persist_errors")
                logger.warning("writing %s below host failed: %s", key, error)
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
                if error is not None:
                    failures.append(error)
            if last:
                # NOTE: a failed write-down still makes the entry evictable (counted in
                # persist_errors), or an entry that cannot be persisted would pin host space for good.
                self.host.written_down(key, ok=not failures)
                self.host.release(lease)
                corrupt = next((e for e in failures if isinstance(e, EntryFormatError)), None)
                if corrupt is not None:
                    # NOTE: the writer's checksum does not match its bytes (a local seal trusts
                    # it): what the disk writer refused must not stay readable in the arena either.
                    self._delete(key)
                if all_done.done():
                    return
                if failures:  # NOTE: a durable put waits on this: it must not be acknowledged
                    all_done.set_exception(corrupt or failures[0])
                else:
                    all_done.set_result(True)

        for f in futures:
            f.add_done_callback(one_done)
        return all_done

    def write_back(self, key: str) -> None:
        """Host wants to evict ``key`` but a lower tier lacks it (e.g. evicted there): copy it
        down first. Called outside the host lock."""
        if self._persisted(key):
            self.host.written_down(key, ok=True)
            return
        self._count("write_backs")
        if self.copy_down(key, tiers=self.durable) is None:  # deleted meanwhile
            self.host.written_down(key, ok=True)

"""The disk tier's one writer thread (``DiskWriter``, a part of ``DiskTier``): it gathers puts,
deletes and corruption clean-ups into batched LMDB write transactions, verifies a local
writer's blobs before it commits them, evicts by the policy when the map or the capacity is
full, then applies the batch to the in-memory index and resolves each op's ``Future``. All
LMDB writes happen here; ``mmcache.tiers.disk`` holds the reading side and the state both share.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import lmdb

from mmcache.core.leases import LeaseTable
from mmcache.core.tier import PutStatus
from mmcache_client.format import BadHeader, EntryFormatError, EntryView, parse_entry, read_entry

logger = logging.getLogger("mmcache.tiers.disk")
_SCRATCH_KEY = b"\x00mmcache-scratch"  # not a valid entry key


@dataclass(eq=False)
class Op:
    """One request to the writer. ``kind``: put | delete | corrupt | flush | stop."""

    kind: str
    future: Future
    key: str = ""
    blob: memoryview | None = None
    cost_ms: float = 0.0
    nbytes: int = 0
    bounded: bool = False
    """Counted against ``max_queued_bytes`` while queued."""
    verify: bool = False
    """The writer verifies the blob's checksum before it commits (a local writer's entry, sealed
    on its word)."""


def check_entry(key: str, buf: Any, *, verify: bool) -> EntryView:
    """The entry in ``buf``, checked against its key; raises ``EntryFormatError``."""
    entry = read_entry(buf, verify=verify) if verify else EntryView(buf, parse_entry(buf))
    own = f"{entry.metadata['namespace']}/{entry.metadata['hash']}"
    if own != key.rpartition("@")[2]:  # NOTE: a tenant's key is "tenant@ns/hash"; the entry names ns/hash
        raise BadHeader(f"entry names {own!r}, stored under {key!r}")
    return entry


def _is_valid(key: str, buf: bytes | None) -> bool:
    """False only for a record that is there and unreadable."""
    try:
        return buf is None or check_entry(key, buf, verify=True) is not None
    except EntryFormatError:
        return False


class DiskState:
    """What the disk tier's callers and its writer thread share, under ``lock``: the index of
    committed entries (key → nbytes) and their total, the eviction policy, the readers' leases,
    the tenants' ledger, the counters, and the bookkeeping of queued puts."""

    def __init__(self, policy: Any, ledger: Any):
        self.lock = threading.Lock()
        self.index: dict[str, int] = {}
        """key → nbytes of committed entries only."""
        self.bytes = 0
        self.policy, self.ledger = policy, ledger
        self.leases = LeaseTable()
        self.counts = dict(hits=0, misses=0, evictions=0, corrupt=0, pending_writes=0, write_errors=0, too_large=0,
                           checksum_mismatch=0, queue_full=0)
        self.queued_bytes = 0
        """Bytes of bounded puts queued or being committed."""
        self.tombstones: set[str] = set()
        """Keys deleted while a put of theirs was queued: that put must not index them when it
        commits ahead of the delete."""
        self.pending_puts: dict[str, int] = {}
        """Keys with a queued put (not yet committed), so a delete knows they exist."""
        self.on_evict: Callable[[str, int], None] | None = None
        """Called (under ``lock``) with (key, nbytes) of each entry evicted to make room."""


class DiskWriter:
    """The disk tier's writer thread: it takes ops from ``queue``, commits them in batches into
    ``env`` and applies them to ``state``; ``broken`` is the error that stopped it, if any."""

    def __init__(self, env: Any, config: Any, state: DiskState, ops: "queue.SimpleQueue[Op]"):
        self._env, self.config, self.state, self._queue = env, config, state, ops
        self.broken: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mmcache-disk-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        ops: list[Op] = []
        try:
            while True:
                if not ops:
                    ops = self._gather()
                stopping = ops[-1].kind == "stop"
                try:
                    ops = self._commit(ops)
                except Exception as e:
                    logger.error("disk tier batch of %s ops failed: %r", len(ops), e, exc_info=True)
                    with self.state.lock:
                        self.state.counts["write_errors"] += sum(op.kind == "put" for op in ops)
                    self._resolve([(op, e) for op in ops])
                    ops = []
                if stopping and not ops:
                    return
        except BaseException as e:  # the writer is gone: no queued future may hang
            logger.exception("disk tier writer died")
            with self.state.lock:
                self.broken = e
            while True:
                try:
                    ops.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._resolve([(op, e) for op in ops if not op.future.done()])
            raise

    def _gather(self) -> list[Op]:
        ops: list[Op] = []
        deadline = None
        while len(ops) < self.config.batch_max_entries:
            if deadline is None:
                op = self._queue.get()
                deadline = time.monotonic() + self.config.flush_interval_ms / 1000
            else:
                try:
                    op = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
            if not op.future.set_running_or_notify_cancel():
                self._resolve([(op, None)])  # cancelled while queued: dropped
                deadline = deadline if ops else None
                continue
            ops.append(op)
            if op.kind in ("flush", "stop", "delete"):  # someone waits: commit now
                break
        return ops

    def _verified(self, ops: list[Op]) -> list[Op]:
        """``ops`` less the puts whose checksum fails (their Futures fail); off every lock."""
        bad = []
        for op in ops:
            if op.kind == "put" and op.verify:
                op.verify = False  # NOTE: once: a retried batch is not verified again
                try:
                    check_entry(op.key, op.blob, verify=True)
                except EntryFormatError as e:
                    bad.append((op, e))
        if not bad:
            return ops
        logger.warning("%s put(s) failed verification and were not written: %s", len(bad), bad[0][1])
        with self.state.lock:
            self.state.counts["checksum_mismatch"] += len(bad)
        self._resolve(bad)
        failed = {id(op) for op, _ in bad}
        return [op for op in ops if id(op) not in failed]

    def _commit(self, ops: list[Op]) -> list[Op]:
        ops = self._verified(ops)
        if not ops:
            return []
        try:
            return self._try_commit(ops)
        except lmdb.MapFullError:
            need = max(2 * sum(op.nbytes for op in ops), self.config.capacity_bytes // 8)
            with self.state.lock:
                victims = self.state.policy.choose_victims(need, lambda k: not self.state.leases.is_leased(k))
            logger.warning("LMDB map full at %s bytes; evicting %s entries and retrying",
                           self.config.resolved_map_size_bytes, len(victims))
            with self._env.begin(write=True) as txn:
                for key in victims:
                    txn.delete(key.encode("utf-8"))
            self._apply({key: True for key in victims}, {})
            # NOTE: LMDB 0.9 reuses pages freed by commit T only from transaction T+2 on (T-1's
            # snapshot must stay recoverable), so one no-op commit precedes the retry. The
            # scratch key never outlives its transaction.
            with self._env.begin(write=True) as txn:
                txn.put(_SCRATCH_KEY, b"")
                txn.delete(_SCRATCH_KEY)
            return self._try_commit(ops)

    def _try_commit(self, ops: list[Op]) -> list[Op]:
        """Write a prefix of ``ops`` in one transaction; return the deferred rest."""
        added: dict[str, Op] = {}
        removed: dict[str, bool] = {}  # committed key -> evicted (True) or deleted (False)
        actions: list[tuple[str, str, memoryview | None]] = []
        results: list[tuple[Op, Any]] = []
        deferred: list[Op] = []
        capacity = self.config.capacity_bytes
        with self.state.lock:  # plan: only this thread changes the index, so the plan stays valid
            present = lambda k: k in added or (k in self.state.index and k not in removed)  # noqa: E731
            used = self.state.bytes
            for i, op in enumerate(ops):
                if op.kind == "put" and present(op.key):
                    results.append((op, PutStatus.EXISTS))
                    continue
                if op.kind == "put" and self.state.ledger:
                    quota = self._quota_room(op, removed, added, actions)
                    if quota is None:  # this batch's own puts of the tenant, once committed, can make room
                        deferred = ops[i:]
                        break
                    if quota is PutStatus.NO_SPACE:
                        results.append((op, quota))
                        continue
                    used -= quota
                if op.kind in ("put", "flush"):
                    need = used + op.nbytes - capacity
                    allowed = self.state.ledger.may_evict(op.key) if op.kind == "put" else None
                    victims = self.state.policy.choose_victims(
                        need, lambda k: k not in removed and not self.state.leases.is_leased(k)
                        and (allowed is None or allowed(k)))
                    freed = sum(self.state.index[k] for k in victims)
                    if freed < need and added:  # this batch's own puts, once committed, can make room
                        deferred = ops[i:]
                        break
                    if freed < need and op.kind == "put":  # the rest is leased: no room now
                        results.append((op, PutStatus.NO_SPACE))
                        continue
                    for k in victims:
                        removed[k] = True
                        actions.append(("del", k, None))
                    used -= freed
                if op.kind == "put":
                    added[op.key] = op
                    used += op.nbytes
                    actions.append(("put", op.key, op.blob))
                    results.append((op, PutStatus.CREATED))
                elif op.kind == "delete":
                    self.state.tombstones.discard(op.key)
                    existed = present(op.key)
                    if op.key in added:
                        used -= added.pop(op.key).nbytes
                    elif existed:
                        removed[op.key] = False
                        used -= self.state.index[op.key]
                    actions.append(("del", op.key, None))
                    results.append((op, existed))
                elif op.kind == "corrupt":
                    actions.append(("corrupt", op.key, None))
                    results.append((op, None))
                else:
                    results.append((op, True))
        if actions:
            with self._env.begin(write=True) as txn:
                for kind, key, blob in actions:
                    kb = key.encode("utf-8")
                    if kind == "put":
                        # NOTE: the index alone decides presence (first put wins); a record it
                        # does not know is an unreadable one queued for deletion at open.
                        txn.put(kb, blob)
                    elif kind == "del":
                        txn.delete(kb)
                    elif not _is_valid(key, txn.get(kb)):  # re-checked: a fresh put may be valid
                        txn.delete(kb)
                        if added.pop(key, None) is None and key in self.state.index:
                            removed[key] = False
        self._apply(removed, added)
        self._resolve(results)
        return deferred

    def _quota_room(self, op: Op, removed: dict[str, bool], added: dict[str, Op],
                    actions: list) -> int | PutStatus | None:
        """Evict (in the plan) ``op``'s tenant's own entries until it fits in its quota
        (``mmcache.core.quotas``): the bytes freed, ``NO_SPACE`` when its own are leased, or None
        when only this batch's own puts of the tenant could make room (defer the rest)."""
        own = self.state.ledger.own(op.key)
        pending = sum(a.nbytes for k, a in added.items() if own(k)) \
            - sum(self.state.index[k] for k in removed if own(k) and k in self.state.index)
        excess = self.state.ledger.excess(op.key, op.nbytes, pending)
        if not excess:
            return 0
        victims = self.state.policy.choose_victims(
            excess, lambda k: own(k) and k not in removed and not self.state.leases.is_leased(k))
        freed = sum(self.state.index[k] for k in victims)
        if freed < excess:
            if any(own(k) for k in added):
                return None
            self.state.ledger.refused += 1
            return PutStatus.NO_SPACE
        for k in victims:
            removed[k] = True
            actions.append(("del", k, None))
        return freed

    def _apply(self, removed: dict[str, bool], added: dict[str, Op]) -> None:
        with self.state.lock:
            for key, evicted in removed.items():
                nbytes = self.state.index.pop(key, None)  # NOTE: None: hidden by a delete meanwhile
                if nbytes is None:
                    continue
                self.state.bytes -= nbytes
                self.state.ledger.credit(key, nbytes)
                self.state.policy.on_remove(key, evicted=evicted)
                self.state.counts["evictions"] += evicted
                if evicted and self.state.on_evict is not None:
                    self.state.on_evict(key, nbytes)
            for key, op in added.items():
                if key in self.state.tombstones:
                    continue
                self.state.index[key] = op.nbytes
                self.state.bytes += op.nbytes
                self.state.ledger.charge(key, op.nbytes)
                self.state.policy.on_insert(key, op.nbytes, op.cost_ms)

    def _resolve(self, results: list[tuple[Op, Any]]) -> None:
        with self.state.lock:
            for op, _ in results:
                if op.kind != "put":
                    continue
                self.state.counts["pending_writes"] -= 1
                if op.bounded:
                    self.state.queued_bytes -= op.nbytes
                left = self.state.pending_puts.get(op.key, 0) - 1
                if left > 0:
                    self.state.pending_puts[op.key] = left
                else:
                    self.state.pending_puts.pop(op.key, None)
        for op, result in results:
            if op.future.done():
                continue
            if isinstance(result, BaseException):
                op.future.set_exception(result)
            else:
                op.future.set_result(result)

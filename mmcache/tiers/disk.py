"""The disk tier: entries in one LMDB environment, written behind by a single writer thread.

Keys are ``"namespace/hash"`` strings (utf-8 in LMDB), values are entry blobs (``format.py``).
The index (``key -> nbytes``) and the eviction policy live in memory and are rebuilt by a scan
at open; LMDB holds the bytes. Reads are zero-copy views inside a read transaction and verify
the checksum: a corrupt entry is a miss, logged, counted and deleted, never served.
"""

from __future__ import annotations

import logging
import math
import os
import queue
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import lmdb

from mmcache_client.keys import Key
from mmcache.core.leases import Owner
from mmcache.core.policies import POLICIES, make_policy
from mmcache.core.quotas import TenantLedger, usage_by_tenant
from mmcache.tiers.disk_writer import DiskState, DiskWriter, Op, check_entry
from mmcache.core.tier import PutStatus, Tier, TierLease
from mmcache_client.session import share_env
from mmcache_client.format import EntryFormatError, EntryView

logger = logging.getLogger(__name__)

GiB = 1 << 30


@dataclass(frozen=True)
class DiskTierConfig:
    path: str
    """Directory of the LMDB environment (created if missing)."""
    capacity_bytes: int
    """Payload bytes (sum of blob lengths) kept before eviction."""
    policy: str = "lru"
    """Eviction policy name, one of ``mmcache.core.policies.POLICIES``."""
    map_size_bytes: int | None = None
    """LMDB map size in bytes; None: ``max(2 * capacity + 1 GiB, 4 GiB)``. Never resized at runtime."""
    max_readers: int = 2048
    """Concurrent LMDB read transactions (reader slots), over all processes."""
    batch_max_entries: int = 256
    """Most operations committed in one write transaction."""
    flush_interval_ms: float = 2.0
    """Longest the writer waits, in ms, to gather more operations into a batch."""
    max_queued_bytes: int = 1 << 30
    """Bytes of ``bounded`` puts (copies the caller made for the writer) queued at most; one
    more is refused with ``NO_SPACE`` at once (503 upstream), so a burst of puts the host cannot
    take neither grows memory nor queues minutes of fsyncs. An empty queue admits any size."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"path={self.path!r} must be a non-empty str")
        for name in ("capacity_bytes", "max_readers", "batch_max_entries", "map_size_bytes", "max_queued_bytes"):
            value = getattr(self, name)
            if name == "map_size_bytes" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be > 0")
        if self.policy not in POLICIES:
            raise ValueError(f"policy={self.policy!r} must be one of {sorted(POLICIES)}")
        if not isinstance(self.flush_interval_ms, (int, float)) or not 0 <= self.flush_interval_ms < math.inf:
            raise ValueError(f"{self.flush_interval_ms=} must be a finite number >= 0")

    @property
    def resolved_map_size_bytes(self) -> int:
        # NOTE: the map is only address space on 64-bit; the slack covers page rounding, the
        # freelist and pages pinned by long readers, so MapFullError stays a rare fallback.
        if self.map_size_bytes is not None:
            return self.map_size_bytes
        return max(2 * self.capacity_bytes + GiB, 4 * GiB)


class DiskTier(Tier):
    """LMDB-backed tier; thread-safe; one per process (open it after fork, never share it).

    Lifecycle: ``DiskTier(config)`` opens the environment, clears stale reader slots, rebuilds
    the index (records that fail to parse are deleted), starts the writer thread; ``close()``
    commits what is queued and closes. All write transactions run on the writer thread; callers
    enqueue and get a ``Future``. The index holds committed entries only: a queued put is not
    yet ``contains()``-ed nor viewable. Invariant: ``stats()["bytes"] <= capacity_bytes`` after
    each commit (the scan at open may find more; the next commit trims).

    A lease (``lease``) holds a read transaction and pins its key against eviction, so a reader
    served from disk in place (the host tier had no room) never sees its entry vanish. A delete
    hides the key at once and commits behind, like a put.
    """

    name = "disk"

    def __init__(self, config: DiskTierConfig, ledger: TenantLedger | None = None):
        self.config = config
        self._pid = os.getpid()
        self._queue: queue.SimpleQueue[Op] = queue.SimpleQueue()
        self.state = DiskState(make_policy(config.policy), ledger if ledger is not None else TenantLedger())
        self._closed = False
        self._env = lmdb.open(config.path, map_size=config.resolved_map_size_bytes, subdir=True,
                              max_readers=config.max_readers, readahead=False, metasync=True,
                              sync=True, max_dbs=0)
        try:
            stale = self._env.reader_check()
            if stale:
                logger.info("cleared %s stale LMDB reader slots in %s", stale, config.path)
            bad = self._rebuild_index()
        except BaseException:
            self._env.close()  # NOTE: py-lmdb refuses a second open of a path still open here
            raise
        self.state.counts["corrupt"] = len(bad)
        share_env(config.path, self._env)
        self._writer = DiskWriter(self._env, config, self.state, self._queue)
        self._writer.start()
        for key in bad:
            self._submit(Op("corrupt", Future(), key))
        if self.state.bytes > config.capacity_bytes:
            self._submit(Op("flush", Future()))  # an empty batch trims to capacity

    def _rebuild_index(self) -> list[str]:
        found, bad = [], []
        with self._env.begin(buffers=True) as txn:
            for kb, buf in txn.cursor():
                key = bytes(kb).decode("utf-8", "replace")
                try:
                    meta = check_entry(key, buf, verify=False).metadata
                    found.append((float(meta["created_at"]), key, len(buf), float(meta["encode_ms"])))
                except EntryFormatError as e:
                    logger.warning("deleting unreadable disk entry %r: %s", key, e)
                    bad.append(key)
        for _, key, nbytes, cost_ms in sorted(found):
            self.state.index[key] = nbytes
            self.state.bytes += nbytes
            self.state.ledger.charge(key, nbytes)
            self.state.policy.on_insert(key, nbytes, max(cost_ms, 0.0) if math.isfinite(cost_ms) else 0.0)
        logger.info("disk tier %s: %s entries, %s bytes", self.config.path, len(found), self.state.bytes)
        return bad

    # ------------------------------------------------------------------ caller side

    def _submit(self, op: Op) -> Future:
        with self.state.lock:
            if self._closed:
                raise RuntimeError("DiskTier is closed")
            if self._writer.broken is not None:
                op.future.set_exception(self._writer.broken)
                return op.future
            if op.kind == "put":
                if op.bounded:
                    if self.state.queued_bytes and self.state.queued_bytes + op.nbytes > self.config.max_queued_bytes:
                        self.state.counts["queue_full"] += 1
                        op.future.set_result(PutStatus.NO_SPACE)
                        return op.future
                    self.state.queued_bytes += op.nbytes
                self.state.counts["pending_writes"] += 1
                self.state.pending_puts[op.key] = self.state.pending_puts.get(op.key, 0) + 1
            self._queue.put(op)
        return op.future

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("DiskTier is closed")
        if os.getpid() != self._pid:
            raise RuntimeError("DiskTier used across fork; open a new one in this process")

    def put(self, key: str, blob: Any, cost_ms: float = 0.0, *, bounded: bool = False, verify: bool = False) -> Future:
        """Enqueue a write; the Future resolves ``PutStatus.CREATED`` once committed (durable),
        ``EXISTS`` if the key was already on disk (first put wins), ``NO_SPACE`` when every entry
        it would evict is leased (or, ``bounded``, at once when the queue holds
        ``max_queued_bytes``), ``TOO_LARGE`` (at once) when it exceeds the capacity. ``blob`` is
        not copied: keep it valid and unchanged until the Future is done. Writes from the host
        arena in place pass ``bounded=False``: the host's capacity bounds them already.
        Cancelling the Future succeeds only while the write is still queued. A malformed key or
        cost raises ValueError here. ``verify``: the writer thread verifies the checksum first; a
        mismatch fails the Future with ``ChecksumMismatch`` (counted ``checksum_mismatch``) and
        writes nothing, so an entry its writer got wrong never becomes durable.
        """
        self._check_usable()
        Key.from_string(key)
        if isinstance(cost_ms, bool) or not isinstance(cost_ms, (int, float)) or not 0 <= cost_ms < math.inf:
            raise ValueError(f"{cost_ms=} must be a finite number >= 0")  # checked before commit
        mv = memoryview(blob).cast("B")
        op = Op("put", Future(), key, mv, float(cost_ms), mv.nbytes, bounded, verify)
        if op.nbytes > self.config.capacity_bytes:
            with self.state.lock:
                self.state.counts["too_large"] += 1
            op.future.set_result(PutStatus.TOO_LARGE)
            return op.future
        return self._submit(op)

    def contains(self, key: str) -> bool:
        """True if ``key`` is committed on disk (queued puts are not contained yet)."""
        with self.state.lock:
            return key in self.state.index

    @contextmanager
    def view(self, key: str, *, count: bool = True) -> Iterator[EntryView | None]:
        """Yield a checksum-verified zero-copy ``EntryView``, or None on a miss.

        The view (and every array/tensor made from it) is valid only inside the with-block:
        it points into the LMDB map through a read transaction that the block holds open.
        ``count=False``: the cache's own read (promotion), not a client's: no hit or miss.
        """
        self._check_usable()
        with self._env.begin(buffers=True) as txn:
            yield self._read(txn, key, count)

    def _read(self, txn: lmdb.Transaction, key: str, count: bool) -> EntryView | None:
        entry = error = None
        buf = txn.get(key.encode("utf-8")) if self.contains(key) else None
        try:
            entry = None if buf is None else check_entry(key, buf, verify=True)
        except EntryFormatError as e:
            error = e
        with self.state.lock:
            if count:
                self.state.counts["hits" if entry is not None else "misses"] += 1
                if entry is not None:
                    self.state.policy.on_access(key)
            self.state.counts["corrupt"] += error is not None
        if error is not None:
            logger.warning("corrupt disk entry %s, deleting it: %s", key, error)
            self.hide(key)
            self._submit(Op("corrupt", Future(), key))
        return entry

    def lease(self, key: str, owner: Owner, *, count: bool = True) -> TierLease | None:
        """A verified entry in place under a read transaction, pinned against eviction until
        ``release``; None on a miss (a corrupt record is a miss, and deleted)."""
        self._check_usable()
        if not self.contains(key):
            if count:
                with self.state.lock:
                    self.state.counts["misses"] += 1
            return None
        txn = self._env.begin(buffers=True)
        try:
            with self.state.lock:  # NOTE: pinned before the read, so eviction cannot race the check
                self.state.leases.acquire(key, owner)
            entry = self._read(txn, key, count)
        except BaseException:
            self._unpin(key, owner)
            txn.abort()
            raise
        if entry is None:
            self._unpin(key, owner)
            txn.abort()
            return None
        return TierLease(self.name, key, owner, entry.nbytes, memoryview(entry.buffer).cast("B"), handle=(txn, entry))

    def _unpin(self, key: str, owner: Owner) -> None:
        with self.state.lock:
            self.state.leases.release(key, owner)

    def release(self, lease: TierLease) -> bool:
        txn, _ = lease.handle
        txn.abort()  # NOTE: py-lmdb opens with MDB_NOTLS: a read txn may end on any thread
        with self.state.lock:
            return self.state.leases.release(lease.key, lease.owner)

    def release_owner(self, owner: Owner) -> int:
        """Unpin an owner's keys; its read transactions end with the ``release`` of each lease."""
        with self.state.lock:
            return sum(self.state.leases.release_owner(owner).values())

    def touch(self, key: str) -> None:
        """A client hit ``key`` in a tier above: the disk policy counts it, so LRU on disk does
        not evict exactly the hottest entries (the ones always served from host)."""
        with self.state.lock:
            self.state.policy.on_access(key)

    def touch_many(self, keys: list[str]) -> None:
        with self.state.lock:
            for key in keys:
                self.state.policy.on_access(key)

    def hide(self, key: str) -> bool:
        """Drop ``key`` from the index now (invisible to readers); the record goes at the next
        commit. True if it was committed or queued."""
        with self.state.lock:
            nbytes = self.state.index.pop(key, None)
            if nbytes is not None:
                self.state.bytes -= nbytes
                self.state.ledger.credit(key, nbytes)
                self.state.policy.on_remove(key, evicted=False)
            pending = self.state.pending_puts.pop(key, None) is not None
            if pending:
                self.state.tombstones.add(key)
            return nbytes is not None or pending

    def get_bytes(self, key: str) -> bytes | None:
        """A verified copy of the entry's blob, or None."""
        with self.view(key) as entry:
            return None if entry is None else bytes(entry.buffer)

    def delete(self, key: str) -> bool:
        """Remove ``key`` without waiting for the writer: invisible at once, the record goes in
        the next commit (after anything queued before). True if it was there or queued."""
        self._check_usable()
        existed = self.hide(key)
        self._submit(Op("delete", Future(), key))
        return existed

    def flush(self, timeout: float | None = None) -> None:
        """Block until everything enqueued so far is committed (or failed); TimeoutError."""
        with self.state.lock:
            if self._closed:
                return
        self._submit(Op("flush", Future())).result(timeout)

    def keys(self) -> list[str]:
        with self.state.lock:
            return list(self.state.index)

    def inventory(self) -> list[tuple[str, int]]:
        """``(key, nbytes)`` of every committed entry, a snapshot (unordered)."""
        with self.state.lock:
            return list(self.state.index.items())

    def list_range(self, prefix: str, after: str, limit: int) -> list[tuple[str, int]]:
        """``(key, nbytes)`` of up to ``limit`` committed entries whose key starts with
        ``prefix`` and sorts after ``after``, in key order: an LMDB cursor from the first such
        key (keys are ASCII, so byte order is key order), O(log entries + limit)."""
        out: list[tuple[str, int]] = []
        start = max(prefix, after)
        with self._env.begin() as txn:
            cursor = txn.cursor()
            if not cursor.set_range(start.encode()):
                return out
            for raw in cursor.iternext(keys=True, values=False):
                key = raw.decode("utf-8", "replace")
                if not key.startswith(prefix):
                    break
                if key <= after:
                    continue
                with self.state.lock:
                    nbytes = self.state.index.get(key)
                if nbytes is not None:  # NOTE: committed and not being deleted
                    out.append((key, nbytes))
                    if len(out) == limit:
                        break
        return out

    def usage_by_tenant(self) -> dict[str | None, list[int]]:
        """``{tenant: [entries, bytes]}`` over committed entries (None: the default tenant)."""
        return usage_by_tenant(self.inventory())

    def stats(self) -> dict[str, int]:
        with self.state.lock:
            return dict(entries=len(self.state.index), bytes=self.state.bytes, capacity_bytes=self.config.capacity_bytes,
                        leases=self.state.leases.total, queued_bytes=self.state.queued_bytes,
                        max_queued_bytes=self.config.max_queued_bytes, quota_refused=self.state.ledger.refused,
                        **self.state.counts)

    def admits(self, nbytes: int) -> bool:
        """Whether a ``bounded`` put of ``nbytes`` would be queued now (a caller's check before it
        copies the blob; ``put`` decides). A no is counted in ``queue_full``."""
        with self.state.lock:
            ok = not self.state.queued_bytes or self.state.queued_bytes + nbytes <= self.config.max_queued_bytes
            self.state.counts["queue_full"] += not ok
            return ok

    def close(self) -> None:
        """Commit what is queued, stop the writer, close LMDB. Idempotent."""
        with self.state.lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(Op("stop", Future()))
        self._writer.join()
        share_env(self.config.path, None)
        self._env.close()

    @property
    def leases(self):
        return self.state.leases

    @property
    def ledger(self) -> TenantLedger:
        """Tenants' committed bytes here against their quotas (``mmcache.core.quotas``)."""
        return self.state.ledger

    @property
    def on_evict(self) -> Callable[[str, int], None] | None:
        """Called (under the tier's lock) with (key, nbytes) of each entry evicted to make room."""
        return self.state.on_evict

    @on_evict.setter
    def on_evict(self, hook: Callable[[str, int], None] | None) -> None:
        self.state.on_evict = hook

    def __enter__(self) -> "DiskTier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

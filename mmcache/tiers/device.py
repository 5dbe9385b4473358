"""The device tier: entries as torch tensors in GPU memory, shared with same-node readers by CUDA IPC.

Lifecycle of an entry: ``put`` (copied to the device) → ``get`` in process, or ``export_ipc`` (a
lease + handles) → ``import_ipc`` in a reader process → ``release`` → evicted or deleted.

Invariants: importing this module and ``cuda_available()`` never create a CUDA context. A leased
entry is never evicted; a deleted leased entry is invisible and freed at its last release. Sizes
are bytes of tensor data (``numel * element_size``; the caching allocator rounds blocks up a
little, so real GPU use is slightly higher); costs are ms.
"""

from __future__ import annotations

import logging
import math
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Hashable

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from mmcache.core.leases import LeaseTable
from mmcache_client.cuda import pin_host_buffer, unpin_host_buffer  # noqa: F401 - the tier's users pin the arena
from mmcache.core.policies import POLICIES, make_policy
from mmcache.core.tier import PutStatus, Tier, TierLease, done
from mmcache_client.format import EntryFormatError, read_entry

logger = logging.getLogger(__name__)

Owner = Hashable
EvictHook = Callable[[str, "dict[str, torch.Tensor]", float], None]
"""Called with (key, device tensors, cost_ms) under the tier's lock just before an eviction."""


def cuda_available() -> bool:
    """True only with a usable CUDA device. Creates no CUDA context.

    NOTE: ``torch.cuda.is_available()`` only counts devices (runtime, or NVML with
    ``PYTORCH_NVML_BASED_CUDA_CHECK=1``): False on a CPU build or a broken driver, and
    ``torch.cuda.is_initialized()`` stays False.
    """
    return torch.cuda.is_available()


@dataclass(frozen=True)
class DeviceTierConfig:
    capacity_bytes: int
    """Most bytes of tensor data held on the device, deleted-but-leased entries included."""
    device: str = "cuda:0"
    """The CUDA device holding the entries; ``"cuda"`` means the current device."""
    policy: str = "lru"
    """Eviction policy name, one of ``mmcache.core.policies.POLICIES``."""

    def __post_init__(self) -> None:
        capacity_bytes, device, policy = self.capacity_bytes, self.device, self.policy
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ValueError(f"{capacity_bytes=} must be > 0")
        try:
            # NOTE: a str only: torch.device(0) would ask which accelerator is present.
            is_cuda = isinstance(device, str) and torch.device(device).type == "cuda"
        except RuntimeError:
            is_cuda = False
        if not is_cuda:
            raise ValueError(f"{device=} must be a CUDA device such as 'cuda:0'")
        if policy not in POLICIES:
            raise ValueError(f"{policy=} must be one of {sorted(POLICIES)}")


@dataclass
class DeviceEntry:
    tensors: dict[str, torch.Tensor]
    nbytes: int
    cost_ms: float
    doomed: bool = False
    """Deleted while leased: invisible, dropped at the last release."""


class DeviceTier(Tier):
    """Entries on one GPU, keyed by ``ns/hash`` strings. Thread-safe; lives as long as its process.

    In-process readers use ``get`` (the stored tensors themselves: read, never write) or ``lease``
    (a ``TierLease`` whose ``handle`` is the dict of device tensors). Readers in other processes of
    the node use ``export_ipc`` / ``import_ipc`` and then ``release_key(key, owner)`` (or
    ``release_owner`` when they disconnect); until then the entry is never evicted.
    ``DeviceTier.fake(config)`` runs the same accounting on the CPU (the contract tests).
    """

    name = "device"

    def __init__(self, config: DeviceTierConfig, *, on_evict: EvictHook | None = None):
        if not cuda_available():
            raise RuntimeError("no CUDA device: the device tier is off")
        device = torch.device(config.device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"{config.device=} is not one of the {torch.cuda.device_count()} visible GPUs")
        self._setup(config, device, on_evict)

    @classmethod
    def fake(cls, config: DeviceTierConfig, *, on_evict: EvictHook | None = None) -> "DeviceTier":
        """A device tier whose "device" is the CPU: the accounting and interface, no CUDA."""
        tier = cls.__new__(cls)
        tier._setup(config, torch.device("cpu"), on_evict)
        return tier

    def _setup(self, config: DeviceTierConfig, device: torch.device, on_evict: EvictHook | None) -> None:
        # NOTE: state only, apart from the GPU checks, so tests can run the accounting on "cpu".
        self.config, self.device, self.on_evict = config, device, on_evict
        self.policy = make_policy(config.policy)
        self._key_to_entry: dict[str, DeviceEntry] = {}
        self.leases = LeaseTable()
        self._used_bytes = 0
        self._lock = threading.RLock()
        self.hits = self.misses = self.evictions = 0

    # ------------------------------------------------------------ writing
    def put(self, key: str, blob: memoryview, cost_ms: float = 0.0, *, verify: bool = False) -> Future:
        """The Tier interface: copy an entry blob's tensors onto the device."""
        try:
            view = read_entry(blob, verify=verify)
        except EntryFormatError as e:
            raise ValueError(f"{key}: {e}") from e
        with self._lock:
            if key in self._key_to_entry:
                return done(PutStatus.EXISTS)
        nbytes = sum(view.get_array(n).nbytes for n in view.names)
        if nbytes > self.config.capacity_bytes:
            return done(PutStatus.TOO_LARGE)
        # NOTE: torch views (bf16 stays bf16; numpy would give its raw uint16 bits), over the
        # arena in place: with the arena pinned the copy onto the device runs at pinned speed.
        tensors = {n: view.get_tensor(n) for n in view.names}
        return done(PutStatus.CREATED if self.put_tensors(key, tensors, cost_ms) else PutStatus.NO_SPACE)

    def put_tensors(self, key: str, tensors: dict[str, torch.Tensor], cost_ms: float = 0.0) -> bool:
        """Copy ``tensors`` (dense, any device) onto the device as entry ``key``; True if stored.

        False when ``key`` exists (entries are immutable), when the entry exceeds the capacity,
        when evicting every unleased entry would still not make room (then nothing is evicted), or
        when the GPU itself is out of memory. Returns after the copies are done, so the caller may
        reuse the source buffers at once.
        """
        if not tensors or not all(
            isinstance(n, str) and isinstance(t, torch.Tensor) and t.layout == torch.strided
            for n, t in tensors.items()
        ):
            raise ValueError(f"tensors for {key!r} must be a non-empty dict of name -> dense tensor")
        if isinstance(cost_ms, bool) or not isinstance(cost_ms, (int, float)) or not 0 <= cost_ms < math.inf:
            raise ValueError(f"{cost_ms=} must be a finite number >= 0")
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        with self._lock:
            if key in self._key_to_entry or not self._make_room(nbytes):
                return False
            try:
                stored = self._copy_in(tensors)
            except torch.cuda.OutOfMemoryError:
                logger.warning("device tier: GPU out of memory storing %s (%d bytes)", key, nbytes)
                return False
            self.policy.on_insert(key, nbytes, cost_ms)
            self._key_to_entry[key] = DeviceEntry(stored, nbytes, cost_ms)
            self._used_bytes += nbytes
            return True

    def _copy_in(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        stored, pending = {}, False
        for name, src in tensors.items():
            src = src.detach()
            # NOTE: a fresh contiguous allocation even for a source already on the device, so the
            # entry owns exactly its bytes and no caller aliases it.
            dst = torch.empty(src.shape, dtype=src.dtype, device=self.device)
            non_blocking = src.device.type == "cpu" and src.is_pinned()
            stored[name] = dst.copy_(src, non_blocking=non_blocking)
            pending |= non_blocking
        if pending:
            # NOTE: a pinned source (e.g. a leased arena slot) may be reused once put returns;
            # one sync after all the copies keeps them overlapped yet safe.
            torch.cuda.current_stream(self.device).synchronize()
        return stored

    def _make_room(self, nbytes: int) -> bool:
        need_bytes = self._used_bytes + nbytes - self.config.capacity_bytes
        if nbytes > self.config.capacity_bytes:
            return False
        victims = self.policy.choose_victims(need_bytes, self._evictable)  # [] when need_bytes <= 0
        if sum(self.policy.size_of(k) for k in victims) < need_bytes:
            return False
        for key in victims:
            entry = self._key_to_entry[key]
            if self.on_evict is not None:
                self.on_evict(key, dict(entry.tensors), entry.cost_ms)
            self.evictions += 1
            self.policy.on_remove(key, evicted=True)
            self._drop(key)
        return True

    def _evictable(self, key: str) -> bool:
        entry = self._key_to_entry.get(key)
        return entry is not None and not self.leases.is_leased(key)

    def _drop(self, key: str) -> None:
        self._used_bytes -= self._key_to_entry.pop(key).nbytes

    # ------------------------------------------------------------ reading
    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """The entry's device tensors (read-only by contract), or None. Counts a hit or miss."""
        with self._lock:
            entry = self._hit(key)
            return None if entry is None else dict(entry.tensors)

    def lease_key(self, key: str, owner: Owner) -> bool:
        """Pin ``key`` for ``owner`` (no hit counted); False if absent."""
        with self._lock:
            entry = self._visible(key)
            if entry is not None:
                self.leases.acquire(key, owner)
            return entry is not None

    def lease(self, key: str, owner: Owner, *, count: bool = True) -> TierLease | None:
        """The Tier interface: pin ``key``; the lease's ``handle`` is its device tensors."""
        with self._lock:
            entry = self._hit(key) if count else self._visible(key)
            if entry is None:
                return None
            self.leases.acquire(key, owner)
            return TierLease(self.name, key, owner, entry.nbytes, handle=dict(entry.tensors))

    def release(self, lease: TierLease) -> bool:
        return self.release_key(lease.key, lease.owner)

    def release_key(self, key: str, owner: Owner) -> bool:
        """Drop one lease of ``owner`` on ``key``; False if it held none."""
        with self._lock:
            if not self.leases.release(key, owner):
                return False
            entry = self._key_to_entry.get(key)
            if entry is not None and entry.doomed and not self.leases.is_leased(key):
                self._drop(key)
            return True

    def release_owner(self, owner: Owner) -> int:
        """Drop every lease of ``owner`` (it disconnected or died); returns how many."""
        with self._lock:
            dropped = self.leases.release_owner(owner)
            for key in dropped:
                entry = self._key_to_entry.get(key)
                if entry is not None and entry.doomed and not self.leases.is_leased(key):
                    self._drop(key)
        return sum(dropped.values())

    def export_ipc(self, key: str, owner: Owner) -> dict | None:
        """Lease ``key`` for ``owner`` and return a handle for ``import_ipc``; None on a miss.

        The handle is ``{"key": key, "tensors": {name: (rebuild_fn, args)}}``, torch's own CUDA
        IPC reduction: ``rebuild_fn`` is ``torch.multiprocessing.reductions.rebuild_cuda_tensor``
        and ``args`` hold ints, bools, bytes (the ``cudaIpcMemHandle``, ref-counter and event
        handles), a dtype, a ``torch.Size`` and two classes, so plain ``pickle`` carries it. Counts
        a hit or miss. Import it in another process of this node while this one lives.

        NOTE: each export takes a slot in torch's IPC ref-counter file, freed when the reader's
        rebuilt tensor dies. A handle never imported keeps its slot: once the entry is dropped its
        block waits in torch's IPC limbo (never reused, never freed) until this process exits.
        """
        with self._lock:
            entry = self._hit(key)
            if entry is None:
                return None
            handles = {name: reduce_tensor(t) for name, t in entry.tensors.items()}
            self.leases.acquire(key, owner)
            return {"key": key, "tensors": handles}

    def _visible(self, key: str) -> DeviceEntry | None:
        entry = self._key_to_entry.get(key)
        return None if entry is None or entry.doomed else entry

    def _hit(self, key: str) -> DeviceEntry | None:
        entry = self._visible(key)
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
            self.policy.on_access(key)
        return entry

    # ------------------------------------------------------------ queries
    def contains(self, key: str) -> bool:
        with self._lock:
            return self._visible(key) is not None

    def delete(self, key: str) -> bool:
        """Remove ``key``; if leased it vanishes now and its memory goes at the last release."""
        with self._lock:
            entry = self._visible(key)
            if entry is None:
                return False
            self.policy.on_remove(key, evicted=False)
            if self.leases.is_leased(key):
                entry.doomed = True
            else:
                self._drop(key)
            return True

    def stats(self) -> dict:
        with self._lock:
            visible = [e for e in self._key_to_entry.values() if not e.doomed]
            return {
                "entries": len(visible),
                "bytes": sum(e.nbytes for e in visible),
                "used_bytes": self._used_bytes,
                "capacity_bytes": self.config.capacity_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "leases": self.leases.total,
            }

    def close(self) -> None:
        """Drop every entry; readers' imported tensors stay valid (torch keeps shared blocks alive)."""
        with self._lock:
            leases = self.stats()["leases"]
            if leases:
                logger.warning("device tier closed with %d live leases", leases)
            self._key_to_entry.clear()
            self.leases = LeaseTable()
            self._used_bytes = 0
            self.policy = make_policy(self.config.policy)


def import_ipc(handle: dict) -> dict[str, torch.Tensor]:
    """In a reader process: device tensors sharing the exporter's memory (zero-copy, writable).

    Not in the exporter's own process (CUDA cannot open its own IPC handles; use ``get`` there).
    Initializes CUDA in the caller. Drop the tensors before releasing the lease.
    """
    tensors = {}
    for name, (rebuild_fn, args) in handle["tensors"].items():
        # NOTE: the handle is data: run torch's CUDA rebuild only, never an arbitrary callable.
        if rebuild_fn is not rebuild_cuda_tensor:
            raise ValueError(f"not a CUDA IPC handle for {handle.get('key')!r}: {rebuild_fn!r}")
        tensors[name] = rebuild_fn(*args)
    return tensors

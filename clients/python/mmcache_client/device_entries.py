"""Entries read onto a GPU: ``get(..., device="cuda")`` and ``get_many(..., device="cuda")``.

The sans-IO half of a device read, shared by the sync and async clients (they only do the round
trips). Where an entry comes from, best first:

1. the sidecar's device tier (``lease_device``): the tensors are CUDA IPC views of the sidecar's
   GPU memory, no copy at all; leased until the batch closes (``release_device``);
2. the host arena (or disk, or HTTP): the embeddings are copied onto the device from the
   client's mapping, pinned once per connection (``mmcache_client.cuda.pin_host_buffer``), all of
   a batch's copies in flight together and waited for once; the host leases go back as soon as
   the copies are done, so such an entry owns its device memory.

A ``DeviceEntry`` has ``tensor`` / ``get_tensor`` (CUDA tensors) and ``metadata``; it has no
numpy ``array`` or ``buffer`` (the bytes are on the GPU).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from mmcache_client.entry import NUMERIC_METADATA, _in_background

logger = logging.getLogger(__name__)

CPU_DEVICES = (None, "cpu")


def cuda_device(device: Any) -> Any:
    """``device`` as a CUDA ``torch.device``, or None for a host read (None, "cpu"). Raises
    ``ValueError`` for anything else, or for CUDA in a process that has no GPU."""
    if device in CPU_DEVICES:
        return None
    try:
        import torch
    except ImportError:
        raise ValueError(f"device={device!r} needs torch") from None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device name such as 'cuda:0'") from None
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":
        raise ValueError(f"device={device!r}: entries are read onto 'cpu' or a CUDA device")
    from mmcache_client.cuda import cuda_available

    if not cuda_available():
        raise ValueError(f"device={device!r}: no CUDA GPU is visible to this process")
    return dev


class DeviceEntry:
    """One entry on a GPU; ``tier`` says where it was read from (``device``: a view of the
    sidecar's device tier, held by a lease until the batch closes; else an owned copy)."""

    __slots__ = ("key", "tier", "_tensors", "_metadata", "closed", "batch")

    def __init__(self, key: str, tier: str, tensors: dict[str, Any], metadata: dict[str, str]):
        self.key, self.tier, self._tensors, self._metadata = key, tier, tensors, metadata
        self.closed = False
        self.batch: DeviceBatch | None = None
        """The batch of a single ``get``: closing the entry closes it (gives its lease back)."""

    @property
    def tensor(self):
        """``embeddings`` on the device."""
        return self._tensors["embeddings"]

    def get_tensor(self, name: str):
        return self._tensors[name]

    @property
    def names(self) -> list[str]:
        return list(self._tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    @property
    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = dict(self._metadata)
        for name in NUMERIC_METADATA:
            if name in meta:
                meta[name] = float(meta[name])
        return meta

    @property
    def array(self):
        raise TypeError(f"{self.key}: the entry is on {self.tensor.device}; use .tensor (or read it with device=None)")

    def close(self) -> None:
        self.closed = True
        if self.batch is not None:
            self.batch.close()

    async def aclose(self) -> None:
        self.closed = True
        if self.batch is not None:
            await self.batch.aclose()

    async def __aenter__(self) -> "DeviceEntry":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def __enter__(self) -> "DeviceEntry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DeviceEntry({self.key!r}, tier={self.tier!r}, device={self.tensor.device})"


def imported(keys: list[str], docs: Any, dev: Any, *, want_gpu: str | None = None,
             import_doc: Callable[[Any], Any] | None = None) -> tuple[list[DeviceEntry | None], list[str]]:
    """A ``lease_device`` answer as entries on ``dev`` (None where the key is not on the device),
    and the keys whose leases to give back at once: a handle for another GPU than ``dev`` (the
    sidecar's device tier is elsewhere), or one that does not import (a malformed doc, a CUDA
    refusal). Those keys are read from host instead; nothing here fails the read.
    ``want_gpu`` / ``import_doc``: the GPU's UUID and the importer (default: ``dev``'s, CUDA's)."""
    from mmcache_client import cuda

    if not isinstance(docs, list) or len(docs) != len(keys):
        raise ValueError(f"a lease_device answer for {len(keys)} keys holds {len(docs) if isinstance(docs, list) else docs!r}")
    want = want_gpu if want_gpu is not None else cuda.gpu_uuid(dev)
    import_doc = import_doc or cuda.import_doc
    out: list[DeviceEntry | None] = []
    give_back: list[str] = []
    for key, doc in zip(keys, docs):
        entry = None
        if doc is not None:
            try:
                entry = _import(key, doc, want, import_doc)
            except (ValueError, TypeError, RuntimeError) as e:
                logger.warning("%s: the device tier's handle is not usable here (%s); reading it from host", key, e)
            if entry is None:
                give_back.append(key)
        out.append(entry)
    return out, give_back


def _import(key: str, doc: Any, want_gpu: str, import_doc: Callable[[Any], Any]) -> DeviceEntry | None:
    if not isinstance(doc, dict) or not isinstance(doc.get("tensors"), dict) or "embeddings" not in doc["tensors"]:
        raise ValueError("a device lease without embeddings")
    if doc.get("gpu") != want_gpu:
        return None  # NOTE: the sidecar's GPU is not the one asked for: a copy from host instead
    meta = doc.get("metadata") or {}
    if not isinstance(meta, dict):
        raise ValueError("device lease metadata must be an object")
    return DeviceEntry(key, "device", {n: import_doc(h) for n, h in doc["tensors"].items()},
                       {str(k): str(v) for k, v in meta.items()})


def copied(entries: list, device: Any) -> list[DeviceEntry | None]:
    """Host entries (``Entry``, leased or owned) copied onto ``device``: every copy queued at
    once on a stream of their own (asynchronous from pinned memory), then that stream waited
    for (not the whole GPU: a forward running meanwhile is not waited on), so the caller may
    release the host leases as soon as this returns."""
    import torch

    consumer = torch.cuda.current_stream(device)
    stream = torch.cuda.Stream(device)
    out: list[DeviceEntry | None] = []
    with torch.cuda.stream(stream):
        for e in entries:
            if e is None:
                out.append(None)
                continue
            tensors = {n: e.get_tensor(n).to(device, non_blocking=True) for n in e.names}
            for t in tensors.values():
                # NOTE: made on the side stream, used on the caller's: the allocator must not
                # hand the block out again while the caller's queued work may still read it
                t.record_stream(consumer)
            out.append(DeviceEntry(e.key, e.tier, tensors, e.metadata))
    stream.synchronize()
    return out


def single(batch: DeviceBatch) -> DeviceEntry | None:
    """The one entry of a one-key batch, whose close closes the batch (None: a miss, closed)."""
    entry = batch[0]
    if entry is None:
        batch.close()
        return None
    entry.batch = batch
    return entry


def merged(keys: list[str], on_device: list, from_host: dict[str, Any]) -> list[DeviceEntry | None]:
    """Key order again: the device tier's entries where it had them, else the host copies."""
    return [d if d is not None else from_host.get(k) for k, d in zip(keys, on_device)]


class DeviceBatch(list):
    """What ``get_many(..., device=...)`` returns: ``DeviceEntry | None`` in key order, and a
    context manager whose close gives back the device tier's leases (``release``)."""

    def __init__(self, entries: list, release: Callable[[], Any] | None = None):
        super().__init__(entries)
        self._release = release
        self.closed = False

    def _mark_closed(self) -> Callable[[], Any] | None:
        if self.closed:
            return None
        self.closed = True
        for e in self:
            if e is not None:
                e.closed = True
        release, self._release = self._release, None
        return release

    def close(self) -> None:
        release = self._mark_closed()
        if release is not None:
            release()

    def __enter__(self) -> "DeviceBatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncDeviceBatch(DeviceBatch):
    """The async client's: ``async with``, ``await batch.aclose()``; its release is a coroutine."""

    def close(self) -> None:
        release = self._mark_closed()
        if release is not None:
            _in_background(release)

    async def aclose(self) -> None:
        release = self._mark_closed()
        if release is not None:
            await release()

    async def __aenter__(self) -> "AsyncDeviceBatch":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

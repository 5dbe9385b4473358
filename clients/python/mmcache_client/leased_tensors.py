"""Tensors that own their leases: for holders that drop references rather than close entries.

``Entry`` and ``EntryBatch`` release their leases when closed. Some holders never close
anything: vLLM's encoder cache is a ``dict[str, torch.Tensor]`` whose entries are simply popped.
``CacheClient.get_tensors`` serves them: on the local path each tensor views the arena in place
(no copy) and owns its lease, which goes back when the last tensor sharing that memory (views
and slices included) is garbage. So the bytes stay put exactly as long as anything can read
them, whoever drops the last reference and on whatever thread.

How: each tensor gets a storage of its own over its bytes (``torch.frombuffer`` of a slice of the
arena's memoryview, which torch keeps for the storage's life, so the mapping cannot be unmapped
under it), and a ``weakref.finalize`` on that storage queues the release (``release_soon``: no
lock, no I/O: a finalizer may run on any thread, even one inside a call on the same connection).
torch keeps one Python object per storage while the storage lives (checked once at first use;
where it did not, a numpy array of the bytes would hold the lease instead).

Entries served from LMDB in place (the host tier had no room) and entries over HTTP are copied
into tensors of their own and their leases (if any) given back at once. On a GPU, the SDK's
``device=`` path copies from the pinned arena on a stream of its own; a view of the sidecar's
device tier is cloned, since its lease is the batch's.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Any

import numpy as np

from mmcache_client import wire
from mmcache_client.errors import MMCacheError
from mmcache_client.format import DTYPES
from mmcache_client.session import LeaseVanished, open_lease


def _torch():
    import torch

    return torch


_TORCH_DTYPES: dict[str, Any] = {}


def arena_tensor(conn: Any, name: str, loc: wire.LeaseLoc) -> Any:
    """The ``embeddings`` of an arena lease (released as ``name``) as a tensor that owns the lease
    (see the module doc). Call it with torch's non-writable-buffer warning silenced
    (``local_tensors``)."""
    torch = _torch()
    lay = loc.layout
    dtype = _TORCH_DTYPES.get(lay.dtype)
    if dtype is None:
        dtype = _TORCH_DTYPES[lay.dtype] = getattr(torch, DTYPES[lay.dtype].torch_name)
    count = lay.rows * lay.cols
    view = conn.arena.view(loc.offset + lay.start, count * DTYPES[lay.dtype].itemsize)
    conn.state.ref()
    if _storage_lives_with_its_views():
        # NOTE: torch keeps ``view`` (a slice of the arena's memoryview, an export that keeps the
        # mapping mapped) for the storage's life, and one Python object per storage for as long
        # as the storage lives (checked once below): its finalizer runs when the last view goes.
        flat = torch.frombuffer(view, dtype=dtype, count=count)
        weakref.finalize(flat.untyped_storage(), _give_back, conn, name)
    else:  # an older torch: a numpy array of its own bytes is what the storage keeps alive
        raw = np.frombuffer(view, dtype=DTYPES[lay.dtype].numpy, count=count)
        weakref.finalize(raw, _give_back, conn, name)
        flat = torch.from_numpy(raw)
        flat = flat.view(dtype) if flat.dtype != dtype else flat
    return flat.view(lay.rows, lay.cols)


_STORAGE_CHECK: list[bool] = []


def _storage_lives_with_its_views() -> bool:
    """Whether this torch keeps one Python object per storage for the storage's whole life (so a
    finalizer on it runs exactly when the last tensor viewing the storage goes): checked once."""
    if not _STORAGE_CHECK:
        torch = _torch()
        fired: list[int] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            base = torch.frombuffer(bytearray(64), dtype=torch.uint8)
        weakref.finalize(base.untyped_storage(), fired.append, 1)
        piece = base[8:16].view(torch.int16)
        del base
        early = bool(fired)
        del piece  # NOTE: no cycle here: reference counting frees it now (no gc.collect, which
        # costs a vLLM worker's whole heap)
        _STORAGE_CHECK.append(not early and fired == [1])
    return _STORAGE_CHECK[0]


def _give_back(conn: Any, name: str) -> None:
    """A finalizer: queue the release (no lock, no I/O); close a detached connection with it."""
    if conn.state.unref():
        conn.close()
    elif not conn.state.lost:
        conn.release_soon(name)


def local_tensors(conn: Any, keys: list[str], locs: list) -> list:
    """One lease answer as tensors (None per miss). On an error every lease not yet handed to a
    tensor is given back before it propagates."""
    out: list = []
    done = 0
    try:
        with warnings.catch_warnings():
            # NOTE: readers map the arena read-only on purpose; torch warns about non-writable arrays.
            warnings.simplefilter("ignore", UserWarning)
            for key, loc in zip(keys, locs):
                if loc is None:
                    out.append(None)
                elif loc.offset >= 0 and loc.layout is not None:
                    out.append(arena_tensor(conn, wire.release_name(key, loc), loc))
                else:  # in place in LMDB (or an arena entry with no layout): an owned copy
                    out.append(_copied(conn, key, loc))
                done += 1
    except BaseException:
        pending = [wire.release_name(k, loc) for k, loc in zip(keys[done:], locs[done:]) if loc is not None]
        if pending and not conn.state.lost:
            with contextlib.suppress(MMCacheError):
                conn.release(pending)
        raise
    return out


def _copied(conn: Any, key: str, loc: wire.LeaseLoc) -> Any:
    """An entry read in place from LMDB, copied; its read transaction and lease end now. None:
    deleted from disk between its lease and this read (a miss)."""
    try:
        view, end_local = open_lease(conn.state, conn.arena, conn.lmdb_path, key, loc)
    except LeaseVanished:
        conn.release([wire.release_name(key, loc)])
        return None
    try:
        return view.tensor.clone()
    finally:
        if end_local is not None:
            end_local()
        conn.release([wire.release_name(key, loc)])


def device_tensors(batch: Any) -> list:
    """A ``DeviceBatch``'s embeddings as tensors of their own (device-tier views are cloned:
    their lease is the batch's, given back when it closes)."""
    return [None if e is None else (e.tensor.clone() if e.tier == "device" else e.tensor) for e in batch]


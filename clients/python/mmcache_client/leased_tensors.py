"""Tensors that own their leases: for holders that drop references rather than close entries.

``Entry`` and ``EntryBatch`` release their leases when closed. Some holders never close
anything: vLLM's encoder cache is a ``dict[str, torch.Tensor]`` whose entries are simply popped.
``CacheClient.get_tensors`` serves them: on the local path each tensor views the arena in place
(no copy) and owns its lease, which goes back when the last tensor sharing that memory (views
and slices included) is garbage. So the bytes stay put exactly as long as anything can read
them, whoever drops the last reference and on whatever thread.

How: each tensor is made over a numpy array of its own bytes (a slice of the arena's memoryview,
so the mapping cannot be unmapped under it); torch keeps that array alive for the storage's
life, and a ``weakref.finalize`` on the array queues the release (``release_soon``: no lock, no
I/O: a finalizer may run on any thread, even one inside a call on the same connection).

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
from mmcache_client.session import open_lease


def _torch():
    import torch

    return torch


def arena_tensor(conn: Any, key: str, loc: wire.LeaseLoc) -> Any:
    """The ``embeddings`` of an arena lease as a tensor that owns the lease (see the module doc)."""
    torch = _torch()
    lay = loc.layout
    dt = DTYPES[lay.dtype]
    count = lay.rows * lay.cols
    raw = np.frombuffer(conn.arena.view(loc.offset + lay.start, count * dt.itemsize), dtype=dt.numpy, count=count)
    with warnings.catch_warnings():
        # NOTE: readers map the arena read-only on purpose; torch warns about non-writable arrays.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.from_numpy(raw)
    if lay.dtype == "BF16":
        flat = flat.view(torch.bfloat16)  # numpy has no bf16: the raw bits came as uint16
    tensor = flat.view(lay.rows, lay.cols)
    conn.state.ref()
    weakref.finalize(raw, _give_back, conn, wire.release_name(key, loc))
    return tensor


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
    pending = [wire.release_name(k, loc) for k, loc in zip(keys, locs) if loc is not None]
    try:
        for key, loc in zip(keys, locs):
            if loc is None:
                out.append(None)
                continue
            name = wire.release_name(key, loc)
            if loc.offset >= 0 and loc.layout is not None:
                out.append(arena_tensor(conn, key, loc))
            else:  # in place in LMDB (or an arena entry with no layout): an owned copy
                view, end_local = open_lease(conn.state, conn.arena, conn.lmdb_path, key, loc)
                try:
                    out.append(view.tensor.clone())
                finally:
                    if end_local is not None:
                        end_local()
                    conn.release([name])
            pending.remove(name)
    except BaseException:
        if pending and not conn.state.lost:
            with contextlib.suppress(MMCacheError):
                conn.release(pending)
        raise
    return out


def device_tensors(batch: Any) -> list:
    """A ``DeviceBatch``'s embeddings as tensors of their own (device-tier views are cloned:
    their lease is the batch's, given back when it closes)."""
    return [None if e is None else (e.tensor.clone() if e.tier == "device" else e.tensor) for e in batch]


"""What the sync and async local connections share: entry accounting and reading a lease in place.

A connection is reference-counted by the entries it leased: the client *detaches* a connection
after a transport error (new calls open a fresh one) but closes its socket only when its last
entry closes, because closing it makes the sidecar drop every lease of it and reuse the memory
under views still open. A connection whose socket died (the sidecar went away or dropped it) is
*lost*: its arena entries fail loudly (``LeaseLost``) on access instead of reading memory that
may be reused. Entries served from LMDB stay readable: their own read transaction pins them.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from mmcache_client.errors import CorruptEntry, LeaseLost
from mmcache_client.format import DTYPES, EntryFormatError, EntryView, read_entry
from mmcache_client.wire import Layout, LeaseLoc


_OPEN_ENVS: dict[str, object] = {}
"""LMDB environments this process already has open (a sidecar in-process, as in tests): py-lmdb
refuses a second open of one path in a process, so readers borrow the open one."""


def share_env(path: str, env: object | None) -> None:
    """Called by the sidecar's disk tier on open (env) and close (None)."""
    if env is None:
        _OPEN_ENVS.pop(os.path.realpath(path), None)
    else:
        _OPEN_ENVS[os.path.realpath(path)] = env


_READER_MAP_BYTES = 1 << 40
"""A reader's LMDB map at least (address space only) where the sidecar names none."""

class SessionState:
    """Counts a connection's open entries; says when it may close and whether it is lost."""

    def __init__(self) -> None:
        self.refs = 0
        self.detached = False
        self.lost = False
        self._lmdb: Any = None
        self.lmdb_map_size: int | None = None
        """The sidecar's LMDB map size (from ``hello``): a reader's map must be at least as large,
        or a file the sidecar grew past the reader's map fails every read with MDB_MAP_RESIZED."""

    def check(self, key: str) -> None:
        if self.lost:
            raise LeaseLost(f"{key}: the connection that leased this entry is gone; its memory may be reused")

    def ref(self) -> None:
        self.refs += 1

    def unref(self) -> bool:
        """One entry closed; True when the connection should close now."""
        self.refs -= 1
        return self.detached and self.refs <= 0

    def detach(self) -> bool:
        """The client stops using this connection; True when it may close at once."""
        self.detached = True
        return self.refs <= 0

    def lmdb_env(self, path: str):
        """The sidecar's LMDB environment, opened read-only on first use (entries the host tier
        had no room for are read from it in place)."""
        shared = _OPEN_ENVS.get(os.path.realpath(path))
        if shared is not None:
            return shared
        if self._lmdb is None:
            import lmdb  # NOTE: only for disk-served reads; the SDK needs it nowhere else

            if not os.path.isdir(path):
                raise CorruptEntry(f"the sidecar serves from LMDB at {path}, which this process cannot see")
            # NOTE: the map is address space only (read-only, nothing reserved); never smaller than
            # the sidecar's, so it covers every byte the sidecar may write (set_mapsize later would
            # remap under the views of live entries).
            self._lmdb = lmdb.open(path, readonly=True, lock=True, subdir=True, max_readers=2048, max_dbs=0,
                                   readahead=False, map_size=max(self.lmdb_map_size or 0, _READER_MAP_BYTES))
        return self._lmdb

    def close(self) -> None:
        if self._lmdb is not None:
            self._lmdb.close()
            self._lmdb = None


class ArenaEntryView:
    """An entry in the arena, viewed from its lease answer's layout: ``embeddings`` are a slice
    of the connection's prepared arena tensor (no header parsed per get); the header is parsed
    only if metadata or another tensor is asked for. The same interface as ``EntryView``."""

    __slots__ = ("_arena", "_offset", "nbytes", "_layout", "_full")

    def __init__(self, arena: Any, offset: int, nbytes: int, layout: Layout):
        self._arena, self._offset, self.nbytes, self._layout = arena, offset, nbytes, layout
        self._full: EntryView | None = None

    def _parsed(self) -> EntryView:
        if self._full is None:
            self._full = read_entry(self.buffer, verify=False)
        return self._full

    @property
    def parsed(self):
        """The whole header (``ParsedEntry``), parsed on first use."""
        return self._parsed().parsed

    @property
    def buffer(self) -> memoryview:
        return self._arena.view(self._offset, self.nbytes)

    @property
    def metadata(self) -> dict[str, str]:
        return self._parsed().metadata

    @property
    def names(self) -> list[str]:
        return self._parsed().names

    @property
    def array(self) -> np.ndarray:
        return self.get_array("embeddings")

    @property
    def tensor(self) -> Any:
        return self.get_tensor("embeddings")

    def get_array(self, name: str) -> np.ndarray:
        if name != "embeddings":
            return self._parsed().get_array(name)
        lay = self._layout
        return self._arena.array(DTYPES[lay.dtype].numpy, self._offset + lay.start, (lay.rows, lay.cols))

    def get_tensor(self, name: str) -> Any:
        if name != "embeddings":
            return self._parsed().get_tensor(name)
        lay = self._layout
        dtype = _TORCH_DTYPES.get(lay.dtype)
        if dtype is None:
            import torch

            dtype = _TORCH_DTYPES[lay.dtype] = getattr(torch, DTYPES[lay.dtype].torch_name)
        return self._arena.tensor(dtype, self._offset + lay.start, (lay.rows, lay.cols))


_TORCH_DTYPES: dict[str, Any] = {}
"""Layout dtype name → torch dtype, filled on first use (torch is imported only when asked for)."""


class LeaseVanished(Exception):
    """An entry leased on disk was deleted before the reader's own LMDB transaction began (a
    delete does not wait for disk leases): for the reader, a miss."""


def open_lease(state: SessionState, arena: Any, lmdb_path: str | None, key: str,
               loc: LeaseLoc) -> tuple[EntryView | ArenaEntryView, Callable[[], None] | None]:
    """The entry a lease answer points to, and what ends the local part of it (an LMDB read
    transaction), or raises ``CorruptEntry`` (or ``LeaseVanished``: deleted meanwhile, a miss). An
    entry served from LMDB is read there under its stored key (a tenant's keys are
    ``tenant@ns/hash`` there) and verified."""
    if loc.offset >= 0:
        if loc.layout is not None:
            return ArenaEntryView(arena, loc.offset, loc.nbytes, loc.layout), None
        try:
            return read_entry(arena.view(loc.offset, loc.nbytes), verify=False), None
        except EntryFormatError as e:
            raise CorruptEntry(f"{key}: {e}") from e
    if not lmdb_path:
        raise CorruptEntry(f"{key}: served from disk but the sidecar named no LMDB path")
    txn = state.lmdb_env(lmdb_path).begin(buffers=True)
    try:
        buf = txn.get(loc.stored_key.encode())
        if buf is None:
            raise LeaseVanished(f"{key}: deleted from disk between its lease and this read")
        view = read_entry(buf, verify=True)  # NOTE: from disk: verified, as docs/architecture.md says
    except BaseException:
        txn.abort()
        raise
    return view, txn.abort

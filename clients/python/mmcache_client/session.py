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

from mmcache_client.errors import CorruptEntry, LeaseLost
from mmcache_client.format import EntryFormatError, EntryView, read_entry


_OPEN_ENVS: dict[str, object] = {}
"""LMDB environments this process already has open (a sidecar in-process, as in tests): py-lmdb
refuses a second open of one path in a process, so readers borrow the open one."""


def share_env(path: str, env: object | None) -> None:
    """Called by the sidecar's disk tier on open (env) and close (None)."""
    if env is None:
        _OPEN_ENVS.pop(os.path.realpath(path), None)
    else:
        _OPEN_ENVS[os.path.realpath(path)] = env


class SessionState:
    """Counts a connection's open entries; says when it may close and whether it is lost."""

    def __init__(self) -> None:
        self.refs = 0
        self.detached = False
        self.lost = False
        self._lmdb: Any = None

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
            self._lmdb = lmdb.open(path, readonly=True, lock=True, subdir=True, max_readers=2048, max_dbs=0,
                                   readahead=False)
        return self._lmdb

    def close(self) -> None:
        if self._lmdb is not None:
            self._lmdb.close()
            self._lmdb = None


def open_lease(state: SessionState, arena: Any, lmdb_path: str | None, key: str, loc: list) -> tuple[EntryView, Callable[[], None] | None]:
    """The entry a lease answer ``[offset, nbytes, tier, stored_key]`` points to, and what ends
    the local part of it (an LMDB read transaction), or raises ``CorruptEntry``. ``stored_key``
    is the key LMDB holds it under (a tenant's keys are ``tenant@ns/hash`` there)."""
    offset, nbytes, _tier = loc[:3]
    stored = loc[3] if len(loc) > 3 and isinstance(loc[3], str) else key
    if offset >= 0:
        try:
            return read_entry(arena.view(offset, nbytes), verify=False), None
        except EntryFormatError as e:
            raise CorruptEntry(f"{key}: {e}") from e
    if not lmdb_path:
        raise CorruptEntry(f"{key}: served from disk but the sidecar named no LMDB path")
    txn = state.lmdb_env(lmdb_path).begin(buffers=True)
    try:
        buf = txn.get(stored.encode())
        if buf is None:
            raise CorruptEntry(f"{key}: leased on disk but not in LMDB")
        view = read_entry(buf, verify=True)  # NOTE: from disk: verified, as DESIGN.md asks
    except BaseException:
        txn.abort()
        raise
    return view, txn.abort

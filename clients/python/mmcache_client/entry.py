"""What ``get`` returns: a context-managed entry whose tensors view the bytes in place."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np

from mmcache_client.format import EntryView


NUMERIC_METADATA = ("encode_ms", "created_at")
"""Metadata an ``Entry`` gives back as numbers."""


class Entry:
    """One cache entry. On the local path its tensors view the shared arena and a lease keeps
    the bytes in place until ``close()`` / the end of the ``with`` block; copy (``.clone()``)
    what must outlive it. Over HTTP it owns its bytes and ``close`` is a no-op.
    """

    __slots__ = ("key", "tier", "_view", "_release", "closed", "_session")

    def __init__(self, key: str, tier: str, view: EntryView, release: Callable[[], Any] | None = None,
                 session: Any = None):
        self.key = key
        self.tier = tier
        self._view = view
        self._release = release
        self._session = session
        """The local connection's ``SessionState`` for arena views: access fails loudly once lost."""
        self.closed = False

    def _live(self) -> EntryView:
        if self._session is not None:
            self._session.check(self.key)
        return self._view

    @property
    def metadata(self) -> dict[str, Any]:
        """The entry's metadata; the numeric fields (``encode_ms``, ``created_at``) as numbers,
        the rest as stored (strings)."""
        meta = dict(self._live().metadata)
        for name in NUMERIC_METADATA:
            if name in meta:
                meta[name] = float(meta[name])  # NOTE: validated as finite numbers when the entry was parsed
        return meta

    @property
    def names(self) -> list[str]:
        """Names of the tensors held (``embeddings`` and extras like ``image_grid_thw``)."""
        return self._live().names

    @property
    def nbytes(self) -> int:
        return self._view.nbytes

    @property
    def buffer(self) -> memoryview:
        """The whole safetensors blob in place."""
        return memoryview(self._live().buffer)

    @property
    def array(self) -> np.ndarray:
        """``embeddings`` as a numpy view (bf16 as raw uint16 bits)."""
        return self._live().array

    @property
    def tensor(self):
        """``embeddings`` as a torch view (needs torch)."""
        return self._live().tensor

    def get_array(self, name: str) -> np.ndarray:
        return self._live().get_array(name)

    def get_tensor(self, name: str):
        return self._live().get_tensor(name)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._release is not None:
                self._release()

    def __enter__(self) -> "Entry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Entry({self.key!r}, tier={self.tier!r}, nbytes={self.nbytes})"


_BACKGROUND: set[asyncio.Task] = set()
"""Releases started by ``AsyncEntry.close`` (strong refs until they finish)."""


def _in_background(release: Callable[[], Any]) -> None:
    """Run the coroutine ``release()`` on the running loop, kept alive until it ends."""
    task = asyncio.get_running_loop().create_task(release())
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


class AsyncEntry(Entry):
    """The async client's entry: ``async with``, and ``await entry.aclose()``."""

    __slots__ = ()

    def close(self) -> None:
        """Release in the background (on the running loop); prefer ``await entry.aclose()``."""
        if not self.closed:
            self.closed = True
            if self._release is not None:
                # NOTE: the inherited close would create the release coroutine and drop it
                # unawaited, pinning the entry until the client closes.
                _in_background(self._release)

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            if self._release is not None:
                await self._release()

    async def __aenter__(self) -> "AsyncEntry":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class EntryBatch(Sequence):
    """What ``get_many`` returns: a sequence of ``Entry | None`` in key order (None: a miss) and
    a context manager. On the local path every entry was leased in one round trip and all are
    released together, in one more, when the batch closes (closing an entry of the batch early
    only marks it closed: its bytes stay leased until the batch ends)."""

    __slots__ = ("_entries", "_release", "closed")

    def __init__(self, entries: list, release: Callable[[], Any] | None = None):
        self._entries = entries
        self._release = release
        self.closed = False

    def __getitem__(self, i):
        return self._entries[i]

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for entry in self._entries:
                if entry is not None:
                    entry.closed = True
            if self._release is not None:
                self._release()

    def __enter__(self) -> "EntryBatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EntryBatch({len(self)} keys, {sum(e is not None for e in self._entries)} found)"


class AsyncEntryBatch(EntryBatch):
    """The async client's batch: ``async with``, and ``await batch.aclose()``."""

    __slots__ = ()

    def close(self) -> None:
        """Release in the background (on the running loop); prefer ``await batch.aclose()``."""
        if not self.closed:
            release, self._release = self._release, None
            EntryBatch.close(self)
            if release is not None:
                _in_background(release)

    async def aclose(self) -> None:
        if not self.closed:
            release, self._release = self._release, None
            EntryBatch.close(self)
            if release is not None:
                await release()

    async def __aenter__(self) -> "AsyncEntryBatch":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

"""What the host tier keeps per entry (``HostEntry``), where a sealed one lies (``Location``),
and the hooks through which it tells its store about write-backs and evictions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mmcache.core.tier import Owner
from mmcache_client.format import EntryFormatError, parse_entry
from mmcache_client.wire import Layout


@dataclass
class HostEntry:
    offset: int
    nbytes: int
    """Exact entry length (the allocation may be rounded up)."""
    cost_ms: float
    persist: bool = True
    """False: host-only (e.g. a KV hand-off), dropped on eviction, never written below."""
    clean: bool = False
    """Evictable without write-back whatever the tiers below hold: host-only, no tier below, or
    its write-down failed (counted by the store; it must not pin host space for good)."""
    sealed: bool = False
    writer: Owner | None = None
    writing_back: bool = False
    layout: Layout | None = None
    """Where its ``embeddings`` lie (parsed once, on the first local lease; entries are immutable)."""


@dataclass(frozen=True)
class Location:
    """Where a sealed entry lies in the arena."""

    offset: int
    nbytes: int


DirtyHook = Callable[[str], None]
"""Called (outside the lock) with a key the tier wants to evict but a lower tier lacks."""
EvictHook = Callable[[str, int], None]
"""Called with (key, nbytes) after an entry was evicted (for counters and events)."""


def embeddings_layout(view) -> Layout | None:
    """Where an entry's ``embeddings`` lie in it (for the local protocol's lease answers), or
    None when it is not laid out as an embeddings entry."""
    try:
        emb = parse_entry(view, strict=False).tensors["embeddings"]
    except (EntryFormatError, KeyError):
        return None
    return Layout(emb.dtype, emb.start, emb.shape[0], emb.shape[1])

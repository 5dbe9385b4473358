"""Offset allocator for the shared-memory arena: accounting only, it never touches the bytes."""

from __future__ import annotations

import bisect

__all__ = ["ArenaAllocator"]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class ArenaAllocator:
    """Best-fit allocator of byte ranges ``[offset, offset + size)`` inside ``[0, capacity_bytes)``.

    Lifecycle of a block: ``allocate(nbytes)`` returns its offset (or None when no free block
    fits: running out of space is an answer, not an error), ``free(offset)`` gives it back once.
    A free block merges at once with free neighbours on either side.

    Units: every size and offset is in bytes. Sizes are rounded UP to ``alignment`` and every
    offset is a multiple of it; ``capacity_bytes`` is the constructor's capacity rounded DOWN
    to ``alignment``. ``free`` / ``size_of`` report the rounded size.

    Invariants:
    - ``used_bytes + free_bytes == capacity_bytes``; free and allocated blocks tile the arena.
    - No two free blocks are adjacent (always coalesced), so ``largest_free_bytes`` is the
      largest request that can succeed.
    - Best fit: the smallest free block that fits, the lowest offset among equal sizes; the
      remainder (the block's tail) stays free.

    Costs: allocate O(log n) search + O(n) list insert/remove (memmove, fast in practice),
    free O(1) neighbour lookup plus the same list update. Not thread-safe: the owner serialises.
    """

    def __init__(self, capacity_bytes: int, alignment: int = 64):
        if not _is_int(alignment) or alignment < 8 or alignment & (alignment - 1):
            raise ValueError(f"{alignment=} must be a power of two >= 8")
        if not _is_int(capacity_bytes) or capacity_bytes <= 0:
            raise ValueError(f"{capacity_bytes=} must be an int > 0")
        usable_bytes = capacity_bytes - capacity_bytes % alignment
        if usable_bytes == 0:
            raise ValueError(f"{capacity_bytes=} must be >= {alignment=}")
        self.alignment = alignment
        self._capacity_bytes = usable_bytes
        self._used_bytes = 0
        self._allocated: dict[int, int] = {}  # start -> size
        self._free_by_start: dict[int, int] = {}  # start -> size
        self._free_by_end: dict[int, int] = {}  # end (exclusive) -> start
        # NOTE: (size, start) tuples sort by size then offset, so bisect_left on (need, -1)
        # lands on the smallest fitting block with the lowest offset among equal sizes.
        self._free_sorted: list[tuple[int, int]] = []
        self._add_free(0, usable_bytes)

    # -- free-block bookkeeping ------------------------------------------------------------

    def _add_free(self, start: int, size: int) -> None:
        self._free_by_start[start] = size
        self._free_by_end[start + size] = start
        bisect.insort(self._free_sorted, (size, start))

    def _remove_free(self, start: int) -> int:
        size = self._free_by_start.pop(start)
        del self._free_by_end[start + size]
        i = bisect.bisect_left(self._free_sorted, (size, start))
        del self._free_sorted[i]
        return size

    def round_up(self, nbytes: int) -> int:
        if not _is_int(nbytes) or nbytes <= 0:
            raise ValueError(f"{nbytes=} must be an int > 0")
        return -(-nbytes // self.alignment) * self.alignment

    def _best_fit(self, size: int) -> int | None:
        i = bisect.bisect_left(self._free_sorted, (size, -1))
        return self._free_sorted[i][1] if i < len(self._free_sorted) else None

    # -- public API ------------------------------------------------------------------------

    def can_allocate(self, nbytes: int) -> bool:
        """Whether ``allocate(nbytes)`` would succeed now. ``nbytes <= 0`` is a ValueError."""
        return self._best_fit(self.round_up(nbytes)) is not None

    def allocate(self, nbytes: int) -> int | None:
        """Offset of a new block of ``nbytes`` (rounded up), or None if no free block fits."""
        size = self.round_up(nbytes)
        start = self._best_fit(size)
        if start is None:
            return None
        block_size = self._remove_free(start)
        if block_size > size:
            # NOTE: keep the head, free the tail: allocations pack toward low offsets.
            self._add_free(start + size, block_size - size)
        self._allocated[start] = size
        self._used_bytes += size
        return start

    def allocate_at(self, offset: int, nbytes: int) -> bool:
        """Claim exactly ``[offset, offset + nbytes)`` (rounded up) if it lies in one free block;
        False (changing nothing) otherwise. Address-aware eviction uses it to take the window it
        freed."""
        size = self.round_up(nbytes)
        if offset % self.alignment:
            return False
        starts = self._free_starts()
        i = bisect.bisect_right(starts, offset) - 1
        if i < 0:
            return False
        start = starts[i]
        block_size = self._free_by_start[start]
        if offset + size > start + block_size:
            return False
        self._remove_free(start)
        if offset > start:
            self._add_free(start, offset - start)
        if start + block_size > offset + size:
            self._add_free(offset + size, start + block_size - offset - size)
        self._allocated[offset] = size
        self._used_bytes += size
        return True

    def _free_starts(self) -> list[int]:
        # NOTE: only on the eviction path (a failed allocate); O(n log n) is fine there.
        return sorted(self._free_by_start)

    def free(self, offset: int) -> int:
        """Give back the block at ``offset``; returns its (rounded) size.

        An offset that is not a live allocation (never allocated, or freed already) is a
        ValueError, and changes nothing.
        """
        size = self._allocated.pop(offset, None)
        if size is None:
            raise ValueError(f"{offset=} must be the offset of a live allocation")
        self._used_bytes -= size
        start, end = offset, offset + size
        prev_start = self._free_by_end.get(start)
        if prev_start is not None:
            self._remove_free(prev_start)
            start = prev_start
        if end in self._free_by_start:
            end += self._remove_free(end)
        self._add_free(start, end - start)
        return size

    def size_of(self, offset: int) -> int:
        """Allocated (rounded) size of the block at ``offset``; ValueError if not live."""
        size = self._allocated.get(offset)
        if size is None:
            raise ValueError(f"{offset=} must be the offset of a live allocation")
        return size

    def free_blocks(self) -> list[tuple[int, int]]:
        """``(offset, size)`` of every free block, by offset. O(n log n); for tests and stats."""
        return sorted(self._free_by_start.items())

    @property
    def capacity_bytes(self) -> int:
        """Usable capacity: the constructor's capacity rounded down to ``alignment``."""
        return self._capacity_bytes

    @property
    def used_bytes(self) -> int:
        return self._used_bytes

    @property
    def free_bytes(self) -> int:
        return self._capacity_bytes - self._used_bytes

    @property
    def largest_free_bytes(self) -> int:
        """Largest block that ``allocate`` can return now (0 when full)."""
        return self._free_sorted[-1][0] if self._free_sorted else 0

    @property
    def num_allocations(self) -> int:
        return len(self._allocated)

    @property
    def fragmentation(self) -> float:
        """``1 - largest_free / free``: 0.0 when the free space is one block (or none)."""
        free_bytes = self.free_bytes
        return 0.0 if free_bytes == 0 else 1.0 - self.largest_free_bytes / free_bytes

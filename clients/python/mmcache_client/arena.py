"""The shared-memory arena file: bytes only, no accounting.

The sidecar creates one arena file (under /dev/shm by default), maps it read-write and owns the
allocator and index over it. Same-node clients map the same file read-only once and view sealed
entries in place: a tensor read from the host tier is a view into this mapping, never a copy.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
import warnings
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


class ArenaTooLarge(OSError):
    """The arena does not fit the filesystem (tmpfs) behind it."""


def _check_room(path: str, capacity_bytes: int) -> None:
    st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    free_bytes, total_bytes = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    if capacity_bytes > free_bytes:
        raise ArenaTooLarge(
            f"an arena of {capacity_bytes} bytes does not fit {os.path.dirname(os.path.abspath(path))}: "
            f"{free_bytes} of its {total_bytes} bytes are free; lower --host-capacity or enlarge the "
            f"filesystem (e.g. docker run --shm-size)")


class SharedArena:
    """A file of ``capacity_bytes`` mapped shared. Lifecycle: create (owner) or open
    (readers) → ``view`` as often as wanted → ``close``; the owner ``unlink``s on shutdown.

    Readers map with ``PROT_READ``: a buggy client cannot corrupt entries others are reading.
    """

    def __init__(self, path: str, capacity_bytes: int | None = None, *, create: bool = False,
                 writable: bool = False):
        self.path = path
        self.writable = create or writable
        if create:
            if capacity_bytes is None or capacity_bytes <= 0:
                raise ValueError(f"{capacity_bytes=} must be > 0")
            # O_EXCL: two sidecars must never share (and corrupt) one arena.
            _check_room(path, capacity_bytes)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, capacity_bytes)
                # NOTE: reserve the pages now: on a tmpfs smaller than the arena (Docker's /dev/shm
                # is 64 MiB) a later write would otherwise die of SIGBUS, silently.
                try:
                    os.posix_fallocate(fd, 0, capacity_bytes)
                except OSError as e:
                    raise ArenaTooLarge(f"cannot reserve an arena of {capacity_bytes} bytes at {path}: {e.strerror}; "
                                        f"give the arena less (--host-capacity) or its filesystem more room") from None
                # NOTE: MAP_POPULATE faults every page in now; otherwise each first write to a
                # 4 KiB page costs a fault, which doubled the cost of small puts.
                flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
                self._mmap = mmap.mmap(fd, capacity_bytes, flags, mmap.PROT_READ | mmap.PROT_WRITE)
            except BaseException:
                os.close(fd)
                os.unlink(path)
                raise
        else:
            fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
            try:
                capacity_bytes = os.fstat(fd).st_size
                if capacity_bytes <= 0:
                    raise ValueError(f"arena {path!r} is empty")
                prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
                # NOTE: a writer's mapping is pre-faulted once (MAP_POPULATE, ~0.14 s per GiB on a
                # 2-core VM): every put lands on pages this process has not touched yet, and a
                # fault per 4 KiB page made a 4.5 MiB fill cost ~2.5x a copy into mapped pages.
                flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if writable else 0)
                self._mmap = mmap.mmap(fd, capacity_bytes, flags, prot)
            except BaseException:
                os.close(fd)
                raise
        os.close(fd)  # the mapping keeps the pages; the descriptor is not needed
        self.capacity_bytes = capacity_bytes
        self._view = memoryview(self._mmap)
        self._typed: dict[str, Any] = {}
        """One torch tensor over the whole mapping per dtype, made once and sliced per entry."""
        self.pinned = False
        """Registered with CUDA (``pin``): copies from it to a GPU run at pinned speed."""
        self._pin_tried = False
        """``pin`` tries once: a refusal (locked-memory limit) is not asked again per read."""

    def pin(self) -> bool:
        """Page-lock the whole mapping with ``cudaHostRegister`` once (a reader's read-only one
        too, ``mmcache_client.cuda``); False without a GPU or where CUDA refuses (copies from it
        still work, at pageable speed). ``close`` unpins it."""
        if not self._pin_tried and self._view is not None:
            from mmcache_client.cuda import pin_host_buffer

            self._pin_tried = True
            self.pinned = pin_host_buffer(self._view)
        return self.pinned

    @property
    def base_address(self) -> int:
        """Address of the mapping in this process (for pinning and zero-copy checks)."""
        import ctypes

        if self.writable:
            return ctypes.addressof(ctypes.c_char.from_buffer(self._mmap))
        # A read-only mmap refuses from_buffer; numpy gives the address without copying.
        import numpy as np

        return int(np.frombuffer(self._mmap, dtype=np.uint8, count=1).ctypes.data)

    def view(self, offset: int, nbytes: int) -> memoryview:
        """The bytes ``[offset, offset + nbytes)`` in place (read-only for readers)."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.capacity_bytes:
            raise ValueError(f"{offset=} {nbytes=} lies outside the {self.capacity_bytes}-byte arena")
        return self._view[offset : offset + nbytes]

    def array(self, dtype: str, offset: int, shape: tuple[int, ...]) -> np.ndarray:
        """A numpy view of ``shape`` elements of numpy ``dtype`` at byte ``offset`` (read-only
        for readers), bounds-checked against the mapping."""
        dt = np.dtype(dtype)
        nbytes = math.prod(shape) * dt.itemsize
        if offset < 0 or offset + nbytes > self.capacity_bytes:
            raise ValueError(f"{offset=} {shape=} lies outside the {self.capacity_bytes}-byte arena")
        return np.ndarray(shape, dt, buffer=self._mmap, offset=offset)

    def tensor(self, torch_dtype: Any, offset: int, shape: tuple[int, int]) -> Any:
        """A torch view of a 2-D ``shape`` at byte ``offset``: a slice of the mapping's one
        prepared tensor of that dtype (no new buffer export per entry). ``offset`` must be a
        multiple of the dtype's size (the arena's entries are 64-byte aligned)."""
        import torch

        base = self._typed.get(torch_dtype)
        if base is None:
            with warnings.catch_warnings():
                # NOTE: readers map read-only on purpose; torch warns about non-writable buffers.
                warnings.simplefilter("ignore", UserWarning)
                # NOTE: from a memoryview the tensor keeps alive, not the mmap itself: torch
                # releases its buffer at once and keeps only the object, so over the bare mmap
                # close() could unmap under live views (a segfault); a memoryview export makes
                # mmap.close() refuse (BufferError) while any view of it lives.
                base = torch.frombuffer(memoryview(self._mmap), dtype=torch_dtype)
            self._typed[torch_dtype] = base
        itemsize = base.element_size()
        rows, cols = shape
        if offset % itemsize or offset < 0 or offset + rows * cols * itemsize > self.capacity_bytes:
            raise ValueError(f"{offset=} {shape=} is misaligned or outside the {self.capacity_bytes}-byte arena")
        return torch.as_strided(base, shape, (cols, 1), offset // itemsize)

    def close(self) -> None:
        """Unmap. Views still alive keep the mapping (mmap refuses to close under exports)."""
        if self._view is None:
            return
        if self.pinned:
            from mmcache_client.cuda import unpin_host_buffer

            unpin_host_buffer(self._view)
            self.pinned = False
        self._view.release()
        self._view = None
        self._typed.clear()
        try:
            self._mmap.close()
        except BufferError:
            # NOTE: a live numpy/torch view still points into the mapping; unmapping now would
            # turn it into a segfault. The mapping goes when the last view is collected.
            logger.debug("arena %s still has live views; leaving it mapped", self.path)

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

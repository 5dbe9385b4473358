"""How a writer may reach the arena, measured ("a writer can write only into its own
reservation ... your call, measured").

A local writer (the SDK over ``unix://``) fills its reservation in the shared arena, then the
sidecar seals it. Four ways to give it the bytes, each timed as one put of a payload into a
256 MiB arena file in /dev/shm (a fresh offset every repeat, so pages and TLB entries are cold):

- whole map:       the writer maps the whole arena once (read-write) and copies into a
                   bounds-checked slice of it (what mmcache does; the sidecar quarantines a dead
                   writer's reservation and verifies every checksum at seal, so a stray write
                   is caught before anyone reads it)
- mmap+populate:   a fresh ``mmap`` of just the reservation per put (MAP_POPULATE), then munmap
- mmap:            the same without MAP_POPULATE (page faults during the copy)
- mprotect window: the whole arena mapped read-only, the reservation made writable with
                   ``mprotect`` for the copy and read-only again after

    python benchmarks/writer_map.py [--sizes 64KiB,1MiB,4.7MiB] [--repeats 30]
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hostinfo import describe  # noqa: E402

from mmcache.sidecar.config import parse_size  # noqa: E402

ARENA = 256 << 20
PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _mprotect(addr: int, length: int, prot: int) -> None:
    if _libc.mprotect(ctypes.c_void_p(addr), ctypes.c_size_t(length), prot) != 0:
        raise OSError(ctypes.get_errno(), "mprotect failed")


def _offsets(nbytes: int, repeats: int) -> list[int]:
    span = (nbytes + PAGE - 1) // PAGE * PAGE
    slots = max(1, ARENA // span)
    return [(i * 7919 % slots) * span for i in range(repeats)]


def _time(fn, offsets: list[int]) -> tuple[float, float]:
    samples = []
    for off in offsets:
        t0 = time.perf_counter()
        fn(off)
        samples.append((time.perf_counter() - t0) * 1e6)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def measure(nbytes: int, repeats: int) -> dict[str, tuple[float, float]]:
    src = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    offsets = _offsets(nbytes, repeats)
    span = (nbytes + PAGE - 1) // PAGE * PAGE
    out: dict[str, tuple[float, float]] = {}
    with tempfile.NamedTemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as f:
        os.ftruncate(f.fileno(), ARENA)
        whole = mmap.mmap(f.fileno(), ARENA)  # faulted in once, as a long-lived client's map is
        arena = np.frombuffer(whole, dtype=np.uint8)
        arena[:] = 0

        def whole_map(off: int) -> None:
            np.copyto(arena[off:off + nbytes], src)

        def per_mmap(populate: bool):
            flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)

            def put(off: int) -> None:
                m = mmap.mmap(f.fileno(), span, flags=flags, offset=off)
                np.copyto(np.frombuffer(m, dtype=np.uint8, count=nbytes), src)
                m.close()
            return put

        ro = mmap.mmap(f.fileno(), ARENA, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        ro_arr = np.frombuffer(ro, dtype=np.uint8)
        base = ro_arr.ctypes.data
        ro_arr[:] = 0
        _mprotect(base, ARENA, mmap.PROT_READ)

        def window(off: int) -> None:
            _mprotect(base + off, span, mmap.PROT_READ | mmap.PROT_WRITE)
            np.copyto(ro_arr[off:off + nbytes], src)
            _mprotect(base + off, span, mmap.PROT_READ)

        out["whole map"] = _time(whole_map, offsets)
        out["mmap+populate"] = _time(per_mmap(True), offsets)
        out["mmap"] = _time(per_mmap(False), offsets)
        out["mprotect window"] = _time(window, offsets)
        _mprotect(base, ARENA, mmap.PROT_READ | mmap.PROT_WRITE)
        del arena, ro_arr
        whole.close()
        ro.close()
    return out


def lines(sizes: list[int], repeats: int) -> list[str]:
    rows = [f"writer map: one put copied into a {ARENA >> 20} MiB /dev/shm arena, median / p99 us of {repeats}",
            f"{'size':>9} {'whole map':>16} {'mmap+populate':>18} {'mmap':>18} {'mprotect window':>18}"]
    for nbytes in sizes:
        m = measure(nbytes, repeats)
        ref = m["whole map"][0]
        cells = [f"{m['whole map'][0]:7.1f} / {m['whole map'][1]:6.1f}"]
        for name in ("mmap+populate", "mmap", "mprotect window"):
            med, p99 = m[name]
            cells.append(f"{med:7.1f} ({med / ref - 1:+5.0%})")
        label = f"{nbytes / (1 << 20):.2f}MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10}KiB"
        rows.append(f"{label:>9} {cells[0]:>16} {cells[1]:>18} {cells[2]:>18} {cells[3]:>18}")
    rows.append("physical limit: the whole-map column is one memcpy into warm shared memory")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64KiB,1MiB,4.7MiB")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    print(f"machine: {describe()}")
    print("\n".join(lines([parse_size(s) for s in args.sizes.split(",")], args.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

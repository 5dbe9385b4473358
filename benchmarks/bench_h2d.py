"""Host → GPU: what a reader on a GPU pays for an entry, against raw pinned and pageable copies.

    python benchmarks/bench_h2d.py [--sizes 64KiB,4.5MiB,64MiB] [--repeats 50]

With the sidecar in its own process (``mmcache serve --device-capacity``), for each entry size
(bf16 embeddings of hidden 4096; 4.5 MiB is LLaVA's 576 tokens):
- device tier (IPC):  ``get(..., device="cuda")`` of an entry the sidecar's device tier holds:
                      a lease and a CUDA IPC import, no copy (the entry's bytes never move)
- arena → GPU:        ``get`` of a host entry, then ``.tensor.to("cuda")`` from this reader's
                      read-only arena mapping, pinned once (``cudaHostRegisterReadOnly``)
- arena unpinned:     the same copy from a mapping that is not pinned (what it cost before)
- raw pinned H2D:     ``torch.empty(pin_memory=True)`` → ``.to("cuda")``: the physical reference
- raw pageable H2D:   an ordinary CPU tensor → ``.to("cuda")``
Medians and p99 in microseconds, GB/s for the copies. Without a CUDA GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hostinfo import describe

HIDDEN = 4096


def stats_us(times_ns: list[int]) -> tuple[float, float]:
    s = sorted(times_ns)
    return statistics.median(s) / 1e3, s[min(len(s) - 1, int(len(s) * 0.99))] / 1e3


def timed(fn, repeats: int) -> tuple[float, float]:
    import torch

    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter_ns()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter_ns() - t0)
    return stats_us(times)


def start_sidecar(tmp: str, device_bytes: int) -> tuple[subprocess.Popen, str]:
    sock = os.path.join(tmp, "s.sock")
    cmd = [sys.executable, "-m", "mmcache.cli", "serve", "--port", "0", "--data-dir", os.path.join(tmp, "d"),
           "--socket", sock, "--host-capacity", "2GiB", "--disk-capacity", "8GiB",
           "--device-capacity", str(device_bytes)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("mmcache ready"):
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, f"unix://{sock}"
    raise RuntimeError(f"the sidecar did not start (exit {proc.wait()})")


def rows_for(client, nbytes: int, repeats: int) -> dict:
    import torch

    from mmcache_client import content_hash

    rows = nbytes // (HIDDEN * 2)
    src = torch.full((rows, HIDDEN), 1.5, dtype=torch.bfloat16)
    dev_key, host_key = content_hash(f"dev-{nbytes}".encode()), content_hash(f"host-{nbytes}".encode())
    client.put("bench", dev_key, src)
    client.put("bench", host_key, src)
    out = {}

    def ipc():
        with client.get("bench", dev_key, device="cuda") as e:
            assert e.tier == "device"
    out["device tier (IPC)"] = timed(ipc, repeats)
    conn = client._connect()

    def from_arena():
        with client.get("bench", host_key) as e:
            e.tensor.to("cuda", non_blocking=True)
            torch.cuda.synchronize()
    conn.arena.pin()
    out["arena -> GPU (pinned)"] = timed(from_arena, repeats)
    from mmcache_client.cuda import unpin_host_buffer

    unpin_host_buffer(conn.arena._view)
    conn.arena.pinned = False
    out["arena -> GPU (unpinned)"] = timed(from_arena, repeats)
    pinned = src.clone().pin_memory()
    out["raw pinned H2D"] = timed(lambda: pinned.to("cuda", non_blocking=True), repeats)
    out["raw pageable H2D"] = timed(lambda: src.to("cuda"), repeats)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64KiB,4.5MiB,64MiB")
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    import torch

    from mmcache.sidecar.config import parse_size
    from mmcache_client import CacheClient

    print(f"machine: {describe(torch=True)}")
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to measure (run it where `mmcache serve --device-capacity` can start)")
        return 0
    print(f"GPU: {torch.cuda.get_device_name(0)}")
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_sidecar(tmp, 4 * max(sizes) + (64 << 20))
        try:
            with CacheClient(url) as client:
                table = {n: rows_for(client, n, args.repeats) for n in sizes}
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"the sidecar in its own process; medians / p99 of {args.repeats} repeats; bf16, hidden {HIDDEN}\n")
    print("| op | " + " | ".join(f"{n / 2**20:g} MiB" for n in sizes) + " |")
    print("|---" * (len(sizes) + 1) + "|")
    for name in next(iter(table.values())):
        cells = []
        for n in sizes:
            med, p99 = table[n][name]
            cells.append(f"{med:.1f} / {p99:.1f} us ({n / med / 1e3:.1f} GB/s)")
        print(f"| {name} | " + " | ".join(cells) + " |")
    for n in sizes:
        t = table[n]
        print(f"{n / 2**20:g} MiB: arena -> GPU pinned at {t['raw pinned H2D'][0] / t['arena -> GPU (pinned)'][0]:.0%} "
              f"of raw pinned H2D; unpinned at {t['raw pinned H2D'][0] / t['arena -> GPU (unpinned)'][0]:.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

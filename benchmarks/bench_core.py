"""Cache-core costs by entry size, against a plain memcpy of the same bytes, in one run.

    python benchmarks/bench_core.py [--sizes 64KiB,1MiB,4MiB,16MiB,64MiB] [--repeats 15]

Rows, for each entry size (fp16 embeddings of hidden 4096, as a 7B LLaVA's projector emits):
- memcpy:          np.copyto of the payload into pre-faulted, cache-cold memory (the physical
                   reference: what any put into shared memory must at least pay)
- put:             TieredStore.put (layout, copy into the shared arena, checksum, seal, enqueue
                   the disk write; the write itself is flushed untimed between repeats)
- get host:        in-process lease → view → numpy/torch views → release (zero-copy)
- get host (unix): CacheClient("unix://...") get → .tensor → close, from the same process over
                   the sidecar's Unix socket, as a prefill worker does (zero-copy)
- get disk:        LMDB read transaction → checksum verification → view (zero-copy, verified)
- promote:         get over the Unix socket of an entry only on disk: the sidecar verifies it,
                   copies it into the arena, and the client views it there (the design's choice
                   over clients opening LMDB themselves: one verified copy, then zero-copy hits)
Targets: zero-copy get flat in size (64 MiB within 2x of 64 KiB); put >= 50% of memcpy.

Then (``benchmarks/pressure.py``) fragmentation under a churn of mixed sizes, old allocator
against new, and ``/healthz`` latency during a put/delete burst with the sidecar in its own
process; ``--before REF`` runs that burst against the code at git REF too (e.g. the commit
before the core rework), side by side; then (``benchmarks/writer_map.py``) what each way of
giving a local writer the arena costs per put; then (``benchmarks/fast_path.py``) the local fast path
with the sidecar in its own process. ``--only core|frag|healthz|writer-map|fast-path`` picks one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

# NOTE: benchmarks/ is a folder of scripts; they share hostinfo.py from it.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from hostinfo import describe
from mmcache_client import CacheClient, content_hash

from mmcache.sidecar.config import ServeConfig, parse_size
from mmcache.core.store import StoreConfig, TieredStore
from mmcache.tiers.wiring import open_store

NS = "bench"
HIDDEN = 4096


def median_us(fn, repeats: int, setup=None) -> float:
    times = []
    for _ in range(repeats):
        if setup:
            setup()
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1e3


def start_sidecar(tmp: str, host_bytes: int):
    """Serve the HTTP app + Unix socket from a thread of this process."""
    import asyncio

    from aiohttp import web

    from mmcache.sidecar.server import STORE, create_app

    sock = os.path.join(tmp, "bench.sock")
    cfg = ServeConfig(data_dir=os.path.join(tmp, "sidecar"), port=0, socket=sock, host_capacity_bytes=host_bytes,
                      disk_capacity_bytes=4 * host_bytes, max_entry_size_bytes=host_bytes)
    ready, box = threading.Event(), {}
    loop = asyncio.new_event_loop()

    async def main():
        box["stop"] = asyncio.Event()
        app = create_app(cfg)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        box["store"] = app[STORE]
        ready.set()
        await box["stop"].wait()
        await runner.cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    ready.wait(60)

    def stop():
        loop.call_soon_threadsafe(box["stop"].set)
        thread.join(60)
    return f"unix://{sock}", box["store"], stop


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64KiB,1MiB,4MiB,16MiB,64MiB")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--only", choices=["core", "frag", "healthz", "writer-map", "fast-path"], default=None)
    ap.add_argument("--before", default=None, help="git ref whose sidecar the /healthz burst also runs (default: none)")
    args = ap.parse_args()
    if args.only in ("frag", "healthz"):
        print(f"machine: {describe()}")
        return pressure_sections(args)
    if args.only == "fast-path":
        import fast_path

        print(f"machine: {describe(torch=True)}")
        print("\n".join(fast_path.lines([parse_size(s) for s in ("64KiB", "4.5MiB", "64MiB")], 400)))
        return 0
    if args.only == "writer-map":
        import writer_map

        print(f"machine: {describe()}")
        print("\n".join(writer_map.lines([64 << 10, 1 << 20, parse_size("4.7MiB")], args.repeats)))
        return 0
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    arena_bytes = max(sizes) * 6
    print(f"machine: {describe()}")
    print(f"median of {args.repeats} repeats; fp16 embeddings, hidden {HIDDEN}; arena {arena_bytes >> 20} MiB in /dev/shm\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(StoreConfig(data_dir=os.path.join(tmp, "data"), host_capacity_bytes=arena_bytes,
                                        disk_capacity_bytes=8 * arena_bytes))
        url, sidecar_store, stop_sidecar = start_sidecar(tmp, arena_bytes)
        client = CacheClient(url)
        try:
            for nbytes in sizes:
                rows.append(bench_size(store, client, sidecar_store, nbytes, args.repeats))
        finally:
            client.close()
            stop_sidecar()
            store.close()
    print_table(rows)
    if args.only is None:
        import writer_map

        pressure_sections(args)
        print()
        print("\n".join(writer_map.lines([64 << 10, 1 << 20, parse_size("4.7MiB")], args.repeats)))
        import fast_path

        print()
        print("\n".join(fast_path.lines([parse_size(s) for s in ("64KiB", "4.5MiB", "64MiB")], 400)))
    print(hash_costs(args.repeats))
    return 0


def hash_costs(repeats: int, nbytes: int = 16 << 20) -> str:
    """The key hash (BLAKE3-256, ``content_hash``) next to the entry checksum (xxh3-64), per MiB
    of incompressible bytes, one thread each; medians of ``repeats``."""
    import blake3
    import xxhash

    data = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    mib = nbytes / (1 << 20)
    blake3_us = median_us(lambda: blake3.blake3(data).digest(), repeats) / mib
    xxh3_us = median_us(lambda: xxhash.xxh3_64_digest(data), repeats) / mib
    return f"hash: blake3 {blake3_us:.0f} us/MiB, xxh3 {xxh3_us:.0f} us/MiB"


def pressure_sections(args) -> int:
    import pressure

    if args.only in (None, "frag"):
        print()
        print("\n".join(pressure.fragmentation()))
    if args.only in (None, "healthz"):
        print()
        print("\n".join(pressure.healthz_lines(args.before)))
    return 0


def bench_size(store: TieredStore, client: CacheClient, sidecar_store, nbytes: int, repeats: int) -> dict:
    num_tokens = max(1, nbytes // (HIDDEN * 2))
    emb = np.random.default_rng(0).standard_normal((num_tokens, HIDDEN)).astype(np.float16)
    # NOTE: a put lands in arena memory that is not in cache; so does the reference memcpy,
    # which cycles through destinations totalling >= 256 MiB (all pre-faulted).
    dsts = [np.ones_like(emb) for _ in range(max(2, (256 << 20) // emb.nbytes))]
    rotation = iter(range(10**9))
    memcpy = median_us(lambda: np.copyto(dsts[next(rotation) % len(dsts)], emb), repeats)
    del dsts

    counter = iter(range(10**9))
    state = {}

    def fresh_key():
        state["key"] = f"{NS}/{content_hash(f'{nbytes}-{next(counter)}'.encode())}"

    def after_put():
        store.flush()
        store.delete(state["key"])  # keep the arena from filling; untimed
    put_times = []
    for _ in range(repeats):
        fresh_key()
        t0 = time.perf_counter_ns()
        store.put(state["key"], {"embeddings": emb})
        put_times.append(time.perf_counter_ns() - t0)
        after_put()
    put = statistics.median(put_times) / 1e3

    key = f"{NS}/{content_hash(f'{nbytes}-kept'.encode())}"
    store.put(key, {"embeddings": emb}, durable=True)

    def get_host():
        with store.get(key) as e:
            e.array
            e.tensor
    get_host_us = median_us(get_host, repeats)

    ns, h = key.split("/")
    client.put(ns, h, emb, durable=True)

    def get_unix():
        with client.get(ns, h) as e:
            e.tensor
    get_unix_us = median_us(get_unix, repeats)

    def drop_host_copy():  # the entry stays on disk only
        sidecar_store.flush()
        sidecar_store.host.delete(key)
    promote_us = median_us(get_unix, repeats, setup=drop_host_copy)

    def get_disk():
        with store.disk.view(key) as e:
            e.array
    get_disk_us = median_us(get_disk, repeats)
    store.delete(key)
    client.delete(ns, h)
    return {"nbytes": emb.nbytes, "memcpy": memcpy, "put": put, "get_host": get_host_us,
            "get_unix": get_unix_us, "get_disk": get_disk_us,
            "promote": promote_us}


def print_table(rows: list[dict]) -> None:
    def gbps(nbytes, us):
        return nbytes / (us * 1e-6) / 1e9
    print(f"{'size':>9} | {'memcpy us':>10} {'GB/s':>6} | {'put us':>9} {'GB/s':>6} {'%memcpy':>8} | "
          f"{'get host us':>11} | {'get unix us':>11} | {'get disk us':>11} {'GB/s':>6} | {'promote us':>10}")
    for r in rows:
        n = r["nbytes"]
        size = f"{n / 2**20:.2f}MiB" if n >= 2**20 else f"{n / 2**10:.0f}KiB"
        print(f"{size:>9} | {r['memcpy']:>10.1f} {gbps(n, r['memcpy']):>6.2f} | {r['put']:>9.1f} {gbps(n, r['put']):>6.2f} "
              f"{100 * r['memcpy'] / r['put']:>7.0f}% | {r['get_host']:>11.1f} | {r['get_unix']:>11.1f} | "
              f"{r['get_disk']:>11.1f} {gbps(n, r['get_disk']):>6.2f} | {r['promote']:>10.1f}")
    first, last = rows[0], rows[-1]
    print(f"\nzero-copy get, largest/smallest: host {last['get_host'] / first['get_host']:.2f}x, "
          f"unix {last['get_unix'] / first['get_unix']:.2f}x (target <= 2x)")
    worst = min(r["memcpy"] / r["put"] for r in rows)
    print(f"put bandwidth, worst size: {100 * worst:.0f}% of memcpy (target >= 50%)")


if __name__ == "__main__":
    sys.exit(main())

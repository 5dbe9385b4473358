"""The cache core under pressure, for ``bench_core.py``: fragmentation under churn (old vs new
allocator) and the sidecar's ``/healthz`` latency during a put/delete burst (before vs after).

Fragmentation: a churn of mixed entry sizes (the LLaVA / Qwen2-VL mix of ``workload.py``'s
realistic profile: 64 KiB to 8 MiB) through a fixed arena, with a few entries leased at any time
(readers mid-prefill). Reported per allocator:
- usable share: mean occupied bytes / capacity, sampled after every put (how much of the arena
  actually holds entries);
- evicted per put: bytes evicted per byte put (1.0 is the floor at steady state; more is waste);
- failed puts: puts that found no room (the new allocator answers 503; the old one evicted
  first and then failed).
The *old* allocator is the previous ``HostTier._allocate``, kept here as a model: evict in policy
order until a best-fit allocation succeeds, ignoring addresses.
"""

from __future__ import annotations

import http.client
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from mmcache.core.allocator import ArenaAllocator
from mmcache.tiers.host import HostTier
from mmcache.core.policies import make_policy
from mmcache.core.tier import PutStatus

KiB, MiB = 1 << 10, 1 << 20
SIZES = [64 * KiB, 256 * KiB, 1 * MiB, 2304 * KiB, 4608 * KiB, 8 * MiB]  # thumbnails .. 576x4096 bf16 .. Qwen2-VL large
WEIGHTS = [10, 15, 20, 25, 20, 10]


class OldAllocator:
    """The previous eviction loop: policy order until ``allocate`` succeeds, addresses ignored."""

    def __init__(self, capacity: int):
        self.allocator = ArenaAllocator(capacity, 256)
        self.policy = make_policy("lru")
        self.key_to_offset: dict[str, int] = {}
        self.leased: set[str] = set()
        self.evicted_bytes = 0

    def put(self, key: str, nbytes: int) -> bool:
        offset = self.allocator.allocate(nbytes)
        while offset is None:
            victims = self.policy.choose_victims(nbytes, lambda k: k not in self.leased)
            reclaimable = self.allocator.free_bytes + sum(self.policy.size_of(k) for k in victims)
            if not victims or reclaimable < nbytes:
                return False
            for k in victims:
                self.evicted_bytes += self.policy.size_of(k)
                self.policy.on_remove(k)
                self.allocator.free(self.key_to_offset.pop(k))
            offset = self.allocator.allocate(nbytes)
        self.key_to_offset[key] = offset
        self.policy.on_insert(key, nbytes, 1.0)
        return True

    def used(self) -> int:
        return self.policy.total_bytes


class NewAllocator:
    """The host tier itself (accounting only; nothing is written into its arena)."""

    def __init__(self, capacity: int, arena_path: str):
        self.host = HostTier(arena_path, capacity)
        self.leased: set[str] = set()

    def put(self, key: str, nbytes: int) -> bool:
        res = self.host.reserve(key, nbytes, "bench", 1.0)
        if isinstance(res, PutStatus):
            return False
        self.host.seal(res)
        return True

    @property
    def evicted_bytes(self) -> int:
        return self.host.evicted_bytes

    def used(self) -> int:
        return self.host.stats()["bytes"]

    def lease(self, key: str) -> None:
        if self.host.lease(key, ("r", key), count=False) is not None:
            self.leased.add(key)

    def release(self, key: str) -> None:
        self.host.release_key(key, ("r", key))
        self.leased.discard(key)


def churn(alloc, capacity: int, puts: int, leased_share: float, seed: int) -> dict:
    rng = random.Random(seed)
    occupancy, put_bytes, failed, keys = [], 0, 0, []
    warmup = puts // 5
    start_evicted = 0
    for i in range(puts):
        if i == warmup:
            start_evicted = alloc.evicted_bytes
        nbytes = rng.choices(SIZES, WEIGHTS)[0]
        key = f"ns/{i}"
        ok = alloc.put(key, nbytes)
        if i >= warmup:
            put_bytes += nbytes if ok else 0
            failed += not ok
            occupancy.append(alloc.used() / capacity)
        if ok:
            keys.append(key)
        # a few readers hold a lease each for a while (a prefill of a few images)
        if ok and rng.random() < leased_share:
            if isinstance(alloc, NewAllocator):
                alloc.lease(key)
            else:
                alloc.leased.add(key)
        if alloc.leased and rng.random() < leased_share:
            k = rng.choice(sorted(alloc.leased))
            alloc.release(k) if isinstance(alloc, NewAllocator) else alloc.leased.discard(k)
    evicted = alloc.evicted_bytes - start_evicted
    return {"usable": statistics.mean(occupancy), "evicted_per_put": evicted / max(put_bytes, 1),
            "failed": failed / (puts - warmup)}


def fragmentation(capacity: int = 256 * MiB, puts: int = 20000, shares=(0.05, 0.3), seed: int = 0) -> list[str]:
    lines = [f"fragmentation: {puts} puts of {len(SIZES)} sizes (64 KiB..8 MiB) through a {capacity >> 20} MiB arena, "
             f"a share of puts leased for a while; steady state (after the first 20%)",
             f"{'leased':>6} | {'allocator':>9} | {'usable share':>12} | {'evicted B per B put':>19} | {'failed puts':>11}"]
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        for share in shares:
            for name in ("old", "new"):
                alloc = OldAllocator(capacity) if name == "old" else NewAllocator(capacity, os.path.join(tmp, f"a{share}"))
                r = churn(alloc, capacity, puts, share, seed)
                lines.append(f"{share:>6.0%} | {name:>9} | {r['usable']:>12.3f} | {r['evicted_per_put']:>19.3f} | "
                             f"{r['failed']:>11.2%}")
                if isinstance(alloc, NewAllocator):
                    alloc.host.close()
    return lines


# ---------------------------------------------------------------- /healthz during a burst

def _start_sidecar(pythonpath: str | None, data_dir: str, sock: str) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + os.path.join(pythonpath, "clients", "python")
    cmd = [sys.executable, "-m", "mmcache.cli", "serve", "--port", "0", "--data-dir", data_dir, "--socket", sock,
           "--host-capacity", "64MiB", "--disk-capacity", "1GiB"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=pythonpath or None)
    for line in proc.stdout:
        if line.startswith("mmcache ready"):
            port = int(line.split()[2].rsplit(":", 1)[1])
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, port
    raise RuntimeError(f"sidecar did not start: {proc.wait()}")


def _burst(port: int, stop: threading.Event, seed: int) -> None:
    import numpy as np

    from mmcache_client.format import plan_entry
    from mmcache_client.keys import content_hash

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((256, 1024)).astype(np.float16)  # 512 KiB
    i = 0
    while not stop.is_set():
        h = content_hash(f"burst-{seed}-{i}".encode())
        body = plan_entry("burst", h, {"embeddings": emb}).to_bytes()
        conn.request("PUT", f"/v1/entries/burst/{h}", body=body)
        conn.getresponse().read()
        conn.request("DELETE", f"/v1/entries/burst/{h}")
        conn.getresponse().read()
        i += 1


def healthz_during_burst(pythonpath: str | None, samples: int = 400, writers: int = 2) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = _start_sidecar(pythonpath, os.path.join(tmp, "d"), os.path.join(tmp, "s.sock"))
        try:
            stop = threading.Event()
            threads = [threading.Thread(target=_burst, args=(port, stop, s)) for s in range(writers)]
            for t in threads:
                t.start()
            time.sleep(0.5)  # NOTE: a benchmark warm-up (the burst reaches steady state), not a wait for a server
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            lat = []
            for _ in range(samples):
                t0 = time.perf_counter()
                conn.request("GET", "/healthz")
                conn.getresponse().read()
                lat.append((time.perf_counter() - t0) * 1e3)
                time.sleep(0.005)
            stop.set()
            for t in threads:
                t.join()
        finally:
            proc.terminate()
            proc.wait(60)
    lat.sort()
    return {"p50": statistics.median(lat), "p99": lat[int(0.99 * len(lat))], "max": lat[-1]}


def healthz_lines(before_ref: str | None) -> list[str]:
    lines = ["/healthz latency (ms) while 2 clients PUT and DELETE 512 KiB entries over HTTP, sidecar in its own process:",
             f"{'code':>22} | {'p50':>7} | {'p99':>7} | {'max':>7}"]
    runs = [("this tree", None)]
    tmp_tree = None
    if before_ref:
        tmp_tree = tempfile.mkdtemp(prefix="mmcache-before-")
        subprocess.run(["git", "worktree", "add", "--detach", tmp_tree, before_ref], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        runs.insert(0, (f"before ({before_ref[:10]})", tmp_tree))
    try:
        for name, path in runs:
            r = healthz_during_burst(path)
            lines.append(f"{name:>22} | {r['p50']:>7.2f} | {r['p99']:>7.2f} | {r['max']:>7.2f}")
    finally:
        if tmp_tree:
            subprocess.run(["git", "worktree", "remove", "--force", tmp_tree], check=False)
    return lines

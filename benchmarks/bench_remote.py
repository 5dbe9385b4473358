"""The remote tier against the store behind it, with everything in its own process, in one run.

    python benchmarks/bench_remote.py [--size 4.5MiB] [--keys 40] [--cluster 3]

Starts a loopback ``redis-server`` (``--cluster K``: a K-master cluster) and two sidecars with
``--remote`` on it. Sidecar A puts ``--keys`` entries; once A's write-behind has written them,
sidecar B reads each over ``unix://``, where only the remote has it. Rows (median, p99):
- get from remote (B):  the SDK's get of an entry B holds nowhere else: the remote GET, checksum
                        verification, promotion into B's arena, the zero-copy view
- raw redis-py GET:     the same bytes straight from redis-py (the peer: what any client of the
                        store pays)
- get from host (B):    the same entries again, now in B's arena (the local floor)
Target: get from remote within 1.5x of the raw redis-py GET.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fast_path
from hostinfo import describe
from mmcache_client import CacheClient, content_hash

from mmcache.sidecar.config import parse_size
from mmcache.stack.redis_local import RedisClusterProcs, RedisServer

NS = "bench-remote"


def Sidecar(tmp: str, name: str, remote: str) -> "fast_path.Sidecar":
    return fast_path.Sidecar(tmp, 1 << 30, name, ("--remote", remote, "--remote-timeout-ms", "2000",
                                                  "--remote-required"))


def pct(times_ns: list[int]) -> tuple[float, float]:
    s = sorted(times_ns)
    return statistics.median(s) / 1e3, s[min(len(s) - 1, int(len(s) * 0.99))] / 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4.5MiB")
    ap.add_argument("--keys", type=int, default=40)
    ap.add_argument("--cluster", type=int, default=0, help="masters of a redis cluster (0: one server)")
    args = ap.parse_args()
    nbytes = parse_size(args.size)
    print(f"machine: {describe(torch=True)}")
    with tempfile.TemporaryDirectory(prefix="mmc-br-", dir="/tmp") as tmp:
        store = (RedisClusterProcs(tmp, args.cluster) if args.cluster else RedisServer(tmp)).start()
        a = b = None
        try:
            a, b = Sidecar(tmp, "a", store.url), Sidecar(tmp, "b", store.url)
            t = torch.ones(nbytes // (4096 * 2), 4096, dtype=torch.bfloat16)
            keys = [content_hash(f"remote-{i}".encode()) for i in range(args.keys)]
            with CacheClient(f"unix://{a.sock}") as ca:
                for k in keys:
                    ca.put(NS, k, t)
                deadline = time.monotonic() + 120
                while ca.stats()["remote"]["queued_bytes"] and time.monotonic() < deadline:
                    time.sleep(0.01)
                written = ca.stats()["remote"]["writes"]
            import redis

            if args.cluster:
                from redis.cluster import ClusterNode, RedisCluster
                raw = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", n.port) for n in store.nodes])
            else:
                raw = redis.Redis(port=store.port)
            remote_t, raw_t, host_t = [], [], []
            with CacheClient(f"unix://{b.sock}") as cb:
                for k in keys:
                    t0 = time.perf_counter_ns()
                    with cb.get(NS, k) as e:
                        e.tensor
                        tier = e.tier
                    remote_t.append(time.perf_counter_ns() - t0)
                    assert tier == "remote", tier
                    t0 = time.perf_counter_ns()
                    raw.get(f"mmc:v1:{NS}/{k}")
                    raw_t.append(time.perf_counter_ns() - t0)
                for k in keys:
                    t0 = time.perf_counter_ns()
                    with cb.get(NS, k) as e:
                        e.tensor
                    host_t.append(time.perf_counter_ns() - t0)
            raw.close()
        finally:
            for sc in (a, b):
                if sc is not None:
                    sc.stop()
            store.stop()
    kind = f"a {args.cluster}-master cluster" if args.cluster else "one redis-server"
    print(f"{args.keys} entries of {nbytes / 2**20:g} MiB on {kind} (loopback); {written} written by A's write-behind")
    print("| op | median us | p99 us |\n|---|---|---|")
    for name, times in (("get from remote (B)", remote_t), ("raw redis-py GET", raw_t), ("get from host (B)", host_t)):
        med, p99 = pct(times)
        print(f"| {name} | {med:.0f} | {p99:.0f} |")
    ratio = pct(remote_t)[0] / pct(raw_t)[0]
    print(f"get from remote = {ratio:.2f}x raw redis-py GET (target <= 1.5x): {'PASS' if ratio <= 1.5 else 'MISS'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

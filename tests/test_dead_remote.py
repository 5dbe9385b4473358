"""A dead remote costs a request at most ``--remote-timeout-ms`` (and a small margin): the attack
as made, Redis killed under load, with every request's latency measured (it was 3.2-4.5 s for a
miss GET or HEAD and 10-12 s for a claim with a 200 ms timeout)."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import torch

from mmcache_client import CacheClient, content_hash
from redis_servers import RedisClusterProcs, needs_redis
from sidecar import SidecarProcess, settled

pytestmark = needs_redis
NS = "deadremote"
BOUND_S = 1.5


@pytest.fixture
def cluster(tmp_path):
    procs = RedisClusterProcs(str(tmp_path / "cluster"), masters=3).start()
    yield procs
    procs.stop()


def test_misses_heads_and_claims_stay_bounded_while_redis_is_dead(tmp_path, cluster):
    sc = SidecarProcess("--data-dir", str(tmp_path / "d"), "--socket", str(tmp_path / "s.sock"),
                        "--remote", cluster.url, "--remote-timeout-ms", "200").start()
    try:
        with CacheClient(sc.url) as c:
            stored = content_hash(b"stored")
            c.put(NS, stored, torch.ones(4, 8))
            assert settled(lambda: c.stats()["remote"].get("queued", 0) == 0, 20)
        worst: dict[str, float] = {"get": 0.0, "head": 0.0, "claim": 0.0, "local hit": 0.0}
        counts = dict.fromkeys(worst, 0)
        lock = threading.Lock()
        stop = time.monotonic() + 7

        def load(worker: int) -> None:
            with CacheClient(sc.url, retries=0, timeout=30) as client:
                i = 0
                while time.monotonic() < stop:
                    miss = content_hash(f"miss-{worker}-{i}".encode())
                    for what, call in (("get", lambda: client.get(NS, miss)),
                                       ("head", lambda: client.exists(NS, miss)),
                                       ("claim", lambda: client.claim([f"{NS}/{miss}"], f"enc-{worker}", 5000)),
                                       ("local hit", lambda: client.get(NS, stored))):
                        t0 = time.perf_counter()
                        got = call()
                        took = time.perf_counter() - t0
                        if what == "local hit":
                            assert got is not None
                        with lock:
                            worst[what] = max(worst[what], took)
                            counts[what] += 1
                    i += 1
        threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # under load: then Redis is killed, no goodbye, connections refused from now on
        for node in cluster.nodes:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait(10)
        for t in threads:
            t.join(60)
        print(f"worst latency while Redis is dead: {worst}, calls: {counts}")
        assert all(n >= 5 for n in counts.values()), counts
        for what, took in worst.items():
            assert took < BOUND_S, f"a {what} took {took:.2f} s with the remote dead (bound {BOUND_S} s)"
        with CacheClient(sc.url) as c:
            assert c.stats()["remote"]["up"] is False
    finally:
        sc.stop()

"""The remote tier on real redis-server processes (one server, and a three-master cluster):
sidecars share entries through it, a corrupt value is a miss and deleted, and the remote (or a
cluster master) going away never fails the sidecar."""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time

import numpy as np
import pytest
import torch

from mmcache.sidecar.config import ServeConfig
from mmcache.tiers.remote import RemoteTier
from mmcache.tiers.remote_config import RemoteConfig, RemoteURLError, parse_remote_url
from mmcache_client import CacheClient, content_hash
from redis_servers import RedisClusterProcs, RedisServer, needs_redis
from sidecar import ThreadedSidecar, settled

NS = "remote"

pytestmark = needs_redis


def h(name) -> str:
    return content_hash(str(name).encode())


def emb(i: int, n: int = 16) -> torch.Tensor:
    return torch.full((n, 64), float(i), dtype=torch.float32)


def sidecar(tmp_path, name: str, remote: str, **kw) -> ThreadedSidecar:
    sock_dir = tempfile.mkdtemp(prefix="mmc-rt-", dir="/tmp")
    config = ServeConfig(data_dir=str(tmp_path / name), port=0, socket=os.path.join(sock_dir, "s.sock"),
                         host_capacity_bytes=8 << 20, disk_capacity_bytes=64 << 20, remote=remote,
                         remote_timeout_ms=kw.pop("remote_timeout_ms", 300), **kw)
    sc = ThreadedSidecar(config).start()
    sc.unix_url = f"unix://{config.socket}"
    return sc


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    procs = RedisClusterProcs(str(tmp_path_factory.mktemp("cluster")), masters=3).start()
    yield procs
    procs.stop()


@pytest.fixture
def server(tmp_path):
    srv = RedisServer(str(tmp_path)).start()
    yield srv
    srv.stop()


def test_urls_are_parsed_and_bad_ones_named(monkeypatch):
    a = parse_remote_url("redis://u:p%40ss@10.0.0.1:7000,10.0.0.2:7001")
    assert a.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001)) and a.username == "u" and a.password == "p@ss"
    assert parse_remote_url("rediss://h:6379").tls
    monkeypatch.setenv("MMCACHE_REMOTE_PASSWORD", "from-env")
    assert parse_remote_url("redis://h:6379").password == "from-env"
    for bad in ("http://h:1", "redis://h", "redis://h:0", "redis://h:6379/2", "redis://:99999"):
        with pytest.raises(RemoteURLError):
            parse_remote_url(bad)
    with pytest.raises(ValueError, match="scheme"):
        ServeConfig(data_dir="/tmp/x", remote="memcached://h:1")


@pytest.mark.parametrize("kind", ["server", "cluster"])
def test_an_entry_put_on_one_sidecar_is_read_on_another(tmp_path, request, kind):
    store = request.getfixturevalue(kind)
    a, b = sidecar(tmp_path, "a", store.url), sidecar(tmp_path, "b", store.url)
    try:
        key = h(f"shared-{kind}")
        with CacheClient(a.url) as ca:
            assert ca.put(NS, key, emb(3))
        a.store.remote.flush(10)
        assert a.store.stats()["remote"]["writes"] >= 1 and a.store.stats()["remote"]["cluster"] == (kind == "cluster")
        with CacheClient(b.url) as cb, CacheClient(b.unix_url) as ub:
            assert cb.lookup([f"{NS}/{key}"])[f"{NS}/{key}"] == "remote"  # lookup and HEAD consult it
            assert cb.exists(NS, key)
            with cb.get(NS, key) as e:
                assert e.tier == "remote" and torch.equal(e.tensor, emb(3))
            with ub.get(NS, key) as e:  # promoted: now a host hit, on the local path too
                assert e.tier == "host" and torch.equal(e.tensor, emb(3))
        b.store.flush(10)
        assert b.store.disk.contains(f"{NS}/{key}")  # and written to b's disk
        assert b.store.stats()["remote"]["hits"] == 1
    finally:
        a.stop()
        b.stop()


def test_a_corrupt_remote_value_is_a_miss_and_deleted(tmp_path, server):
    import redis

    sc = sidecar(tmp_path, "c", server.url)
    raw = redis.Redis(port=server.port)
    try:
        good, cut, other = h("good"), h("cut"), h("other")
        with CacheClient(sc.url) as c:
            c.put(NS, good, emb(1))
            c.put(NS, other, emb(2))
        sc.store.remote.flush(10)
        blob = raw.get(f"mmc:v1:{NS}/{good}")
        flipped = bytearray(blob)
        flipped[-1] ^= 0xFF
        raw.set(f"mmc:v1:{NS}/{good}", bytes(flipped))  # a flipped byte
        raw.set(f"mmc:v1:{NS}/{cut}", blob[: len(blob) // 2])  # truncated
        raw.set(f"mmc:v1:{NS}/{h('swapped')}", raw.get(f"mmc:v1:{NS}/{other}"))  # another key's entry
        sc.store.host.delete(f"{NS}/{good}")  # NOTE: gone locally (the remote keeps its damaged copy)
        sc.store.disk.delete(f"{NS}/{good}")
        sc.store.flush(10)
        for k in (good, cut, h("swapped")):
            assert sc.store.remote.lease(f"{NS}/{k}", "t") is None
            assert raw.exists(f"mmc:v1:{NS}/{k}") == 0  # deleted there
        assert sc.store.stats()["remote"]["corrupt"] == 3
        with CacheClient(sc.url) as c:  # a client sees a miss, never the damaged bytes
            assert c.get(NS, good) is None
    finally:
        raw.close()
        sc.stop()


def test_the_remote_going_away_never_fails_the_sidecar(tmp_path, server):
    sc = sidecar(tmp_path, "d", server.url, remote_timeout_ms=200)
    port = server.port
    try:
        with CacheClient(sc.url) as c, CacheClient(sc.unix_url) as u:
            c.put(NS, h("before"), emb(1))
            sc.store.remote.flush(10)
            server.kill()
            t0 = time.monotonic()
            for i in range(20):  # puts and reads, both transports: no error, no stall
                assert c.put(NS, h(f"down-{i}"), emb(i))
                assert u.put(NS, h(f"down-u-{i}"), emb(i))
                with u.get(NS, h("before")) as e:
                    assert torch.equal(e.tensor, emb(1))
                assert c.get(NS, h(f"never-{i}")) is None  # a miss, not a 5xx
                assert c.lookup([f"{NS}/{h(f'never-{i}')}"])[f"{NS}/{h(f'never-{i}')}"] is None
            assert time.monotonic() - t0 < 20
            doc = c.stats()["remote"]
            assert doc["up"] is False and doc["errors"] >= 1 and doc["dropped"] >= 1
            restarted = RedisServer(server.workdir, port=port).start()
            try:  # NOTE: the breaker probes again after retry_s (1 s)
                assert settled(lambda: c.put(NS, h(f"after-{time.monotonic()}"), emb(5)) and
                               c.stats()["remote"]["up"], timeout=15)
                c.put(NS, h("resumed"), emb(6))
                sc.store.remote.flush(10)
                import redis
                assert redis.Redis(port=port).exists(f"mmc:v1:{NS}/{h('resumed')}") == 1  # writes resumed
            finally:
                restarted.stop()
    finally:
        sc.stop()


def test_an_unreachable_remote_at_start_is_marked_down_or_refused(tmp_path):
    from sidecar import refused_port

    url = f"redis://127.0.0.1:{refused_port()}"
    tier = RemoteTier(RemoteConfig(url, timeout_ms=100))
    try:
        assert tier.stats()["up"] is False and tier.lease("ns/" + "a" * 64, "o") is None
    finally:
        tier.close()
    with pytest.raises(ConnectionError, match="remote-required"):
        RemoteTier(RemoteConfig(url, timeout_ms=100, required=True))


def test_a_cluster_master_killed_under_reads_and_puts(tmp_path, cluster):
    a, b = sidecar(tmp_path, "ka", cluster.url), sidecar(tmp_path, "kb", cluster.url)
    errors: list[BaseException] = []
    stop = threading.Event()

    def load(sc, tag):
        try:
            with CacheClient(sc.url) as c, CacheClient(sc.unix_url) as u:
                i = 0
                while not stop.is_set():
                    assert c.put(NS, h(f"{tag}-{i}"), emb(i % 50))
                    with u.get(NS, h(f"{tag}-{i}")) as e:  # a local hit, whatever the remote does
                        assert torch.equal(e.tensor, emb(i % 50))
                    got = c.get(NS, h(f"{'kb' if tag == 'ka' else 'ka'}-{random.randrange(max(i, 1))}"))
                    if got is not None:  # from the other sidecar, through the remote: never corrupt
                        assert got.tensor.shape == (16, 64)
                    i += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=load, args=(a, "ka")), threading.Thread(target=load, args=(b, "kb"))]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        victim = cluster.nodes[0]
        victim.kill()
        assert settled(lambda: not a.store.stats()["remote"]["up"] or a.store.stats()["remote"]["errors"] > 0,
                       timeout=20)
        time.sleep(0.5)
        victim.start()  # the same port and node config: it rejoins with its slots
        cluster.wait_ok()
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        a.stop()
        b.stop()
    assert not errors, errors[:3]

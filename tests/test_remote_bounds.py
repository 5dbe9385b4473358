"""What a shared remote can make a sidecar do is bounded: a value planted in Redis larger than
``--max-entry-size`` is a miss, never loaded whole (the attack: a 200 MiB value was loaded)."""

from __future__ import annotations

import pytest

from mmcache_client import CacheClient, content_hash
from redis_servers import RedisServer, needs_redis
from sidecar import SidecarProcess

pytestmark = needs_redis


def _rss_anon_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


@pytest.fixture
def server(tmp_path):
    (tmp_path / "redis").mkdir()
    srv = RedisServer(str(tmp_path / "redis")).start()
    yield srv
    srv.stop()


def test_a_planted_oversized_value_is_a_miss_and_is_not_loaded(tmp_path, server):
    import redis

    key = f"planted/{content_hash(b'planted')}"
    r = redis.Redis(host="127.0.0.1", port=server.port)
    r.set(f"mmc:v1:{key}", b"\0" * (96 << 20))
    sc = SidecarProcess("--data-dir", str(tmp_path / "d"), "--remote", server.url, "--max-entry-size", "8MiB").start()
    try:
        with CacheClient(sc.url) as c:
            c.stats()
            before = _rss_anon_kib(sc.proc.pid)
            for _ in range(3):
                assert c.get(*key.split("/")) is None
            grown_kib = _rss_anon_kib(sc.proc.pid) - before
            remote = c.stats()["remote"]
        assert remote["oversize"] == 3 and remote["hits"] == 0
        assert grown_kib < 32 << 10, f"RssAnon grew {grown_kib} KiB reading a 96 MiB value thrice"
        assert r.strlen(f"mmc:v1:{key}") == 96 << 20  # not ours to delete: another sidecar may take it
    finally:
        sc.stop()
        r.close()

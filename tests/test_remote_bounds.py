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
    sc = SidecarProcess("--data-dir", str(tmp_path / "d"), "--remote", server.url, "--max-entry-size", "8MiB",
                        "--remote-timeout-ms", "5000").start()  # NOTE: 8 MiB read on a loaded machine
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


def test_relayed_events_are_checked_before_any_follower_sees_them(tmp_path, server):
    """Anyone who can write the shared stream could send anything: a 4 MiB key, ``bytes: -7``,
    ``ts: NaN``. Only well-formed events reach this sidecar's followers."""
    import json
    import threading
    import urllib.request

    import redis

    from sidecar import settled

    sc = SidecarProcess("--data-dir", str(tmp_path / "d"), "--remote", server.url).start()
    r = redis.Redis(host="127.0.0.1", port=server.port)
    good = f"ns/{content_hash(b'good')}"
    seen: list[dict] = []
    try:
        def follow() -> None:
            with urllib.request.urlopen(sc.url + "/v1/events", timeout=30) as stream:
                for raw in stream:
                    line = raw.decode().strip()
                    if line.startswith("data:"):
                        doc = json.loads(line[5:])
                        seen.append(doc)
                        if doc.get("key") == good:
                            return
        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        with CacheClient(sc.url) as c:
            assert settled(lambda: c.stats()["events"]["followers"] >= 1, 10)
            base = {"kind": "stored", "tier": "host", "node": "elsewhere", "bytes": "10", "ts": "1.5"}
            for bad in ({"key": "ns/" + "a" * (4 << 20)}, {"key": good, "bytes": "-7"}, {"key": good, "ts": "nan"},
                        {"key": good, "kind": "exploded"}, {"key": good, "node": "x\n" * 10}):
                r.xadd("mmc:v1:events", {**base, **bad})
            r.xadd("mmc:v1:events", {**base, "key": good})
            follower.join(20)
            assert not follower.is_alive()
            assert settled(lambda: c.stats()["events"]["relays_refused"] == 5, 10)
        relayed = [d for d in seen if d.get("node") == "elsewhere"]
        assert [d["key"] for d in relayed] == [good] and relayed[0]["bytes"] == 10
    finally:
        sc.stop()
        r.close()

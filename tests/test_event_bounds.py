"""Event followers are bounded and cheap (the attacks: 1,000 idle ``GET /v1/events`` followers made
200 small PUTs 55x slower; under ``--max-connections 64``, 70 idle streams locked every other
client out, 50 of 50 answered 503)."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

import pytest
import torch

from mmcache.sidecar.common import EVENT_HUB
from mmcache_client import CacheClient, content_hash
from sidecar import SidecarProcess, ThreadedSidecar, settled
from mmcache.sidecar.config import ServeConfig

NS = "evbounds"


def _follow(url: str) -> socket.socket:
    """A follower that subscribes (reads up to its ``subscribed`` event) and then never reads."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(b"GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n")
    s.settimeout(10)
    got = b""
    while b"subscribed" not in got:
        if got.startswith(b"HTTP/1.1 ") and not got.startswith(b"HTTP/1.1 200"):
            raise ConnectionRefusedError(got.decode(errors="replace")[:300])
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionResetError(got.decode(errors="replace")[:300])
        got += chunk
    return s


def _events_stats(url: str) -> dict:
    with CacheClient(url) as c:
        return c.stats()["events"]


def _status(url: str, path: str) -> int:
    try:
        with urllib.request.urlopen(url + path, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_idle_streams_never_take_the_connections_requests_need(tmp_path):
    sc = SidecarProcess("--data-dir", str(tmp_path / "d"), "--max-connections", "64",
                        "--max-event-followers-per-tenant", "100").start()
    streams = []
    try:
        for _ in range(70):
            streams.append(_follow(sc.url))
        assert settled(lambda: _events_stats(sc.url)["followers"] == 70, 20)
        answers = [_status(sc.url, "/v1/stats") for _ in range(50)]
        assert answers == [200] * 50
    finally:
        for s in streams:
            s.close()
        sc.stop()


def test_followers_are_capped_in_all_and_per_tenant_with_429(tmp_path):
    sc = SidecarProcess("--data-dir", str(tmp_path / "d"), "--max-event-followers", "6",
                        "--max-event-followers-per-tenant", "4").start()
    streams = []
    try:
        for _ in range(4):
            streams.append(_follow(sc.url))
        assert settled(lambda: _events_stats(sc.url)["followers"] == 4, 20)
        req = urllib.request.Request(sc.url + "/v1/events")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=10)
        assert refused.value.code == 429 and int(refused.value.headers["Retry-After"]) >= 1
        assert b"--max-event-followers-per-tenant" in refused.value.read()
        streams.pop().close()  # one leaves: room again
        assert settled(lambda: _events_stats(sc.url)["followers"] == 3, 20)
        streams.append(_follow(sc.url))
        assert settled(lambda: _events_stats(sc.url)["followers"] == 4, 20)
        assert _events_stats(sc.url)["refused_followers"] == 1
    finally:
        for s in streams:
            s.close()
        sc.stop()


def _put_burst(url: str, n: int, start: int) -> float:
    with CacheClient(url) as c:
        value = torch.ones(2, 8)
        t0 = time.perf_counter()
        for i in range(start, start + n):
            c.put(NS, content_hash(str(i).encode()), value)
        return time.perf_counter() - t0


@pytest.mark.slow
def test_publishing_costs_the_same_with_300_idle_followers(tmp_path):
    """200 small PUTs each publish an event; with 300 followers connected (reading nothing) they
    take at most 3x as long as with none: the bus wakes one broadcaster, not 300 readers."""
    sc = SidecarProcess("--data-dir", str(tmp_path / "d"), "--max-event-followers", "400",
                        "--max-event-followers-per-tenant", "400").start()
    streams = []
    try:
        _put_burst(sc.url, 50, 0)  # warm: connections, LMDB, the arena's first pages
        alone = min(_put_burst(sc.url, 200, 1000), _put_burst(sc.url, 200, 2000))
        for _ in range(300):
            streams.append(_follow(sc.url))
        assert settled(lambda: _events_stats(sc.url)["followers"] == 300, 30)
        crowded = min(_put_burst(sc.url, 200, 3000), _put_burst(sc.url, 200, 4000))
        print(f"200 PUTs: {alone:.3f} s alone, {crowded:.3f} s with 300 followers ({crowded / alone:.2f}x)")
        assert crowded < 3 * alone, (alone, crowded)
    finally:
        for s in streams:
            s.close()
        sc.stop()


def test_a_follower_that_stops_reading_is_closed_not_buffered(tmp_path):
    config = ServeConfig(data_dir=str(tmp_path / "d"), port=0, host_capacity_bytes=8 << 20,
                         disk_capacity_bytes=64 << 20)
    sc = ThreadedSidecar(config).start()
    try:
        hub = sc.app[EVENT_HUB]
        hub.max_buffer_bytes = 64 << 10
        silent = _follow(sc.url)
        reader = urllib.request.urlopen(sc.url + "/v1/events", timeout=30)  # one that reads, to compare
        assert settled(lambda: sc.store.events.stats()["followers"] == 2, 10)
        key = f"{NS}/{content_hash(b'k')}"
        for _ in range(20):  # ~4 MB of events
            for _ in range(1000):
                sc.store.events.publish("stored", key, "host", 10)
            reader.read(1 << 16)
            time.sleep(0.02)
        assert settled(lambda: hub.stats()["lagging_closed"] == 1, 10), hub.stats()
        assert settled(lambda: sc.store.events.stats()["followers"] == 1, 10)
        silent.settimeout(10)
        with pytest.raises((ConnectionResetError, BrokenPipeError, OSError)):
            while silent.recv(1 << 20):  # what was buffered, then the end
                pass
            raise ConnectionResetError("closed")
        reader.close()
    finally:
        silent.close()
        sc.stop()

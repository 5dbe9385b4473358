"""Keys per call are bounded, and a big call is parsed off the event loop (the attack: one
``POST /v1/lookup`` of 52,000 keys blocked the sidecar's loop 0.27 s per call)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from mmcache.sidecar.common import MAX_KEYS_PER_CALL
from mmcache_client import CacheClient, TooManyKeys, content_hash
from sidecar import SidecarProcess

NS = "keycaps"


def _keys(n: int, start: int = 0) -> list[str]:
    return [f"{NS}/{content_hash(str(i).encode())}" for i in range(start, start + n)]


def _post(url: str, path: str, doc: dict) -> tuple[int, bytes]:
    req = urllib.request.Request(url + path, data=json.dumps(doc).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    sc = SidecarProcess("--data-dir", str(tmp_path_factory.mktemp("keycaps"))).start()
    yield sc
    sc.stop()


def test_ten_thousand_keys_are_a_413_naming_the_limit(sidecar):
    assert MAX_KEYS_PER_CALL == 4096
    for path in ("/v1/lookup", "/v1/batch_get", "/v1/claims"):
        status, body = _post(sidecar.url, path, {"keys": _keys(10_000), "owner": "x"})
        assert status == 413, (path, status, body[:200])
        assert "4096" in json.loads(body)["error"]
    with CacheClient(sidecar.url) as c:
        with pytest.raises(TooManyKeys, match="at most 4096"):
            c.lookup(_keys(10_000))
        assert sum(t is not None for t in c.lookup(_keys(4096)).values()) == 0  # the limit itself is fine


def test_big_lookups_leave_the_loop_responsive(sidecar):
    """Threads send 4096-key lookups back to back; /healthz answers meanwhile without waiting
    for a parse to finish on the loop."""
    body = {"keys": _keys(4096, 50_000)}
    stop = threading.Event()
    done = [0]

    def hammer() -> None:
        while not stop.is_set():
            status, _ = _post(sidecar.url, "/v1/lookup", body)
            assert status == 200
            done[0] += 1
    threads = [threading.Thread(target=hammer, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    waits = []
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            with urllib.request.urlopen(sidecar.url + "/healthz", timeout=10) as r:
                assert r.status == 200
            waits.append(time.perf_counter() - t0)
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    waits.sort()
    assert done[0] >= 4
    assert waits[len(waits) // 2] < 0.05, f"median /healthz {waits[len(waits) // 2]:.3f} s during big lookups"

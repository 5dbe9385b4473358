"""HTTP bounds: batch_get streams within a memory budget, JSON bodies
are capped chunked or not, a reader that never reads cannot pin an entry, idle sockets cannot
lock out HTTP or the Unix socket, slow request heads time out, the backlog is what we ask for.

Every test runs the sidecar as users run it, in its own process (``mmcache serve``)."""

from __future__ import annotations

import http.client
import json
import os
import resource
import socket
import subprocess
import time

import numpy as np
import pyarrow as pa
import pytest

from mmcache.common.http_limits import ConnectionGate, connection_cap, raise_nofile_limit
from mmcache_client import CacheClient, content_hash
from sidecar import SidecarProcess
from conftest import wait_until

MiB = 1 << 20
NS = "limits"


def h(name) -> str:
    return content_hash(str(name).encode())


def payload(i: int, nbytes: int) -> np.ndarray:
    a = np.random.default_rng(i).standard_normal((nbytes // 256, 64), dtype=np.float32)
    a[:, 0] = i
    return a


def stats(sc: SidecarProcess) -> dict:
    with CacheClient(sc.url) as c:
        return c.stats()


def rss_anon_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/PID/status")


def post(port: int, path: str, body: bytes, *, chunked: bool = False, timeout: float = 60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    if chunked:
        conn.putrequest("POST", path)
        conn.putheader("Transfer-Encoding", "chunked")
        conn.putheader("Content-Type", "application/json")
        conn.endheaders()
        for i in range(0, len(body), 1 << 20):
            part = body[i:i + (1 << 20)]
            try:
                conn.send(b"%x\r\n" % len(part) + part + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break  # refused mid-upload: the answer is already on its way
        else:
            conn.send(b"0\r\n\r\n")
    else:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response.read(), response


# ---------------------------------------------------------------- batch_get

def test_batch_get_streams_within_a_memory_budget(tmp_path):
    """48 entries of 4 MiB (192 MiB) that live on disk, fetched in one batch_get with a 16 MiB
    budget: the sidecar's anonymous memory grows by a few budgets, not by the answer (before:
    a table of every entry plus its serialized copy, 2.26 GB for 400 MiB)."""
    sc = SidecarProcess("--data-dir", str(tmp_path / "d"), "--host-capacity", "16MiB",
                        "--disk-capacity", "1GiB", "--batch-get-budget", "16MiB").start()
    try:
        n, size = 48, 4 * MiB
        with CacheClient(sc.url) as c:
            for i in range(n):
                c.put(NS, h(i), payload(i, size), durable=True)
        keys = [f"{NS}/{h(i)}" for i in range(n)] + [f"{NS}/{h('missing')}"]
        base = rss_anon_bytes(sc.proc.pid)
        conn = http.client.HTTPConnection("127.0.0.1", sc.port, timeout=120)
        conn.request("POST", "/v1/batch_get", body=json.dumps({"keys": keys}),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        peak = base
        reader = pa.ipc.open_stream(response)
        seen = {}
        for batch in reader:
            peak = max(peak, rss_anon_bytes(sc.proc.pid))
            for key, tier, entry in zip(*(batch.column(i).to_pylist() for i in range(3))):
                seen[key] = (tier, len(entry))
        peak = max(peak, rss_anon_bytes(sc.proc.pid))
        assert set(seen) == set(keys[:-1])  # the miss is left out
        assert all(nbytes > size for _, nbytes in seen.values())
        grown = peak - base
        assert grown < 112 * MiB, f"batch_get of {n * size >> 20} MiB grew the sidecar by {grown >> 20} MiB"
        with CacheClient(sc.url) as c:  # every lease was given back
            assert c.stats()["host"]["leases"] == 0
    finally:
        sc.stop()


# ---------------------------------------------------------------- body limits

@pytest.mark.parametrize("chunked", [False, True])
def test_json_bodies_are_capped_per_route(tmp_path, chunked):
    """A 12 MiB lookup body gets 413 with a JSON message (chunked too: before, a chunked 99 MiB
    body was parsed whole), and the sidecar keeps serving."""
    sc = SidecarProcess("--data-dir", str(tmp_path / "d"), "--host-capacity", "8MiB").start()
    try:
        body = json.dumps({"keys": [f"{NS}/{h(i)}" for i in range(170_000)]}).encode()
        assert len(body) > 8 * MiB
        status, answer, _ = post(sc.port, "/v1/lookup", body, chunked=chunked)
        assert status == 413, answer
        assert "limit" in json.loads(answer)["error"]
        status, answer, _ = post(sc.port, "/v1/lookup", json.dumps({"keys": [f"{NS}/{h(1)}"]}).encode(),
                                 chunked=chunked)
        assert status == 200 and json.loads(answer)["found"] == 0
    finally:
        sc.stop()


def test_a_put_over_the_entry_limit_chunked_gets_413(tmp_path):
    sc = SidecarProcess("--data-dir", str(tmp_path / "d"), "--host-capacity", "8MiB",
                        "--max-entry-size", "1MiB").start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", sc.port, timeout=30)
        conn.putrequest("PUT", f"/v1/entries/{NS}/{h('big')}")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        try:
            for _ in range(3):
                conn.send(b"%x\r\n" % MiB + b"\0" * MiB + b"\r\n")
            conn.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = conn.getresponse()
        assert response.status == 413 and "limit" in json.loads(response.read())["error"]
        assert stats(sc)["host"]["entries"] == 0
    finally:
        sc.stop()


# ---------------------------------------------------------------- readers that never read

def _never_read(port: int, request: bytes) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel takes as little as it may
    s.connect(("127.0.0.1", port))
    s.sendall(request)
    return s


@pytest.mark.parametrize("route", ["get", "batch_get"])
def test_a_reader_that_never_reads_cannot_pin_an_entry(tmp_path, route):
    """A 32 MiB entry requested by a client that never reads: after the write timeout its
    connection is aborted and its lease (GET) or its batch (batch_get) freed (before: pinned for
    as long as the socket lived), so a delete frees the space at once and the sidecar serves on."""
    sc = SidecarProcess("--data-dir", str(tmp_path / "d"), "--host-capacity", "96MiB",
                        "--write-timeout", "1").start()
    try:
        key = h("pinned")
        with CacheClient(sc.url) as c:
            c.put(NS, key, payload(1, 32 * MiB))
        if route == "get":
            request = f"GET /v1/entries/{NS}/{key} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        else:
            body = json.dumps({"keys": [f"{NS}/{key}"]}).encode()
            request = (f"POST /v1/batch_get HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        s = _never_read(sc.port, request)
        try:
            if route == "get":  # batch_get gives its leases back once the batch holds copies
                wait_until(lambda: stats(sc)["host"]["leases"] == 1, what="the reader's lease")
            doc = wait_until(lambda: (d := stats(sc))["http"]["write_timeouts"] == 1 and d, what="the write timeout")
            assert doc["host"]["leases"] == 0
            with CacheClient(sc.url) as c:
                assert c.delete(NS, key)
                assert stats(sc)["host"]["used_bytes"] == 0  # not held aside for a lease
                assert c.put(NS, h("next"), payload(2, 32 * MiB))
        finally:
            s.close()
    finally:
        sc.stop()


# ---------------------------------------------------------------- connections

def _nofile(soft: int, hard: int):
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _open_idle(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        socks.append(s)
    return socks


def _soft_nofile(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError("no 'Max open files' in /proc/PID/limits")


@pytest.fixture
def many_fds():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2600:
        pytest.skip(f"the test process needs 2600 descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2600), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_1100_idle_connections_under_a_1024_limit_lock_out_nothing(tmp_path, many_fds):
    """Soft and hard limit 1024 (nothing to raise to): 1100 idle TCP connections (before: the
    sidecar ran out of descriptors and refused HTTP *and* Unix clients). Now the connection cap
    keeps descriptors for everything else and the oldest idle connection makes room."""
    sock_path = str(tmp_path / "s.sock")
    # NOTE: a long header timeout, so that the cap (not the slow-header deadline) frees the room.
    sc = SidecarProcess("--data-dir", str(tmp_path / "d"), "--host-capacity", "8MiB", "--socket", sock_path,
                        "--header-timeout", "300", preexec_fn=_nofile(1024, 1024)).start()
    idle: list[socket.socket] = []
    try:
        with CacheClient(sc.url) as c:
            c.put(NS, h("x"), payload(1, 64 << 10))
        idle = _open_idle(sc.port, 1100)
        conn = http.client.HTTPConnection("127.0.0.1", sc.port, timeout=30)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        conn.close()
        with CacheClient(f"unix://{sock_path}") as u:  # the Unix socket still accepts
            with u.get(NS, h("x")) as entry:
                assert entry is not None and float(entry.tensor[0, 0]) == 1.0
        doc = stats(sc)
        assert doc["http"]["header_timeouts"] == 0
        # the 1100 idle ones and /healthz against a cap of 1024 - 64 (the stats call came after
        # /healthz had closed): each one over the cap closed an older idle one, or, where it came
        # in one accept burst with every live one (none has a transport yet, none can be closed),
        # got the 503 itself
        over = doc["http"]["evicted_idle"] + doc["http"]["refused"]
        assert over >= 1100 + 1 - (1024 - 64), doc["http"]
        assert doc["http"]["evicted_idle"] > 0
        assert len(os.listdir(f"/proc/{sc.proc.pid}/fd")) <= 1024 - 32  # room for LMDB, logs, Unix clients
        assert sc.proc.poll() is None
    finally:
        for s in idle:
            s.close()
        sc.stop()


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one(tmp_path, many_fds):
    """Soft 1024, hard 4096: the sidecar raises its soft limit, and 1100 idle connections stay
    open side by side with a working request."""
    sc = SidecarProcess("--data-dir", str(tmp_path / "d"), "--host-capacity", "8MiB",
                        preexec_fn=_nofile(1024, 4096)).start()
    idle: list[socket.socket] = []
    try:
        assert _soft_nofile(sc.proc.pid) == 4096
        idle = _open_idle(sc.port, 1100)
        conn = http.client.HTTPConnection("127.0.0.1", sc.port, timeout=30)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        assert stats(sc)["http"]["evicted_idle"] == 0
    finally:
        for s in idle:
            s.close()
        sc.stop()


def test_a_connection_cap_refuses_with_503_when_every_connection_is_busy(tmp_path):
    """--max-connections 2, both connections inside a request (a never-read 32 MiB GET): a third
    gets a 503 with Retry-After and a JSON message; once they go, it is served again."""
    sock = f"/tmp/mmc-cap-{os.getpid()}.sock"
    sc = SidecarProcess("--data-dir", str(tmp_path / "d"), "--host-capacity", "96MiB", "--socket", sock,
                        "--max-connections", "2", "--write-timeout", "30").start()
    try:
        key = h("busy")
        with CacheClient(sc.url) as c:
            c.put(NS, key, payload(1, 32 * MiB), durable=True)  # NOTE: its write-through lease is gone
        busy = [_never_read(sc.port, f"GET /v1/entries/{NS}/{key} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                for _ in range(2)]
        # NOTE: both must be inside their handlers (busy, not idle) before a probe arrives, or the
        # probe would rightly evict one as idle; the Unix socket sees that without an HTTP slot.
        with CacheClient(f"unix://{sock}") as u:
            wait_until(lambda: u.stats()["host"]["leases"] == 2, what="both readers in their handlers")

        def healthz():
            conn = http.client.HTTPConnection("127.0.0.1", sc.port, timeout=30)
            try:
                conn.request("GET", "/healthz")
                r = conn.getresponse()
                return r.status, r.getheader("Retry-After"), r.read()
            except (ConnectionResetError, BrokenPipeError):
                return None
            finally:
                conn.close()

        status, retry_after, body = wait_until(lambda: (a := healthz()) and a[0] == 503 and a, what="a 503")
        assert retry_after == "1" and "too many connections" in json.loads(body)["error"]
        for s in busy:
            s.close()
        wait_until(lambda: (a := healthz()) and a[0] == 200, what="service again")
    finally:
        sc.stop()


def test_a_slow_request_head_times_out(tmp_path):
    """A connection that sends half a request head and stops is closed at --header-timeout
    (slowloris); a complete request on a fresh connection is unaffected."""
    sc = SidecarProcess("--data-dir", str(tmp_path / "d"), "--host-capacity", "8MiB",
                        "--header-timeout", "0.5").start()
    try:
        s = socket.create_connection(("127.0.0.1", sc.port), timeout=30)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no blank line: the head never ends
        t0 = time.monotonic()
        assert s.recv(1024) == b""  # closed by the sidecar, not by our timeout
        assert time.monotonic() - t0 < 20
        s.close()
        assert stats(sc)["http"]["header_timeouts"] >= 1
    finally:
        sc.stop()


def test_the_listen_backlog_is_what_the_code_asks_for(tmp_path):
    """aiohttp's run_app re-listens at 128; ``ss`` shows a listening socket's backlog as Send-Q."""
    try:
        out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no ss(8) here")
    sc = SidecarProcess("--data-dir", str(tmp_path / "d"), "--host-capacity", "8MiB").start()
    try:
        out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout
        rows = [line.split() for line in out.splitlines() if line.split()[3].endswith(f":{sc.port}")]
        assert rows, out
        with open("/proc/sys/net/core/somaxconn") as f:
            somaxconn = int(f.read())
        assert int(rows[0][2]) == min(1024, somaxconn)
    finally:
        sc.stop()


# ---------------------------------------------------------------- units

def test_connection_cap_keeps_a_descriptor_reserve():
    assert connection_cap(None, 1024) == 1024 - 64
    assert connection_cap(100, 1024) == 100
    assert connection_cap(5000, 1024) == 1024 - 64
    with pytest.raises(ValueError):
        ConnectionGate(object(), 0)  # type: ignore[arg-type]


def test_raise_nofile_limit_reaches_the_hard_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        assert raise_nofile_limit() == (hard if hard != resource.RLIM_INFINITY else max(256, 1 << 20))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

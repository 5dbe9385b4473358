"""The cache under pressure and under attack: contiguous eviction, "no space" as an
answer, disk entries served when host cannot take them, views that live exactly as long as their
leases, writers that die or keep scribbling, hostile costs, arenas over tmpfs, and a loop that
stays responsive."""

from __future__ import annotations

import http.client
import json
import multiprocessing
import os
import random
import signal
import socket
import threading
import time

import numpy as np
import pytest

from mmcache.sidecar.config import ServeConfig
from mmcache.tiers.host import HostTier
from mmcache.core.store import StoreConfig
from mmcache.tiers.wiring import open_store
from mmcache.core.tier import PutStatus
from mmcache_client import CacheClient, CacheFull, EntryTooLarge, LeaseLost, content_hash
from mmcache_client.arena import ArenaTooLarge
from entries import encode_entry
from mmcache_client.format import read_entry
from sidecar import SidecarProcess, ThreadedSidecar, settled, unix_sidecar

KiB, MiB = 1 << 10, 1 << 20
NS = "pressure"
SPAWN = multiprocessing.get_context("spawn")


def h(name) -> str:
    return content_hash(str(name).encode())


def payload(i: int, num_tokens: int, hidden: int = 64) -> np.ndarray:
    a = np.random.default_rng(i).standard_normal((num_tokens, hidden), dtype=np.float32)
    a[:, 0] = i
    return a


def fill_raw(host: HostTier, name: str, nbytes: int, owner="w") -> str:
    """A sealed host entry of exactly ``nbytes`` (the accounting does not look at the bytes)."""
    res = host.reserve(name, nbytes, owner, 1.0)
    assert not isinstance(res, PutStatus), res
    host.seal(res)
    return name


# ---------------------------------------------------------------- contiguous eviction

def test_a_put_that_cannot_fit_around_a_lease_evicts_nothing(tmp_path):
    """Six 16 KiB entries in a 96 KiB arena, the third leased: a 64 KiB put has no contiguous
    window without the leased one. Before: it evicted all five others and still failed."""
    host = HostTier(str(tmp_path / "arena"), 96 * KiB)
    keys = [fill_raw(host, f"ns/{i}", 16 * KiB) for i in range(6)]
    host.lease(keys[2], "reader")
    assert host.reserve("ns/big", 64 * KiB, "w") is PutStatus.NO_SPACE
    assert host.evictions == 0 and all(host.contains(k) for k in keys)
    # 32 KiB fits beside it: exactly the two oldest entries of one window go, nothing else.
    res = host.reserve("ns/mid", 32 * KiB, "w")
    assert not isinstance(res, PutStatus)
    assert host.evicted_bytes == 32 * KiB and host.evictions == 2
    assert not host.contains(keys[0]) and not host.contains(keys[1])
    assert all(host.contains(k) for k in keys[2:])
    host.close()


def test_eviction_prefers_the_policys_victims_among_windows_that_fit(tmp_path):
    host = HostTier(str(tmp_path / "arena"), 64 * KiB)
    keys = [fill_raw(host, f"ns/{i}", 16 * KiB) for i in range(4)]
    for k in (keys[0], keys[1]):  # LRU: 2 and 3 are now the oldest
        assert host.lease(k, "r") is not None
        host.release_owner("r")
    res = host.reserve("ns/new", 32 * KiB, "w")
    assert not isinstance(res, PutStatus) and res.offset == 32 * KiB
    assert host.contains(keys[0]) and host.contains(keys[1])
    assert not host.contains(keys[2]) and not host.contains(keys[3])
    host.close()


def test_churn_of_mixed_sizes_with_a_leased_entry_in_the_middle(tmp_path):
    """No put evicts more than it needs (at most the request plus one entry, and nothing while a
    free block fits), the leased entry is never touched, and the 503 path (NO_SPACE) is hit."""
    capacity = 1 * MiB
    host = HostTier(str(tmp_path / "arena"), capacity)
    rng = random.Random(0)
    pinned = fill_raw(host, "ns/pinned", 48 * KiB)
    host.lease(pinned, "pin")
    no_space = 0
    live: list[str] = []
    for i in range(3000):
        size = rng.choice([4, 16, 64, 200, 300, 500]) * KiB
        before_evicted, before_largest = host.evicted_bytes, host.allocator.largest_free_bytes
        if rng.random() < 0.2 and live:
            host.delete(live.pop(rng.randrange(len(live))))
            continue
        res = host.reserve(f"ns/{i}", size, "w", float(rng.random()))
        evicted = host.evicted_bytes - before_evicted
        if before_largest >= size:
            assert evicted == 0
        if isinstance(res, PutStatus):
            assert res is PutStatus.NO_SPACE and evicted == 0
            no_space += 1
            continue
        assert evicted < size + 500 * KiB  # the window's last entry may overshoot, nothing more
        host.seal(res)
        live.append(f"ns/{i}")
        if rng.random() < 0.05:  # a reader pins a few entries for a while
            host.lease(f"ns/{i}", "pin")
        if rng.random() < 0.05:
            host.release_owner("pin")
            host.lease(pinned, "pin")
    assert host.contains(pinned)
    assert no_space > 0, "the churn never hit the no-space answer"
    assert host.stats()["no_space"] == no_space
    host.close()


# ---------------------------------------------------------------- a full cache says so

@pytest.fixture
def sidecar(tmp_path):
    with unix_sidecar(str(tmp_path / "data"), host_capacity_bytes=2 * MiB) as sc:
        yield sc


def test_all_leased_is_cache_full_on_both_transports_never_a_400(sidecar):
    with CacheClient(sidecar.unix_url) as u, CacheClient(sidecar.url) as w:
        entries = []
        for i in range(6):  # 6 x 256 KiB host-only entries leased: the 2 MiB arena is pinned
            assert u.put(NS, h(i), payload(i, 1024), persist=False)
            entries.append(u.get(NS, h(i)))
        with pytest.raises(CacheFull) as local:
            u.put(NS, h("x"), payload(7, 2048), persist=False)
        assert local.value.retry_after_s >= 1
        conn = http.client.HTTPConnection("127.0.0.1", sidecar.port, timeout=30)
        blob = encode_entry(NS, h("y"), {"embeddings": payload(8, 2048)})
        conn.request("PUT", f"/v1/entries/{NS}/{h('y')}?persist=0", body=blob)
        resp = conn.getresponse()
        body = json.loads(resp.read())
        assert resp.status == 503 and int(resp.getheader("Retry-After")) >= 1 and "leased" in body["error"]
        with pytest.raises(CacheFull):
            w.put(NS, h("z"), payload(9, 2048), persist=False)
        assert not u.exists(NS, h("x")) and not u.exists(NS, h("y"))
        for e in entries:
            e.close()
        assert u.put(NS, h("x"), payload(7, 2048), persist=False)  # room again once released
        assert sidecar.store.stats()["host"]["leases"] == 0


def test_a_disk_entry_the_host_cannot_take_is_served_over_unix(sidecar):
    """Larger than the 2 MiB arena: it lands on disk, and the local path reads it from LMDB in
    place instead of reporting a miss."""
    big = payload(3, 8192)  # 2 MiB of data, over the arena with its header
    with CacheClient(sidecar.url) as w, CacheClient(sidecar.unix_url) as u:
        assert w.put(NS, h("big"), big)
        assert w.lookup([f"{NS}/{h('big')}"])[f"{NS}/{h('big')}"] == "disk"  # visible at the 201
        with u.get(NS, h("big")) as e:
            assert e is not None and e.tier == "disk"
            assert np.array_equal(e.array, big)
            assert sidecar.store.stats()["disk"]["leases"] == 1  # pinned on disk while read
        assert settled(lambda: sidecar.store.stats()["disk"]["leases"] == 0)  # NOTE: a release is one-way
        with w.get(NS, h("big")) as e:  # and over HTTP
            assert e.tier == "disk" and np.array_equal(e.array, big)


def test_a_disk_entry_is_served_in_place_while_host_is_all_leased(sidecar):
    with CacheClient(sidecar.unix_url) as u:
        assert u.put(NS, h("cold"), payload(1, 1024), durable=True)
        sidecar.store.host.delete(f"{NS}/{h('cold')}")  # only disk has it now
        held = []
        for i in range(7):
            assert u.put(NS, h(f"hot{i}"), payload(i, 1024), persist=False)
            held.append(u.get(NS, h(f"hot{i}")))
        with u.get(NS, h("cold")) as e:
            assert e is not None and e.tier == "disk" and float(e.array[0, 0]) == 1.0
        assert sidecar.store.stats()["host"]["served_in_place"] >= 1
        for e in held:
            e.close()


def test_durable_put_larger_than_the_disk_tier_stores_nothing(tmp_path):
    store = open_store(StoreConfig(data_dir=str(tmp_path / "d"), host_capacity_bytes=4 * MiB,
                                    disk_capacity_bytes=256 * KiB, arena_path=str(tmp_path / "arena")))
    try:
        k = f"{NS}/{h('huge')}"
        with pytest.raises(EntryTooLarge, match="disk tier"):
            store.put(k, {"embeddings": payload(1, 2048)}, durable=True)
        with pytest.raises(EntryTooLarge):  # a plain one is refused too: it could never persist
            store.put(k, {"embeddings": payload(1, 2048)})
        assert store.tier_of(k) is None and store.host.stats()["used_bytes"] == 0
        assert store.put(k, {"embeddings": payload(1, 2048)}, persist=False).tier == "host"  # host-only is fine
    finally:
        store.close()


def test_a_full_disk_queue_is_a_503_and_stores_nothing(tmp_path):
    """Puts the 2 MiB host cannot take queue copies for the disk writer; with the writer stuck
    (a slow disk) and 3 MiB of them queued, the next is a 503 with Retry-After at once (not a
    queue that grows memory and latency without bound), stores nothing, and once the writer
    moves the same put succeeds and every acknowledged entry reads back whole."""
    config = ServeConfig(data_dir=str(tmp_path / "data"), port=0, host_capacity_bytes=2 * MiB,
                         disk_capacity_bytes=64 * MiB, disk_queue_bytes=3 * MiB)
    sc = ThreadedSidecar(config).start()
    disk, writer = sc.store.disk, sc.store.disk._writer  # NOTE: its writer thread, held mid-commit
    stuck, entered = threading.Event(), threading.Event()
    commit = writer._try_commit

    def slow_commit(ops):
        entered.set()
        assert stuck.wait(60)
        return commit(ops)

    writer._try_commit = slow_commit
    try:
        big = {i: payload(i, 10_000) for i in range(3)}  # 2.5 MiB each: over the arena
        first: list = []

        def put_first():
            with CacheClient(sc.url) as c:
                first.append(c.put(NS, h(0), big[0]))

        t = threading.Thread(target=put_first)
        t.start()
        assert entered.wait(30)  # the first is in the writer's hands (and counted as queued)
        assert disk.stats()["queued_bytes"] > 2 * MiB
        conn = http.client.HTTPConnection("127.0.0.1", sc.port, timeout=30)
        blob = encode_entry(NS, h(1), {"embeddings": big[1]})
        t0 = time.monotonic()
        conn.request("PUT", f"/v1/entries/{NS}/{h(1)}", body=blob)
        resp = conn.getresponse()
        body = json.loads(resp.read())
        assert time.monotonic() - t0 < 10  # answered at once, not after the stuck commit
        assert resp.status == 503 and int(resp.getheader("Retry-After")) >= 1, body
        assert "queue" in body["error"]
        with CacheClient(sc.url) as c:
            with pytest.raises(CacheFull):
                c.put(NS, h(2), big[2])
            assert not c.exists(NS, h(1)) and not c.exists(NS, h(2))
        assert disk.stats()["queue_full"] >= 1
        stuck.set()
        t.join(30)
        assert first == [True]
        with CacheClient(sc.url) as c:
            assert c.put(NS, h(1), big[1]) and c.put(NS, h(2), big[2])
            for i in range(3):
                with c.get(NS, h(i)) as e:
                    assert e.tier == "disk" and np.array_equal(e.array, big[i])
        assert disk.stats()["queued_bytes"] == 0
    finally:
        stuck.set()
        sc.stop()


def test_the_disk_queue_bound_spares_write_through_from_host(tmp_path):
    """Write-through copies from the arena in place (host's capacity bounds them): a queue bound
    smaller than one entry refuses none of them, and an empty queue admits any size."""
    store = open_store(StoreConfig(data_dir=str(tmp_path / "d"), host_capacity_bytes=8 * MiB,
                                    disk_capacity_bytes=64 * MiB, arena_path=str(tmp_path / "arena"),
                                    disk_max_queued_bytes=1))
    try:
        for i in range(8):
            assert store.put(f"{NS}/{h(i)}", {"embeddings": payload(i, 1024)}).created
        k = f"{NS}/{h('big')}"
        assert store.put(k, {"embeddings": payload(9, 40_000)}).tier == "disk"  # 10 MiB, alone in the queue
        store.flush()
        assert all(store.disk.contains(f"{NS}/{h(i)}") for i in range(8))
        assert store.disk.stats()["queue_full"] == 0 and store.stats()["disk"]["persist_errors"] == 0
    finally:
        store.close()


def test_a_201_is_visible_to_head_and_lookup_when_it_lands_on_disk(sidecar):
    big = encode_entry(NS, h("d"), {"embeddings": payload(4, 8192)})
    conn = http.client.HTTPConnection("127.0.0.1", sidecar.port, timeout=30)
    conn.request("PUT", f"/v1/entries/{NS}/{h('d')}", body=big)
    resp = conn.getresponse()
    assert resp.status == 201 and json.loads(resp.read())["tier"] == "disk"
    conn.request("HEAD", f"/v1/entries/{NS}/{h('d')}")
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200 and resp.getheader("X-MMCache-Tier") == "disk"


# ---------------------------------------------------------------- hostile input

@pytest.mark.parametrize("cost", ["nan", "inf", "-1", "-0.5"])
def test_a_hostile_cost_is_a_400_and_stores_nothing(sidecar, cost):
    import safetensors.numpy

    conn = http.client.HTTPConnection("127.0.0.1", sidecar.port, timeout=30)
    for i in range(8):  # eight such puts filled an 8 MiB host tier for good, before
        blob = safetensors.numpy.save({"embeddings": payload(i, 1024)}, metadata={"encode_ms": cost})
        conn.request("PUT", f"/v1/entries/{NS}/{h(f'nan{i}')}", body=blob)
        resp = conn.getresponse()
        assert resp.status == 400 and "encode_ms" in json.loads(resp.read())["error"]
    stats = sidecar.store.stats()
    assert stats["host"]["entries"] == 0 and stats["host"]["used_bytes"] == 0 and stats["disk"]["pending_writes"] == 0
    with CacheClient(sidecar.unix_url) as u:
        with pytest.raises(ValueError):
            u.put(NS, h("n"), payload(1, 16), encode_ms=float(cost))
        assert not u.exists(NS, h("n"))


def test_a_local_writer_that_seals_a_hostile_cost_leaves_nothing(sidecar):
    from mmcache_client.local import LocalConnection

    conn = LocalConnection(sidecar.config.socket)
    k = f"{NS}/{h('seal-nan')}"
    blob = encode_entry(NS, h("seal-nan"), {"embeddings": payload(1, 64)}, encode_ms=1.0)
    assert b'"encode_ms":"1.000"' in blob
    blob = blob.replace(b'"encode_ms":"1.000"', b'"encode_ms":"nan  "')  # same length: a hostile writer
    ans = conn.call("reserve", key=k, nbytes=len(blob), encode_ms=0.0)
    conn.writable_arena().view(ans["offset"], len(blob))[:] = blob
    with pytest.raises(ValueError, match="encode_ms"):
        conn.call("seal", key=k)
    assert not sidecar.store.contains(k) and sidecar.store.host.stats()["used_bytes"] == 0
    conn.close()


def test_zero_token_embeddings_are_refused_on_every_path(sidecar):
    from mmcache_client.format import BadHeader, parse_entry

    with CacheClient(sidecar.url) as w, CacheClient(sidecar.unix_url) as u:
        for c in (w, u):
            with pytest.raises(ValueError):
                c.put(NS, h("empty"), np.zeros((0, 64), np.float32))
    import safetensors.numpy

    raw = safetensors.numpy.save({"embeddings": np.zeros((0, 64), np.float32)})
    with pytest.raises(BadHeader, match="num_tokens"):
        parse_entry(raw, strict=False)
    conn = http.client.HTTPConnection("127.0.0.1", sidecar.port, timeout=30)
    conn.request("PUT", f"/v1/entries/{NS}/{h('empty')}", body=raw)
    resp = conn.getresponse()
    assert resp.status == 400 and "num_tokens" in json.loads(resp.read())["error"]


def test_an_arena_over_the_tmpfs_behind_it_is_refused_with_the_sizes(tmp_path, monkeypatch):
    real = os.statvfs

    class Small:
        def __init__(self, st):
            self.f_frsize, self.f_bavail, self.f_blocks = 4096, (64 * MiB) // 4096, (64 * MiB) // 4096

    monkeypatch.setattr(os, "statvfs", lambda p: Small(real(p)))  # Docker's 64 MiB /dev/shm
    with pytest.raises(ArenaTooLarge, match=r"67108864 of its 67108864 bytes are free") as e:
        open_store(StoreConfig(data_dir=str(tmp_path / "d"), host_capacity_bytes=256 * MiB,
                                arena_path=str(tmp_path / "arena")))
    assert "268435456" in str(e.value) and not (tmp_path / "arena").exists()
    monkeypatch.setattr(os, "statvfs", real)
    # statvfs said yes but the pages are not there: fallocate is the real check
    monkeypatch.setattr(os, "posix_fallocate", lambda fd, off, n: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(ArenaTooLarge, match="No space left"):
        open_store(StoreConfig(data_dir=str(tmp_path / "d2"), host_capacity_bytes=1 * MiB,
                                arena_path=str(tmp_path / "arena2")))
    assert not (tmp_path / "arena2").exists()


def test_serve_refuses_an_arena_larger_than_dev_shm(tmp_path):
    st = os.statvfs("/dev/shm")
    too_big = st.f_blocks * st.f_frsize * 2
    sc = SidecarProcess("--data-dir", str(tmp_path / "d"), "--host-capacity", str(too_big))
    out, _ = sc.proc.communicate(timeout=60)
    assert sc.proc.returncode != 0 and "does not fit" in out and "--host-capacity" in out, out
    assert "Traceback" not in out


# ---------------------------------------------------------------- views live exactly as long as leases

def _churn(url: str, stop, n: int) -> None:
    with CacheClient(url) as c:
        i = 0
        while not stop.is_set():
            k = h(f"churn-{i % n}")
            with_retry(lambda: c.put(NS, k, payload(1000 + i, 512), persist=False))
            c.delete(NS, k)
            i += 1


def with_retry(fn):
    for _ in range(100):
        try:
            return fn()
        except CacheFull:
            time.sleep(0.01)


@pytest.mark.parametrize("run", range(5))
def test_a_transport_error_elsewhere_never_frees_open_entries(sidecar, run, monkeypatch):
    """Thread A holds entries; thread B's call on the same client fails (an injected socket
    error). The connection is detached, not closed: A's leases hold, and a writer churning the
    arena never overwrites them."""
    c = CacheClient(sidecar.unix_url, retries=0)
    for i in range(3):
        c.put(NS, h(f"held{run}-{i}"), payload(i, 512), persist=False)
    held = [c.get(NS, h(f"held{run}-{i}")) for i in range(3)]
    conn = c._local
    real = conn._read_frame
    monkeypatch.setattr(conn, "_read_frame", lambda *spin: (_ for _ in ()).throw(OSError(5, "injected I/O error")))
    with pytest.raises(Exception):
        c.exists(NS, h("other"))
    monkeypatch.setattr(conn, "_read_frame", real)
    assert c._local is None and not conn.state.lost  # detached; its socket lives on for A
    stop = threading.Event()
    t = threading.Thread(target=_churn, args=(sidecar.unix_url, stop, 8))
    t.start()
    try:
        for _ in range(200):
            for i, e in enumerate(held):
                assert np.array_equal(e.array, payload(i, 512))
    finally:
        stop.set()
        t.join()
    assert sidecar.store.stats()["host"]["leases"] == 3
    for e in held:
        e.close()
    assert settled(lambda: sidecar.store.stats()["host"]["leases"] == 0)
    assert c.exists(NS, h(f"held{run}-0"))  # the client reconnects for new calls
    c.close()


def test_when_the_sidecar_drops_the_connection_open_views_fail_loudly(sidecar):
    c = CacheClient(sidecar.unix_url, retries=0)
    c.put(NS, h("doomed"), payload(1, 64), persist=False)
    e = c.get(NS, h("doomed"))
    assert float(e.array[0, 0]) == 1.0
    conn = c._local
    with pytest.raises(Exception):  # a message over the limit: the sidecar answers and hangs up
        conn.call("lookup", keys=["x" * (2 << 20)])
    assert conn.state.lost
    with pytest.raises(LeaseLost):
        e.array
    e.close()  # no error, nothing to release
    assert sidecar.store.stats()["host"]["leases"] == 0
    c.close()


def _scribbler(sock: str, key: str, nbytes: int, ready, go) -> None:
    """Reserve, close the connection mid-fill, and keep writing into the old range."""
    from mmcache_client.local import LocalConnection

    conn = LocalConnection(sock)
    ans = conn.call("reserve", key=key, nbytes=nbytes, encode_ms=1.0)
    view = conn.writable_arena().view(ans["offset"], nbytes)
    conn._sock.close()  # the connection dies; this process does not
    ready.set()
    go.wait(60)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        view[:] = b"\xee" * nbytes  # scribble on what the space could be given to next


def test_a_writer_whose_connection_dies_mid_fill_cannot_scribble_on_the_next_entry(sidecar):
    key = f"{NS}/{h('scribbler')}"
    ready, go = SPAWN.Event(), SPAWN.Event()
    p = SPAWN.Process(target=_scribbler, args=(sidecar.config.socket, key, 512 * KiB, ready, go))
    p.start()
    assert ready.wait(60)
    deadline = time.monotonic() + 10
    while sidecar.store.host.stats()["quarantined_bytes"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sidecar.store.host.stats()["quarantined_bytes"] >= 512 * KiB
    go.set()
    with CacheClient(sidecar.unix_url) as c:
        for i in range(40):  # others fill the 2 MiB arena over and over while it scribbles
            with_retry(lambda: c.put(NS, h(f"after{i}"), payload(i, 256), persist=False))
        p.join(30)
        for i in range(40):
            e = c.get(NS, h(f"after{i}"))
            if e is not None:
                with e:
                    read_entry(e.buffer, verify=True)  # every sealed entry's checksum holds
                    assert np.array_equal(e.array, payload(i, 256))
    deadline = time.monotonic() + 10
    while sidecar.store.host.stats()["quarantined_bytes"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sidecar.store.host.stats()["quarantined_bytes"] == 0  # freed once the writer exited


def _die_mid_fill(sock: str, key: str, nbytes: int, ready) -> None:
    from mmcache_client.local import LocalConnection

    conn = LocalConnection(sock)
    ans = conn.call("reserve", key=key, nbytes=nbytes, encode_ms=1.0)
    view = conn.writable_arena().view(ans["offset"], nbytes)
    ready.set()
    while True:
        view[: nbytes // 2] = b"\xab" * (nbytes // 2)


def test_writers_killed_mid_fill_while_others_put_corrupt_nothing(sidecar):
    with CacheClient(sidecar.unix_url) as c:
        for round_ in range(3):
            ready = SPAWN.Event()
            p = SPAWN.Process(target=_die_mid_fill, args=(sidecar.config.socket, f"{NS}/{h(f'k{round_}')}", 256 * KiB, ready))
            p.start()
            assert ready.wait(60)
            for i in range(10):
                with_retry(lambda: c.put(NS, h(f"r{round_}-{i}"), payload(i, 256)))
            os.kill(p.pid, signal.SIGKILL)
            p.join(30)
        sidecar.store.flush()
        for round_ in range(3):
            assert not c.exists(NS, h(f"k{round_}"))
            for i in range(10):
                with c.get(NS, h(f"r{round_}-{i}")) as e:
                    read_entry(e.buffer, verify=True)
                    assert np.array_equal(e.array, payload(i, 256))
    deadline = time.monotonic() + 10
    while sidecar.store.host.stats()["reservations"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sidecar.store.host.stats()["reservations"] == 0


def test_a_late_answer_to_a_timed_out_lease_is_given_back(sidecar):
    from mmcache_client import CacheTimeout
    from mmcache_client.local import LocalConnection

    with CacheClient(sidecar.unix_url) as c:
        c.put(NS, h("late"), payload(1, 64), persist=False)
    conn = LocalConnection(sidecar.config.socket, timeout=10)
    conn.set_timeout(0.25)  # NOTE: the gate holds the answer until the caller gave up; 250 ms, so a loaded
    # machine still sends the request in time (1 ms did not: the timeout then fell before the send)
    key = f"{NS}/{h('late')}"
    gate = threading.Event()
    real_lease = sidecar.store.lease_host_many
    sidecar.store.lease_host_many = lambda k, o: (gate.wait(5), real_lease(k, o))[1]
    sidecar.store.host.contains = lambda k, real=sidecar.store.host.contains: False  # force the thread path
    try:
        with pytest.raises(CacheTimeout):
            conn.call("lease", keys=[key])
        gate.set()
        deadline = time.monotonic() + 10
        while sidecar.store.stats()["host"]["leases"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sidecar.store.stats()["host"]["leases"] == 1  # granted after the caller gave up
        conn.set_timeout(10)
        conn.call("stats")  # the next exchange skips the late answer and gives its lease back
        deadline = time.monotonic() + 10
        while sidecar.store.stats()["host"]["leases"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sidecar.store.stats()["host"]["leases"] == 0
    finally:
        del sidecar.store.lease_host_many
        del sidecar.store.host.contains
        conn.close()


# ---------------------------------------------------------------- a loop that stays responsive

def test_healthz_stays_responsive_during_deletes_and_disk_only_reads(tmp_path):
    sc = SidecarProcess("--data-dir", str(tmp_path / "d"), "--host-capacity", "4MiB",
                        "--socket", str(tmp_path / "s.sock")).start()
    try:
        with CacheClient(sc.url) as c:
            for i in range(40):  # 40 x 512 KiB: most live on disk only
                c.put(NS, h(f"hz{i}"), payload(i, 2048), durable=True)
        stop = threading.Event()

        def burst():
            with CacheClient(sc.url) as w:
                i = 0
                while not stop.is_set():
                    with w.get(NS, h(f"hz{i % 40}")):
                        pass
                    w.delete(NS, h(f"gone{i}"))
                    i += 1

        workers = [threading.Thread(target=burst) for _ in range(3)]
        for t in workers:
            t.start()
        latencies = []
        conn = http.client.HTTPConnection("127.0.0.1", sc.port, timeout=30)
        for _ in range(200):
            t0 = time.perf_counter()
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            latencies.append(time.perf_counter() - t0)
        stop.set()
        for t in workers:
            t.join()
        latencies.sort()
        # NOTE: a bound loose enough for a loaded 2-core CI machine; the benchmark quotes p99.
        assert latencies[int(0.99 * len(latencies))] < 0.5, latencies[-5:]
    finally:
        sc.stop()

"""Multi-process guarantees of the host tier: real zero-copy, no torn reads, no TOCTOU errors,
no leaks from writers that die between reserve and seal."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import tempfile
import threading
import time
import tracemalloc

import numpy as np
import pytest
import xxhash

from mmcache.sidecar.config import ServeConfig
from mmcache_client import CacheClient, content_hash
from sidecar import ThreadedSidecar, settled, unix_sidecar

NS = "test-ns"
SPAWN = mp.get_context("spawn")


@pytest.fixture
def sidecar(tmp_path):
    with unix_sidecar(str(tmp_path / "data"), disk_capacity_bytes=256 << 20, arena_path=str(tmp_path / "arena")) as sc:
        sc.socket_url = sc.unix_url
        yield sc


def _payload(i: int, num_tokens: int, hidden: int = 64) -> np.ndarray:
    """Deterministic content per key index: every row starts with the index."""
    a = np.random.default_rng(i).standard_normal((num_tokens, hidden), dtype=np.float32)
    a[:, 0] = i
    return a


def _key(i: int) -> str:
    return content_hash(f"image-{i}".encode())


# ---------------------------------------------------------------- zero-copy in another process

def _zero_copy_child(url: str, hash_hex: str, out) -> None:
    import torch  # noqa: F401  (imported before tracing: its import allocates)

    with CacheClient(url) as c:
        c.get(NS, hash_hex).close()  # warm: connection, arena mapping
        tracemalloc.start()
        with c.get(NS, hash_hex) as e:
            arr, ten = e.array, e.tensor
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            arena = c._local.arena
            out.put({
                "base": arena.base_address, "size": arena.capacity_bytes,
                "array_ptr": arr.ctypes.data, "tensor_ptr": ten.data_ptr(), "nbytes": arr.nbytes,
                "writeable": arr.flags.writeable, "peak_traced": peak,
                "first": float(arr[0, 0]), "sum": float(arr.sum(dtype=np.float64)),
            })


def test_get_in_another_process_views_the_arena_in_place(sidecar):
    data = _payload(7, num_tokens=4096, hidden=256)  # 4 MiB
    with CacheClient(sidecar.socket_url) as c:
        assert c.put(NS, _key(7), data)
    out = SPAWN.Queue()
    p = SPAWN.Process(target=_zero_copy_child, args=(sidecar.socket_url, _key(7), out))
    p.start()
    r = out.get(timeout=60)
    p.join(30)
    assert r["base"] <= r["array_ptr"] and r["array_ptr"] + r["nbytes"] <= r["base"] + r["size"]
    assert r["tensor_ptr"] == r["array_ptr"]
    assert not r["writeable"]  # readers map the arena read-only
    # Python-side bookkeeping allocates a few KiB; a copy would allocate the 4 MiB payload.
    assert r["peak_traced"] < r["nbytes"] // 16, f"get allocated {r['peak_traced']} bytes: a payload copy?"
    assert r["first"] == 7.0 and r["sum"] == pytest.approx(float(data.sum(dtype=np.float64)))


# ---------------------------------------------------------------- no torn reads under churn

def _churn_writer(url: str, num_keys: int, rounds: int, out, done) -> None:
    rng = np.random.default_rng(0)
    try:
        with CacheClient(url) as c:
            puts = 0
            for _ in range(rounds):
                i = int(rng.integers(num_keys))
                if not c.exists(NS, _key(i)):
                    c.put(NS, _key(i), _payload(i, int(rng.integers(64, 1024))))
                    puts += 1
                c.delete(NS, _key(int(rng.integers(num_keys))))  # churn: free and reuse space
    finally:
        done.set()
    out.put(("writer", puts))


def _verifying_reader(url: str, num_keys: int, num_reads: int, seed: int, out, done) -> None:
    """At least ``num_reads`` reads, and on until the writer is done: the reads overlap the
    whole churn however fast they are (a reader that started first would otherwise finish its
    reads on an empty cache)."""
    rng = np.random.default_rng(seed)
    hits = bad = reads = 0
    with CacheClient(url) as c:
        while reads < num_reads or not done.is_set():
            reads += 1
            i = int(rng.integers(num_keys))
            e = c.get(NS, _key(i))
            if e is None:
                continue
            with e:
                parsed = e._view.parsed
                data = e.buffer[parsed.data_start:]
                ok = xxhash.xxh3_64_hexdigest(data) == e.metadata["checksum"] and bool((e.array[:, 0] == i).all())
                hits += 1
                bad += not ok
    out.put(("reader", hits, bad))
    # NOTE: hits include entries promoted from disk after their host copy was evicted.


def _results(out, procs, timeout: float) -> list:
    """One result per child; a child that dies without one fails the test at once (its
    traceback is in the captured stderr), instead of a wait for the whole timeout."""
    results, deadline = [], time.monotonic() + timeout
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=0.5))
            continue
        except queue.Empty:
            pass
        dead = [p for p in procs if p.exitcode not in (None, 0)]
        assert not dead, f"children died: {[(p.name, p.exitcode) for p in dead]}"
        assert time.monotonic() < deadline, "no result from every child in time"
    for p in procs:
        p.join(30)
    return results


def test_no_torn_reads_while_a_writer_churns_the_arena(sidecar):
    num_keys, readers, reads_each = 128, 3, 3400  # ~17 MiB of keys through an 8 MiB arena
    out, done = SPAWN.Queue(), SPAWN.Event()
    procs = [SPAWN.Process(target=_churn_writer, args=(sidecar.socket_url, num_keys, 1500, out, done), daemon=True)]
    procs += [SPAWN.Process(target=_verifying_reader, args=(sidecar.socket_url, num_keys, reads_each, s, out, done),
                            daemon=True)
              for s in range(readers)]
    for p in procs:
        p.start()
    results = _results(out, procs, timeout=300)
    reads = [r for r in results if r[0] == "reader"]
    total_reads = readers * reads_each
    assert total_reads >= 10_000
    assert sum(r[2] for r in reads) == 0, f"torn or wrong reads: {reads}"
    assert sum(r[1] for r in reads) > 1000, f"too few hits to mean anything: {reads}"
    assert settled(lambda: (s := sidecar.store.stats()["host"])["leases"] == 0 and s["reservations"] == 0)
    stats = sidecar.store.stats()["host"]
    assert stats["evictions"] > 0, stats


# ---------------------------------------------------------------- TOCTOU: lookup, then read

@pytest.mark.parametrize("action", ["evict", "delete"])
def test_barrier_between_lookup_and_read_gives_miss_or_valid_entry(sidecar, action):
    """LMCache's TOCTOU test: the entry goes away between ``exists`` and ``get``."""
    filler = _payload(10_000, num_tokens=2048, hidden=64)  # 512 KiB; 16 of them fill the arena
    with CacheClient(sidecar.socket_url) as reader, CacheClient(sidecar.socket_url) as writer:
        outcomes = []
        # NOTE: the entry is as large as a filler: eviction frees only what a put needs, so a
        # small entry between fillers would rightly outlive older fillers.
        tokens = 2048 if action == "evict" else 256
        for it in range(12):
            i = 100 + it
            writer.put(NS, _key(i), _payload(i, tokens), durable=True)
            barrier = threading.Barrier(2, timeout=60)

            def interfere():
                barrier.wait()
                if action == "delete":
                    writer.delete(NS, _key(i))
                else:  # push it out of the host tier by filling the arena
                    for j in range(20):
                        writer.put(NS, content_hash(f"filler-{it}-{j}".encode()), filler)
                barrier.wait()

            t = threading.Thread(target=interfere)
            t.start()
            assert reader.exists(NS, _key(i))
            barrier.wait()  # lookup done; now the entry is removed
            barrier.wait()
            t.join()
            e = reader.get(NS, _key(i))
            if e is None:
                outcomes.append("miss")
                continue
            with e:
                assert (e.array[:, 0] == i).all()
                assert np.array_equal(e.array, _payload(i, tokens))
                outcomes.append(e.tier)
        if action == "delete":
            assert set(outcomes) == {"miss"}
        else:
            assert "disk" in outcomes  # evicted from host, promoted back on read


def test_leased_entry_survives_eviction_pressure(sidecar):
    filler = _payload(1, num_tokens=2048, hidden=64)
    with CacheClient(sidecar.socket_url) as c:
        c.put(NS, _key(5), _payload(5, 512))
        with c.get(NS, _key(5)) as e:
            before = e.array.copy()
            for j in range(40):  # 20 MiB through an 8 MiB arena
                c.put(NS, content_hash(f"f-{j}".encode()), filler)
            assert np.array_equal(e.array, before)
            assert sidecar.store.host.contains(f"{NS}/{_key(5)}")
        assert sidecar.store.stats()["host"]["evictions"] > 0


# ---------------------------------------------------------------- a writer dies mid-put

def _die_after_reserve(sock: str, key: str, nbytes: int, ready) -> None:
    from mmcache_client.local import LocalConnection

    conn = LocalConnection(sock)
    ans = conn.call("reserve", key=key, nbytes=nbytes, encode_ms=1.0)
    arena = conn.writable_arena()
    arena.view(ans["offset"], 1024)[:] = b"\xab" * 1024  # half-written bytes
    ready.set()
    os.kill(os.getpid(), signal.SIGKILL)


def test_writer_killed_between_reserve_and_seal_leaks_nothing(sidecar):
    host = sidecar.store.host
    used_before = host.allocator.used_bytes
    key = f"{NS}/{_key(42)}"
    ready = SPAWN.Event()
    p = SPAWN.Process(target=_die_after_reserve, args=(sidecar.config.socket, key, 1 << 20, ready))
    p.start()
    p.join(60)
    assert ready.is_set() and p.exitcode == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while (host.stats()["reservations"] or host.allocator.used_bytes != used_before) and time.monotonic() < deadline:
        time.sleep(0.01)  # the sidecar notices the closed socket (and the writer's exit: pidfd) on its loop
    assert host.stats()["reservations"] == 0 and host.stats()["quarantined_bytes"] == 0
    assert host.allocator.used_bytes == used_before
    assert not sidecar.store.contains(key)
    with CacheClient(sidecar.socket_url) as c:  # and the key can be written properly after
        assert c.put(NS, _key(42), _payload(42, 16))
        with c.get(NS, _key(42)) as e:
            assert (e.array[:, 0] == 42).all()


def _early_disk_reader(url: str, keys: list[str], opened, grown, out) -> None:
    with CacheClient(url) as c:
        with c.get(NS, keys[0]) as e:  # NOTE: maps the sidecar's LMDB while the file is small
            first = e.tier
        opened.set()
        grown.wait(120)
        tiers = []
        for k in keys:
            with c.get(NS, k) as e:
                tiers.append((e.tier, float(e.array[0, 0])))
    out.put((first, tiers))


def test_disk_reads_in_place_survive_the_sidecar_growing_lmdb_past_the_readers_first_map(tmp_path):
    """A reader in another process that mapped the sidecar's LMDB while it was small still reads
    in place after the sidecar grew the file far past that (no MDB_MAP_RESIZED: a reader maps
    the sidecar's map size, which it learns in hello)."""
    sock_dir = tempfile.mkdtemp(prefix="mmc-zc-", dir="/tmp")
    cfg = ServeConfig(data_dir=str(tmp_path / "cache"), port=0, socket=os.path.join(sock_dir, "s.sock"),
                      host_capacity_bytes=1 << 20, disk_capacity_bytes=256 << 20)
    sc = ThreadedSidecar(cfg).start()
    big = lambda i: _payload(i, num_tokens=2048, hidden=256)  # noqa: E731 - 2 MiB: never fits the 1 MiB arena
    keys = [_key(i) for i in range(24)]
    try:
        with CacheClient(sc.url) as w:  # NOTE: over HTTP: an entry larger than the arena lands on disk
            w.put(NS, keys[0], big(0), durable=True)
            opened, grown, out = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
            reader = SPAWN.Process(target=_early_disk_reader, args=(f"unix://{cfg.socket}", keys, opened, grown, out))
            reader.start()
            assert opened.wait(60)
            for i in range(1, 24):  # ~48 MiB more: past LMDB's default 10 MiB map
                w.put(NS, keys[i], big(i), durable=True)
            grown.set()
            first, tiers = _results(out, [reader], timeout=120)[0]
        assert first == "disk" and tiers == [("disk", float(big(i)[0, 0])) for i in range(24)]
    finally:
        sc.stop()

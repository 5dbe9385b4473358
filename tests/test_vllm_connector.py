"""The vLLM EC connector end to end: real ``mmcache serve`` processes, real vLLM engines (CPU
build) serving tiny-llava, greedy outputs compared with vLLM's own without any connector.

Each engine runs in a process of its own (``tests/vllm_engines.py``); engines take ~20 s to start
on a 2-core machine, so engines are shared within a test where a story allows it. Marked ``slow``
too: ``python -m pytest -m vllm`` runs just these.
"""

from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest
from PIL import Image

from mmcache_client import CacheClient
from redis_servers import RedisClusterProcs, needs_redis
from sidecar import SidecarProcess, settled
from vllm_engines import Engine, ec_config, needs_vllm

pytestmark = [pytest.mark.vllm, pytest.mark.slow, needs_vllm]

IMAGES = 12


def _picture(folder, seed: int) -> str:
    """A random picture (the processor resizes it to 336 px)."""
    rng = np.random.RandomState(seed)
    side = (48, 64, 96)[seed % 3]
    path = folder / f"img{seed}.png"
    Image.fromarray(rng.randint(0, 255, (side, side, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    return [_picture(folder, 100 + i) for i in range(IMAGES)]


@pytest.fixture
def fresh(tmp_path):
    """A new picture on each call, never seen by any engine (whose own encoder cache would
    answer a repeated one without encoding, so without saving)."""
    seeds = iter(range(1000, 100000))
    return lambda: _picture(tmp_path, next(seeds))


@pytest.fixture(scope="module")
def baseline(model_dir, images) -> list[list[int]]:
    """vLLM without any connector: what every engine below must answer, image by image."""
    with Engine(model_dir, name="baseline") as engine:
        return engine.generate(images)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    procs = RedisClusterProcs(str(tmp_path_factory.mktemp("vllm-cluster")), masters=3).start()
    yield procs
    procs.stop()


def _serve(data_dir, sock, *more: str) -> SidecarProcess:
    return SidecarProcess("--data-dir", str(data_dir), "--socket", str(sock), "--host-capacity", "64MiB",
                          "--disk-capacity", "256MiB", *more).start()


def _stats(sc: SidecarProcess) -> dict:
    with CacheClient(sc.url) as c:
        return c.stats()


def _keys(sc: SidecarProcess) -> set[str]:
    with CacheClient(sc.url) as c:
        return {e["key"] for e in c.iter_entries()}


def _stored(sc: SidecarProcess, n: int, before: set[str] = frozenset()) -> set[str]:
    """Wait until ``n`` entries beyond ``before`` are stored (saves are off the forward path)."""
    assert settled(lambda: len(_keys(sc) - before) >= n, timeout=60), _keys(sc)
    return _keys(sc) - before


def _hits(sc: SidecarProcess) -> int:
    s = _stats(sc)
    return sum(s[t].get("hits", 0) for t in ("host", "disk", "remote") if t in s)


@pytest.fixture
def node_a(tmp_path, cluster):
    sc = _serve(tmp_path / "a", f"/tmp/mmc-vllm-a-{os.getpid()}.sock", "--remote", cluster.url)
    yield sc
    sc.stop()


def test_producer_then_consumer_and_a_zeroed_entry_changes_the_answer(model_dir, images, baseline, node_a):
    sock = f"unix:///tmp/mmc-vllm-a-{os.getpid()}.sock"
    cached, zeroed, fresh = images[0], images[1], images[2]
    with Engine(model_dir, ec_config(sock, "ec_producer"), name="producer") as producer:
        producer.generate([cached])
        first = _stored(node_a, 1)
        producer.generate([zeroed])
        (zeroed_key,) = _stored(node_a, 1, first)
    with CacheClient(sock) as c:  # the zeroed image's entry replaced by zeros of its shape
        ns, h = zeroed_key.split("/")
        with c.get(ns, h) as entry:
            shape, dtype = entry.tensor.shape, entry.tensor.dtype
        assert c.delete(ns, h)
        import torch
        c.put(ns, h, torch.zeros(shape, dtype=dtype))
    hits = _hits(node_a)
    with Engine(model_dir, ec_config(sock, "ec_consumer"), name="consumer") as consumer:
        got = consumer.generate([cached, fresh])
        assert got == [baseline[0], baseline[2]]  # a cached image and one the consumer encodes itself
        assert _hits(node_a) >= hits + 1  # the sidecar served the consumer
        assert consumer.generate([zeroed]) != [baseline[1]]  # the cached embedding is what was used
    assert len(_keys(node_a)) == 2  # a consumer saves nothing


def test_two_nodes_share_entries_through_the_remote_tier(model_dir, images, baseline, node_a, tmp_path, cluster):
    sock_a = f"unix:///tmp/mmc-vllm-a-{os.getpid()}.sock"
    sock_b = f"/tmp/mmc-vllm-b-{os.getpid()}.sock"
    node_b = _serve(tmp_path / "b", sock_b, "--remote", cluster.url)
    try:
        with Engine(model_dir, ec_config(sock_a, "ec_producer"), name="producer@A") as producer:
            producer.generate([images[3]])
            _stored(node_a, 1)
        assert settled(lambda: _stats(node_a)["remote"].get("queued", 0) == 0, timeout=30)
        assert _keys(node_b) == set()
        with Engine(model_dir, ec_config(f"unix://{sock_b}", "ec_consumer"), name="consumer@B") as consumer:
            assert consumer.generate([images[3]]) == [baseline[3]]
        assert _stats(node_b)["remote"]["hits"] >= 1  # B had it from the remote tier, not from A's disk
    finally:
        node_b.stop()


def test_ec_both_stores_a_miss_and_reads_it_from_disk_after_a_restart(model_dir, images, baseline, tmp_path):
    sock = tmp_path / "both.sock"
    url = f"unix://{sock}"
    sc = _serve(tmp_path / "data", sock)
    try:
        with Engine(model_dir, ec_config(url, "ec_both", durable=True), name="ec_both") as engine:
            assert engine.generate([images[4]]) == [baseline[4]]
            _stored(sc, 1)
        sc.stop()
        sc = _serve(tmp_path / "data", sock)
        assert _stats(sc)["host"]["entries"] == 0 and _stats(sc)["disk"]["entries"] == 1
        with Engine(model_dir, ec_config(url, "ec_both"), name="ec_both after restart") as engine:
            assert engine.generate([images[4]]) == [baseline[4]]
        assert _stats(sc)["disk"]["hits"] >= 1
    finally:
        sc.stop()


def test_cache_down_at_start_then_back(model_dir, images, baseline, tmp_path, fresh):
    """No sidecar at the URL: every request answered as without the cache; once one starts
    there, the engine reconnects on its own (backoff) and saves again."""
    sock = tmp_path / "later.sock"
    with Engine(model_dir, ec_config(f"unix://{sock}", "ec_both"), name="ec_both, no sidecar") as engine:
        assert engine.generate(images[5:7]) == baseline[5:7]
        sc = _serve(tmp_path / "data", sock)
        try:
            def saved_again() -> bool:
                engine.generate([fresh()])
                return len(_keys(sc)) >= 1
            assert settled(saved_again, timeout=60)
        finally:
            sc.stop()
        assert "unreachable" in engine.tail(400)  # the outage was logged


def test_sidecar_killed_mid_run_then_restarted(model_dir, images, baseline, tmp_path, fresh):
    sock = tmp_path / "k.sock"
    url = f"unix://{sock}"
    sc = _serve(tmp_path / "data", sock)
    try:
        with Engine(model_dir, ec_config(url, "ec_both"), name="ec_both, sidecar killed") as engine:
            assert engine.generate([images[0]]) == [baseline[0]]
            _stored(sc, 1)
            engine.send(images[1:4])  # in flight while the sidecar dies
            sc.stop(signal.SIGKILL)
            assert engine.receive() == baseline[1:4]
            assert engine.generate(images[4:6]) == baseline[4:6]
            outage_logs = engine.tail(400).count("is unreachable")
            assert outage_logs == 1  # logged once, not per request
            sc = _serve(tmp_path / "data", sock)
            before = _keys(sc)

            def back() -> bool:
                engine.generate([fresh()])
                return len(_keys(sc) - before) >= 1
            assert settled(back, timeout=60)
            assert engine.generate([images[0]]) == [baseline[0]]
    finally:
        sc.stop()


def test_an_entry_deleted_between_lookup_and_load_is_encoded_locally(model_dir, images, baseline, tmp_path):
    """The seam deletes the entry after the scheduler's lookup found it and before the worker's
    load: the worker encodes it in the same step (and, as ec_both, stores it again)."""
    sock = tmp_path / "seam.sock"
    url = f"unix://{sock}"
    sc = _serve(tmp_path / "data", sock)
    seam = tmp_path / "seam.txt"
    try:
        with Engine(model_dir, ec_config(url, "ec_producer"), name="producer") as producer:
            producer.generate([images[8]])
            (key,) = _stored(sc, 1)
        seam.write_text(key.split("/")[1] + "\n")
        ec = ec_config(url, "ec_both", connector="SeamECConnector", module="seam_connector")
        with Engine(model_dir, ec, env={"MMCACHE_TEST_SEAM_FILE": str(seam)}, name="seam") as engine:
            assert engine.generate([images[8]]) == [baseline[8]]
            assert (tmp_path / "seam.txt.done").read_text().split() == ["deleted", key.split("/")[1]]
            assert settled(lambda: key in _keys(sc), timeout=30)  # encoded here, stored again
    finally:
        sc.stop()


def test_two_ec_both_engines_encode_each_new_image_once(model_dir, images, baseline, tmp_path):
    """Both engines get the same new images at the same moment: claims make one encode each
    image and the other wait for its entry (vLLM's scheduler skips the waiting request and
    serves the rest meanwhile). Each image is reserved (saved) once: encoded once."""
    sock = tmp_path / "two.sock"
    url = f"unix://{sock}"
    sc = _serve(tmp_path / "data", sock)
    batch = images[8:12]
    try:
        with Engine(model_dir, ec_config(url, "ec_both"), name="left") as left, \
                Engine(model_dir, ec_config(url, "ec_both"), name="right") as right:
            barrier = threading.Barrier(2)
            results: dict[str, list] = {}

            def run(name: str, engine: Engine) -> None:
                barrier.wait()
                results[name] = engine.generate(batch)
            threads = [threading.Thread(target=run, args=(n, e)) for n, e in (("left", left), ("right", right))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            assert results["left"] == baseline[8:12] and results["right"] == baseline[8:12]
            _stored(sc, len(batch))
        stats = _stats(sc)
        reserves = stats["local"]["ops"].get("reserve", 0)
        claims = stats["claims"]
        print(f"reserves={reserves} claims={claims}")
        assert reserves == len(batch), claims  # one save, so one encode, per image
        assert claims["won"] == len(batch)
    finally:
        sc.stop()

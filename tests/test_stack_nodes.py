"""Several node groups in one command: ``mmcache up --nodes 2 --redis-cluster 3`` (two sidecars,
each with its own encoder, prefill and decode, a 3-master redis cluster they share, one router),
driven through the official ``openai`` client: the same image again is routed to the node that
holds it (its sidecar counts the hit), a new one by load; the other node reads the first through
the remote; the router's stats list both nodes; a missing ``redis-server`` is a clear error."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import tempfile
import time

import pytest

from stack_process import StackProcess
from mmcache_client import CacheClient, content_hash
from redis_servers import needs_redis
from test_stack import chat, image, token_ids

pytestmark = [needs_redis, pytest.mark.slow]  # NOTE: two node groups and a redis cluster


@pytest.fixture(scope="module")
def two_nodes(model_dir):  # noqa: F811
    data_dir = tempfile.mkdtemp(prefix="mmc-n2-", dir="/tmp")
    with StackProcess("--model", model_dir, "--data-dir", data_dir, "--port", "0", "--nodes", "2",
                      "--redis-cluster", "3", "--encoders", "1", "--host-capacity", "128MiB",
                      "--log-level", "warning", env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}) as up:
        up.data_dir = data_dir
        yield up
    assert up.proc.returncode == 0, "\n".join(up.output[-30:])


def _node(stats: dict, name: str) -> dict:
    return next(n for n in stats["nodes"] if n["name"] == name)


def _host_hits(node: dict) -> int:
    return node["cache"]["stats"]["host"]["hits"]


def _prefills(node: dict) -> int:
    return sum(w["stats"]["requests"] for w in node["prefill"])


def test_the_same_image_again_goes_to_the_node_that_holds_it(two_nodes):
    uri, _ = image(71)
    first = chat(two_nodes, [uri], extra_body={"return_token_ids": True})
    s1 = two_nodes.stats()
    holder = next(n["name"] for n in s1["nodes"] if n["requests"] == 1)
    other = next(n["name"] for n in s1["nodes"] if n["name"] != holder)
    assert _node(s1, holder)["routed_by_load"] == 1

    # NOTE: the router learns of the entry from the holder's event stream (milliseconds)
    deadline = time.monotonic() + 10
    while _node(two_nodes.stats(), holder)["indexed_keys"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    second = chat(two_nodes, [uri], extra_body={"return_token_ids": True})
    s2 = two_nodes.stats()
    h1, h2 = _node(s1, holder), _node(s2, holder)
    assert h2["routed_by_cache"] == 1 and h2["requests"] == 2
    assert _host_hits(h2) > _host_hits(h1)  # the holder's sidecar served it
    assert _node(s2, other)["requests"] == 0 and _prefills(_node(s2, other)) == 0
    assert s2["totals"]["images_encoded"] == 1
    assert token_ids(first) == token_ids(second)


def test_a_new_image_goes_by_load_and_every_node_reads_the_other_through_the_remote(two_nodes):
    before = two_nodes.stats()
    busy = max(before["nodes"], key=lambda n: n["requests"])["name"]
    uri, _ = image(72)
    chat(two_nodes, [uri])
    after = two_nodes.stats()
    idle = next(n["name"] for n in after["nodes"] if n["name"] != busy)
    assert _node(after, idle)["requests"] == _node(before, idle)["requests"] + 1  # fewest requests wins a tie
    assert _node(after, idle)["routed_by_load"] >= 1
    # the busy node has never seen image 72, yet reads it: from the shared remote
    namespace = after["encoders"][0]["stats"]["namespace"]
    h = content_hash(base64.b64decode(uri.split(",", 1)[1]))
    sock = os.path.join(two_nodes.data_dir, busy, "mmcache.sock")
    c = CacheClient(f"unix://{sock}")
    deadline = time.monotonic() + 10
    tier = None
    while tier is None and time.monotonic() < deadline:  # the write-behind lands in ms
        tier = c.lookup([f"{namespace}/{h}"])[f"{namespace}/{h}"]
    assert tier == "remote"
    with c.get(namespace, h) as entry:
        assert entry.tier == "remote" and entry.tensor.shape[0] > 0
    assert c.lookup([f"{namespace}/{h}"])[f"{namespace}/{h}"] == "host"  # promoted on read
    c.close()


def test_the_routers_stats_list_each_node_with_its_sidecar_and_workers(two_nodes):
    stats = two_nodes.stats()
    assert [n["name"] for n in stats["nodes"]] == ["node-0", "node-1"]
    for node in stats["nodes"]:
        assert node["cache"]["healthy"] and node["cache"]["stats"]["remote"]["up"] is True
        assert node["cache"]["stats"]["remote"]["cluster"] is True
        assert len(node["encoders"]) == 1 and len(node["prefill"]) == 1 and len(node["decode"]) == 1
        assert all(w["healthy"] for role in ("encoders", "prefill", "decode") for w in node[role])
        assert node["following_events"] is True
    assert stats["routing"]["mode"] == "cache"


def test_redis_cluster_without_redis_server_is_a_clear_error(tmp_path):
    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}
    proc = subprocess.run([sys.executable, "-m", "mmcache.cli", "up", "--nodes", "2", "--redis-cluster", "3",
                           "--data-dir", str(tmp_path), "--port", "0"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "redis-server" in proc.stderr and "not found" in proc.stderr and "--remote" in proc.stderr

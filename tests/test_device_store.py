"""The device tier wired into the store (``mmcache.tiers.device_front``), the CUDA IPC handle as data
(``mmcache_client.cuda``) and device reads in the SDK: on the CPU with ``DeviceTier.fake``, and
the real CUDA paths under ``gpu``."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor

from mmcache.sidecar.config import ServeConfig
from mmcache.tiers.device import DeviceTier, DeviceTierConfig
from mmcache.core.store import StoreConfig, TieredStore
from mmcache.tiers.wiring import open_store
from mmcache_client import BadRequest, CacheClient, Key, content_hash
from mmcache_client.arena import SharedArena
from mmcache_client.cuda import handle_doc, ipc_args
from mmcache_client.format import plan_entry
from sidecar import unix_sidecar

NS = "dev"
HIDDEN = 64
ENTRY_TENSOR_BYTES = 8 * HIDDEN * 2 + 3 * 8  # bf16 embeddings of 8 tokens + an int64 grid
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")


def key(name: str) -> str:
    return f"{NS}/{content_hash(name.encode())}"


def put(store: TieredStore, name: str, value: float, *, persist: bool = True) -> torch.Tensor:
    k = Key.from_string(key(name))
    emb = torch.full((8, HIDDEN), value, dtype=torch.bfloat16)
    plan = plan_entry(k.namespace, k.hash, {"embeddings": emb, "image_grid_thw": torch.tensor([1, 2, 4])},
                      encode_ms=7.5)
    store.put_plan(key(name), plan, persist=persist)
    return emb


@pytest.fixture
def store(tmp_path):
    """A store whose device tier holds two entries (a CPU-backed fake: the same accounting)."""
    tier = DeviceTier.fake(DeviceTierConfig(capacity_bytes=2 * ENTRY_TENSOR_BYTES))
    s = open_store(StoreConfig(data_dir=str(tmp_path), host_capacity_bytes=1 << 20, disk_capacity_bytes=4 << 20),
                    device_tier=tier)
    yield s
    s.close()


def test_a_device_lease_promotes_from_host_then_hits(store):
    emb = put(store, "a", 3.0)
    got = store.device.lease(key("a"), "reader")
    assert got["embeddings"].dtype == torch.bfloat16 and torch.equal(got["embeddings"], emb)
    assert got["image_grid_thw"].tolist() == [1, 2, 4]
    assert store.device.metadata(key("a"))["encode_ms"] == "7.500"
    again = store.device.lease(key("a"), "reader")
    assert again["embeddings"].data_ptr() == got["embeddings"].data_ptr()  # the device copy, not a new one
    stats = store.stats()["device"]
    assert (stats["promotions"], stats["hits"], stats["misses"], stats["leases"]) == (1, 1, 1, 2)
    assert store.device.release(key("a"), "reader") and store.device.release(key("a"), "reader")
    assert store.stats()["device"]["leases"] == 0


def test_a_miss_promotes_nothing(store):
    assert store.device.lease(key("nothing"), "reader") is None
    assert store.stats()["device"]["entries"] == 0 and store.stats()["device"]["promotions"] == 0


def test_a_promotion_from_disk_reads_the_verified_entry(store):
    emb = put(store, "d", 5.0)
    store.flush(30)
    store.host.delete(key("d"))  # as if host had evicted it: disk holds it
    got = store.device.lease(key("d"), "r")
    assert torch.equal(got["embeddings"], emb)
    store.device.release(key("d"), "r")


def test_leased_device_entries_are_never_evicted_and_a_full_device_is_an_answer(store):
    for i, name in enumerate("abc"):
        put(store, name, float(i))
    store.device.lease(key("a"), "r")
    store.device.lease(key("b"), "r")  # the device is full, all of it leased
    assert store.device.lease(key("c"), "r") is None  # no room now: read it from host instead
    assert store.stats()["device"]["no_room"] == 1
    lease = store.lease(key("c"), "r")
    assert lease is not None and lease.served_from == "host"
    store.release(lease)
    store.device.release(key("b"), "r")
    got = store.device.lease(key("c"), "r")  # now b (unleased) makes room; a stays
    assert got is not None and float(got["embeddings"][0, 0]) == 2.0
    assert store.device.tier.contains(key("a")) and not store.device.tier.contains(key("b"))
    assert store.stats()["device"]["evictions"] == 1


def test_delete_removes_from_the_device_and_a_leased_view_stays_readable(store):
    emb = put(store, "a", 4.0)
    got = store.device.lease(key("a"), "r")
    assert store.delete(key("a"))
    assert not store.device.tier.contains(key("a")) and store.device.lease(key("a"), "other") is None
    assert torch.equal(got["embeddings"], emb)  # the reader's view: still its bytes
    store.device.release(key("a"), "r")
    assert store.stats()["device"]["used_bytes"] == 0


def test_a_reader_that_disconnects_loses_its_device_leases(store):
    put(store, "a", 1.0)
    store.device.lease(key("a"), ("local", 1))
    store.device.lease(key("a"), ("local", 1))
    assert store.release_owner(("local", 1)) == 2
    assert store.stats()["device"]["leases"] == 0


def test_eviction_demotes_into_host_what_no_tier_below_holds(store):
    emb = put(store, "only", 9.0, persist=False)  # host-only: never on disk
    store.device.lease(key("only"), "r")
    store.device.release(key("only"), "r")
    assert store.host.delete(key("only"))  # host let it go (as an eviction would)
    assert not store.holds_locally(key("only"))
    put(store, "x", 1.0)
    put(store, "y", 2.0)
    store.device.lease(key("x"), "r")
    store.device.lease(key("y"), "r")  # evicts "only" from the device: demoted into host
    assert store.stats()["device"]["demotions"] == 1
    with store.get(key("only")) as view:
        assert view is not None and torch.equal(view.tensor, emb)
        assert view.get_array("image_grid_thw").tolist() == [1, 2, 4]
        assert (view.metadata["hash"], float(view.metadata["encode_ms"])) == (Key.from_string(key("only")).hash, 7.5)


def test_an_entry_deleted_while_it_is_promoted_does_not_come_back(store):
    """A delete that lands while the entry's tensors are copied onto the device: the copy is
    dropped, and nothing (no reader, no later demotion) brings the entry back."""
    import threading

    put(store, "racy", 1.0, persist=False)
    tier = store.device.tier
    entered, go = threading.Event(), threading.Event()
    real_put = tier.put

    def slow_put(*a, **k):
        entered.set()
        go.wait(10)
        return real_put(*a, **k)
    tier.put = slow_put
    got = {}
    reader = threading.Thread(target=lambda: got.setdefault("lease", store.device.lease(key("racy"), "r")))
    reader.start()
    assert entered.wait(10)
    assert store.delete(key("racy"))
    go.set()
    reader.join(10)
    tier.put = real_put
    assert got["lease"] is None
    assert not tier.contains(key("racy")) and store.device.metadata(key("racy")) == {}
    assert store.device.lease(key("racy"), "r") is None and not store.holds_locally(key("racy"))


def test_a_lease_device_that_cannot_export_answers_an_error_and_holds_nothing(sidecar):
    """The export failing part-way (here: CPU tensors have no CUDA IPC handle) is an error
    answer naming it; every device lease the message took is given back, and the connection
    serves on."""
    from mmcache.tiers.device_front import DeviceFront

    store = sidecar.store
    store.device = DeviceFront(store, DeviceTier.fake(DeviceTierConfig(capacity_bytes=1 << 20)))
    with CacheClient(sidecar.unix_url) as c:
        c.put(NS, content_hash(b"a"), torch.ones(2, 8))
        conn = c._connect()
        assert conn.device_tier is True
        with pytest.raises(BadRequest, match="not a CUDA tensor"):
            conn.call("lease_device", keys=[key("a"), key("a")])
        assert store.stats()["device"]["leases"] == 0
        assert conn.call("lease_device", keys=[key("missing")]) == {"entries": [None]}
        assert conn.call("release_device", keys=[key("a")]) == {"released": 0}
        with c.get(NS, content_hash(b"a")) as e:
            assert e.tensor.sum() == 16


def test_handles_for_another_gpu_or_that_do_not_import_are_given_back():
    from mmcache_client.device_entries import imported

    docs = [{"tensors": {"embeddings": "h1"}, "metadata": {"encode_ms": "2.0"}, "gpu": "GPU-a"},
            {"tensors": {"embeddings": "h2"}, "metadata": {}, "gpu": "GPU-b"},  # the sidecar's GPU is another
            None,
            {"tensors": {"embeddings": "bad"}, "metadata": {}, "gpu": "GPU-a"},
            {"tensors": {}, "gpu": "GPU-a"}]

    def fake_import(handle):
        if handle == "bad":
            raise RuntimeError("cudaIpcOpenMemHandle failed")
        return torch.zeros(2, 2)
    keys = ["k1", "k2", "k3", "k4", "k5"]
    entries, give_back = imported(keys, docs, "cuda:0", want_gpu="GPU-a", import_doc=fake_import)
    assert [e is not None for e in entries] == [True, False, False, False, False]
    assert entries[0].tier == "device" and entries[0].metadata["encode_ms"] == 2.0
    assert give_back == ["k2", "k4", "k5"]
    with pytest.raises(ValueError, match="holds"):
        imported(keys, docs[:2], "cuda:0", want_gpu="GPU-a", import_doc=fake_import)


def test_device_leases_go_back_on_the_connection_that_took_them():
    """Not the client's current one (a reconnect may have replaced it); the batch holds a
    reference on its connection, so a detached connection stays open until the batch closes."""
    from mmcache_client.aclient import _async_device_release
    from mmcache_client.client import _device_release
    from mmcache_client.session import SessionState

    class Conn:
        def __init__(self):
            self.state, self.calls, self.closed = SessionState(), [], False

        def call(self, op, **fields):
            self.calls.append((op, fields["keys"]))
            return {}

        def close(self):
            self.closed = True
    conn = Conn()
    release = _device_release(conn, ["ns/a", "ns/a"])
    assert conn.state.detach() is False  # the client moved on; the batch still relies on it
    release()
    assert conn.calls == [("release_device", ["ns/a", "ns/a"])] and conn.closed
    lost = Conn()
    release = _device_release(lost, ["ns/a"])
    lost.state.lost = True
    release()
    assert lost.calls == []  # its leases went with the socket

    class AsyncConn(Conn):
        async def call(self, op, **fields):
            return Conn.call(self, op, **fields)

        async def close(self):
            self.closed = True
    import asyncio

    aconn = AsyncConn()
    release = _async_device_release(aconn, ["ns/b"])
    aconn.state.detach()
    asyncio.run(release())
    assert aconn.calls == [("release_device", ["ns/b"])] and aconn.closed


def test_a_device_tier_and_tenants_are_refused_together(tmp_path):
    tenants = tmp_path / "tenants.toml"
    tenants.write_text('[tokens]\nabc = "t1"\n')
    with pytest.raises(ValueError, match="cannot serve --tenants"):
        ServeConfig(data_dir=str(tmp_path), device_capacity_bytes=1 << 20, tenants=str(tenants))


def test_eviction_of_what_a_tier_below_holds_copies_nothing(store):
    put(store, "a", 1.0)
    store.device.lease(key("a"), "r")
    store.device.release(key("a"), "r")
    put(store, "x", 1.0)
    put(store, "y", 2.0)
    store.device.lease(key("x"), "r")
    store.device.lease(key("y"), "r")
    assert store.stats()["device"]["evictions"] == 1 and store.stats()["device"]["demotions"] == 0


_NO_CONTEXT = """
import sys, torch
from mmcache.core.store import StoreConfig
from mmcache.tiers.wiring import open_store
from mmcache_client import CacheClient
s = open_store(StoreConfig(data_dir=sys.argv[1], host_capacity_bytes=1 << 20, disk_capacity_bytes=4 << 20))
assert s.device is None and "device" not in s.stats()
s.close()
print("initialized" if torch.cuda.is_initialized() else "no context")
"""


def test_without_a_device_tier_nothing_of_it_shows_and_no_cuda_context(tmp_path):
    # NOTE: a process of its own: this one may hold a context from other (gpu) tests
    out = subprocess.run([sys.executable, "-c", _NO_CONTEXT, str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["no", "context"]


@no_gpu
def test_a_device_tier_without_a_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="needs a CUDA GPU.*--device-capacity"):
        open_store(StoreConfig(data_dir=str(tmp_path), host_capacity_bytes=1 << 20, disk_capacity_bytes=4 << 20,
                                device_capacity_bytes=1 << 20))
    # the data dir is free again (its lock let go), and the arena gone
    open_store(StoreConfig(data_dir=str(tmp_path), host_capacity_bytes=1 << 20, disk_capacity_bytes=4 << 20)).close()
    assert not torch.cuda.is_initialized()


@no_gpu
def test_serve_with_a_device_capacity_on_a_cpu_machine_says_why(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mmcache.cli", "serve", "--port", "0", "--data-dir", str(tmp_path),
                          "--device-capacity", "1GiB"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out
    assert "needs a CUDA GPU" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("bad", ["-1", "lots"])
def test_serve_config_refuses_a_bad_device_capacity(tmp_path, bad):
    with pytest.raises(ValueError, match="device_capacity"):
        ServeConfig.from_sources({"data_dir": str(tmp_path), "device_capacity_bytes": bad})


# -- the IPC handle as data ---------------------------------------------------------------------

def _reduced() -> tuple:
    """What torch's ``reduce_tensor`` gives for a CUDA tensor (made up: no GPU needed)."""
    return (rebuild_cuda_tensor, (torch.Tensor, torch.Size([2, 3]), (3, 1), 4, torch.storage.TypedStorage,
                                  torch.bfloat16, 0, b"\x01" * 64, 4096, 512, False, b"/torch_1_2", 17,
                                  b"\x02" * 64, True))


def test_an_ipc_handle_round_trips_as_json_data():
    import json

    doc = json.loads(json.dumps(handle_doc(_reduced())))
    assert ipc_args(doc) == _reduced()[1]


def test_a_non_cuda_reduction_is_refused():
    with pytest.raises(ValueError, match="not a CUDA tensor"):
        handle_doc((print, ("x",)))


@pytest.mark.parametrize("field,value", [
    ("dtype", "os.system"), ("dtype", "Tensor"), ("storage", "builtins.eval"), ("size", [2, -3]),
    ("size", "2,3"), ("stride", [1]), ("offset", -1), ("device", True), ("handle", None), ("handle", "!!"),
    ("event_sync", "yes"), ("extra", 1)])
def test_a_handle_that_does_not_add_up_is_refused(field, value):
    doc = handle_doc(_reduced())
    doc[field] = value
    with pytest.raises(ValueError):
        ipc_args(doc)


# -- the SDK and the protocol --------------------------------------------------------------------

@pytest.fixture
def sidecar(tmp_path):
    with unix_sidecar(str(tmp_path / "data")) as sc:
        yield sc


def test_a_sidecar_without_a_device_tier_says_so(sidecar):
    with CacheClient(sidecar.unix_url) as c:
        c.put(NS, content_hash(b"a"), torch.ones(2, 8))
        assert c._connect().device_tier is False
        with pytest.raises(BadRequest, match="no device tier"):
            c._call("lease_device", keys=[key("a")])
        with c.get(NS, content_hash(b"a")) as e:  # the connection serves on
            assert e.tensor.sum() == 16


@pytest.mark.parametrize("device", ["cpu", None])
def test_a_host_device_reads_as_ever(sidecar, device):
    with CacheClient(sidecar.unix_url) as c:
        c.put(NS, content_hash(b"a"), torch.ones(2, 8))
        with c.get(NS, content_hash(b"a"), device=device) as e:
            assert e.tier == "host" and e.array.shape == (2, 8)
        with c.get_many([key("a")], device=device) as [e]:
            assert e.tensor.device.type == "cpu"


@no_gpu
@pytest.mark.parametrize("device,why", [("cuda", "no CUDA GPU"), ("cuda:1", "no CUDA GPU"), ("meta", "onto 'cpu' or a CUDA"),
                                        ("gpu-please", "not a device name")])
def test_a_device_read_without_the_device_is_a_named_error(sidecar, device, why):
    with CacheClient(sidecar.unix_url) as c:
        with pytest.raises(ValueError, match=why):
            c.get(NS, content_hash(b"a"), device=device)
        with pytest.raises(ValueError, match=why):
            c.get_many([key("a")], device=device)


@no_gpu
def test_pinning_an_arena_without_a_gpu_touches_nothing(tmp_path):
    owner = SharedArena(str(tmp_path / "a.arena"), 1 << 20, create=True)
    reader = SharedArena(owner.path)
    assert reader.pin() is False and reader.pinned is False
    reader.close()
    owner.close()
    assert not torch.cuda.is_initialized()


# -- on a GPU ------------------------------------------------------------------------------------

@pytest.fixture
def gpu_sidecar(tmp_path):
    with unix_sidecar(str(tmp_path / "data"), host_capacity_bytes=64 << 20, disk_capacity_bytes=256 << 20,
                      device_capacity_bytes=2 * (576 * 4096 * 2 + 64)) as sc:
        yield sc


_READER = """
import sys, torch
from mmcache_client import CacheClient
with CacheClient(sys.argv[1]) as c:
    with c.get_many(sys.argv[2:], device="cuda") as entries:
        print(" ".join(f"{e.tier}:{e.tensor.device.type}:{float(e.tensor.float()[0, 0])}" for e in entries))
        print("pinned" if c._connect().arena.pinned else "unpinned")
    print("leases", c.stats()["device"]["leases"])
"""


def _read_on_gpu(url: str, *keys: str) -> list[str]:
    """A reader in a process of its own (CUDA opens no IPC handle in the process that made it)."""
    out = subprocess.run([sys.executable, "-c", _READER, url, *keys], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@pytest.mark.gpu
def test_a_reader_in_another_process_views_the_device_tier_through_cuda_ipc(gpu_sidecar):
    emb = torch.full((576, 4096), 0.5, dtype=torch.bfloat16)
    with CacheClient(gpu_sidecar.unix_url) as c:
        c.put(NS, content_hash(b"g"), emb)
    tiers, _, leases = _read_on_gpu(gpu_sidecar.unix_url, key("g"), key("g"))
    assert tiers.split() == ["device:cuda:0.5"] * 2
    assert leases == "leases 0"  # given back when the batch closed, before the reader went away
    assert gpu_sidecar.store.stats()["device"]["promotions"] == 1
    assert gpu_sidecar.store.host.arena.pinned


@pytest.mark.gpu
def test_without_room_on_the_device_a_read_copies_from_the_pinned_arena(gpu_sidecar):
    with CacheClient(gpu_sidecar.unix_url) as c:
        for i in range(3):
            c.put(NS, content_hash(str(i).encode()), torch.full((576, 4096), float(i), dtype=torch.bfloat16))
    tiers, pinned, leases = _read_on_gpu(gpu_sidecar.unix_url, *[key(str(i)) for i in range(3)])
    # the device holds two; all three are asked for at once: the third is copied from the arena
    assert tiers.split() == ["device:cuda:0.0", "device:cuda:1.0", "host:cuda:2.0"]
    assert pinned == "pinned" and leases == "leases 0"


@pytest.mark.gpu
def test_a_reader_mapping_pins_read_only(tmp_path):
    owner = SharedArena(str(tmp_path / "a.arena"), 1 << 20, create=True)
    np.frombuffer(owner.view(0, 1 << 20), dtype=np.uint8)[:] = 7
    reader = SharedArena(owner.path)
    assert reader.pin() is True and reader.pin() is True
    on_gpu = reader.tensor(torch.uint8, 0, (1024, 1024)).to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert int(on_gpu.sum()) == 7 * (1 << 20)
    reader.close()
    assert reader.pinned is False
    owner.close()


def test_up_gives_the_sidecar_its_device_tier_only_when_asked(monkeypatch, tmp_path):
    """``mmcache up --cache-device-capacity`` reaches the sidecar as ``--device-capacity`` (and
    nothing of it reaches a sidecar without the flag); planned only, no process started."""
    from mmcache.stack.up import LOOPBACK, Stack, StackConfig
    from mmcache.stack.supervisor import Child

    monkeypatch.setattr(Child, "spawn", lambda child, events: setattr(child, "url", f"http://{LOOPBACK}:1"))
    monkeypatch.setattr(Stack, "_wait_ready", lambda self, children, deadline: None)
    for capacity, expected in ((None, None), ("8GiB", "8GiB")):
        stack = Stack(StackConfig(data_dir=str(tmp_path / str(capacity)), cache_device_capacity=capacity))
        stack.start()
        [sidecar] = [c for c in stack.children if c.role == "cache"]
        got = sidecar.argv[sidecar.argv.index("--device-capacity") + 1] if "--device-capacity" in sidecar.argv else None
        assert got == expected

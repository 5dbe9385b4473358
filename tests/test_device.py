"""The device tier: CUDA-free behaviour on any machine, then GPU tests (marked ``gpu``)."""

from __future__ import annotations

import mmap
import multiprocessing
import pickle
import subprocess
import sys
import traceback

import pytest
import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor

import mmcache.tiers.device as device_mod
import mmcache_client.cuda as client_cuda
from mmcache.tiers.device import (
    DeviceTier,
    DeviceTierConfig,
    cuda_available,
    import_ipc,
    pin_host_buffer,
    unpin_host_buffer,
)
from mmcache.core.policies import POLICIES

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")


@pytest.fixture
def gpu_off(monkeypatch):
    """Behave as on a machine without a GPU, whatever this one has."""
    monkeypatch.setattr(device_mod, "cuda_available", lambda: False)
    monkeypatch.setattr(client_cuda, "cuda_available", lambda: False)


# -- any machine ----------------------------------------------------------------------------


def test_import_and_cuda_available_create_no_cuda_context():
    # NOTE: a fresh interpreter, since other tests in this process may have initialized CUDA.
    code = (
        "import torch, mmcache.tiers.device as d\n"
        "assert not torch.cuda.is_initialized(), 'import initialized CUDA'\n"
        "d.cuda_available(); d.DeviceTierConfig(capacity_bytes=1)\n"
        "assert not torch.cuda.is_initialized(), 'cuda_available initialized CUDA'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_cuda_available_is_a_bool():
    assert isinstance(cuda_available(), bool)
    assert cuda_available() == torch.cuda.is_available()


def test_device_tier_refuses_without_gpu(gpu_off):
    with pytest.raises(RuntimeError, match="no CUDA device: the device tier is off"):
        DeviceTier(DeviceTierConfig(capacity_bytes=1024))


@no_gpu
def test_device_tier_refuses_on_this_cpu_machine():
    with pytest.raises(RuntimeError, match="no CUDA device"):
        DeviceTier(DeviceTierConfig(capacity_bytes=1024))
    assert not torch.cuda.is_initialized()


def test_pin_host_buffer_is_a_no_op_without_gpu(gpu_off):
    initialized = torch.cuda.is_initialized()
    buf = mmap.mmap(-1, 4096)
    try:
        assert pin_host_buffer(buf) is False
        assert unpin_host_buffer(buf) is False
        assert torch.cuda.is_initialized() == initialized
    finally:
        buf.close()  # no buffer export is left behind


@no_gpu
def test_pin_host_buffer_on_this_cpu_machine():
    buf = bytearray(4096)
    assert pin_host_buffer(buf) is False
    assert unpin_host_buffer(buf) is False
    assert not torch.cuda.is_initialized()


@pytest.mark.parametrize("capacity_bytes", [0, -1, True, 1.5, "1024"])
def test_config_rejects_bad_capacity(capacity_bytes):
    with pytest.raises(ValueError, match="capacity_bytes="):
        DeviceTierConfig(capacity_bytes=capacity_bytes)


@pytest.mark.parametrize("device", ["cpu", "meta", "not-a-device", 0])
def test_config_rejects_non_cuda_device(device):
    with pytest.raises(ValueError, match="device="):
        DeviceTierConfig(capacity_bytes=1024, device=device)


def test_config_rejects_unknown_policy():
    with pytest.raises(ValueError, match="policy="):
        DeviceTierConfig(capacity_bytes=1024, policy="fifo")


def test_config_defaults_and_frozen():
    config = DeviceTierConfig(capacity_bytes=1024)
    assert (config.device, config.policy) == ("cuda:0", "lru")
    for policy in POLICIES:
        DeviceTierConfig(capacity_bytes=1, device="cuda", policy=policy)
    with pytest.raises(AttributeError):
        config.capacity_bytes = 2  # type: ignore[misc]


def test_import_ipc_runs_only_torch_cuda_rebuild():
    with pytest.raises(ValueError, match="not a CUDA IPC handle"):
        import_ipc({"key": "ns/x", "tensors": {"emb": (print, ("pwned",))}})


# -- accounting: on a CPU-backed tier everywhere, on the GPU when there is one ------------------

ENTRY_BYTES = 1024  # one float32 tensor of 256 elements


def entry(value: float = 0.0) -> dict[str, torch.Tensor]:
    return {"emb": torch.full((256,), value, dtype=torch.float32)}


def make_tier(backend: str, capacity_bytes: int = 3 * ENTRY_BYTES, policy: str = "lru") -> DeviceTier:
    config = DeviceTierConfig(capacity_bytes=capacity_bytes, policy=policy)
    if backend == "cuda":
        return DeviceTier(config)
    # NOTE: the same bookkeeping over CPU tensors, past the GPU check, so that the lease and
    # eviction logic is tested on machines without a GPU.
    tier = DeviceTier.__new__(DeviceTier)
    tier._setup(config, torch.device("cpu"), None)
    return tier


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request) -> str:
    return request.param


@pytest.fixture
def tier(backend):
    tier = make_tier(backend)
    yield tier
    tier.close()


@pytest.fixture
def gpu_tier():
    tier = make_tier("cuda")
    yield tier
    tier.close()


def test_put_get_round_trip(tier):
    src = {"emb": torch.randn(4, 8), "ids": torch.arange(6, dtype=torch.int64)}
    assert tier.put_tensors("ns/a", src, cost_ms=3.0)
    got = tier.get("ns/a")
    assert set(got) == {"emb", "ids"}
    assert all(t.device == tier.device for t in got.values())
    assert torch.equal(got["emb"].cpu(), src["emb"]) and torch.equal(got["ids"].cpu(), src["ids"])
    assert tier.get("ns/missing") is None
    assert tier.contains("ns/a") and not tier.contains("ns/missing")
    assert tier.put_tensors("ns/a", src) is False  # immutable
    stats = tier.stats()
    assert (stats["entries"], stats["bytes"], stats["hits"], stats["misses"]) == (1, 4 * 8 * 4 + 6 * 8, 1, 1)


def test_put_rejects_bad_input(tier):
    with pytest.raises(ValueError, match="cost_ms="):
        tier.put_tensors("ns/a", entry(), cost_ms=float("nan"))
    with pytest.raises(ValueError, match="dense tensor"):
        tier.put_tensors("ns/a", {})
    assert tier.stats()["entries"] == 0


def test_put_larger_than_capacity_is_refused(tier):
    assert tier.put_tensors("ns/big", {"emb": torch.zeros(4 * 256)}) is False
    assert tier.stats()["entries"] == 0


def test_lru_eviction_skips_leased_entries(tier):
    for name in "abc":
        assert tier.put_tensors(f"ns/{name}", entry())
    assert tier.lease_key("ns/a", owner="reader")  # oldest, but leased
    assert tier.put_tensors("ns/d", entry())
    assert tier.contains("ns/a") and not tier.contains("ns/b")
    assert tier.stats()["evictions"] == 1
    assert tier.lease_key("ns/c", "reader") and tier.lease_key("ns/d", "reader")
    assert tier.put_tensors("ns/e", entry()) is False  # everything left is leased: nothing evicted
    assert tier.stats()["evictions"] == 1 and tier.stats()["entries"] == 3
    assert tier.release_owner("reader") == 3
    assert tier.put_tensors("ns/e", entry())


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_keeps_leased_and_capacity(backend, policy):
    tier = make_tier(backend, policy=policy)
    evicted = []
    tier.on_evict = lambda key, tensors, cost_ms: evicted.append((key, tensors["emb"].device == tier.device))
    tier.put_tensors("ns/keep", entry(), cost_ms=0.0)
    tier.lease_key("ns/keep", "reader")
    for i in range(10):
        assert tier.put_tensors(f"ns/{i}", entry(i), cost_ms=float(i))
        assert tier.stats()["used_bytes"] <= 3 * ENTRY_BYTES
    assert tier.contains("ns/keep") and tier.stats()["evictions"] == len(evicted) == 8
    assert "ns/keep" not in {key for key, _ in evicted} and all(on_device for _, on_device in evicted)
    tier.close()


def test_delete_while_leased_frees_at_last_release(tier):
    tier.put_tensors("ns/a", entry(1.0))
    held = tier.get("ns/a")["emb"]
    assert tier.lease_key("ns/a", "r1") and tier.lease_key("ns/a", "r2")
    assert tier.delete("ns/a")
    assert not tier.contains("ns/a") and tier.get("ns/a") is None and tier.delete("ns/a") is False
    assert tier.lease_key("ns/a", "r3") is False
    stats = tier.stats()
    assert (stats["entries"], stats["bytes"], stats["used_bytes"], stats["leases"]) == (0, 0, ENTRY_BYTES, 2)
    assert torch.equal(held.cpu(), entry(1.0)["emb"])  # still readable by its holder
    assert tier.release_key("ns/a", "r1") and tier.stats()["used_bytes"] == ENTRY_BYTES
    assert tier.release_key("ns/a", "r2") and tier.stats()["used_bytes"] == 0
    assert tier.release_key("ns/a", "r2") is False
    assert tier.put_tensors("ns/a", entry(2.0))  # the key is free again


def test_export_ipc_leases_and_counts(backend, tier):
    tier.put_tensors("ns/a", entry(1.0))
    assert tier.export_ipc("ns/missing", "reader") is None
    handle = tier.export_ipc("ns/a", "reader")
    assert handle["key"] == "ns/a" and set(handle["tensors"]) == {"emb"}
    rebuild_fn, args = handle["tensors"]["emb"]
    assert callable(rebuild_fn) and isinstance(args, tuple)
    if backend == "cuda":
        assert rebuild_fn is rebuild_cuda_tensor
        assert pickle.loads(pickle.dumps(handle))["tensors"]["emb"][0] is rebuild_cuda_tensor
    stats = tier.stats()
    assert (stats["hits"], stats["misses"], stats["leases"]) == (1, 1, 1)
    for name in "bcd":  # pressure: "ns/a" is the LRU victim but leased
        assert tier.put_tensors(f"ns/{name}", entry())
    assert tier.contains("ns/a") and not tier.contains("ns/b")
    assert tier.release_key("ns/a", "reader") and tier.stats()["leases"] == 0


# -- GPU only --------------------------------------------------------------------------------


@pytest.mark.gpu
def test_put_from_pinned_and_device_sources_copies(gpu_tier):
    tier = gpu_tier
    pinned = torch.randn(256).pin_memory()
    on_device = torch.randn(256, device=tier.device)
    assert tier.put_tensors("ns/pinned", {"emb": pinned}) and tier.put_tensors("ns/dev", {"emb": on_device})
    pinned_before, device_before = pinned.clone(), on_device.clone()
    pinned.zero_()  # put has returned: the copy is complete, so reusing the source is safe
    on_device.zero_()
    assert torch.equal(tier.get("ns/pinned")["emb"].cpu(), pinned_before)
    assert torch.equal(tier.get("ns/dev")["emb"], device_before)  # not an alias of the source


def _ipc_reader(handle_bytes: bytes, expected: list[float], conn) -> None:
    """Spawned reader: import the handle, check it, then write through the shared memory."""
    try:
        tensors = import_ipc(pickle.loads(handle_bytes))  # plain pickle carries the handle
        emb = tensors["emb"]
        same = emb.is_cuda and torch.equal(emb.cpu(), torch.tensor(expected, dtype=emb.dtype))
        emb[:4].fill_(42.0)
        torch.cuda.synchronize()
        del tensors, emb
        conn.send(("ok", same))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


@pytest.mark.gpu
def test_export_ipc_is_zero_copy_across_processes(gpu_tier):
    tier = gpu_tier
    src = torch.randn(256)
    tier.put_tensors("ns/a", {"emb": src})
    assert tier.export_ipc("ns/missing", "reader") is None
    handle = tier.export_ipc("ns/a", "reader")
    assert handle["key"] == "ns/a" and tier.stats()["leases"] == 1
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=_ipc_reader, args=(pickle.dumps(handle), src.tolist(), child_conn))
    proc.start()
    try:
        assert parent_conn.poll(180), "reader process did not answer"
        status, detail = parent_conn.recv()
    finally:
        proc.join(60)
    assert status == "ok", detail
    assert detail is True and proc.exitcode == 0
    got = tier.get("ns/a")["emb"].cpu()
    assert torch.all(got[:4] == 42.0) and torch.equal(got[4:], src[4:])  # the reader's write is ours
    assert tier.release_key("ns/a", "reader") and tier.stats()["leases"] == 0


@pytest.mark.gpu
def test_pin_host_buffer_mmap(gpu_tier):
    tier = gpu_tier
    buf = mmap.mmap(-1, 1 << 20)
    assert pin_host_buffer(buf) is True
    assert pin_host_buffer(buf) is True  # idempotent: already pinned
    host = torch.frombuffer(buf, dtype=torch.uint8)
    assert host.is_pinned()
    host.copy_(torch.arange(host.numel()) % 251)
    on_device = host.to(tier.device, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_device.cpu(), host)
    assert tier.put_tensors("ns/arena", {"emb": host[:ENTRY_BYTES].view(torch.float32)})  # non_blocking path
    assert torch.equal(tier.get("ns/arena")["emb"].cpu().view(torch.uint8), host[:ENTRY_BYTES])
    del host
    assert unpin_host_buffer(buf) is True
    assert unpin_host_buffer(buf) is False
    assert not torch.frombuffer(buf, dtype=torch.uint8).is_pinned()
    buf.close()

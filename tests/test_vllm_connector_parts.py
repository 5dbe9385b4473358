"""The vLLM connector's parts without vLLM: settings, keys, the scheduler's and the worker's logic
and the saver, against a real sidecar (threaded) and real sockets. vLLM's ``Request`` is read by
attribute only, so plain objects with the same fields stand in for it here; the end-to-end tests
with real engines are in ``test_vllm_connector.py``."""

from __future__ import annotations

import gc
import os
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest
import torch

from mmcache_client import CacheClient, content_hash
from mmcache_client.vllm.counters import Counters, reduced
from mmcache_client.vllm.keys import hash_for, namespace_for
from mmcache_client.vllm.link import CacheLink
from mmcache_client.vllm.saver import SaveQueue
from mmcache_client.vllm.scheduler_side import LoadItem, SchedulerSide
from mmcache_client.vllm.settings import ConnectorSettings
from mmcache_client.vllm.worker_side import WorkerSide
from sidecar import settled, unix_sidecar

NS = "vllm.test.float32.0123456789abcdef0123"


# ---------------------------------------------------------------- stand-ins for vLLM's Request
@dataclass
class Pos:
    offset: int
    length: int

    def get_num_embeds(self) -> int:
        return self.length


@dataclass
class Feature:
    identifier: str
    mm_position: Pos
    modality: str = "image"


@dataclass
class Request:
    request_id: str
    mm_features: list = field(default_factory=list)


def _ident(i: int) -> str:
    return content_hash(f"image-{i}".encode())


def _request(rid: str, *idents: str, rows: int = 4) -> Request:
    return Request(rid, [Feature(ident, Pos(10 + 20 * k, rows)) for k, ident in enumerate(idents)])


@pytest.fixture
def sidecar(tmp_path):
    with unix_sidecar(str(tmp_path)) as sc:
        yield sc


def _scheduler(url: str, *, producer: bool = False, consumer: bool = True, owner: str = "vllm:a",
               timeout_ms: float = 200, claim_ttl_ms: int = 5000, clock=time.monotonic) -> SchedulerSide:
    counters = Counters()
    link = CacheLink(url, None, timeout_ms, counters, "test scheduler", clock=clock)
    return SchedulerSide(link, NS, counters, is_producer=producer, is_consumer=consumer, claim_owner=owner,
                         claim_ttl_ms=claim_ttl_ms, clock=clock)


def _store(url: str, ident: str, rows: int = 4, cols: int = 8, value: float = 1.0) -> None:
    with CacheClient(url) as c:
        c.put(NS, hash_for(ident), torch.full((rows, cols), value))


# ---------------------------------------------------------------- settings and keys
def test_settings_name_what_is_wrong(monkeypatch):
    with pytest.raises(ValueError, match='"url"'):
        ConnectorSettings.from_extra_config({})
    with pytest.raises(ValueError, match="url="):
        ConnectorSettings.from_extra_config({"url": "ftp://x"})
    with pytest.raises(ValueError, match="unknown key"):
        ConnectorSettings.from_extra_config({"url": "unix:///x.sock", "shared_storage_path": "/tmp"})
    with pytest.raises(ValueError, match="timeout_ms"):
        ConnectorSettings.from_extra_config({"url": "unix:///x.sock", "timeout_ms": 0})
    with pytest.raises(ValueError, match="durable"):
        ConnectorSettings.from_extra_config({"url": "unix:///x.sock", "durable": "yes"})
    with pytest.raises(ValueError, match="namespace"):
        ConnectorSettings.from_extra_config({"url": "unix:///x.sock", "namespace": "../x"})
    s = ConnectorSettings.from_extra_config({"url": "http://127.0.0.1:1", "timeout_ms": 20}, {"MMCACHE_TOKEN": "t"})
    assert (s.token, s.timeout_ms, s.durable, s.namespace) == ("t", 20, False, None)


class _ModelConfig:
    def __init__(self, model="/m/tiny-llava", dtype="torch.float32", kwargs=None):
        self.model, self.revision, self.dtype = model, None, dtype
        self.multimodal_config = type("MM", (), {"mm_processor_kwargs": kwargs})()
        self.hf_overrides, self.quantization = {}, None

    def get_inputs_embeds_size(self) -> int:
        return 128


def test_keys():
    h = "ab" * 32
    assert hash_for(h) == h
    assert hash_for(h.upper()) != h.upper() and len(hash_for(h.upper())) == 64  # not our digest form: hashed
    assert hash_for("lora-a:" + h) != hash_for("lora-b:" + h)
    base = namespace_for(_ModelConfig())
    assert base.startswith("vllm.tiny-llava.float32.")
    others = {namespace_for(_ModelConfig(model="/m/other")), namespace_for(_ModelConfig(dtype="torch.bfloat16")),
              namespace_for(_ModelConfig(kwargs={"do_pan_and_scan": True})), namespace_for(_ModelConfig(model="./tiny-llava"))}
    assert base not in others and len(others) == 4
    long = namespace_for(_ModelConfig(model="/x/" + "ü" * 300))
    assert len(long) <= 128 and all(ch.isalnum() or ch in "._-" for ch in long)


# ---------------------------------------------------------------- scheduler side
def test_one_round_trip_per_request_and_loads_only_for_hits(sidecar):
    url = sidecar.unix_url
    a, b, c = _ident(1), _ident(2), _ident(3)
    _store(url, a)
    _store(url, c)
    side = _scheduler(url)
    req = _request("r1", a, b, c)
    lookups = sidecar.store.stats()["host"]["hits"]
    assert side.ensure_cache_available(req, 0) is True
    assert [side.has_cache_item(i) for i in (a, b, c)] == [True, False, True]
    assert side._counters.totals()["lookups"] == 1  # one batched round trip for the three
    for index in range(3):
        side.update_state_after_alloc(req, index)
    loads = side.take_loads()
    assert [(x.req_id, x.index, x.mm_hash, x.num_embeds) for x in loads] == [("r1", 0, a, 4), ("r1", 2, c, 4)]
    assert side.take_loads() == []
    assert sidecar.store.stats()["host"]["hits"] == lookups  # a lookup leases nothing


def test_items_behind_the_computed_tokens_are_not_asked_for(sidecar):
    side = _scheduler(sidecar.unix_url)
    req = _request("r", _ident(1), _ident(2))  # at tokens 10..14 and 30..34
    side.ensure_cache_available(req, 20)
    assert side._counters.totals()["misses"] == 1


def test_a_dead_sidecar_is_a_counted_miss_and_no_call_during_backoff(tmp_path):
    side = _scheduler(f"unix://{tmp_path}/nobody.sock")
    t0 = time.perf_counter()
    assert side.ensure_cache_available(_request("r", _ident(1)), 0) is True
    assert side.has_cache_item(_ident(1)) is False
    for i in range(50):  # backing off: answered at once, no connection tried
        assert side.has_cache_item(_ident(100 + i)) is False
    assert time.perf_counter() - t0 < 0.5
    totals = side._counters.totals()
    assert totals["outages"] == 1 and totals["lookup_errors"] >= 1 and totals["misses"] >= 51


def test_a_sidecar_that_never_answers_costs_at_most_the_timeout(tmp_path):
    """A process that accepts and then says nothing (hung, stopped): bounded by timeout_ms."""
    path = str(tmp_path / "silent.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    held: list = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.05)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except socket.timeout:
                pass
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        side = _scheduler(f"unix://{path}", timeout_ms=100)
        t0 = time.perf_counter()
        assert side.ensure_cache_available(_request("r", _ident(1), _ident(2)), 0) is True
        assert side.has_cache_item(_ident(1)) is False
        assert time.perf_counter() - t0 < 0.6
        assert side._counters.totals()["lookup_errors"] == 1
    finally:
        stop.set()
        t.join(5)
        for s in held:
            s.close()
        server.close()


def test_claims_one_engine_encodes_the_other_waits_then_loads(sidecar):
    now = [1000.0]
    clock = lambda: now[0]  # noqa: E731 - a settable clock
    url = sidecar.unix_url
    ident = _ident(7)
    left = _scheduler(url, producer=True, owner="vllm:left", clock=clock)
    right = _scheduler(url, producer=True, owner="vllm:right", clock=clock)
    assert left.ensure_cache_available(_request("l1", ident), 0) is True  # won: left encodes it
    assert left.has_cache_item(ident) is False
    assert right.ensure_cache_available(_request("r1", ident), 0) is False  # wait: deferred
    assert right.ensure_cache_available(_request("r1", ident), 0) is False  # polled within 5 ms: no trip
    trips = right._counters.totals()["lookups"]
    left.update_state_after_alloc(_request("l1", ident), 0)
    _store(url, ident)  # left's worker saves it: the put ends the claim
    now[0] += 0.01
    assert right.ensure_cache_available(_request("r1", ident), 0) is True
    assert right._counters.totals()["lookups"] == trips + 1
    assert right.has_cache_item(ident) is True


def test_a_wait_ends_at_the_claim_ttl_and_an_abandoned_claim_is_given_back(sidecar):
    now = [1000.0]
    clock = lambda: now[0]  # noqa: E731
    url = sidecar.unix_url
    a, b = _ident(8), _ident(9)
    left = _scheduler(url, producer=True, owner="vllm:left", clock=clock, claim_ttl_ms=2000)
    right = _scheduler(url, producer=True, owner="vllm:right", clock=clock, claim_ttl_ms=2000)
    assert left.ensure_cache_available(_request("l", a, b), 0) is True
    assert right.ensure_cache_available(_request("r", a), 0) is False
    now[0] += 2.5  # right waited as long as it would hold a claim itself
    assert right.ensure_cache_available(_request("r", a), 0) is True
    assert right.has_cache_item(a) is False and right._counters.totals()["claim_timeouts"] == 1
    left.request_finished(_request("l", a, b))  # aborted before encoding: claims given back
    other = _scheduler(url, producer=True, owner="vllm:third", clock=clock)
    assert other.ensure_cache_available(_request("o", b), 0) is True
    assert other._counters.totals()["claims_won"] == 1


def test_a_pure_consumer_looks_up_and_never_claims(sidecar):
    side = _scheduler(sidecar.unix_url, producer=False, consumer=True)
    side.ensure_cache_available(_request("r", _ident(1)), 0)
    with CacheClient(sidecar.url) as c:
        assert c.stats()["claims"]["won"] == 0
    assert side._counters.totals().get("claims_won", 0) == 0


# ---------------------------------------------------------------- worker side
def _worker(url: str, saver=None, width: int | None = 8, dtype=torch.float32) -> WorkerSide:
    counters = Counters()
    link = CacheLink(url, None, 500, counters, "test worker")
    return WorkerSide(link, saver, NS, counters, device=None, dtype=dtype, widths={}, default_width=width)


def _load(ident: str, req: str = "r", index: int = 0, rows: int = 4) -> LoadItem:
    return LoadItem(req, index, ident, hash_for(ident), rows, "image")


def test_loads_are_arena_views_held_as_long_as_the_encoder_cache_holds_them(sidecar):
    url = sidecar.unix_url
    a, b = _ident(1), _ident(2)
    _store(url, a, value=3.0)
    _store(url, b, value=4.0)
    sidecar.store.flush(30)
    assert settled(lambda: sidecar.store.stats()["host"]["leases"] == 0)
    worker = _worker(url)
    cache: dict = {}
    encode_list: dict = {}
    worker.load(cache, [_load(a, index=0), _load(b, index=1)], encode_list)
    assert encode_list == {} and torch.equal(cache[a], torch.full((4, 8), 3.0))
    arena = worker._link.client._local.arena
    assert arena.base_address <= cache[b].data_ptr() < arena.base_address + arena.capacity_bytes
    assert sidecar.store.stats()["host"]["leases"] == 2
    cache.pop(a)  # vLLM frees the entry
    gc.collect()
    assert settled(lambda: sidecar.store.stats()["host"]["leases"] == 1)
    cache.clear()
    assert settled(lambda: sidecar.store.stats()["host"]["leases"] == 0)
    counters, vanished = worker.take_report()
    assert counters["loads"] == 2 and vanished == []


def test_a_vanished_or_misshapen_entry_is_encoded_here(sidecar):
    url = sidecar.unix_url
    gone, wide, fine = _ident(1), _ident(2), _ident(3)
    _store(url, wide, cols=16)
    _store(url, fine)
    worker = _worker(url)
    cache: dict = {}
    encode_list = {"other": [0]}
    worker.load(cache, [_load(gone, "r1", 0), _load(wide, "r1", 2), _load(fine, "r2", 1)], encode_list)
    assert encode_list == {"other": [0], "r1": [0, 2]}
    assert list(cache) == [fine]
    counters, vanished = worker.take_report()
    assert counters["vanished"] == 2 and counters["rejected"] == 1 and sorted(vanished) == sorted([gone, wide])


def test_loads_with_the_sidecar_gone_are_encoded_here(tmp_path):
    worker = _worker(f"unix://{tmp_path}/nobody.sock")
    encode_list: dict = {}
    worker.load({}, [_load(_ident(1), "r", 0)], encode_list)
    assert encode_list == {"r": [0]}
    counters, _ = worker.take_report()
    assert counters["load_errors"] == 1 and counters["outages"] == 1


# ---------------------------------------------------------------- saver
class _SlowLink(CacheLink):
    """A real link whose calls wait for a gate first: the sidecar is slow."""

    def __init__(self, *args, gate: threading.Event, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = gate

    def call(self, fn, fallback, what):
        self.gate.wait(30)
        return super().call(fn, fallback, what)


def test_a_full_save_queue_drops_counts_and_gives_the_claim_back(sidecar):
    url = sidecar.unix_url
    counters = Counters()
    gate = threading.Event()
    link = _SlowLink(url, None, 1000, counters, "test saver", gate=gate)
    idents = [_ident(i) for i in range(4)]
    with CacheClient(url) as c:  # this engine holds claims on what it encodes
        c.claim([f"{NS}/{hash_for(i)}" for i in idents], "vllm:me", 30_000)
    saver = SaveQueue(link, NS, capacity=2, durable=False, claim_owner="vllm:me", counters=counters)
    t0 = time.perf_counter()
    accepted = [saver.offer(hash_for(i), torch.full((4, 8), float(k))) for k, i in enumerate(idents)]
    assert time.perf_counter() - t0 < 0.1  # never blocks the forward
    assert accepted.count(False) >= 1 and counters.totals()["saves_dropped"] == accepted.count(False)
    gate.set()
    assert saver.flush(30)
    saver.close()
    with CacheClient(url) as c:
        stored = [c.exists(NS, hash_for(i)) for i in idents]
        assert stored == accepted
        dropped = [f"{NS}/{hash_for(i)}" for i, ok in zip(idents, accepted) if not ok]
        answers = c.claim(dropped, "vllm:other", 1000)  # given back: another engine may encode them now
    assert all(a["state"] == "won" for a in answers.values())
    assert counters.totals()["saves"] == accepted.count(True)


def test_a_second_save_of_a_key_writes_nothing(sidecar):
    counters = Counters()
    link = CacheLink(sidecar.unix_url, None, 1000, counters, "test saver")
    saver = SaveQueue(link, NS, capacity=8, durable=True, claim_owner=None, counters=counters)
    h = hash_for(_ident(5))
    saver.offer(h, torch.ones(4, 8))
    saver.offer(h, torch.zeros(4, 8))
    saver.close()
    totals = counters.totals()
    assert totals["saves"] == 1 and totals["saves_existing"] == 1
    with CacheClient(sidecar.unix_url) as c, c.get(NS, h) as e:
        assert torch.equal(e.tensor, torch.ones(4, 8))


def test_counters_reduce_to_a_log_line():
    c = Counters()
    c.add("loads", 2)
    c.add("load_ms", 3.0)
    c.add("lookups")
    assert reduced(c.take()) == {"lookups": 1, "loads": 2, "avg_load_ms": 1.5}
    assert c.take() == {} and c.totals()["loads"] == 2

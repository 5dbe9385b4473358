"""The compute gate: turn order, wait budgets, the socket protocol, and clients that leave."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time

import pytest

from mmcache.compute_gate import ComputeGate, GateClient, start_gate_server


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def _queue(gate: ComputeGate, stages: list[str], order: list[str]) -> list[asyncio.Task]:
    async def one(stage: str) -> None:
        granted = await gate.acquire(stage)
        order.append(stage)
        gate.release(stage, granted)
    tasks = []
    for stage in stages:
        tasks.append(asyncio.create_task(one(stage)))
        await asyncio.sleep(0)  # NOTE: each enqueued in this order
    return tasks


async def test_turns_go_prefill_then_encode_then_decode_oldest_first():
    gate = ComputeGate(max_wait_s={})
    held = await gate.acquire("decode")
    order: list[str] = []
    tasks = await _queue(gate, ["decode", "encode", "prefill", "encode", "prefill"], order)
    assert gate.stats()["waiting"] == 5 and gate.holding == 1
    gate.release("decode", held)
    await asyncio.gather(*tasks)
    assert order == ["prefill", "prefill", "encode", "encode", "decode"]
    stats = gate.stats()["stages"]
    assert (stats["prefill"]["turns"], stats["encode"]["turns"], stats["decode"]["turns"]) == (2, 2, 2)
    assert gate.holding == 0


async def test_a_waiter_past_its_budget_goes_first():
    clock = Clock()
    gate = ComputeGate(max_wait_s={"decode": 0.5}, clock=clock)
    held = await gate.acquire("encode")
    order: list[str] = []
    tasks = await _queue(gate, ["decode", "encode"], order)
    clock.now = 0.4  # within the budget: encode ranks first
    gate.release("encode", held)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert order[:1] == ["encode"]
    await asyncio.gather(*tasks)
    assert order == ["encode", "decode"]

    held = await gate.acquire("encode")
    order.clear()
    tasks = await _queue(gate, ["decode", "prefill"], order)
    clock.now = 1.0  # decode has waited 0.6 s > 0.5: before even the prefill
    gate.release("encode", held)
    await asyncio.gather(*tasks)
    assert order == ["decode", "prefill"]
    assert gate.stats()["stages"]["decode"]["max_wait_s"] == pytest.approx(0.6)


async def test_slots_grant_that_many_turns_at_once():
    gate = ComputeGate(slots=2)
    a, b = await gate.acquire("encode"), await gate.acquire("decode")
    third = asyncio.create_task(gate.acquire("prefill"))
    await asyncio.sleep(0)
    assert not third.done() and gate.holding == 2
    gate.release("encode", a)
    await third
    gate.release("decode", b)
    gate.release("prefill", third.result())
    assert gate.holding == 0


async def test_a_cancelled_waiter_leaves_the_queue():
    gate = ComputeGate()
    held = await gate.acquire("encode")
    waiting = asyncio.create_task(gate.acquire("prefill"))
    order: list[str] = []
    tasks = await _queue(gate, ["decode"], order)
    waiting.cancel()
    gate.release("encode", held)  # NOTE: before the cancelled task ran: it must not be granted
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.gather(*tasks)
    assert order == ["decode"] and gate.holding == 0 and gate.stats()["waiting"] == 0


async def test_a_yield_lets_the_waiter_the_order_puts_first_go_and_queues_the_yielder():
    gate = ComputeGate(max_wait_s={})
    held = await gate.acquire("encode")
    order: list[str] = []
    tasks = await _queue(gate, ["decode", "prefill"], order)
    again = asyncio.create_task(gate.acquire("encode", yielding=held))
    regranted = await again  # after the prefill, before the older decode: the order decides
    assert order == ["prefill"] and gate.holding == 1
    gate.release("encode", regranted)
    await asyncio.gather(*tasks)
    assert order == ["prefill", "decode"] and gate.holding == 0
    assert gate.stats()["stages"]["encode"]["turns"] == 2


async def test_a_yield_with_nobody_waiting_is_granted_at_once_and_a_release_frees_the_turn():
    gate = ComputeGate(max_wait_s={})
    held = await gate.acquire("encode")
    order: list[str] = []
    regranted = await asyncio.wait_for(gate.acquire("encode", yielding=held), 1)
    assert gate.holding == 1 and gate.stats()["waiting"] == 0
    tasks = await _queue(gate, ["decode"], order)
    assert order == []  # the yielder still holds the one turn
    gate.release("encode", regranted)
    await asyncio.gather(*tasks)
    assert order == ["decode"] and gate.holding == 0


async def test_a_gate_socket_that_cannot_be_made_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="cannot serve the compute gate on .*no-such-dir"):
        await start_gate_server(ComputeGate(), str(tmp_path / "no-such-dir" / "gate.sock"))


def test_bad_gate_settings_are_clear_errors():
    with pytest.raises(ValueError, match="slots"):
        ComputeGate(slots=0)
    with pytest.raises(ValueError, match="unknown stages"):
        ComputeGate(max_wait_s={"gpu": 1.0})
    with pytest.raises(ValueError, match="unknown stage"):
        GateClient("/nowhere.sock", "train")


class GateServer:
    """A gate on a Unix socket, served by an event loop in a thread (as the sidecar serves it)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.gate = ComputeGate(max_wait_s={})
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(start_gate_server(self.gate, self.path))
        self._ready.set()
        self.loop.run_forever()

    def call(self, fn):
        async def run():
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def stats(self) -> dict:
        return self.call(self.gate.stats)

    def wait_for(self, predicate, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.stats()):
            assert time.monotonic() < deadline, self.stats()
            time.sleep(0.01)

    def stop(self) -> None:
        self.call(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture
def server(tmp_path):
    s = GateServer(str(tmp_path / "gate.sock"))
    yield s
    s.stop()


def test_clients_take_turns_one_at_a_time_in_stage_order(server):
    blocker = GateClient(server.path, "decode")
    clients = {stage: GateClient(server.path, stage) for stage in ("decode", "encode", "prefill")}
    order: list[str] = []
    inside = []
    lock = threading.Lock()

    def work(stage: str) -> None:
        with clients[stage].turn():
            with lock:
                inside.append(1)
                assert len(inside) == 1, "two turns at once"
                order.append(stage)
            time.sleep(0.02)
            with lock:
                inside.pop()

    with blocker.turn():
        threads = []
        for n, stage in enumerate(("decode", "encode", "prefill")):
            threads.append(threading.Thread(target=work, args=(stage,)))
            threads[-1].start()
            server.wait_for(lambda s, n=n: s["waiting"] == n + 1)
    for t in threads:
        t.join(10)
    assert order == ["prefill", "encode", "decode"]
    assert all(c.turns == 1 and c.ungated == 0 for c in clients.values())
    server.wait_for(lambda s: s["holding"] == 0)
    assert server.stats()["stages"]["decode"]["turns"] == 2


def test_a_client_that_hangs_up_gives_back_its_turn_and_its_place(server):
    holder = socket.socket(socket.AF_UNIX)
    holder.connect(server.path)
    holder.sendall(b"want encode\n")
    assert holder.recv(16) == b"go\n"
    waiter = socket.socket(socket.AF_UNIX)
    waiter.connect(server.path)
    waiter.sendall(b"want prefill\n")
    server.wait_for(lambda s: s["waiting"] == 1)
    waiter.close()  # gives up its place
    server.wait_for(lambda s: s["waiting"] == 0)
    holder.close()  # dies holding its turn
    server.wait_for(lambda s: s["holding"] == 0)
    client = GateClient(server.path, "decode")
    with client.turn():
        assert server.stats()["holding"] == 1
    assert client.turns == 1 and server.stats()["stages"]["prefill"]["turns"] == 0


def test_a_long_forward_yields_between_layers_to_a_prefill_and_goes_on(server):
    encoder, prefill = GateClient(server.path, "encode"), GateClient(server.path, "prefill")
    events: list[str] = []
    prefill_done = threading.Event()

    def run_prefill() -> None:
        with prefill.turn():
            events.append("prefill")
        prefill_done.set()

    with encoder.turn():
        events.append("layer 0")
        encoder.yield_turn()  # nobody waits: goes on at once
        events.append("layer 1")
        thread = threading.Thread(target=run_prefill)
        thread.start()
        server.wait_for(lambda s: s["waiting"] == 1)
        assert events == ["layer 0", "layer 1"]  # the prefill waits for the layer in progress
        encoder.yield_turn()  # the prefill runs here
        assert prefill_done.is_set()
        events.append("layer 2")
    thread.join(10)
    assert events == ["layer 0", "layer 1", "prefill", "layer 2"]
    assert encoder.turns == 1 and encoder.yields == 2 and prefill.turns == 1
    server.wait_for(lambda s: s["holding"] == 0)
    assert server.stats()["stages"]["encode"]["turns"] == 3


def test_yield_outside_a_turn_or_ungated_returns_at_once(tmp_path, server):
    client = GateClient(server.path, "encode")
    client.yield_turn()
    ungated = GateClient(str(tmp_path / "nobody.sock"), "encode")
    with ungated.turn():
        ungated.yield_turn()
    assert client.yields == 0 and ungated.yields == 0 and ungated.ungated == 1


def test_a_client_that_hangs_up_after_a_yield_gives_back_its_turn(server):
    holder = socket.socket(socket.AF_UNIX)
    holder.connect(server.path)
    holder.sendall(b"want encode\n")
    assert holder.recv(16) == b"go\n"
    waiter = GateClient(server.path, "decode")
    ran = threading.Event()

    def run() -> None:
        with waiter.turn():
            ran.set()

    thread = threading.Thread(target=run)
    thread.start()
    server.wait_for(lambda s: s["waiting"] == 1)
    holder.sendall(b"yield\n")  # encode ranks before decode: granted again, and then gone
    holder.close()
    thread.join(10)
    assert ran.is_set() and waiter.turns == 1
    server.wait_for(lambda s: s["holding"] == 0 and s["waiting"] == 0)


@pytest.mark.parametrize("message", [b"want gpu\n", b"done\n", b"yield\n", b"hello\n"])
def test_a_bad_message_drops_that_client_and_the_gate_serves_on(server, message):
    bad = socket.socket(socket.AF_UNIX)
    bad.connect(server.path)
    bad.sendall(message)
    assert bad.recv(16) == b""  # the gate hung up on it
    bad.close()
    client = GateClient(server.path, "encode")
    with client.turn():
        pass
    assert client.turns == 1


def test_without_a_gate_the_worker_runs_ungated(tmp_path):
    client = GateClient(str(tmp_path / "nobody.sock"), "prefill")
    ran = []
    with client.turn():
        ran.append(1)
    with client.turn():  # NOTE: not retried at once: no connect per forward while the gate is down
        ran.append(2)
    assert ran == [1, 2] and client.ungated == 2 and client.turns == 0


def test_a_gate_that_dies_mid_run_is_survived(tmp_path):
    path = str(tmp_path / "gate.sock")
    code = ("import asyncio, sys\nfrom mmcache.compute_gate import ComputeGate, start_gate_server\n"
            "async def main():\n    await start_gate_server(ComputeGate(), sys.argv[1])\n"
            "    print('ready', flush=True)\n    await asyncio.Event().wait()\nasyncio.run(main())\n")
    proc = subprocess.Popen([sys.executable, "-c", code, path], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        client = GateClient(path, "decode")
        with client.turn():
            pass
        proc.kill()  # the sidecar dies; its end of the connection closes
        proc.wait(10)
        with client.turn():
            pass
        assert client.turns == 1 and client.ungated == 1
    finally:
        proc.kill()
        proc.wait(10)


def test_the_sidecar_serves_the_gate_and_reports_it(tmp_path):
    """``mmcache serve --compute-gate PATH``: turns over the socket, counted in ``/v1/stats``; the
    socket is gone once the sidecar stops."""
    import json
    import os
    import urllib.request

    from sidecar import SidecarProcess

    path = str(tmp_path / "gate.sock")
    proc = SidecarProcess("--data-dir", str(tmp_path / "data"), "--host-capacity", "16MiB",
                          "--compute-gate", path).start()
    try:
        client = GateClient(path, "prefill")
        with client.turn():
            pass
        client.close()
        with urllib.request.urlopen(proc.url + "/v1/stats", timeout=10) as resp:
            gate = json.load(resp)["compute_gate"]
        assert gate["slots"] == 1 and gate["stages"]["prefill"]["turns"] == 1 and gate["holding"] == 0
    finally:
        assert proc.stop() == 0
    assert not os.path.exists(path)

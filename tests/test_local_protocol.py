"""The local protocol (binary frames, see ``mmcache_client.wire``): layouts sent with leases,
one-way releases, a socket served apart from the HTTP loop, hostile frames, the connection cap,
and seals on the writer's word with the disk writer verifying."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import numpy as np
import pytest
import torch

from mmcache_client import CacheClient, CacheUnavailable, CorruptEntry, content_hash, wire
from mmcache_client.client import plan_put
from mmcache_client.keys import Key
from mmcache_client.local import LocalConnection
from sidecar import settled, unix_sidecar

NS = "proto"


def h(name) -> str:
    return content_hash(str(name).encode())


@pytest.fixture
def sidecar(tmp_path):
    with unix_sidecar(str(tmp_path / "data")) as sc:
        yield sc


class Raw:
    """A bare client speaking frames (what a hostile or buggy client sends)."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buf = b""

    def send(self, msg_id: int, code: int, body: bytes) -> None:
        self.sock.sendall(wire.frame(msg_id, code, body))

    def recv(self) -> tuple[int, int, bytes] | None:
        while True:
            if len(self.buf) >= wire.HEAD.size:
                blen, msg_id, code = wire.HEAD.unpack_from(self.buf)
                if len(self.buf) >= wire.HEAD.size + blen:
                    body = self.buf[wire.HEAD.size:wire.HEAD.size + blen]
                    self.buf = self.buf[wire.HEAD.size + blen:]
                    return msg_id, code, body
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def test_a_lease_answer_carries_the_layout_and_a_get_parses_no_header(sidecar, monkeypatch):
    t = torch.arange(6 * 32, dtype=torch.float32).reshape(6, 32).to(torch.bfloat16)
    with CacheClient(sidecar.unix_url) as c:
        c.put(NS, h("lay"), t, extras={"image_grid_thw": torch.tensor([[1, 2, 3]])})
        [loc] = c._local.lease([f"{NS}/{h('lay')}"])
        assert loc.layout == wire.Layout("BF16", loc.layout.start, 6, 32) and loc.layout.start % 8 == 0
        c._local.release([f"{NS}/{h('lay')}"])
        import mmcache_client.entry_reader as fmt

        def no_parse(*a, **k):
            raise AssertionError("a get parsed the header")
        monkeypatch.setattr(fmt, "parse_entry", no_parse)
        with c.get(NS, h("lay")) as e:
            assert torch.equal(e.tensor, t) and e.tensor.data_ptr() >= c._local.arena.base_address
            assert np.array_equal(e.array, t.view(torch.uint16).numpy())
        monkeypatch.undo()
        with c.get(NS, h("lay")) as e:  # metadata and extras: the header, parsed on demand
            assert e.metadata["hash"] == h("lay")
            assert e.get_tensor("image_grid_thw").tolist() == [[1, 2, 3]]
            assert set(e.names) == {"embeddings", "image_grid_thw"}


def test_release_is_one_way_and_ordered_before_what_follows(sidecar):
    with CacheClient(sidecar.url) as c:
        c.put(NS, h("ow"), torch.ones(2, 8))
    sidecar.store.flush(30)
    raw = Raw(sidecar.config.socket)
    try:
        key = f"{NS}/{h('ow')}".encode()
        raw.send(1, wire.OP_CODES["lease"], key)
        msg_id, code, body = raw.recv()
        assert (msg_id, code) == (1, wire.OK) and wire.unpack_leases(body, [key.decode()])[0] is not None
        assert sidecar.store.stats()["host"]["leases"] == 1
        raw.send(2, wire.OP_CODES["release"], key)  # no answer comes for it
        raw.send(3, wire.OP_CODES["stats"], b"{}")
        msg_id, code, body = raw.recv()
        assert msg_id == 3 and code == wire.OK
        assert json.loads(body)["stats"]["host"]["leases"] == 0  # the release was served first
    finally:
        raw.close()


def test_the_unix_socket_is_served_while_the_http_loop_is_stuck(sidecar):
    with CacheClient(sidecar.unix_url) as c:
        c.put(NS, h("loop"), torch.ones(2, 8), persist=False)
        unblock = threading.Event()
        blocker = threading.Thread(target=sidecar.call, args=(unblock.wait, 30))
        blocker.start()  # the sidecar's event loop (HTTP) is now stuck
        try:
            t0 = time.monotonic()
            for _ in range(50):
                with c.get(NS, h("loop")) as e:
                    assert float(e.tensor[0, 0]) == 1.0
            assert c.put(NS, h("loop2"), torch.ones(2, 8), persist=False)
            assert time.monotonic() - t0 < 10
        finally:
            unblock.set()
            blocker.join()


@pytest.mark.parametrize("frame", [
    wire.frame(7, 200, b""),                                   # an unknown op
    wire.frame(7, wire.OP_CODES["lease"], b"\xff\xfe"),         # keys that are not UTF-8
    wire.frame(7, wire.OP_CODES["lease"], b"proto/notahash"),   # a key that is no key
    wire.frame(7, wire.OP_CODES["reserve"], b"[1, 2]"),         # JSON that is not an object
    wire.frame(7, wire.OP_CODES["seal"], b"{not json"),         # not JSON
    wire.frame(7, wire.OP_CODES["reserve"], b'{"key": "proto/' + b"a" * 64 + b'", "nbytes": -5}'),
    wire.frame(7, wire.OP_CODES["lease"], "\n".join(["proto/" + "a" * 64] * 5000).encode()),  # too many keys
])
def test_a_bad_frame_gets_a_named_error_and_the_connection_serves_on(sidecar, frame):
    raw = Raw(sidecar.config.socket)
    try:
        raw.sock.sendall(frame)
        msg_id, code, body = raw.recv()
        assert msg_id == 7 and code == wire.ERROR
        err = json.loads(body)
        assert err["error"] and err["kind"] in ("ProtocolError", "ValueError", "UnicodeDecodeError")
        raw.send(8, wire.OP_CODES["stats"], b"")
        assert raw.recv()[:2] == (8, wire.OK)
    finally:
        raw.close()
    assert sidecar.store.stats()["host"]["entries"] == 0 and sidecar.store.stats()["host"]["reservations"] == 0


def test_a_frame_over_the_limit_is_refused_and_the_connection_closed(sidecar):
    raw = Raw(sidecar.config.socket)
    try:
        raw.sock.sendall(wire.HEAD.pack(wire.MAX_BODY_BYTES + 1, 1, wire.OP_CODES["lookup"]))
        msg_id, code, body = raw.recv()
        assert msg_id == wire.NO_REQUEST and code == wire.ERROR and "limit" in json.loads(body)["error"]
        assert raw.recv() is None  # closed
    finally:
        raw.close()
    with CacheClient(sidecar.unix_url) as c:  # the sidecar serves on
        assert c.stats()["host"]["leases"] == 0


def test_a_truncated_frame_drops_the_connection_and_its_leases(sidecar):
    with CacheClient(sidecar.unix_url) as c:
        c.put(NS, h("trunc"), torch.ones(2, 8), persist=False)
    raw = Raw(sidecar.config.socket)
    raw.send(1, wire.OP_CODES["lease"], f"{NS}/{h('trunc')}".encode())
    assert raw.recv()[1] == wire.OK
    raw.sock.sendall(wire.HEAD.pack(100, 2, wire.OP_CODES["lookup"]) + b'{"keys"')  # and then nothing
    raw.close()
    assert settled(lambda: sidecar.store.stats()["host"]["leases"] == 0)


def test_connections_over_the_cap_are_told_so(sidecar):
    from mmcache.sidecar.local_server import LocalServer

    path = os.path.join(os.path.dirname(sidecar.config.socket), "capped.sock")
    server = LocalServer(sidecar.store, path, max_connections=2).start()
    try:
        held = [LocalConnection(path), LocalConnection(path)]
        with pytest.raises(CacheUnavailable, match="2 local connections at most"):
            LocalConnection(path, timeout=10)
        assert server.refused == 1
        held.pop().close()
        assert settled(lambda: server.connections == 1)
        LocalConnection(path).close()  # room again
        for conn in held:
            conn.close()
    finally:
        server.close()
    assert not os.path.exists(path)


def _seal_with_a_wrong_checksum(sidecar, name: str, durable: bool) -> dict:
    """Reserve, fill, flip a data byte after the fused checksum, seal: what the seal answered."""
    key = Key(NS, h(name))
    plan = plan_put(key, torch.ones(4, 8), None, None, 0.0)
    conn = LocalConnection(sidecar.config.socket)
    try:
        ans = conn.call("reserve", key=str(key), nbytes=plan.total_bytes, encode_ms=1.0, persist=True)
        view = conn.writable_arena().view(ans["offset"], plan.total_bytes)
        plan.write_into(view)
        np.frombuffer(view, dtype=np.uint8)[-1] ^= 0xFF  # a byte of the data flipped after the checksum
        return conn.call("seal", key=str(key), durable=durable)
    finally:
        conn.close()


def test_a_local_seal_skips_the_checksum_but_a_wrong_one_never_reaches_disk(sidecar):
    """The seal trusts the writer's fused checksum (readers of the arena never verify); the disk
    writer verifies before it commits, so an entry whose checksum is wrong never becomes durable,
    counted, and is deleted from the arena too: no reader, local or HTTP, is served it."""
    assert _seal_with_a_wrong_checksum(sidecar, "wrong", durable=False)["created"]
    sidecar.store.flush(30)
    stats = sidecar.store.stats()
    assert stats["disk"]["checksum_mismatch"] == 1
    key = str(Key(NS, h("wrong")))
    assert settled(lambda: not sidecar.store.host.contains(key))
    assert not sidecar.store.disk.contains(key)
    for url in (sidecar.url, sidecar.unix_url):
        with CacheClient(url) as c:
            assert c.get(NS, h("wrong")) is None


def test_a_durable_local_seal_of_a_wrong_checksum_is_refused_not_acknowledged(sidecar):
    """durable=True answers only once the entry is on disk: one the disk writer refuses is an
    error naming the checksum, and nothing of it stays readable."""
    with pytest.raises(CorruptEntry, match="checksum"):
        _seal_with_a_wrong_checksum(sidecar, "wrong-durable", durable=True)
    key = str(Key(NS, h("wrong-durable")))
    assert not sidecar.store.disk.contains(key) and not sidecar.store.host.contains(key)
    with CacheClient(sidecar.unix_url) as c:
        assert c.get(NS, h("wrong-durable")) is None
        assert c.put(NS, h("wrong-durable"), torch.ones(4, 8), durable=True)  # a good put of it works
        with c.get(NS, h("wrong-durable")) as e:
            assert torch.equal(e.tensor.float(), torch.ones(4, 8))


def test_a_torch_view_outlives_the_arena_close_without_a_crash(tmp_path):
    """The prepared arena tensor holds a buffer export, so closing the mapping under a live view
    leaves it mapped (the view stays readable) instead of unmapping it under the view (SIGBUS/SEGV)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import torch
        from mmcache_client.arena import SharedArena
        w = SharedArena({str(tmp_path / 'a.arena')!r}, 1 << 20, create=True)
        r = SharedArena({str(tmp_path / 'a.arena')!r})
        t = r.tensor(torch.float16, 0, (2, 4))
        r.close()
        print(float(t.sum()))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "0.0", out


def test_a_lease_batch_with_a_bad_key_leases_nothing(sidecar):
    with CacheClient(sidecar.unix_url) as c:
        c.put(NS, h("good"), torch.ones(2, 8), persist=False)
    raw = Raw(sidecar.config.socket)
    try:
        raw.send(1, wire.OP_CODES["lease"], f"{NS}/{h('good')}\n{NS}/bad".encode())
        assert raw.recv()[:2] == (1, wire.ERROR)
        assert sidecar.store.stats()["host"]["leases"] == 0
        raw.send(2, wire.OP_CODES["reserve"], b"[" * 100_000)  # deep nesting: a named error, no traceback
        msg_id, code, body = raw.recv()
        assert (msg_id, code) == (2, wire.ERROR) and json.loads(body)["kind"] == "ProtocolError"
    finally:
        raw.close()


def test_a_release_gives_back_the_lease_it_took_not_the_newest(sidecar):
    """e1 leases K at one offset; K is deleted and put again elsewhere, e2 leases the new one;
    closing e1 must free e1's lease (before: the newest, leaving e2 over unleased memory)."""
    key = f"{NS}/{h('twice')}"
    with CacheClient(sidecar.unix_url) as u, CacheClient(sidecar.url) as c:
        u.put(NS, h("twice"), torch.full((2, 8), 1.0), persist=False)
        e1 = u.get(NS, h("twice"))
        first = e1._view._offset
        assert c.delete(NS, h("twice"))
        u.put(NS, h("twice"), torch.full((2, 8), 2.0), persist=False)
        e2 = u.get(NS, h("twice"))
        second = e2._view._offset
        assert first != second
        e1.close()
        assert settled(lambda: not sidecar.store.host.leases.is_leased((key, first)))
        assert sidecar.store.host.leases.is_leased((key, second))
        assert float(e2.tensor[0, 0]) == 2.0
        e2.close()


@pytest.mark.parametrize("record,needle", [
    ((0, 100, 9, 2, 0, 0, 1, 1), "malformed"),          # unknown tier code
    ((0, 100, 0, 7, 0, 0, 1, 1), "malformed"),          # unknown dtype code
    ((-7, 100, 0, 2, 0, 0, 1, 1), "malformed"),         # no such offset
    ((0, 0, 0, 2, 0, 0, 1, 1), "malformed"),            # an empty entry
    ((0, 100, 0, 2, 0, 64, 10, 4), "overrun"),          # embeddings past the entry's end
    ((-1, 100, 1, 255, 40, 0, 0, 0), "past the answer"),  # a stored key longer than the answer
])
def test_a_lease_record_that_does_not_add_up_is_refused_whole(record, needle):
    from mmcache_client import wire

    body = wire.LEASE_RECORD.pack(*record)
    with pytest.raises(ValueError, match=needle):
        wire.unpack_leases(body, ["ns/" + "0" * 64])
    ok = wire.LEASE_RECORD.pack(0, 200, 0, 2, 0, 64, 4, 8)  # 64 + 4*8*4 = 192 <= 200
    assert wire.unpack_leases(ok, ["ns/" + "0" * 64])[0].layout == wire.Layout("F32", 64, 4, 8)

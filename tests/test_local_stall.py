"""A Unix connection that stalls mid-frame is closed after --header-timeout (the attack: 512
half-sent frames held every local slot, with no read timeout)."""

from __future__ import annotations

import socket
import time

from mmcache_client import CacheClient, CacheUnavailable
from mmcache_client.wire import HEAD, OK, OP_CODES
from sidecar import SidecarProcess, settled


def test_half_sent_frames_are_closed_and_their_slots_come_back(tmp_path):
    sock_path = str(tmp_path / "s.sock")
    sc = SidecarProcess("--data-dir", str(tmp_path / "d"), "--socket", sock_path, "--header-timeout", "1").start()
    held = []
    try:
        frame = HEAD.pack(200, 1, 1) + b"{" * 10  # a head promising 200 bytes, then 10 of them
        for i in range(512):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(sock_path)
            s.sendall(frame if i % 2 else frame[:7])  # half a head, or a head and a bit of body
            held.append(s)
        t0 = time.monotonic()
        try:  # every slot is taken for now (or about to be freed)
            with CacheClient(f"unix://{sock_path}", retries=0, timeout=5) as c:
                c.stats()
        except CacheUnavailable:
            pass
        with CacheClient(sc.url) as http:
            assert settled(lambda: http.stats()["local"].get("stalled_frames", 0) == 512, 20), http.stats()["local"]
        took = time.monotonic() - t0
        assert took < 6, took
        for s in held:  # the sidecar hung up on each, saying why
            s.settimeout(5)
            data = s.recv(4096)
            assert b"header-timeout" in data or data == b""
        with CacheClient(f"unix://{sock_path}", retries=0, timeout=5) as c:  # slots are free again
            assert c.stats()["host"]["entries"] == 0
        idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # an idle connection between frames stays
        idle.connect(sock_path)
        time.sleep(1.5)
        with CacheClient(sc.url) as http:
            assert http.stats()["local"]["stalled_frames"] == 512
        idle.close()
    finally:
        for s in held:
            s.close()
        sc.stop()


def test_a_whole_frame_sent_slowly_within_the_timeout_is_served(tmp_path):
    sock_path = str(tmp_path / "s.sock")
    sc = SidecarProcess("--data-dir", str(tmp_path / "d"), "--socket", sock_path, "--header-timeout", "2").start()
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock_path)
        body = b'{"token": null}'
        frame = HEAD.pack(len(body), 7, OP_CODES["hello"]) + body
        for i in range(0, len(frame), 4):
            s.sendall(frame[i:i + 4])
            time.sleep(0.1)
        s.settimeout(10)
        answer = s.recv(65536)
        blen, msg_id, code = HEAD.unpack_from(answer)
        assert msg_id == 7 and code == OK, answer[:200]
        s.close()
    finally:
        sc.stop()

"""Fuzz target: the Unix socket's frame and op decoders, as the sidecar runs them on what a local
client sends (``mmcache.sidecar.local_server``: a 9-byte head, then ``LocalSession.handle`` on the body),
against a real store; and the client's decoder of lease answers (``wire.unpack_leases``), which a
client runs on what a sidecar sends.

The input is read as the server reads a connection: frames until the bytes end, a frame over the
size limit or an ``events`` frame ends it. Each op may fail only as the server expects (its
``_EXPECTED`` errors, answered to the client); anything else is a bug the server would answer as
an internal error. When the connection closes, everything it leased or reserved is given back.
An input that starts with ``L`` is instead a lease answer for the keys its first line names."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile

from harness import instrumented, main

with instrumented():
    from mmcache.sidecar.local_server import _EXPECTED, MAX_MESSAGE_BYTES
    from mmcache.sidecar.local_session import LocalSession
    from mmcache.common.tenants import Tenants
    from mmcache.core.store import StoreConfig
    from mmcache.tiers.wiring import open_store
    from mmcache_client import wire

logging.disable(logging.WARNING)  # NOTE: refused ops log; a million of them say nothing new
_dir = tempfile.mkdtemp(prefix="mmc-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
STORE = open_store(StoreConfig(data_dir=_dir, host_capacity_bytes=4 << 20, disk_capacity_bytes=8 << 20,
                                disk_max_queued_bytes=4 << 20, tenant_quotas={"alice": 1 << 20}))
TENANTS = Tenants({"alice-token-0123456789abcdef": {"tenant": "alice", "quota": 1 << 20},
                   "bob-token-0123456789abcdef": "bob"})
atexit.register(lambda: (STORE.close(), shutil.rmtree(_dir, ignore_errors=True)))
_EVENTS = wire.OP_CODES["events"]


def frames(data: bytes):
    at = 0
    while at + wire.HEAD.size <= len(data):
        blen, msg_id, code = wire.HEAD.unpack_from(data, at)
        at += wire.HEAD.size
        if blen > MAX_MESSAGE_BYTES or at + blen > len(data) or code == _EVENTS:
            return
        yield code, data[at:at + blen]
        at += blen


def serve(data: bytes) -> None:
    session = LocalSession(STORE, None, TENANTS)
    try:
        for code, body in frames(data):
            try:
                answer = session.handle(code, body)
            except _EXPECTED:
                continue
            assert isinstance(answer, bytes)
    finally:
        session.close()
    stats = STORE.host.stats()
    assert STORE.host.leases_of(session.owner) == 0 and stats["reservations"] == 0, stats
    assert STORE.disk.leases.total == 0


def lease_answer(data: bytes) -> None:
    head, _, body = data[1:].partition(b"\n")
    keys = [f"ns/{i}" for i in range(min(len(head), 64))]
    try:
        locs = wire.unpack_leases(body, keys)
    except ValueError:
        return
    assert len(locs) == len(keys)
    for loc in locs:
        if loc is not None:
            assert loc.offset >= wire.IN_LMDB and loc.nbytes > 0 and loc.tier in wire.TIERS, loc


def test_one_input(data: bytes) -> None:
    if data[:1] == b"L":
        lease_answer(data)
    else:
        serve(data)


if __name__ == "__main__":
    main(test_one_input)

"""The local protocol's framing (sidecar and SDKs share it; see ``mmcache.sidecar.local_server``).

Every message is a frame: a 9-byte head ``<u32 body length, u32 id, u8 code>`` and a body. A
request's code is its op; an answer's code is ``OK`` or ``ERROR`` and its id the request's. Bodies:

- ``lease`` and ``release``: the keys, UTF-8, joined by ``\\n`` (one message per batch, no JSON;
  a release names each lease as ``key\\toffset``);
  the lease answer is one fixed 32-byte record per key (``LEASE_RECORD``) followed by the
  stored keys of entries served from disk. ``release`` is one-way: it has no answer.
- every other op (``hello``, ``lookup``, ``reserve``, ``seal``, ``abort``, ``delete``,
  ``stats``, ``claim``, ``unclaim``, ``events``, ``lease_device``, ``release_device``) and every
  ``ERROR``: a compact JSON object (they are rare, carry a put, or CUDA IPC handles). ``events`` is answered once, then the connection only carries
  pushed ``EVENT`` frames from the sidecar (a dedicated connection: an event stream).

A lease record is ``<i64 offset, i64 nbytes, u8 tier, u8 dtype, u16 stored-key length, u32 data
start, u32 rows, u32 cols>``: where the entry lies in the arena (offset -1: in place in LMDB,
-2: a miss) and where its ``embeddings`` lie in it, parsed once by the sidecar (entries are
immutable), so a get parses no safetensors header. ``dtype`` 255: no layout sent.
"""

from __future__ import annotations

import json
import struct
from typing import Any, NamedTuple

HEAD = struct.Struct("<IIB")
LEASE_RECORD = struct.Struct("<qqBBHIII")
MAX_BODY_BYTES = 1 << 20
"""Longest request body the sidecar reads (4096 keys fit many times over)."""
MAX_ANSWER_BYTES = 16 << 20
"""Longest answer body a client accepts."""

OPS = ("hello", "lookup", "lease", "release", "reserve", "seal", "abort", "delete", "stats", "claim", "unclaim",
       "events", "lease_device", "release_device", "list", "scan")
OP_CODES = {name: i + 1 for i, name in enumerate(OPS)}
OP_NAMES = {i + 1: name for i, name in enumerate(OPS)}
LEASE_OPS = ("lease", "scan")
"""Binary lease messages: ``lease`` (a lower tier's entry is promoted into host where there is
room) and ``scan`` (read where it lies: a sequential scan, an export, leaves host's hot set be)."""
ONE_WAY = frozenset({OP_CODES["release"]})
"""Ops the sidecar does not answer (a failed one is logged and counted)."""
OK, ERROR = 0, 1
NO_REQUEST = 0xFFFFFFFF
"""The id of an ``ERROR`` that answers no request: the sidecar closes the connection after it
(a frame over the limit, too many connections)."""
EVENT = 0xFFFFFFFE
"""The id of a pushed frame on a connection turned into an event stream by ``events``: its body
is ``{"events": [...], "lost": bool}`` (an empty list is a heartbeat)."""

TIERS = ("host", "disk", "device", "remote")
TIER_CODES = {name: i for i, name in enumerate(TIERS)}
LAYOUT_DTYPES = ("BF16", "F16", "F32")
_DTYPE_BYTES = (2, 2, 4)
_DTYPE_CODES = {name: i for i, name in enumerate(LAYOUT_DTYPES)}
NO_LAYOUT = 255
MISS, IN_LMDB = -2, -1


class Layout(NamedTuple):
    """Where an entry's ``embeddings`` lie, relative to the entry's first byte."""

    dtype: str
    start: int
    rows: int
    cols: int


class LeaseLoc(NamedTuple):
    """One lease answer: ``offset`` in the arena (-1: in place in LMDB under ``stored_key``)."""

    offset: int
    nbytes: int
    tier: str
    stored_key: str
    layout: Layout | None


def release_name(key: str, loc: "LeaseLoc") -> str:
    """How a release names one lease: ``key\toffset``, so a key leased at two places (deleted and
    put again meanwhile) gives back the lease that was taken, not the newest."""
    return f"{key}\t{loc.offset}"


def frame(msg_id: int, code: int, body: bytes) -> bytes:
    return HEAD.pack(len(body), msg_id, code) + body


def json_body(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode()


def keys_body(keys: list[str]) -> bytes:
    return "\n".join(keys).encode()


def parse_keys(body: bytes) -> list[str]:
    return body.decode().split("\n") if body else []


def pack_lease_record(offset: int, nbytes: int, tier: int, layout: Layout | None, stored_len: int = 0) -> bytes:
    """One lease record (``LEASE_RECORD``); a miss is ``offset`` ``MISS``."""
    if layout is None:
        return LEASE_RECORD.pack(offset, nbytes, tier, NO_LAYOUT, stored_len, 0, 0, 0)
    return LEASE_RECORD.pack(offset, nbytes, tier, _DTYPE_CODES[layout.dtype], stored_len, layout.start,
                             layout.rows, layout.cols)


def pack_leases(locs: list[LeaseLoc | None]) -> bytes:
    records, tail = [], []
    for loc in locs:
        if loc is None:
            records.append(LEASE_RECORD.pack(MISS, 0, 0, NO_LAYOUT, 0, 0, 0, 0))
            continue
        stored = loc.stored_key.encode() if loc.offset == IN_LMDB else b""
        records.append(pack_lease_record(loc.offset, loc.nbytes, TIER_CODES[loc.tier], loc.layout, len(stored)))
        tail.append(stored)
    return b"".join(records) + b"".join(tail)


def unpack_leases(body: bytes | memoryview, keys: list[str]) -> list[LeaseLoc | None]:
    """The lease answer for ``keys`` (a host entry's stored key is the one asked for)."""
    n = len(keys)
    size = LEASE_RECORD.size
    if len(body) < n * size:
        raise ValueError(f"a lease answer for {n} keys is {len(body)} bytes, shorter than {n * size}")
    out: list[LeaseLoc | None] = []
    at = n * size
    for i, (offset, nbytes, tier, dtype, klen, start, rows, cols) in enumerate(LEASE_RECORD.iter_unpack(body[:at])):
        if offset == MISS:
            out.append(None)
            continue
        # NOTE: a record that does not add up is refused whole (ValueError), never half-used: the
        # client would slice the arena by it.
        if offset < IN_LMDB or nbytes <= 0 or tier >= len(TIERS) or (dtype != NO_LAYOUT and dtype >= len(LAYOUT_DTYPES)):
            raise ValueError(f"lease record {i} is malformed (offset {offset}, {nbytes} bytes, tier {tier}, dtype {dtype})")
        stored = keys[i]
        if klen:
            if at + klen > len(body):
                raise ValueError(f"lease record {i} names a {klen}-byte key past the answer's end")
            stored = bytes(body[at:at + klen]).decode()
            at += klen
        layout = None
        if dtype != NO_LAYOUT:
            width = _DTYPE_BYTES[dtype]
            if start + rows * cols * width > nbytes:
                raise ValueError(f"lease record {i}: embeddings of {rows}x{cols} at {start} overrun its {nbytes} bytes")
            layout = Layout(LAYOUT_DTYPES[dtype], start, rows, cols)
        out.append(LeaseLoc(offset, nbytes, TIERS[tier], stored, layout))
    return out

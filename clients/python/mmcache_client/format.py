"""The entry format: one safetensors blob, the same on every tier and on the wire.

Layout (safetensors): ``u64 little-endian header length N`` | ``N bytes of JSON`` | data. The
JSON holds one record per tensor (``dtype``, ``shape``, ``data_offsets`` relative to the data
section) and ``__metadata__`` (str -> str) with at least ``format``, ``namespace``, ``hash``,
``checksum``, ``created_at`` and ``encode_ms``.

mmcache writes ``embeddings`` first and pads the header with spaces so that the data section
starts on a ``DATA_ALIGNMENT`` boundary of the blob; blobs sit at aligned offsets in the arena,
so the embeddings can be viewed in place by numpy or torch. ``checksum`` is the xxh3-64 of the
whole data section (all tensor bytes in offset order), 16 hex chars.

Readers treat every blob as untrusted: ``parse_entry`` validates the header completely and
raises an ``EntryFormatError`` subclass naming the problem; it never yields a view outside the
buffer. Views are made without copying (``EntryView.array`` / ``EntryView.tensor``).

The format lives in three modules, re-exported here: ``entry_spec`` (constants, dtypes, errors),
``entry_reader`` (``parse_entry``, ``read_entry``, ``EntryView``) and ``entry_writer``
(``plan_entry``, ``EntryPlan``, ``relayout``).
"""

from __future__ import annotations

from mmcache_client.entry_reader import (
    EntryView,
    parse_entry,
    read_entry,
    verify_checksum,
    view_array,
    view_tensor,
)
from mmcache_client.entry_spec import (
    DATA_ALIGNMENT,
    DTYPES,
    EMBEDDING_DTYPES,
    FORMAT_VERSION,
    MAX_HEADER_BYTES,
    MAX_TENSORS,
    REQUIRED_METADATA,
    BadHeader,
    ChecksumMismatch,
    EntryFormatError,
    MissingMetadata,
    ParsedEntry,
    TensorInfo,
    TruncatedEntry,
    UnsupportedDtype,
    checksum,
)
from mmcache_client.entry_writer import EntryPlan, plan_entry, relayout

__all__ = [
    "DATA_ALIGNMENT", "DTYPES", "EMBEDDING_DTYPES", "FORMAT_VERSION", "MAX_HEADER_BYTES", "MAX_TENSORS",
    "REQUIRED_METADATA", "BadHeader", "ChecksumMismatch", "EntryFormatError", "EntryPlan", "EntryView",
    "MissingMetadata", "ParsedEntry", "TensorInfo", "TruncatedEntry", "UnsupportedDtype", "checksum", "parse_entry",
    "plan_entry", "read_entry", "relayout", "verify_checksum", "view_array", "view_tensor",
]

"""The entry format's constants, dtypes, errors and parsed records (see ``mmcache_client.format``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash


FORMAT_VERSION = "mmcache/1"
DATA_ALIGNMENT = 64
MAX_HEADER_BYTES = 1 << 20
"""Headers are a few hundred bytes; anything past 1 MiB is hostile or broken."""
MAX_TENSORS = 64
REQUIRED_METADATA = ("format", "namespace", "hash", "checksum", "created_at", "encode_ms")
EMBEDDING_DTYPES = ("BF16", "F16", "F32")


@dataclass(frozen=True)
class _DType:
    itemsize: int
    numpy: str
    """numpy dtype; BF16 is viewed as its raw uint16 bits (numpy has no bfloat16)."""
    torch_name: str


DTYPES: dict[str, _DType] = {
    "BF16": _DType(2, "<u2", "bfloat16"),
    "F16": _DType(2, "<f2", "float16"),
    "F32": _DType(4, "<f4", "float32"),
    "F64": _DType(8, "<f8", "float64"),
    "I8": _DType(1, "i1", "int8"),
    "U8": _DType(1, "u1", "uint8"),
    "I16": _DType(2, "<i2", "int16"),
    "I32": _DType(4, "<i4", "int32"),
    "I64": _DType(8, "<i8", "int64"),
    "BOOL": _DType(1, "?", "bool"),
}
_NUMPY_TO_DTYPE = {np.dtype(v.numpy): k for k, v in DTYPES.items() if k != "BF16"}


class EntryFormatError(ValueError):
    """A blob is not a valid mmcache entry."""


class TruncatedEntry(EntryFormatError):
    """The blob ends before its header or its tensor data does."""


class BadHeader(EntryFormatError):
    """The header is not valid JSON or its records lie (offsets, sizes, shapes)."""


class UnsupportedDtype(EntryFormatError):
    """A tensor has a dtype that mmcache does not know."""


class MissingMetadata(EntryFormatError):
    """Required ``__metadata__`` fields are absent or malformed."""


class ChecksumMismatch(EntryFormatError):
    """The data section does not hash to the recorded checksum."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a blob; ``start``/``end`` are absolute byte offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class ParsedEntry:
    """A validated header: tensor locations and metadata. ``total_bytes`` is the blob length."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    total_bytes: int


def checksum(data: Any) -> str:
    """xxh3-64 of ``data`` (the data section) as 16 lowercase hex chars."""
    return xxhash.xxh3_64_hexdigest(data)

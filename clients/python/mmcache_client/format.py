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
"""

from __future__ import annotations

import json
import math
import struct
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import xxhash

from mmcache_client.keys import validate_hash, validate_namespace

try:  # torch is optional for the SDK
    import torch
except ImportError:  # pragma: no cover - exercised only where torch is absent
    torch = None

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


# ---------------------------------------------------------------- reading


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise BadHeader(f"duplicate key {k!r} in header")
        out[k] = v
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_tensor(name: str, rec: Any, data_start: int) -> TensorInfo:
    if not isinstance(rec, dict) or set(rec) != {"dtype", "shape", "data_offsets"}:
        raise BadHeader(f"tensor {name!r}: record must have exactly dtype, shape, data_offsets")
    dtype, shape, offsets = rec["dtype"], rec["shape"], rec["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise UnsupportedDtype(f"tensor {name!r}: unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d) and d >= 0 for d in shape):
        raise BadHeader(f"tensor {name!r}: shape {shape!r} must be a list of <= 8 ints >= 0")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise BadHeader(f"tensor {name!r}: data_offsets {offsets!r} must be [begin, end], 0 <= begin <= end")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise BadHeader(f"tensor {name!r}: data_offsets span {offsets[1] - offsets[0]} bytes, shape needs {nbytes}")
    return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _parse_metadata(meta: Any, strict: bool) -> dict[str, str]:
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise BadHeader("__metadata__ must map strings to strings")
    if not strict:
        return meta
    if meta.get("format", FORMAT_VERSION) != FORMAT_VERSION:
        raise BadHeader(f"format {meta['format']!r} is not {FORMAT_VERSION!r}")
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise MissingMetadata(f"__metadata__ lacks {', '.join(missing)}")
    try:
        validate_namespace(meta["namespace"])
        validate_hash(meta["hash"])
        encode_ms = float(meta["encode_ms"])
        float(meta["created_at"])
        if not math.isfinite(encode_ms) or encode_ms < 0:
            raise ValueError(f"encode_ms={meta['encode_ms']!r} must be a finite number >= 0")
    except ValueError as e:
        raise MissingMetadata(f"__metadata__ is malformed: {e}") from None
    if len(meta["checksum"]) != 16 or any(c not in "0123456789abcdef" for c in meta["checksum"]):
        raise MissingMetadata(f"__metadata__ checksum {meta['checksum']!r} must be 16 lowercase hex chars")
    return meta


def parse_entry(buf: Any, *, strict: bool = True) -> ParsedEntry:
    """Validate ``buf`` (bytes, memoryview, mmap, ...) as an entry and locate its tensors.

    ``strict=False`` accepts blobs whose metadata is incomplete (a client's PUT body, which the
    server completes); everything else is checked in both modes. The checksum is not verified
    here: see ``verify_checksum``.
    """
    mv = memoryview(buf).cast("B")
    total = mv.nbytes
    if total < 8:
        raise TruncatedEntry(f"blob of {total} bytes is shorter than the 8-byte header length")
    (header_len,) = struct.unpack_from("<Q", mv, 0)
    if header_len > MAX_HEADER_BYTES:
        raise BadHeader(f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + header_len > total:
        raise TruncatedEntry(f"header of {header_len} bytes runs past the {total}-byte blob")
    try:
        # UTF-8 only, as safetensors requires (json.loads(bytes) would also take UTF-16/32).
        text = bytes(mv[8 : 8 + header_len]).decode("utf-8")
        header = json.loads(text, object_pairs_hook=_reject_duplicates)
    except BadHeader:
        raise
    except (ValueError, RecursionError) as e:  # also int literals past sys.get_int_max_str_digits
        raise BadHeader(f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise BadHeader("header must be a JSON object")
    data_start = 8 + header_len
    metadata = _parse_metadata(header.pop("__metadata__", None), strict)
    if len(header) > MAX_TENSORS:
        raise BadHeader(f"{len(header)} tensors exceed the limit of {MAX_TENSORS}")
    tensors = {name: _parse_tensor(name, rec, data_start) for name, rec in header.items()}
    emb = tensors.get("embeddings")
    if emb is None:
        raise BadHeader("entry has no 'embeddings' tensor")
    if len(emb.shape) != 2 or emb.dtype not in EMBEDDING_DTYPES or emb.shape[0] == 0:
        raise BadHeader(f"embeddings must be 2-D {'/'.join(EMBEDDING_DTYPES)} with num_tokens >= 1, "
                        f"got {emb.dtype} {list(emb.shape)}")
    # The tensors must tile the data section exactly, as safetensors requires.
    end = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start != end:
            raise BadHeader(f"tensor {info.name!r} starts at {info.start - data_start}, expected {end - data_start}")
        end = info.end
    if end > total:
        raise TruncatedEntry(f"tensor data needs {end} bytes, blob has {total}")
    if end != total:
        raise BadHeader(f"{total - end} trailing bytes after the tensor data")
    return ParsedEntry(tensors, metadata, data_start, total)


def verify_checksum(buf: Any, parsed: ParsedEntry) -> None:
    """Raise ``ChecksumMismatch`` unless the data section hashes to the recorded checksum."""
    mv = memoryview(buf).cast("B")
    got = checksum(mv[parsed.data_start : parsed.total_bytes])
    want = parsed.metadata.get("checksum")
    if got != want:
        raise ChecksumMismatch(f"checksum {want!r} recorded, data hashes to {got!r}")


def view_array(buf: Any, info: TensorInfo) -> np.ndarray:
    """A numpy view of one tensor in place (BF16 as raw uint16 bits)."""
    dt = DTYPES[info.dtype]
    count = math.prod(info.shape)
    return np.frombuffer(buf, dtype=dt.numpy, count=count, offset=info.start).reshape(info.shape)


def view_tensor(buf: Any, info: TensorInfo) -> "torch.Tensor":
    """A torch view of one tensor in place. Needs torch."""
    if torch is None:
        raise RuntimeError("torch is not installed; use .array for a numpy view")
    tdtype = getattr(torch, DTYPES[info.dtype].torch_name)
    count = math.prod(info.shape)
    if count == 0:
        return torch.empty(info.shape, dtype=tdtype)
    with warnings.catch_warnings():
        # NOTE: read-only mappings are the point (readers must not write the arena); torch
        # warns about non-writable buffers, which is exactly what we want here.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(buf, dtype=tdtype, count=count, offset=info.start)
    return flat.view(info.shape)


class EntryView:
    """A parsed entry over a buffer that the caller keeps alive; views share its memory."""

    __slots__ = ("buffer", "parsed")

    def __init__(self, buffer: Any, parsed: ParsedEntry):
        self.buffer = buffer
        self.parsed = parsed

    @property
    def metadata(self) -> dict[str, str]:
        return self.parsed.metadata

    @property
    def nbytes(self) -> int:
        return self.parsed.total_bytes

    @property
    def names(self) -> list[str]:
        return list(self.parsed.tensors)

    @property
    def array(self) -> np.ndarray:
        """``embeddings`` as a numpy view (bf16 as raw uint16 bits)."""
        return self.get_array("embeddings")

    @property
    def tensor(self) -> "torch.Tensor":
        """``embeddings`` as a torch view (needs torch)."""
        return self.get_tensor("embeddings")

    def get_array(self, name: str) -> np.ndarray:
        return view_array(self.buffer, self.parsed.tensors[name])

    def get_tensor(self, name: str) -> "torch.Tensor":
        return view_tensor(self.buffer, self.parsed.tensors[name])


def read_entry(buf: Any, *, verify: bool = True) -> EntryView:
    """Parse and (by default) checksum-verify ``buf``; the view's tensors share its memory."""
    parsed = parse_entry(buf, strict=True)
    if verify:
        verify_checksum(buf, parsed)
    return EntryView(buf, parsed)


# ---------------------------------------------------------------- writing


@dataclass(frozen=True)
class _Source:
    name: str
    dtype: str
    shape: tuple[int, ...]
    data: Any  # torch.Tensor (any device) or np.ndarray

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


def _dtype_name(x: Any) -> str:
    if torch is not None and isinstance(x, torch.Tensor):
        for name, dt in DTYPES.items():
            if getattr(torch, dt.torch_name) == x.dtype:
                return name
        raise UnsupportedDtype(f"unsupported torch dtype {x.dtype}")
    if isinstance(x, np.ndarray):
        name = _NUMPY_TO_DTYPE.get(x.dtype.newbyteorder("<") if x.dtype.byteorder == ">" else x.dtype)
        if name is None:
            raise UnsupportedDtype(f"unsupported numpy dtype {x.dtype}")
        return name
    raise TypeError(f"expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _source(name: str, x: Any, dtype: str | None = None) -> _Source:
    dtype = dtype or _dtype_name(x)
    if dtype not in DTYPES:
        raise UnsupportedDtype(f"tensor {name!r}: unsupported dtype {dtype!r}")
    if isinstance(x, np.ndarray) and np.dtype(DTYPES[dtype].numpy) != x.dtype.newbyteorder("<"):
        raise ValueError(f"tensor {name!r}: numpy {x.dtype} cannot be stored as {dtype} without a cast")
    return _Source(name, dtype, tuple(int(d) for d in x.shape), x)


@dataclass
class EntryPlan:
    """A laid-out entry: the header is fixed, so ``total_bytes`` is known before any data moves.

    Two-phase writers reserve ``total_bytes`` in the arena, then ``write_into`` copies each
    tensor straight into the reserved bytes (a CUDA tensor is copied device→shared memory
    directly) and fills in the checksum.
    """

    sources: list[_Source]
    metadata: dict[str, str]
    data_start: int = 0
    total_bytes: int = 0
    offsets: list[int] = field(default_factory=list)

    def _header(self, checksum_hex: str) -> bytes:
        header: dict[str, Any] = {"__metadata__": {**self.metadata, "checksum": checksum_hex}}
        for src, off in zip(self.sources, self.offsets):
            header[src.name] = {"dtype": src.dtype, "shape": list(src.shape), "data_offsets": [off, off + src.nbytes]}
        text = json.dumps(header, separators=(",", ":")).encode()
        pad = -(8 + len(text)) % DATA_ALIGNMENT
        return struct.pack("<Q", len(text) + pad) + text + b" " * pad

    def _layout(self) -> None:
        # Never write a blob that parse_entry(strict=True) would reject.
        for src in self.sources:
            if not isinstance(src.name, str) or src.name == "__metadata__":
                raise ValueError(f"tensor name {src.name!r} is not allowed")
        _parse_metadata({**self.metadata, "checksum": "0" * 16}, strict=True)
        off = 0
        self.offsets = []
        for src in self.sources:
            self.offsets.append(off)
            off += src.nbytes
        self._header_template = self._header(_CHECKSUM_PLACEHOLDER)
        # NOTE: JSON escapes quotes inside strings, so this byte pattern occurs only as the key.
        self._checksum_at = self._header_template.index(b'"checksum":"' + _CHECKSUM_PLACEHOLDER.encode()) + 12
        self.data_start = len(self._header_template)
        if self.data_start - 8 > MAX_HEADER_BYTES:
            raise BadHeader(f"header of {self.data_start - 8} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
        self.total_bytes = self.data_start + off

    def write_into(self, dest: Any) -> str:
        """Write the whole entry into ``dest`` (writable, exactly ``total_bytes``); return checksum.

        Host tensors are copied in cache-sized chunks, each hashed while still in cache, so the
        checksum costs almost no extra memory traffic; device tensors are copied whole.
        """
        mv = memoryview(dest).cast("B")
        if mv.nbytes != self.total_bytes:
            raise ValueError(f"destination holds {mv.nbytes} bytes, entry needs {self.total_bytes}")
        hasher = xxhash.xxh3_64()
        for src, off in zip(self.sources, self.offsets):
            start = self.data_start + off
            flat = _host_bytes(src.data)
            if flat is None:
                _copy_into(mv, start, src)
                hasher.update(mv[start : start + src.nbytes])
                continue
            dst = np.frombuffer(mv, dtype=np.uint8, count=src.nbytes, offset=start)
            for i in range(0, src.nbytes, _COPY_CHUNK_BYTES):
                chunk = dst[i : i + _COPY_CHUNK_BYTES]
                np.copyto(chunk, flat[i : i + _COPY_CHUNK_BYTES])
                hasher.update(chunk)
        digest = hasher.hexdigest()
        mv[: self.data_start] = self._header_template
        mv[self._checksum_at : self._checksum_at + 16] = digest.encode()
        return digest

    def to_bytes(self) -> bytes:
        out = bytearray(self.total_bytes)
        self.write_into(out)
        return bytes(out)


_CHECKSUM_PLACEHOLDER = "0" * 16
_COPY_CHUNK_BYTES = 512 << 10
"""Fits in L2: a chunk is hashed right after it is copied, while still cached."""


def _host_bytes(data: Any) -> np.ndarray | None:
    """The bytes of a C-contiguous, little-endian host tensor as a flat uint8 view, else None."""
    if isinstance(data, np.ndarray):
        if data.flags.c_contiguous and data.dtype.byteorder in ("=", "<", "|"):
            return data.reshape(-1).view(np.uint8)
        return None
    if torch is not None and isinstance(data, torch.Tensor) and data.device.type == "cpu" and data.is_contiguous():
        return data.detach().reshape(-1).view(torch.uint8).numpy()
    return None


def _copy_into(mv: memoryview, start: int, src: _Source) -> None:
    if src.nbytes == 0:
        return
    data = src.data
    if torch is not None and isinstance(data, torch.Tensor):
        tdtype = getattr(torch, DTYPES[src.dtype].torch_name)
        dst = torch.frombuffer(mv, dtype=tdtype, count=math.prod(src.shape), offset=start)
        dst.view(src.shape).copy_(data.detach())
        return
    dst = np.frombuffer(mv, dtype=DTYPES[src.dtype].numpy, count=math.prod(src.shape), offset=start)
    np.copyto(dst.reshape(src.shape), data, casting="equiv")


def plan_entry(
    namespace: str,
    hash_hex: str,
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
    *,
    encode_ms: float = 0.0,
    dtypes: Mapping[str, str] | None = None,
) -> EntryPlan:
    """Lay out an entry holding ``tensors`` (must include 2-D ``embeddings``).

    ``metadata`` adds or overrides string fields (``created_at``/``encode_ms`` included);
    ``dtypes`` overrides a source's dtype name (numpy uint16 arrays holding BF16 bits).
    """
    validate_namespace(namespace)
    validate_hash(hash_hex)
    if isinstance(encode_ms, bool) or not isinstance(encode_ms, (int, float)) or not 0 <= encode_ms < math.inf:
        raise ValueError(f"{encode_ms=} must be a finite number >= 0")
    if "embeddings" not in tensors:
        raise ValueError("an entry needs an 'embeddings' tensor")
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"{len(tensors)} tensors exceed the limit of {MAX_TENSORS}")
    dtypes = dtypes or {}
    emb = _source("embeddings", tensors["embeddings"], dtypes.get("embeddings"))
    if len(emb.shape) != 2 or emb.dtype not in EMBEDDING_DTYPES or emb.shape[0] == 0:
        raise ValueError(f"embeddings must be 2-D {'/'.join(EMBEDDING_DTYPES)} with num_tokens >= 1, got {emb.dtype} {list(emb.shape)}")
    extras = [_source(n, t, dtypes.get(n)) for n, t in tensors.items() if n != "embeddings"]
    # NOTE: widest dtypes first keeps extras naturally aligned whenever the embeddings' byte
    # length is a multiple of 8 (any even hidden size in 16-bit, any hidden size in fp32).
    extras.sort(key=lambda s: (-DTYPES[s.dtype].itemsize, s.name))
    meta = {
        "format": FORMAT_VERSION,
        "namespace": namespace,
        "hash": hash_hex,
        "created_at": f"{time.time():.6f}",
        "encode_ms": f"{float(encode_ms):.3f}",
    }
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"metadata must map str to str, got {k!r}: {type(v).__name__}")
        if k in ("namespace", "hash", "checksum") and k in meta and v != meta.get(k):
            raise ValueError(f"metadata {k}={v!r} contradicts the key")
        if k != "checksum":
            meta[k] = v
    plan = EntryPlan([emb, *extras], meta)
    plan._layout()
    return plan


def relayout(buf: Any, namespace: str, hash_hex: str, metadata: Mapping[str, str] | None = None) -> EntryPlan:
    """Plan a canonical entry from a client's blob (incomplete metadata allowed).

    Metadata that contradicts ``namespace``/``hash`` raises ``BadHeader``; a checksum the
    client supplied is verified against its own data section (``ChecksumMismatch``). Tensor
    order is kept, so the data section (and its checksum) is unchanged. Sources are views over
    ``buf``: the caller keeps it alive until ``write_into`` returns.
    """
    parsed = parse_entry(buf, strict=False)
    meta = dict(parsed.metadata)
    for k, want in (("namespace", namespace), ("hash", hash_hex)):
        if k in meta and meta[k] != want:
            raise BadHeader(f"metadata {k}={meta[k]!r} contradicts the key's {want!r}")
    if "format" in meta and meta["format"] != FORMAT_VERSION:
        raise BadHeader(f"metadata format={meta['format']!r}, this server reads {FORMAT_VERSION!r}")
    if "checksum" in meta:
        verify_checksum(buf, parsed)
    for k in ("encode_ms", "created_at"):
        if k in meta:
            try:
                value = float(meta[k])
            except ValueError:
                raise BadHeader(f"metadata {k}={meta[k]!r} must be a number") from None
            if not math.isfinite(value) or value < 0:
                raise BadHeader(f"metadata {k}={meta[k]!r} must be a finite number >= 0")
    meta.update(metadata or {})
    meta.pop("checksum", None)
    infos = sorted(parsed.tensors.values(), key=lambda t: t.start)
    sources = [_Source(i.name, i.dtype, i.shape, view_array(buf, i)) for i in infos]
    plan = EntryPlan(sources, {"format": FORMAT_VERSION, "namespace": namespace, "hash": hash_hex,
                               "created_at": f"{time.time():.6f}", "encode_ms": "0.000", **meta})
    plan._layout()
    return plan

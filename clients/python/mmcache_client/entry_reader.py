"""Reading entries: validate an untrusted blob's header, verify its checksum, view its tensors in
place (see ``mmcache_client.format``)."""

from __future__ import annotations

import json
import math
import struct
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from mmcache_client.entry_spec import (DTYPES, EMBEDDING_DTYPES, FORMAT_VERSION, MAX_HEADER_BYTES, MAX_TENSORS,
                                       REQUIRED_METADATA, BadHeader, ChecksumMismatch, MissingMetadata, ParsedEntry,
                                       TensorInfo, TruncatedEntry, UnsupportedDtype, checksum)
from mmcache_client.keys import validate_hash, validate_namespace


if TYPE_CHECKING:
    import torch

_TORCH = None


def _torch():
    """torch, imported on first use: optional for the SDK, and ~1 s and ~200 MB to import, which
    a client that reads numpy views (``mmcache warm``, the CLI) never pays. None where absent."""
    global _TORCH
    if _TORCH is None:
        try:
            import torch
        except ImportError:  # pragma: no cover - exercised only where torch is absent
            return None
        _TORCH = torch
    return _TORCH


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
    torch = _torch()
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

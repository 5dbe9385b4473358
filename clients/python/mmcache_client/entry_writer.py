"""Writing entries: lay out the header first (``EntryPlan``), so that a two-phase writer can reserve
``total_bytes`` and fill the blob in place, checksum fused into the copy (see ``mmcache_client.format``)."""

from __future__ import annotations

import json
import math
import sys
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import xxhash

from mmcache_client.entry_reader import _parse_metadata, parse_entry, verify_checksum, view_array
from mmcache_client.entry_spec import (DATA_ALIGNMENT, DTYPES, EMBEDDING_DTYPES, FORMAT_VERSION, MAX_HEADER_BYTES,
                                       MAX_TENSORS, _NUMPY_TO_DTYPE, BadHeader, UnsupportedDtype)
from mmcache_client.keys import validate_hash, validate_namespace



def _torch_tensor(x: Any):
    """torch when ``x`` is a torch tensor, else None. A caller holding a tensor imported torch
    already, so the SDK never imports it to find out (it is optional, and heavy to import)."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and isinstance(x, torch.Tensor) else None


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
    torch = _torch_tensor(x)
    if torch is not None:
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
    torch = _torch_tensor(data)
    if torch is not None and data.device.type == "cpu" and data.is_contiguous():
        return data.detach().reshape(-1).view(torch.uint8).numpy()
    return None


def _copy_into(mv: memoryview, start: int, src: _Source) -> None:
    if src.nbytes == 0:
        return
    data = src.data
    torch = _torch_tensor(data)
    if torch is not None:
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

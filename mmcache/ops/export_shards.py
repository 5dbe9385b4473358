"""Reading an export's shards (``mmcache.ops.export_format``) as untrusted input, for ``mmcache
import``: each shard mapped and checked whole (size and BLAKE3 against the manifest's shard table,
its header bounded with offsets inside the file and tensors tiling the data, every entry against
its manifest row and its checksum) before anything of it may be imported. A failed check is a
``ShardRefused`` naming the shard file. The manifest side is ``mmcache.ops.export_reader``."""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

from mmcache.ops.export_format import MAX_SHARD_HEADER_BYTES, PAD_PREFIX, SHARD_ALIGNMENT, SHARD_FORMAT
from mmcache.ops.export_reader import is_count, open_regular

_JSON = {"separators": (",", ":")}


class ShardRefused(ValueError):
    """A shard failed a check; nothing of it may be imported. The message names the shard file."""


@dataclass(frozen=True)
class _Tensor:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


class CheckedShard:
    """A mapped shard whose every entry passed ``open_shard``'s checks; ``blob(row)`` builds the
    entry (a safetensors blob to ``put_blob``) from it. A context manager: unmaps on exit.

    NOTE: a file changed after its check shows through the map; ``put_blob`` verifies each
    entry's checksum again, so such an entry fails its put (``BadRequest``) rather than going in.
    """

    def __init__(self, path: str, mm: mmap.mmap, spans: dict[str, list[tuple[str, _Tensor]]]):
        self.path, self._mm, self._spans = path, mm, spans

    def blob(self, row: dict) -> bytearray:
        """The entry of ``row`` as the sidecar held it (its metadata, tensors in their order)."""
        return _entry_blob(self._mm, self._spans[row["key"]], row["metadata"])

    def close(self) -> None:
        self._mm.close()

    def __enter__(self) -> "CheckedShard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _entry_blob(mm: mmap.mmap, tensors: list[tuple[str, _Tensor]], metadata_json: str) -> bytearray:
    """A safetensors entry: ``metadata_json`` as ``__metadata__``, then ``tensors`` (short names)
    with their bytes from the shard, in their order (so the data section is the entry's)."""
    base, end = tensors[0][1].start, tensors[-1][1].end
    header: dict[str, Any] = {"__metadata__": json.loads(metadata_json)}
    for name, t in tensors:
        header[name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.start - base, t.end - base]}
    text = json.dumps(header, **_JSON).encode()
    text += b" " * (-(8 + len(text)) % 64)
    blob = bytearray(8 + len(text) + end - base)
    struct.pack_into("<Q", blob, 0, len(text))
    blob[8 : 8 + len(text)] = text
    blob[8 + len(text) :] = mm[base:end]
    return blob


def open_shard(in_dir: str, name: str, table_rec: dict | None, rows: list[dict]) -> CheckedShard:
    """Map shard ``name`` and check all of it against the manifest before anything is imported:
    its size and BLAKE3 (the shard table), its header (untrusted: bounded, offsets inside the
    file, tensors tiling the data), and every entry of ``rows``: key, tensors, dtype, shape, a
    valid entry whose bytes hash to its checksum. Any mismatch: ``ShardRefused`` naming the file."""
    import blake3

    path = os.path.join(in_dir, str(name))
    if table_rec is None:
        raise ShardRefused(f"{path}: refused: not in the manifest's shard table")
    if table_rec["entries"] != len(rows):
        raise ShardRefused(f"{path}: refused: the shard table says {table_rec['entries']} entries, "
                           f"the manifest has {len(rows)} rows for it")
    try:
        with open_regular(path, inside=in_dir) as f:
            size = os.fstat(f.fileno()).st_size
            if size != table_rec["bytes"]:
                raise ShardRefused(f"{path}: refused: {size} bytes, the manifest says {table_rec['bytes']}")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    except OSError as e:
        raise ShardRefused(f"{path}: refused: {e.strerror or e}") from None
    if mm is None:
        raise ShardRefused(f"{path}: refused: empty")
    try:
        digest = blake3.blake3(mm).hexdigest()
        if digest != table_rec["blake3"]:
            raise ShardRefused(f"{path}: refused: its BLAKE3 is {digest}, the manifest says {table_rec['blake3']} "
                               "(changed or damaged since the export)")
        tensors = _shard_tensors(path, mm)
        return CheckedShard(path, mm, _check_entries(path, mm, tensors, rows))
    except BaseException:
        mm.close()
        raise


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k[:200]!r}")
        out[k] = v
    return out


def _shard_tensors(path: str, mm: mmap.mmap) -> dict[str, _Tensor]:
    """The shard's header, validated as untrusted input: name → tensor (absolute offsets)."""
    from mmcache_client.format import DTYPES

    def refuse(why: str) -> ShardRefused:
        return ShardRefused(f"{path}: refused: header: {why}")

    size = len(mm)
    if size < 8:
        raise refuse(f"{size} bytes, shorter than the header length")
    (n,) = struct.unpack_from("<Q", mm, 0)
    if n > MAX_SHARD_HEADER_BYTES or 8 + n > size:
        raise refuse(f"length {n} is past the {MAX_SHARD_HEADER_BYTES}-byte limit or the {size}-byte file")
    try:
        header = json.loads(mm[8 : 8 + n].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:
        raise refuse(f"not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise refuse("not a JSON object")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or meta.get("format") != SHARD_FORMAT:
        raise refuse(f"__metadata__ format is not {SHARD_FORMAT!r}")
    data_start, tensors = 8 + n, {}
    for name, rec in header.items():
        ok = (isinstance(rec, dict) and set(rec) == {"dtype", "shape", "data_offsets"}
              and isinstance(rec["dtype"], str) and rec["dtype"] in DTYPES)
        shape, offsets = (rec.get("shape"), rec.get("data_offsets")) if ok else (None, None)
        ok = ok and isinstance(shape, list) and len(shape) <= 8 and all(is_count(d) for d in shape)
        ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(is_count(o) for o in offsets)
        if not ok or offsets[1] - offsets[0] != math.prod(shape) * DTYPES[rec["dtype"]].itemsize:
            raise refuse(f"tensor {name[:200]!r}: bad record {str(rec)[:200]}")
        tensors[name] = _Tensor(rec["dtype"], tuple(shape), data_start + offsets[0], data_start + offsets[1])
    at = data_start
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if t.start != at:
            raise refuse(f"tensor {name[:200]!r} starts at {t.start - data_start}, expected {at - data_start}")
        at = t.end
    if at != size:
        raise refuse(f"the tensors end at byte {at}, the file at {size}")
    return tensors


def _check_entries(path: str, mm: mmap.mmap, tensors: dict[str, _Tensor],
                   rows: list[dict]) -> dict[str, list[tuple[str, _Tensor]]]:
    """Every row's entry, checked in the shard: key → its tensors (short name, location)."""
    from mmcache_client import Key
    from mmcache_client.format import EntryFormatError, read_entry

    spans: dict[str, list[tuple[str, _Tensor]]] = {}
    for row in rows:
        key = row["key"]

        def refuse(why: str) -> ShardRefused:
            return ShardRefused(f"{path}: refused: entry {str(key)[:300]!r}: {why}")

        try:
            named = Key(row["namespace"], row["hash"], row["tenant"]).to_string()
        except (ValueError, TypeError) as e:
            raise refuse(f"bad key: {e}") from None
        if named != key:
            raise refuse("the key does not match its namespace, hash and tenant")
        if key in spans:
            raise refuse("listed twice")
        entry: list[tuple[str, _Tensor]] = []
        for name in row["tensors"] or []:
            short = name[len(key) + 1 :] if isinstance(name, str) and name.startswith(key + "/") else None
            t = tensors.pop(name, None) if short not in (None, "", "__metadata__") else None
            if t is None:  # NOTE: popped above: a tensor belongs to one entry
                raise refuse(f"tensor {str(name)[:300]!r} is not in the shard or not the entry's")
            if entry and entry[-1][1].end != t.start:
                raise refuse(f"tensor {name[:300]!r} does not follow the one before it")
            entry.append((short, t))
        emb = dict(entry).get("embeddings")
        if emb is None:
            raise refuse("no embeddings tensor")
        if (emb.dtype, list(emb.shape), emb.shape[:1]) != (row["dtype"], row["shape"], (row["num_tokens"],)):
            raise refuse(f"embeddings are {emb.dtype} {list(emb.shape)} in the shard, the manifest says "
                         f"{row['dtype']} {row['shape']} ({row['num_tokens']} tokens)")
        nbytes = entry[-1][1].end - entry[0][1].start
        if nbytes != row["nbytes"]:
            raise refuse(f"{nbytes} bytes in the shard, the manifest says {row['nbytes']}")
        spans[key] = entry
        try:  # a valid entry (what put_blob will take), its checksum the xxh3 of its bytes in the shard
            view = read_entry(_entry_blob(mm, entry, row["metadata"]), verify=True)
        except (EntryFormatError, ValueError, TypeError) as e:
            raise refuse(str(e)) from None
        meta = view.metadata
        if (meta["checksum"], meta["namespace"], meta["hash"]) != (row["checksum"], row["namespace"], row["hash"]):
            raise refuse("its metadata contradicts the manifest (checksum, namespace or hash)")
        if (float(meta["encode_ms"]), float(meta["created_at"])) != (row["encode_ms"], row["created_at"]):
            raise refuse("its metadata contradicts the manifest (encode_ms or created_at)")
    for name, t in tensors.items():  # what is left must be padding
        if not (name.startswith(PAD_PREFIX) and t.dtype == "U8" and len(t.shape) == 1
                and t.shape[0] < SHARD_ALIGNMENT):
            raise ShardRefused(f"{path}: refused: tensor {name[:300]!r} belongs to no entry of the manifest")
    return spans

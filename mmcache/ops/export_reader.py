"""Reading an export (``mmcache.ops.export_format``) as untrusted input, for ``mmcache import``: the
manifest checked (format, columns, shard table), surveyed whole before anything is imported
(``Manifest.survey``: every row names a shard file, a shard's rows lie together, no key twice,
each shard's row count as the table says and the total as the manifest says) and then read a
batch of rows at a time, at most a shard's table count of rows held; each shard mapped and
checked whole (size, BLAKE3, header, every entry against its row and its checksum) before
anything of it may be imported. A failed shard check is a ``ShardRefused`` naming the shard file;
a manifest that cannot be read as one (a row naming no shard file, a shard's rows apart) is a
``ValueError`` naming it and the row. Only regular files are opened (a FIFO, a device: refused,
never waited on)."""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from mmcache.ops.export_format import (EXPORT_FORMAT, MANIFEST, MANIFEST_KEY, MAX_SHARD_ENTRIES, MAX_SHARD_HEADER_BYTES,
                                   PAD_PREFIX, SHARD_ALIGNMENT, SHARD_FORMAT, SHARD_NAME, manifest_schema)

_JSON = {"separators": (",", ":")}


def open_regular(path: str, *, inside: str | None = None):
    """``path`` opened for reading as a binary file, if it is a regular file; ``OSError``
    otherwise (a FIFO or a device would block a read, or never end). Opened without blocking
    and checked on the open descriptor, so nothing swapped in between is read.

    ``inside``: ``path`` must be a file directly in that folder, and is opened relative to the
    folder's descriptor without following a link (``O_NOFOLLOW``): a shard or manifest that is
    a symbolic link (to a file outside the export, say) is refused before anything of its
    target, even its size, is looked at."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if inside is None:
        fd = os.open(path, flags)
    else:
        name = os.path.basename(path)
        if os.path.join(inside, name) != path or name in ("", ".", ".."):
            raise OSError(errno.EINVAL, "not a file directly in the export folder")
        dir_fd = os.open(inside, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW, dir_fd=dir_fd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise OSError(errno.ELOOP, "a symbolic link (not followed: only the export's own files are read)") from None
            raise
        finally:
            os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode)
                    or stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a folder"
                    if stat.S_ISDIR(st.st_mode) else "not a plain file")
            raise OSError(errno.EINVAL, f"not a regular file ({kind})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@dataclass
class Survey:
    """What ``Manifest.survey`` found: ``refused`` (shard name → why: a message naming the
    shard file), ``missing`` (shards of the table that no row names, with their table count),
    ``problems`` (the manifest's own counts that disagree) and ``chosen`` (the rows an import of
    the namespace takes)."""

    refused: dict[str, str] = field(default_factory=dict)
    missing: list[tuple[str, int]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    chosen: int = 0


class Manifest:
    """An opened, checked ``manifest.parquet``: ``info`` (its ``mmcache.export`` document),
    ``shards`` (name → shard table record) and its rows, read a batch at a time."""

    def __init__(self, path: str, parquet_file, info: dict, shards: dict[str, dict], in_dir: str = "", fileobj=None):
        self.path, self._file, self.info, self.shards = path, parquet_file, info, shards
        self.in_dir, self._fileobj = in_dir, fileobj

    def _batches(self, columns: list[str] | None = None) -> Iterator[list[dict]]:
        import pyarrow as pa

        try:
            for batch in self._file.iter_batches(batch_size=4096, columns=columns):
                yield batch.to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{self.path}: unreadable rows: {e}") from None

    def _shard_path(self, name: str) -> str:
        return os.path.join(self.in_dir, name)

    def survey(self, namespace: str | None = None) -> Survey:
        """One pass over the rows' keys and shards, before anything is imported: every row names
        a shard file (else ``ValueError`` naming the row), a shard's rows lie together (else
        ``ValueError``), and a shard is refused (``Survey.refused``) that holds a key an earlier
        row holds, is not in the shard table, or has another row count than the table's; shards
        of the table with no rows are ``missing``, and a total other than the manifest's
        ``entries`` is a problem. Memory: one set of the keys (bounded by the manifest)."""
        out = Survey()
        first: dict = {}  # key -> the shard it is first in
        counts: dict[str, int] = {}
        current: Any = _NO_SHARD
        index = 0
        for rows in self._batches(["key", "shard", "namespace", "tenant"]):
            for row in rows:
                name, key = row["shard"], row["key"]
                if name != current:
                    if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
                        raise ValueError(f"{self.path}: row {index} (key {str(key)[:300]!r}): shard "
                                         f"{str(name)[:200]!r} is not a shard file name (shard-NNNNN.safetensors); not a manifest that "
                                         "mmcache export wrote")
                    if name in counts:
                        raise ValueError(f"{self.path}: row {index}: the rows of {name!r} are not together; "
                                         "not a manifest that mmcache export wrote")
                    current = name
                    counts[name] = 0
                counts[name] += 1
                index += 1
                if namespace is None or (isinstance(row["namespace"], str) and scoped_namespace(row) == namespace):
                    out.chosen += 1
                earlier = first.get(key)
                if earlier is None:
                    first[key] = current  # NOTE: one name object per shard, not one per row
                elif name not in out.refused:
                    where = "twice in it" if earlier == name else f"in {earlier} already"
                    out.refused[name] = (f"{self._shard_path(name)}: refused: entry {str(key)[:300]!r} is "
                                         f"{where} (a key may be in the manifest once)")
        for name, n in counts.items():
            rec = self.shards.get(name)
            if name in out.refused:
                continue
            if rec is None:
                out.refused[name] = f"{self._shard_path(name)}: refused: not in the manifest's shard table"
            elif rec["entries"] > MAX_SHARD_ENTRIES:
                out.refused[name] = (f"{self._shard_path(name)}: refused: the shard table says {rec['entries']} "
                                     f"entries, more than a shard's header can hold ({MAX_SHARD_ENTRIES})")
            elif rec["entries"] != n:
                out.refused[name] = (f"{self._shard_path(name)}: refused: the shard table says {rec['entries']} "
                                     f"entries, the manifest has {n} rows for it")
        out.missing = [(name, rec["entries"]) for name, rec in self.shards.items()
                       if name not in counts and rec["entries"] > 0]
        if self.info["entries"] != index:
            out.problems.append(f"{self.path}: says {self.info['entries']} entries but has {index} rows "
                                "(rows added or removed since the export)")
        return out

    def rows_by_shard(self, refused: dict[str, str] | None = None, keep: Callable[[dict], bool] = lambda row: True
                      ) -> Iterator[tuple[str, list[dict] | None, int, str | None]]:
        """``(shard name, its rows, how many of them ``keep`` takes, why refused)``, shard after
        shard (rows of one shard lie together, as written). A shard already ``refused`` (by
        ``survey``), or whose rows pass its table count, comes with rows None and the reason: its
        rows are counted, never held, so memory stays bounded by one shard's table count whatever
        the manifest holds."""
        refused = refused or {}
        current: Any = _NO_SHARD
        rows: list[dict] | None = []
        kept, why, limit = 0, None, 0

        def start(name: Any) -> None:
            nonlocal current, rows, kept, why, limit
            current, kept = name, 0
            rec = self.shards.get(name) if isinstance(name, str) else None
            why = refused.get(name) if isinstance(name, str) else f"{self.path}: a row names shard {name!r}"
            if why is None and rec is None:
                why = f"{self._shard_path(name)}: refused: not in the manifest's shard table"
            limit = min(rec["entries"], MAX_SHARD_ENTRIES) if rec is not None else 0
            rows = None if why is not None else []

        for batch in self._batches():
            for row in batch:
                if row["shard"] != current:
                    if current is not _NO_SHARD:
                        yield current, rows, kept, why
                    start(row["shard"])
                kept += bool(keep(row))
                if rows is not None:
                    if len(rows) >= limit:  # NOTE: more rows than the table says: stop holding them
                        rows, why = None, (f"{self._shard_path(current)}: refused: the manifest has more rows for it "
                                           f"than the shard table's {limit} entries")
                    else:
                        rows.append(row)
        if current is not _NO_SHARD:
            yield current, rows, kept, why

    def close(self) -> None:
        self._file.close()
        if self._fileobj is not None:
            self._fileobj.close()

    def __enter__(self) -> "Manifest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_NO_SHARD = object()


def scoped_namespace(row: dict) -> str:
    """A row's namespace as ``--namespace`` names it: ``TENANT@NS`` for a tenant's entry."""
    return f"{row['tenant']}@{row['namespace']}" if row["tenant"] else row["namespace"]


def open_manifest(in_dir: str) -> Manifest:
    """The export's manifest, checked (format, columns, shard table, its entry count a count);
    ``ValueError`` naming it. Only a regular file is opened."""
    path = os.path.join(in_dir, MANIFEST)
    if not os.path.isdir(in_dir):
        raise ValueError(f"{in_dir}: no such folder")
    if not os.path.lexists(path):
        raise ValueError(f"{path}: missing: not an mmcache export, or an unfinished one (the manifest is written last)")
    try:
        f = open_regular(path, inside=in_dir)
    except OSError as e:
        raise ValueError(f"{path}: refused: {e.strerror or e}") from None
    try:
        return _checked_manifest(in_dir, path, f)
    except BaseException:
        f.close()
        raise


def _checked_manifest(in_dir: str, path: str, f) -> Manifest:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
        raw = (pf.metadata.metadata or {}).get(MANIFEST_KEY)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable Parquet manifest: {e}") from None
    if raw is None:
        raise ValueError(f"{path}: no {MANIFEST_KEY.decode()!r} metadata: not an mmcache export manifest")
    try:
        info = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{path}: its {MANIFEST_KEY.decode()!r} metadata is not JSON: {e}") from None
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT:
        fmt = info.get("format") if isinstance(info, dict) else None
        raise ValueError(f"{path}: format {fmt!r}; this mmcache reads {EXPORT_FORMAT!r}")
    want = manifest_schema()
    have = pf.schema_arrow
    for col in want:
        if have.get_field_index(col.name) < 0 or not have.field(col.name).type.equals(col.type):
            got = have.field(col.name).type if have.get_field_index(col.name) >= 0 else "missing"
            raise ValueError(f"{path}: column {col.name!r} is {got}, expected {col.type}")
    shards: dict[str, dict] = {}
    for rec in info.get("shards") if isinstance(info.get("shards"), list) else [None]:
        if (not isinstance(rec, dict) or not isinstance(rec.get("name"), str) or not SHARD_NAME.fullmatch(rec["name"])
                or not _is_count(rec.get("bytes")) or not _is_count(rec.get("entries"))
                or not isinstance(rec.get("blake3"), str) or not re.fullmatch(r"[0-9a-f]{64}", rec["blake3"])):
            raise ValueError(f"{path}: bad shard table record {str(rec)[:200]}")
        if rec["name"] in shards:
            raise ValueError(f"{path}: the shard table names {rec['name']!r} twice")
        shards[rec["name"]] = rec
    if not _is_count(info.get("entries")):
        raise ValueError(f"{path}: 'entries' is {str(info.get('entries'))[:100]!r}, not a count")
    return Manifest(path, pf, info, shards, in_dir, f)


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


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
        ok = ok and isinstance(shape, list) and len(shape) <= 8 and all(_is_count(d) for d in shape)
        ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
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

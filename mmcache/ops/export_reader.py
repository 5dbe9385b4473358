"""Reading an export (``mmcache.ops.export_format``) as untrusted input, for ``mmcache import``: the
manifest checked (format, columns, shard table), surveyed whole before anything is imported
(``Manifest.survey``: every row names a shard file, a shard's rows lie together, no key twice,
each shard's row count as the table says and the total as the manifest says) and then read a
batch of rows at a time, at most a shard's table count of rows held (the shards themselves:
``mmcache.ops.export_shards``). A manifest that cannot be read as one (a row naming no shard file, a shard's rows apart) is a
``ValueError`` naming it and the row. Only regular files are opened (a FIFO, a device: refused,
never waited on)."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from mmcache.ops.export_format import EXPORT_FORMAT, MANIFEST, MANIFEST_KEY, MAX_SHARD_ENTRIES, SHARD_NAME, manifest_schema


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
                or not is_count(rec.get("bytes")) or not is_count(rec.get("entries"))
                or not isinstance(rec.get("blake3"), str) or not re.fullmatch(r"[0-9a-f]{64}", rec["blake3"])):
            raise ValueError(f"{path}: bad shard table record {str(rec)[:200]}")
        if rec["name"] in shards:
            raise ValueError(f"{path}: the shard table names {rec['name']!r} twice")
        shards[rec["name"]] = rec
    if not is_count(info.get("entries")):
        raise ValueError(f"{path}: 'entries' is {str(info.get('entries'))[:100]!r}, not a count")
    return Manifest(path, pf, info, shards, in_dir, f)


def is_count(x: Any) -> bool:
    """A non-negative int (not a bool): what the manifest's counts and sizes must be."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0

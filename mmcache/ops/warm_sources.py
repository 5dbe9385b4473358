"""What ``mmcache warm`` reads: the images of a corpus as ``Item``s, and reading one.

Sources: a folder (walked recursively for image files, symlinked folders followed once each, an
unreadable folder named as a failure), a text file with one path, ``http(s)://`` URL or
``data:`` URI per line (``#`` comments; relative paths are relative to the list's folder), a
Parquet file with an image column (bytes, a path or URL string, or a ``{bytes, path}`` struct as
Hugging Face image datasets store them), or one image file. Each source is checked before the
run starts (a typo fails at once, not after an hour); a bad item fails alone, named.

A Parquet file is read one row group at a time (pyarrow decodes a row group's column whole), so
a file whose image column has a row group larger than the memory budget is refused up front,
with the size it would need: the budget bounds memory, not the writer's choice of row groups.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
"""What a folder source picks up (case-insensitive); other files are not images to warm."""
_PATH_COLUMNS = ("path", "file", "filename", "file_name", "image_path", "url", "image_url", "uri")


class WarmError(ValueError):
    """The run cannot start or go on (a bad source, no encoder, a dead encoder): names why."""


@dataclass
class Item:
    """One image of the corpus: ``name`` says where it came from (in failures), ``path``/``url``
    or ``data`` how to read it, ``error`` why it cannot be read (found while listing)."""

    name: str
    path: str | None = None
    url: str | None = None
    data: bytes | None = None
    error: str | None = None
    hash: str = ""
    reserved: int = 0
    """Bytes of the memory budget this item holds."""
    size: int = 0
    """Bytes read (0 until read)."""
    owner: bool = False
    """The first of this run's items with its hash (a later one with the same hash is a hit)."""


def is_url(text: str) -> bool:
    return text[:8].lower().startswith(("http://", "https://"))


def _is_data_uri(text: str) -> bool:
    return text[:5].lower() == "data:"


def decode_data_uri(text: str) -> bytes:
    """The bytes of a base64 ``data:`` URI; ValueError naming what is wrong."""
    header, sep, payload = text[5:].partition(",")
    if not sep or header.split(";")[-1].strip().lower() != "base64":
        raise ValueError("a data: URI must be base64 ('data:image/png;base64,...')")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as e:
        raise ValueError(f"a data: URI with invalid base64: {e}") from None


def read_file(path: str, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of the regular file ``path`` (the caller refuses more). A
    FIFO, device or socket is refused before it is read: it could block forever or never end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------- folders

def _walk(folder: Path) -> Iterator[Item]:
    """Image files under ``folder``, recursively, in a stable (sorted) order. Symlinked folders
    are followed, each real folder once (a link loop ends); an unreadable folder is an item that
    fails, named, rather than a silent gap."""
    seen: set[tuple[int, int]] = set()
    errors: list[OSError] = []

    def visit(root: str, dirs: list[str]) -> None:
        dirs.sort()
        kept = []
        for d in dirs:
            try:
                st = os.stat(os.path.join(root, d))
            except OSError as e:
                errors.append(e)
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                kept.append(d)
        dirs[:] = kept

    try:
        st = os.stat(folder)
        seen.add((st.st_dev, st.st_ino))
    except OSError:
        pass  # NOTE: os.walk below reports the folder's error through onerror
    for root, dirs, files in os.walk(folder, onerror=errors.append, followlinks=True):
        while errors:
            e = errors.pop(0)
            yield Item(os.path.relpath(e.filename or root, folder.parent), error=f"folder not read: {e.strerror or e}")
        visit(root, dirs)
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                path = os.path.join(root, name)
                yield Item(os.path.relpath(path, folder.parent), path=path)
    while errors:
        e = errors.pop(0)
        yield Item(os.path.relpath(e.filename or str(folder), folder.parent), error=f"folder not read: {e.strerror or e}")


# ------------------------------------------------------------------------------- lists

def _list_lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8-sig") as f:  # NOTE: -sig: a BOM on the first line is not part of a path
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                yield line


def _from_list(path: Path) -> Iterator[Item]:
    base = path.parent
    for k, line in enumerate(_list_lines(path), 1):
        where = f"{path.name}:{k}"
        if is_url(line):
            yield Item(line, url=line)
        elif _is_data_uri(line):
            try:
                yield Item(f"{where}: data: URI", data=decode_data_uri(line))
            except ValueError as e:
                yield Item(f"{where}: data: URI", error=str(e))
        elif line[:7].lower() == "file://":
            yield Item(line, path=line[7:])
        elif "://" in line:
            yield Item(f"{where}: {line[:200]}", error="unsupported URL scheme (paths, file://, http(s):// and "
                                                       "data: only)")
        else:
            yield Item(line[:500], path=str(base / line))


# ------------------------------------------------------------------------------- Parquet

def _parquet_column(schema, column: str | None) -> tuple[str, str]:
    """``(name, kind)`` of the image column: ``bytes``, ``text`` (paths or URLs) or ``struct``
    (``{bytes, path}``). Named by ``column``, else found: the first binary column, else a
    ``{bytes, path}`` struct, else a string column with a path-like name."""
    import pyarrow as pa

    def binary(typ) -> bool:
        return pa.types.is_binary(typ) or pa.types.is_large_binary(typ) or pa.types.is_fixed_size_binary(typ)

    def text(typ) -> bool:
        return pa.types.is_string(typ) or pa.types.is_large_string(typ)

    def kind_of(typ) -> str | None:
        if binary(typ):
            return "bytes"
        if text(typ):
            return "text"
        if pa.types.is_struct(typ):
            fields = {typ.field(i).name: typ.field(i).type for i in range(typ.num_fields)}
            if ("bytes" in fields or "path" in fields) and (
                    "bytes" not in fields or binary(fields["bytes"])) and ("path" not in fields or text(fields["path"])):
                return "struct"
        return None

    fields = {f.name: f.type for f in schema}
    if column is not None:
        if column not in fields:
            raise WarmError(f"the Parquet file has no column {column!r} (it has {', '.join(fields) or 'none'})")
        kind = kind_of(fields[column])
        if kind is None:
            raise WarmError(f"column {column!r} is {fields[column]}: expected image bytes (binary), a path/URL "
                            "string, or a struct of bytes: binary and path: string")
        return column, kind
    for wanted in ("bytes", "struct"):
        for name, typ in fields.items():
            if kind_of(typ) == wanted:
                return name, wanted
    for name, typ in fields.items():
        if kind_of(typ) == "text" and name.lower() in _PATH_COLUMNS:
            return name, "text"
    raise WarmError(f"no image column found among {', '.join(fields) or 'none'}: name one with --column "
                    "(binary image bytes, a path/URL string, or a struct of bytes: binary and path: string)")


def _check_row_groups(path: Path, pf, name: str, memory_bytes: int) -> None:
    """Refuse a file whose image column has a row group larger than the memory budget."""
    meta = pf.metadata
    index = pf.schema_arrow.get_field_index(name)
    columns = [i for i in range(meta.num_columns) if meta.schema.column(i).path.split(".")[0] == name] or [index]
    largest = max((sum(meta.row_group(g).column(c).total_uncompressed_size for c in columns)
                   for g in range(meta.num_row_groups)), default=0)
    if largest > memory_bytes:
        raise WarmError(
            f"{path}: a row group of column {name!r} holds {largest / 2**20:.0f} MiB, and pyarrow reads a row group "
            f"whole: more than --memory={memory_bytes / 2**20:.0f} MiB. Pass --memory {largest / 2**20 + 1:.0f}MiB or "
            "more (reading a row group takes a few times its size), or rewrite the file with smaller row groups "
            "(pyarrow.parquet.write_table(..., row_group_size=N))")


def _from_parquet(path: Path, column: str | None, rows_per_batch: int) -> Iterator[Item]:
    """Rows of the image column, ``rows_per_batch`` at a time, one row group after another
    (a buffered read, no pre-buffering): a file larger than memory is never held whole."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
    name, kind = _parquet_column(pf.schema_arrow, column)
    row = 0
    # NOTE: row group by row group, not iter_batches: that reads ahead across row groups (its
    # peak grew with the file: +98 MB over a 74 MB file of 3 MB row groups; this: +27 MB)
    for group in range(pf.num_row_groups):
        table = pf.read_row_group(group, columns=[name], use_threads=False)
        for start in range(0, table.num_rows, rows_per_batch):
            yield from _rows(table.slice(start, rows_per_batch).column(0).to_pylist(), path, kind, row)
            row += min(rows_per_batch, table.num_rows - start)
        del table


def _rows(values: list, path: Path, kind: str, row: int) -> Iterator[Item]:
    base = path.parent
    for value in values:
        where = f"{path.name}[row {row}]"
        row += 1
        if kind == "struct" and isinstance(value, dict):
            data, ref = value.get("bytes"), value.get("path")
            if data is not None:
                yield Item(f"{where} {ref}" if ref else where, data=bytes(data))
                continue
            value = ref
        if value is None:
            yield Item(where, error="no image in this row")
        elif isinstance(value, (bytes, bytearray)):
            yield Item(where, data=bytes(value))
        elif is_url(value):
            yield Item(f"{where} {value[:200]}", url=value)
        elif _is_data_uri(value):
            try:
                yield Item(f"{where} data: URI", data=decode_data_uri(value))
            except ValueError as e:
                yield Item(f"{where} data: URI", error=str(e))
        else:
            yield Item(f"{where} {value[:200]}", path=str(base / value.removeprefix("file://")))


# ------------------------------------------------------------------------------- all

def open_sources(sources: list[str], column: str | None = None, rows_per_batch: int = 16,
                 memory_bytes: int | None = None) -> tuple[Iterator[Item], int]:
    """The items of every source in order, and how many there are (a folder's unreadable
    subfolders are counted as they are met)."""
    import pyarrow.parquet as pq

    plans: list[tuple[Path, str]] = []
    total = 0
    for text in sources:
        path = Path(text).expanduser()
        if path.is_dir():
            plans.append((path, "folder"))
            total += sum(1 for item in _walk(path) if item.error is None)
        elif not path.exists():
            raise WarmError(f"source {text!r} is neither a folder nor a file")
        elif not path.is_file():
            raise WarmError(f"source {text!r} is not a regular file (a FIFO, a device?)")
        elif path.suffix.lower() == ".parquet":
            try:
                pf = pq.ParquetFile(path)
                name, _ = _parquet_column(pf.schema_arrow, column)
                if memory_bytes is not None:
                    _check_row_groups(path, pf, name, memory_bytes)
            except WarmError:
                raise
            except Exception as e:  # pyarrow's own errors: not Parquet, truncated
                raise WarmError(f"source {text!r} is not a readable Parquet file: {e}") from None
            plans.append((path, "parquet"))
            total += pf.metadata.num_rows
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            plans.append((path, "image"))
            total += 1
        else:
            try:
                total += sum(1 for _ in _list_lines(path))
            except (UnicodeDecodeError, ValueError):
                raise WarmError(f"source {text!r} is not a folder, an image, a Parquet file or a text list of "
                                "paths/URLs") from None
            plans.append((path, "list"))

    def items() -> Iterator[Item]:
        for path, kind in plans:
            if kind == "folder":
                yield from _walk(path)
            elif kind == "parquet":
                yield from _from_parquet(path, column, rows_per_batch)
            elif kind == "image":
                yield Item(str(path), path=str(path))
            else:
                yield from _from_list(path)
    return items(), total

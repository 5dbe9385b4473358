"""The export format of ``mmcache export`` / ``mmcache import`` (``mmcache.ops.portable``), and writing
it; ``mmcache.ops.export_reader`` reads and checks one.

A folder, readable by plain ``safetensors`` and ``pyarrow``:

- ``shard-00000.safetensors``, ...: valid safetensors files of at most the shard size (an entry
  larger than that gets a shard of its own), ``__metadata__`` ``{"format": SHARD_FORMAT}``. Entry
  ``KEY``'s tensors are ``KEY/embeddings``, ``KEY/image_grid_thw``, ..., contiguous and in their
  original order, so the xxh3-64 of the entry's bytes in the shard is its ``checksum``. Each entry
  starts ``SHARD_ALIGNMENT``-aligned (``numpy.frombuffer`` views work); the gap before it is a
  ``__pad__/N`` uint8 tensor, as safetensors wants the tensors to tile the data section.
- ``manifest.parquet``: one row per entry (``manifest_schema``), the entry's whole ``__metadata__``
  included as JSON so that an import gives back the very entry; file key-value metadata
  ``mmcache.export``: ``{"format": EXPORT_FORMAT, "created_at", "source", "namespace", "entries",
  "shards": [{"name", "bytes", "blake3", "entries"}]}``. Written last (temp + rename): a folder
  without it is an incomplete export.

Every file is created 0600 (``create_private``), whatever the folder's mode: whoever reads an
export reads every embedding in it. Shards are written in bounded memory: tensor bytes stream to a
temp data file and only the header is kept; ``close`` writes header + data into the shard (hashing
it) and renames it in place. Readers map shards (``mmap``), never read them whole. Heavy modules
load inside functions.
"""

from __future__ import annotations

import json
import os
import re
import struct

EXPORT_FORMAT = "mmcache-export/1"
SHARD_FORMAT = "mmcache-export-shard/1"
MANIFEST = "manifest.parquet"
MANIFEST_KEY = b"mmcache.export"
DEFAULT_SHARD_SIZE = "1GiB"
DEFAULT_SHARD_SIZE_BYTES = 1 << 30
SHARD_ALIGNMENT = 8
MAX_SHARD_HEADER_BYTES = 16 << 20
"""A shard closes before its header passes this (~80k tensors); a reader refuses a larger one.
safetensors itself refuses headers over 100 MB."""
MAX_SHARD_ENTRIES = MAX_SHARD_HEADER_BYTES // 100
"""Each entry takes over 100 bytes of its shard's header (its key is over 64 characters), so a
shard holds fewer entries than this; a reader refuses a shard table record that says more."""
PAD_PREFIX = "__pad__/"
SHARD_NAME = re.compile(r"shard-[0-9]{5,9}\.safetensors")
_COPY_CHUNK_BYTES = 4 << 20
_JSON = {"separators": (",", ":")}


def create_private(path: str, mode: str = "wb"):
    """A new file, mode 0600 whatever the folder's mode or the umask lets through (whoever reads
    an export reads every embedding in it); never an existing file or a link followed."""
    flags = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_RDWR if "+" in mode else os.O_WRONLY)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


def manifest_schema():
    import pyarrow as pa

    return pa.schema([
        ("key", pa.string()), ("namespace", pa.string()), ("hash", pa.string()), ("tenant", pa.string()),
        ("num_tokens", pa.int64()), ("dtype", pa.string()), ("shape", pa.list_(pa.int64())),
        ("checksum", pa.string()), ("encode_ms", pa.float64()), ("created_at", pa.float64()),
        ("nbytes", pa.int64()), ("shard", pa.string()), ("tensors", pa.list_(pa.string())),
        ("metadata", pa.string()),
    ])


# ------------------------------------------------------------------------------------ writing

class ShardWriter:
    """One shard being filled: bytes stream to ``NAME.data.tmp``, the header stays in memory as
    records (their encoded length tracked exactly, so the shard's size is known before each add)."""

    def __init__(self, out_dir: str, name: str):
        self.name, self.path = name, os.path.join(out_dir, name)
        self._data = create_private(self.path + ".data.tmp", "w+b")
        self._records: dict[str, dict] = {}
        self._header_chars = len(json.dumps({"__metadata__": {"format": SHARD_FORMAT}}, **_JSON))
        self.data_bytes = 0
        self.entries = 0
        self._pads = 0

    def _plan(self, key: str, view) -> tuple[dict[str, dict], int]:
        """The records ``view`` would add (a pad first if needed) and their encoded length."""
        records: dict[str, dict] = {}
        at = self.data_bytes
        pad = -at % SHARD_ALIGNMENT
        if pad:
            records[f"{PAD_PREFIX}{self._pads}"] = {"dtype": "U8", "shape": [pad], "data_offsets": [at, at + pad]}
            at += pad
        for info in sorted(view.parsed.tensors.values(), key=lambda t: t.start):
            n = info.end - info.start
            records[f"{key}/{info.name}"] = {"dtype": info.dtype, "shape": list(info.shape),
                                             "data_offsets": [at, at + n]}
            at += n
        chars = sum(len(json.dumps(name)) + len(json.dumps(rec, **_JSON)) + 2 for name, rec in records.items())
        return records, chars

    def size_with(self, key: str, view) -> tuple[int, int]:
        """(file bytes, header bytes) this shard would have with ``view`` added."""
        records, chars = self._plan(key, view)
        last = list(records.values())[-1]["data_offsets"][1]
        header = self._header_chars + chars
        return 8 + header + SHARD_ALIGNMENT - 1 + last, header

    def add(self, key: str, view) -> list[str]:
        """Append ``view``'s data section (whole: its tensors in offset order); its tensor names."""
        records, chars = self._plan(key, view)
        names = [name for name in records if not name.startswith(PAD_PREFIX)]
        if len(names) < len(records):
            self._pads += 1
            self._data.write(bytes(-self.data_bytes % SHARD_ALIGNMENT))
        parsed = view.parsed
        self._data.write(memoryview(view.buffer).cast("B")[parsed.data_start : parsed.total_bytes])
        self._records.update(records)
        self._header_chars += chars
        self.data_bytes = list(records.values())[-1]["data_offsets"][1]
        self.entries += 1
        return names

    def close(self) -> dict:
        """Write the shard (header + data, hashed on the way) and rename it in place."""
        import blake3

        header = json.dumps({"__metadata__": {"format": SHARD_FORMAT}, **self._records}, **_JSON).encode()
        header += b" " * (-(8 + len(header)) % SHARD_ALIGNMENT)
        hasher = blake3.blake3()
        tmp = self.path + ".tmp"
        with create_private(tmp) as f:
            for part in (struct.pack("<Q", len(header)), header):
                f.write(part)
                hasher.update(part)
            self._data.seek(0)
            chunk = bytearray(_COPY_CHUNK_BYTES)
            while n := self._data.readinto(chunk):
                part = memoryview(chunk)[:n]
                hasher.update(part)
                f.write(part)
            size = f.tell()
            f.flush()
            os.fsync(f.fileno())  # NOTE: before the manifest names it: a finished export is whole on disk
        os.replace(tmp, self.path)
        self.discard()
        return {"name": self.name, "bytes": size, "blake3": hasher.hexdigest(), "entries": self.entries}

    def discard(self) -> None:
        """Remove the temp files (after ``close``, or on a failed export)."""
        self._data.close()
        for path in (self.path + ".data.tmp", self.path + ".tmp"):
            if os.path.exists(path):
                os.unlink(path)


class ShardSet:
    """The shards of one export, filled in turn: ``add`` closes the current one when the entry
    would take it past ``limit_bytes`` (an entry larger than that gets a shard of its own)."""

    def __init__(self, out_dir: str, limit_bytes: int):
        self.out_dir, self.limit_bytes = out_dir, limit_bytes
        self.current: ShardWriter | None = None
        self.table: list[dict] = []

    def add(self, key: str, view) -> tuple[str, list[str]]:
        if self.current is not None:
            size, header = self.current.size_with(key, view)
            if size > self.limit_bytes or header > MAX_SHARD_HEADER_BYTES:
                self.table.append(self.current.close())
                self.current = None
        if self.current is None:
            self.current = ShardWriter(self.out_dir, f"shard-{len(self.table):05d}.safetensors")
        return self.current.name, self.current.add(key, view)

    def close(self) -> list[dict]:
        if self.current is not None:
            self.table.append(self.current.close())
            self.current = None
        return self.table

    def discard(self) -> None:
        """Remove every shard written so far (a failed export leaves its folder as it found it)."""
        if self.current is not None:
            self.current.discard()
            self.current = None
        for rec in self.table:
            path = os.path.join(self.out_dir, rec["name"])
            if os.path.exists(path):
                os.unlink(path)


def check_listed(key: str, view) -> None:
    """``CorruptEntry`` unless the entry ``view`` names the key it was listed as (checked before
    it is added to a shard)."""
    from mmcache_client import CorruptEntry, Key

    k, meta = Key.from_string(key), view.metadata
    if meta["namespace"] != k.namespace or meta["hash"] != k.hash:
        raise CorruptEntry(f"{key}: its metadata names {meta['namespace']}/{meta['hash']}")


def entry_row(key: str, view, shard: str, names: list[str]) -> dict:
    """The manifest row of the entry ``view`` (listed as ``key``, ``check_listed``) written into ``shard``."""
    from mmcache_client import Key

    k, meta = Key.from_string(key), view.metadata
    emb = view.parsed.tensors["embeddings"]
    return {"key": key, "namespace": k.namespace, "hash": k.hash, "tenant": k.tenant, "num_tokens": emb.shape[0],
            "dtype": emb.dtype, "shape": list(emb.shape), "checksum": meta["checksum"],
            "encode_ms": float(meta["encode_ms"]), "created_at": float(meta["created_at"]),
            "nbytes": view.parsed.total_bytes - view.parsed.data_start, "shard": shard, "tensors": names,
            "metadata": json.dumps(meta, **_JSON)}


class ManifestWriter:
    """``manifest.parquet`` written as rows come (``ROWS_PER_GROUP`` at a time) to a temp file;
    ``close`` adds the ``mmcache.export`` metadata and renames it in place."""

    ROWS_PER_GROUP = 4096

    def __init__(self, out_dir: str):
        import pyarrow.parquet as pq

        self.path = os.path.join(out_dir, MANIFEST)
        self._tmp = self.path + ".tmp"
        self._schema = manifest_schema()
        self._file = create_private(self._tmp)
        try:
            self._writer = pq.ParquetWriter(self._file, self._schema)
        except BaseException:
            self._file.close()
            os.unlink(self._tmp)
            raise
        self._rows: list[dict] = []

    def add(self, row: dict) -> None:
        self._rows.append(row)
        if len(self._rows) >= self.ROWS_PER_GROUP:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self._schema))
            self._rows = []

    def close(self, info: dict) -> None:
        self._flush()
        self._writer.add_key_value_metadata({MANIFEST_KEY.decode(): json.dumps({"format": EXPORT_FORMAT, **info})})
        self._writer.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)

    def discard(self) -> None:
        self._writer.close()
        self._file.close()
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)

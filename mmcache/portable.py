"""``mmcache export`` / ``mmcache import`` (issue 23): a sidecar's entries to a folder and back.

An export folder (``mmcache.export_format`` describes and writes it, ``mmcache.export_reader``
checks it; plain ``safetensors`` and ``pyarrow`` read it)::

    shard-00000.safetensors, ...   the entries' tensors, each shard at most --shard-size
    manifest.parquet               one row per entry, and the shard table; written last

``export`` walks the sidecar's listing page by page and fetches in batches bounded in bytes, so
its memory stays bounded by one batch and one shard's header whatever the cache holds; an entry
listed and then gone (evicted, deleted) is counted, not an error; an export that fails removes
what it wrote (the folder was new or empty). ``import`` checks each shard
whole before putting any of it (``open_shard``), skips the keys the target holds, waits out a
full cache (``CacheFull``: the sidecar's pressure is an answer, never a failure) and gives back
each entry bit for bit: the same tensor bytes, dtypes, shapes and metadata (checksum,
``created_at``, ``encode_ms``, any other key). A refused shard is named and skipped; the import
goes on with the others and exits 1.

Light at import: ``mmcache.cli`` imports this module for every command; numpy, pyarrow and the
SDK load when a command runs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from typing import Any, Iterator

from mmcache.export_format import (DEFAULT_SHARD_SIZE, DEFAULT_SHARD_SIZE_BYTES, MANIFEST, ManifestWriter, ShardSet,
                                   entry_row)
from mmcache.export_reader import ShardRefused, open_manifest, open_shard, scoped_namespace
from mmcache.serving.progress import Progress
from mmcache.serving.security import resolve_secret
from mmcache.serving.sizes import parse_size

FETCH_BATCH_BYTES = 64 << 20
"""An export fetches entries (``get_many``) in batches of about this many bytes (by the listing's
sizes), so memory stays bounded whatever the cache holds; an entry larger than this is a batch."""
FETCH_BATCH_KEYS = 512
LOOKUP_BATCH_KEYS = 1000
"""An import asks which keys the target holds this many at a time (a sidecar takes 4096 a message)."""


# ------------------------------------------------------------------------------------ export

def export_entries(client, out_dir: str, *, namespace: str | None = None,
                   shard_size_bytes: int = DEFAULT_SHARD_SIZE_BYTES, progress: Progress | None = None) -> dict:
    """Write what ``client`` may see (of ``namespace``: ``NS``, or ``TENANT@NS`` for the default
    tenant) into ``out_dir`` (new or empty); returns the summary (entries, bytes, shards, gone)."""
    from mmcache_client import CorruptEntry
    from mmcache_client.format import EntryFormatError, read_entry

    if shard_size_bytes <= 0:
        raise ValueError(f"{shard_size_bytes=} must be > 0")
    listed_ns, prefix = _listing_scope(namespace)
    created = _prepare_out(out_dir)
    progress = progress or _silent("export")
    shards = ShardSet(out_dir, shard_size_bytes)
    manifest = ManifestWriter(out_dir)
    entries = nbytes = gone = 0
    try:
        for batch in _listed_batches(client, listed_ns, prefix):
            with client.get_many([item["key"] for item in batch]) as found:
                for item, entry in zip(batch, found):
                    if entry is None:  # listed, then evicted or deleted
                        gone += 1
                        progress.update(1, gone=1)
                        continue
                    try:  # NOTE: over HTTP the SDK verified it already; arena views are checked here
                        view = read_entry(entry.buffer, verify=True)
                    except EntryFormatError as e:
                        raise CorruptEntry(f"{item['key']}: {e}") from e
                    shard, names = shards.add(item["key"], view)
                    row = entry_row(item["key"], view, shard, names)
                    manifest.add(row)
                    entries += 1
                    nbytes += row["nbytes"]
                    progress.update(1, nbytes=row["nbytes"])
        table = shards.close()
        manifest.close({"created_at": time.time(), "source": client.url, "namespace": namespace,
                        "entries": entries, "shards": table})
    except BaseException:
        shards.discard()
        manifest.discard()
        if created:
            os.rmdir(out_dir)
        raise
    return {"entries": entries, "bytes": nbytes, "shards": len(table), "gone": gone, "out": out_dir}


def _listing_scope(namespace: str | None) -> tuple[str | None, str | None]:
    """What to list and which key prefix to keep: ``TENANT@NS`` has no listing of its own for the
    default tenant's client, so every key is listed and that tenant's namespace kept."""
    from mmcache_client.keys import validate_namespace, validate_tenant

    if namespace is None:
        return None, None
    tenant, at, plain = namespace.partition("@")
    if not at:
        return validate_namespace(namespace), None
    return None, f"{validate_tenant(tenant)}@{validate_namespace(plain)}/"


def _listed_batches(client, namespace: str | None, prefix: str | None) -> Iterator[list[dict]]:
    batch: list[dict] = []
    nbytes = 0
    for item in client.iter_entries(namespace):
        if prefix is not None and not item["key"].startswith(prefix):
            continue
        batch.append(item)
        nbytes += item["nbytes"]
        if nbytes >= FETCH_BATCH_BYTES or len(batch) >= FETCH_BATCH_KEYS:
            yield batch
            batch, nbytes = [], 0
    if batch:
        yield batch


def _prepare_out(out_dir: str) -> bool:
    """Check that ``out_dir`` is empty, or create it (True)."""
    if os.path.lexists(out_dir):
        if not os.path.isdir(out_dir):
            raise ValueError(f"{out_dir} exists and is not a folder")
        if os.listdir(out_dir):
            raise ValueError(f"{out_dir} is not empty: an export goes into a new or an empty folder")
        return False
    # NOTE: 0700 like the sidecar's data dir: whoever reads the shards reads every embedding.
    os.makedirs(out_dir, mode=0o700)
    return True


# ------------------------------------------------------------------------------------ import

def import_export(in_dir: str, client, *, namespace: str | None = None, durable: bool = False,
                  progress: Progress | None = None) -> dict:
    """Put the entries of the export in ``in_dir`` (of ``namespace`` only: ``NS`` or
    ``TENANT@NS``) through ``client``; returns the summary. Shards that fail their checks are
    refused whole and named in ``refused_shards``; keys the target holds are skipped."""
    if namespace is not None:
        _listing_scope(namespace)  # validates it
    progress = progress or _silent("import")
    summary: dict[str, Any] = {"imported": 0, "skipped": 0, "refused": 0, "failed": 0, "bytes": 0,
                               "refused_shards": [], "dir": in_dir}
    with open_manifest(in_dir) as manifest:
        progress.set_total(manifest.count(namespace))
        for shard_name, rows in manifest.rows_by_shard():
            chosen = [r for r in rows if namespace is None or scoped_namespace(r) == namespace]
            if not chosen:
                continue
            try:
                shard = open_shard(in_dir, shard_name, manifest.shards.get(shard_name), rows)
            except ShardRefused as e:
                summary["refused"] += len(chosen)
                summary["refused_shards"].append(shard_name)
                progress.note(str(e))
                progress.update(len(chosen), refused=len(chosen))
                continue
            with shard:
                _put_shard(client, shard, chosen, durable, progress, summary)
    return summary


def _put_shard(client, shard, rows: list[dict], durable: bool, progress: Progress, summary: dict) -> None:
    from mmcache_client import EntryTooLarge

    for i in range(0, len(rows), LOOKUP_BATCH_KEYS):
        part = rows[i : i + LOOKUP_BATCH_KEYS]
        held = client.lookup([row["key"] for row in part])
        for row in part:
            if held.get(row["key"]) is not None:
                summary["skipped"] += 1
                progress.update(1, skipped=1)
                continue
            try:
                created = _put_patiently(client, scoped_namespace(row), row["hash"], shard.blob(row), durable)
            except EntryTooLarge as e:  # the target's --max-entry-size is smaller than the source's
                summary["failed"] += 1
                progress.note(f"{row['key']}: not imported: {e}")
                progress.update(1, failed=1)
                continue
            kind = "imported" if created else "skipped"  # NOTE: False: someone put it since the lookup
            summary[kind] += 1
            summary["bytes"] += row["nbytes"] if created else 0
            progress.update(1, nbytes=row["nbytes"] if created else 0, **{kind: 1})


def _put_patiently(client, namespace: str, hash_hex: str, blob, durable: bool) -> bool:
    """``put_blob``, waiting out ``CacheFull`` (everything leased or being written) for as long as
    it lasts: the sidecar's pressure is an answer to wait on, never a failure (DESIGN "Tiers")."""
    from mmcache_client import CacheFull

    while True:
        try:
            return client.put_blob(namespace, hash_hex, blob, durable=durable)
        except CacheFull as e:
            time.sleep(min(max(e.retry_after_s, 0.01), 30.0))


# ------------------------------------------------------------------------------------ CLI

def _silent(what: str) -> Progress:
    return Progress(what, stream=io.StringIO(), bar=False)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token", help="the sidecar's bearer token (or MMCACHE_TOKEN, or --token-file)")
    parser.add_argument("--token-file", metavar="PATH", help="read the bearer token from this file")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar: a plain progress line every 10 s and one at the end")


def configure_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="the sidecar: unix:///path.sock or http://host:port")
    parser.add_argument("out", help="a new or empty folder for the shards and manifest.parquet")
    parser.add_argument("--namespace", metavar="NS",
                        help="only this namespace (TENANT@NS: a tenant's, for the sidecar's own token)")
    parser.add_argument("--shard-size", default=DEFAULT_SHARD_SIZE, metavar="SIZE",
                        help="largest shard, e.g. 256MiB (an entry larger than that gets a shard of its own)")
    _common(parser)
    parser.set_defaults(fn=_export_cmd)


def configure_import(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help=f"an export folder (shards + {MANIFEST})")
    parser.add_argument("url", help="the sidecar: unix:///path.sock or http://host:port")
    parser.add_argument("--namespace", metavar="NS", help="only this namespace's entries (TENANT@NS: a tenant's)")
    parser.add_argument("--durable", action="store_true", help="each put answers once the entry is on disk")
    _common(parser)
    parser.set_defaults(fn=_import_cmd)


def _client(args: argparse.Namespace):
    from mmcache_client import CacheClient

    return CacheClient(args.url, token=resolve_secret(args.token, args.token_file, "MMCACHE_TOKEN", "token"))


def _export_cmd(args: argparse.Namespace) -> int:
    shard_size = parse_size(args.shard_size)
    with _client(args) as client, Progress("export", unit="entries", counters=("gone",), quiet=args.quiet) as p:
        summary = export_entries(client, args.out, namespace=args.namespace, shard_size_bytes=shard_size, progress=p)
    print(json.dumps(summary))
    return 0


def _import_cmd(args: argparse.Namespace) -> int:
    with _client(args) as client, Progress("import", unit="entries", counters=("imported", "skipped", "refused"),
                                           quiet=args.quiet) as p:
        summary = import_export(args.dir, client, namespace=args.namespace, durable=args.durable, progress=p)
    print(json.dumps(summary))
    if summary["refused_shards"]:
        print(f"mmcache import: refused {len(summary['refused_shards'])} shard(s), nothing of them imported: "
              f"{', '.join(summary['refused_shards'])}", file=sys.stderr)
    return 1 if summary["refused"] or summary["failed"] else 0

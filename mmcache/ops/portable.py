"""``mmcache export`` / ``mmcache import``: a sidecar's entries to a folder and back.

An export folder (``mmcache.ops.export_format`` describes and writes it, ``mmcache.ops.export_reader``
checks it; plain ``safetensors`` and ``pyarrow`` read it)::

    shard-00000.safetensors, ...   the entries' tensors, each shard at most --shard-size
    manifest.parquet               one row per entry, and the shard table; written last

``export`` walks the sidecar's listing page by page and fetches in batches bounded in bytes, so
its memory stays bounded by one batch and one shard's header whatever the cache holds. Over HTTP
it fetches without promoting (``get_many(promote=False)``): the scan reads disk entries in place
and leaves host's hot set as it was (a Unix socket's lease has no such flag yet, and promotes).
An entry listed and then gone (evicted, deleted) is counted, not an error; a corrupt entry is
left out, counted (``corrupt``) and named, and the export exits 1 with the rest written; any
other failure removes what the export wrote (the folder was new or empty). Its files are 0600; a
new folder is 0700, an existing empty one keeps its mode. ``TENANT@NS`` is for the sidecar's own
token: a tenant's token naming one is told so.

``import`` surveys the manifest whole before putting anything (each row names a shard, a key
once, each shard's row count and the total as the manifest says), checks each shard whole before
putting any of it (``open_shard``; only regular files are opened), skips the keys the target
holds, waits out a full cache (``CacheFull``: the sidecar's pressure is an answer, never a
failure) and gives back each entry bit for bit: the same tensor bytes, dtypes, shapes and
metadata (checksum, ``created_at``, ``encode_ms``, any other key). A refused shard is named and
skipped; an entry the target refuses (too large; not the token's to put, such as another
tenant's rows for a tenant's token) fails alone, named; the import goes on with the others and
exits 1. A manifest that cannot be read as one (a row naming no shard file) is refused whole,
before anything is imported (exit 2).

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

from mmcache.ops.export_format import (DEFAULT_SHARD_SIZE, DEFAULT_SHARD_SIZE_BYTES, MANIFEST, ManifestWriter, ShardSet,
                                   check_listed, entry_row)
from mmcache.ops.export_reader import open_manifest, scoped_namespace
from mmcache.ops.export_shards import ShardRefused, open_shard
from mmcache.common.progress import Progress
from mmcache.common.security import resolve_secret
from mmcache.common.sizes import parse_size

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
    tenant) into ``out_dir`` (new or empty); returns the summary (entries, bytes, shards, gone,
    corrupt). A corrupt entry is left out, counted and named; any other failure removes what the
    export wrote and raises."""
    from mmcache_client import CorruptEntry
    from mmcache_client.format import EntryFormatError, read_entry

    if shard_size_bytes <= 0:
        raise ValueError(f"{shard_size_bytes=} must be > 0")
    listed_ns, prefix = _listing_scope(namespace)
    _check_tenant_scope(client, namespace, "export")
    created = _prepare_out(out_dir)
    progress = progress or _silent("export")
    shards = ShardSet(out_dir, shard_size_bytes)
    manifest = ManifestWriter(out_dir)
    entries = nbytes = gone = corrupt = 0
    local = getattr(client, "scheme", "unix") == "unix"
    try:
        for batch in _listed_batches(client, listed_ns, prefix):
            for item, entry in _fetched(client, batch):
                key = item["key"]
                if entry is None:  # listed, then evicted or deleted
                    gone += 1
                    progress.update(1, gone=1)
                    continue
                try:  # NOTE: over HTTP the SDK verified the bytes it got; views of the arena and LMDB are checked here
                    if isinstance(entry, CorruptEntry):
                        raise entry
                    view = read_entry(entry.buffer, verify=local)
                    check_listed(key, view)
                except (CorruptEntry, EntryFormatError) as e:
                    corrupt += 1
                    why = str(e).removeprefix(f"{key}: ")
                    progress.note(f"{key}: not exported: corrupt: {why}")
                    progress.update(1, corrupt=1)
                    continue
                shard, names = shards.add(key, view)
                row = entry_row(key, view, shard, names)
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
    return {"entries": entries, "bytes": nbytes, "shards": len(table), "gone": gone, "corrupt": corrupt,
            "out": out_dir}


def _fetched(client, batch: list[dict]) -> Iterator[tuple[dict, Any]]:
    """Each listed item with its entry (None: gone since the listing; a ``CorruptEntry``: damaged),
    fetched without promoting (a scan would push the hot set out of host). One damaged entry
    fails a whole ``get_many`` answer, so a batch that does is fetched again one key at a time."""
    from mmcache_client import CorruptEntry

    try:
        found = client.get_many([item["key"] for item in batch], promote=False)
    except CorruptEntry as e:
        if len(batch) == 1:
            yield batch[0], e
            return
        for item in batch:
            yield from _fetched(client, [item])
        return
    with found:
        yield from zip(batch, found)


def _check_tenant_scope(client, namespace: str | None, what: str) -> None:
    """``TENANT@NS`` is for the default tenant (the sidecar's own token, a local connection
    without one); a tenant's token has its own keys only, named plain: refused up front rather
    than an export of nothing or an import of refusals. ``stats`` says whose the token is."""
    if namespace is None or "@" not in namespace:
        return
    tenant = client.stats().get("tenant")
    if tenant is not None:
        raise ValueError(f"--namespace {namespace}: this token is tenant {tenant!r}'s, which may not name a "
                         f"tenant's namespace (TENANT@NS is for the sidecar's own token); {what} --namespace "
                         f"{namespace.partition('@')[2]} for its own")


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
    ``TENANT@NS``) through ``client``; returns the summary. The manifest is surveyed whole first
    (``Manifest.survey``); shards that fail their checks (or that the manifest lists wrongly:
    a key twice, a row count other than the shard table's, no rows at all) are refused whole
    and named in ``refused_shards``; the manifest's own disagreeing counts are ``problems``; an
    entry the target refuses (too large, not the token's to put) fails alone, named; keys the
    target holds are skipped."""
    if namespace is not None:
        _listing_scope(namespace)  # validates it
    progress = progress or _silent("import")
    summary: dict[str, Any] = {"imported": 0, "skipped": 0, "refused": 0, "failed": 0, "bytes": 0,
                               "refused_shards": [], "problems": [], "dir": in_dir}

    def keep(row: dict) -> bool:
        return namespace is None or scoped_namespace(row) == namespace

    with open_manifest(in_dir) as manifest:
        survey = manifest.survey(namespace)
        _check_tenant_scope(client, namespace, "import")
        progress.set_total(survey.chosen)
        for problem in survey.problems:
            summary["problems"].append(problem)
            progress.note(problem)
        for name, n in survey.missing:
            summary["refused_shards"].append(name)
            summary["refused"] += n if namespace is None else 0
            progress.note(f"{os.path.join(in_dir, name)}: refused: the shard table says {n} entries, "
                          "the manifest has no rows for it (rows removed since the export)")
        for shard_name, rows, n_chosen, why in manifest.rows_by_shard(survey.refused, keep):
            if not n_chosen:
                continue
            shard = None
            if why is None:
                try:
                    shard = open_shard(in_dir, shard_name, manifest.shards.get(shard_name), rows)
                except ShardRefused as e:
                    why = str(e)
            if shard is None:
                summary["refused"] += n_chosen
                summary["refused_shards"].append(shard_name)
                progress.note(why)
                progress.update(n_chosen, refused=n_chosen)
                continue
            with shard:
                _put_shard(client, shard, [r for r in rows if keep(r)], durable, progress, summary)
    return summary


def _put_shard(client, shard, rows: list[dict], durable: bool, progress: Progress, summary: dict) -> None:
    from mmcache_client import BadRequest, EntryTooLarge, Forbidden

    for i in range(0, len(rows), LOOKUP_BATCH_KEYS):
        part = rows[i : i + LOOKUP_BATCH_KEYS]
        try:
            held = client.lookup([row["key"] for row in part])
        except (BadRequest, Forbidden):  # a key not the token's to name: its put says so, entry by entry
            held = {}
        for row in part:
            if held.get(row["key"]) is not None:
                summary["skipped"] += 1
                progress.update(1, skipped=1)
                continue
            try:
                created = _put_patiently(client, scoped_namespace(row), row["hash"], shard.blob(row), durable)
            except (EntryTooLarge, BadRequest, Forbidden) as e:  # too large for the target; not the token's
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
    with _client(args) as client, Progress("export", unit="entries", counters=("gone", "corrupt"),
                                           quiet=args.quiet) as p:
        summary = export_entries(client, args.out, namespace=args.namespace, shard_size_bytes=shard_size, progress=p)
    print(json.dumps(summary))
    if summary["corrupt"]:
        print(f"mmcache export: left out {summary['corrupt']} corrupt entr{'y' if summary['corrupt'] == 1 else 'ies'} "
              "(named above); the rest exported", file=sys.stderr)
        return 1
    return 0


def _import_cmd(args: argparse.Namespace) -> int:
    with _client(args) as client, Progress("import", unit="entries", counters=("imported", "skipped", "refused",
                                                                                  "failed"),
                                           quiet=args.quiet) as p:
        summary = import_export(args.dir, client, namespace=args.namespace, durable=args.durable, progress=p)
    print(json.dumps(summary))
    if summary["refused_shards"]:
        print(f"mmcache import: refused {len(summary['refused_shards'])} shard(s), nothing of them imported: "
              f"{', '.join(map(str, summary['refused_shards']))}", file=sys.stderr)
    if summary["failed"]:
        print(f"mmcache import: {summary['failed']} entr{'y' if summary['failed'] == 1 else 'ies'} not imported "
              "(named above)", file=sys.stderr)
    for problem in summary["problems"]:
        print(f"mmcache import: {problem}", file=sys.stderr)
    return 1 if summary["refused"] or summary["failed"] or summary["refused_shards"] or summary["problems"] else 0

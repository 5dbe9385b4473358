"""An export folder for the export targets to start from (two tenants' and the default tenant's
entries, two shards), written by the exporter's own writers, the same bytes on every run; and the
import's read path without the puts (what ``mmcache import`` runs before it sends anything)."""

from __future__ import annotations

import os

import numpy as np

from mmcache.ops.export_format import ManifestWriter, ShardSet, entry_row
from mmcache.ops.export_reader import open_manifest
from mmcache.ops.export_shards import ShardRefused, open_shard
from mmcache_client.format import plan_entry, read_entry
from mmcache_client.keys import content_hash

KEYS = [f"ns/{content_hash(b'a')}", f"ns/{content_hash(b'b')}", f"alice@ns/{content_hash(b'c')}",
        f"alice@other/{content_hash(b'd')}", f"ns/{content_hash(b'e')}"]


def _blob(key: str, i: int) -> bytes:
    ns, _, hx = key.rpartition("@")[2].partition("/")
    plan = plan_entry(ns, hx, {"embeddings": np.full((2 + i, 4), i, dtype=np.float32),
                               **({"grid": np.array([1, 2, 2], dtype=np.int64)} if i % 2 else {})},
                      {"encode_ms": "1.5", "created_at": "1700000000.0"})
    out = bytearray(plan.total_bytes)
    plan.write_into(out)
    return bytes(out)


def make_export(out_dir: str, shard_bytes: int = 600) -> dict:
    """Write the export into ``out_dir`` (existing, empty); returns its shard table."""
    shards, manifest = ShardSet(out_dir, shard_bytes), ManifestWriter(out_dir)
    for i, key in enumerate(KEYS):
        view = read_entry(_blob(key, i))
        name, names = shards.add(key, view)
        manifest.add(entry_row(key, view, name, names))
    table = shards.close()
    manifest.close({"created_at": 1700000000.0, "source": "fuzz", "namespace": None, "entries": len(KEYS),
                    "shards": table})
    return table


def read_export(in_dir: str) -> int:
    """Every row an import would put, checked as the import checks it; the entries built. Bad
    input may raise ``ValueError`` (``ShardRefused`` is one) only; an entry built from a
    checked shard must be valid, name its row's key and carry its row's checksum."""
    built = 0
    with open_manifest(in_dir) as manifest:
        survey = manifest.survey(None)
        for name, rows, chosen, why in manifest.rows_by_shard(survey.refused):
            if why is not None or not chosen:
                continue
            try:
                shard = open_shard(in_dir, name, manifest.shards.get(name), rows)
            except ShardRefused:
                continue
            with shard:
                for row in rows:
                    check_built(shard.blob(row), row)
                    built += 1
    return built


def check_built(blob, row: dict) -> None:
    entry = read_entry(bytes(blob), verify=True)
    assert entry.metadata["checksum"] == row["checksum"], (entry.metadata, row)
    assert f"{entry.metadata['namespace']}/{entry.metadata['hash']}" == f"{row['namespace']}/{row['hash']}"
    assert entry.parsed.tensors["embeddings"].shape[0] == row["num_tokens"]


def write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)

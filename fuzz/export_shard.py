"""Fuzz target: the export shard reader (``open_shard``: a safetensors file of many entries'
tensors, checked whole against the manifest's rows before any entry is imported).

The shard table's size and BLAKE3 are made to match the input (an attacker who writes the shard
writes the manifest too), so the checks past them see every input. Bad input may raise
``ShardRefused`` (a ``ValueError``) only; an entry built from a shard that passed must be valid,
name its row's key and carry its row's checksum."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import blake3

from harness import instrumented, main

with instrumented():
    from exports import check_built, make_export, write
    from mmcache.ops.export_reader import open_manifest
    from mmcache.ops.export_shards import ShardRefused, open_shard

_dir = tempfile.mkdtemp(prefix="mmc-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
atexit.register(shutil.rmtree, _dir, True)
make_export(_dir)
with open_manifest(_dir) as _manifest:
    SHARDS = [(name, rows) for name, rows, _, _ in _manifest.rows_by_shard()]
NAME, ROWS = SHARDS[0]
PATH = os.path.join(_dir, NAME)


def test_one_input(data: bytes) -> None:
    write(PATH, data)
    record = {"name": NAME, "entries": len(ROWS), "bytes": len(data), "blake3": blake3.blake3(data).hexdigest()}
    try:
        shard = open_shard(_dir, NAME, record, ROWS)
    except ShardRefused:
        return
    with shard:
        for row in ROWS:
            check_built(shard.blob(row), row)


if __name__ == "__main__":
    main(test_one_input)

"""Fuzz target: the export manifest (``manifest.parquet`` and its ``mmcache.export`` metadata) as
``mmcache import`` reads it: open and check it, survey its rows, walk them shard by shard, and
check and build every entry of the shards it names (the real shards of a known export).

Bad input may raise ``ValueError`` only (the import names the file and stops, or refuses a
shard); an entry built from a shard that passed its checks must be valid and match its row."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from harness import instrumented, main

with instrumented():
    from exports import make_export, read_export, write
    from mmcache.ops.export_format import MANIFEST

_dir = tempfile.mkdtemp(prefix="mmc-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
atexit.register(shutil.rmtree, _dir, True)
make_export(_dir)
PATH = os.path.join(_dir, MANIFEST)


def test_one_input(data: bytes) -> None:
    write(PATH, data)
    try:
        read_export(_dir)
    except ValueError:
        pass


if __name__ == "__main__":
    main(test_one_input)

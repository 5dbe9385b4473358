"""benchmarks/fast_path.py runs as a user runs it (the sidecar in its own process) and prints
every row it promises, with numbers that mean something."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_fast_path_bench_prints_its_table():
    import fast_path

    out = "\n".join(fast_path.lines([64 << 10], repeats=20, use_redis=False, host_bytes=48 << 20))
    for row in ("| get (us", "| get_many 1 ", "| get_many 10 ", "| get_many 100 ", "| put host-only", "| put (us",
                "| memcpy", "| HTTP GET", "socketpair round trip"):
        assert row in out, out
    verdict = next(line for line in out.splitlines() if line.startswith("0.0625 MiB:"))
    assert "x memcpy" in verdict and "per key beyond the first" in verdict
    get_row = next(line for line in out.splitlines() if line.startswith("| get (us"))
    median = float(get_row.split("|")[2].split("/")[0])
    assert 0 < median < 100_000  # a get of 64 KiB, in microseconds

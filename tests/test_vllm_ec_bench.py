"""benchmarks/vllm_ec.py's load-latency part runs as a user runs it (the sidecar in its own
process, each connector through its real ``start_load_caches``) and prints every row it promises."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from vllm_engines import needs_vllm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
def test_load_latency_rows(model_dir, capsys):
    import vllm_ec

    vllm_ec.print_loads(vllm_ec.bench_loads(model_dir, repeats=20))
    out = capsys.readouterr().out
    for connector in ("mmcache (unix, arena views)", "ECExampleConnector (disk)", "ECCPUConnector (shm)"):
        for size in ("1 MiB", "4.5 MiB"):
            assert any(line.startswith(connector) and size in line for line in out.splitlines()), out
    assert "Mooncake (published" in out and "target 4 x 1 MiB <= 0.1 ms" in out
    ours = [line for line in out.splitlines() if line.startswith("mmcache")]
    assert len(ours) == 4 and all(0 < float(line.split()[-4]) < 1000 for line in ours)

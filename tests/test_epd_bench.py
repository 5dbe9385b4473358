"""Smoke test of the EPD benchmark's tiny profile: three real stacks (EPD, aggregated, aggregated
with an in-process LRU) driven through the OpenAI API, and everything it promises to write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_profile_end_to_end(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "epd.py"), "--profile", "tiny", "--requests", "5",
         "--rates", "4", "--reuse", "0.6", "--models-dir", str(tmp_path / "models"), "--out", str(out),
         # NOTE: one encoder, so that its single flight sees every request, as the aggregated worker's
         # one queue does; two encoders each encode a new image that concurrent requests send to both.
         "--epd-flags=--encoders 1"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "machine:" in proc.stdout and "| median TTFT s |" in proc.stdout
    assert f"{os.cpu_count()} cores" in proc.stdout and "torch " in proc.stdout
    assert "aggregated/epd" in proc.stdout and "peak memory per process" in proc.stdout

    rows = pq.read_table(out / "requests.parquet").to_pylist()
    assert sorted({r["system"] for r in rows}) == ["aggregated", "aggregated-lru", "epd"]
    assert len(rows) == 15 and all(r["error"] is None for r in rows), [r["error"] for r in rows]
    for r in rows:
        assert 0 < r["ttft_s"] <= r["e2e_s"] and 1 <= r["completion_tokens"] <= r["max_tokens"]
        assert r["prompt_tokens"] > 576 * r["images"]

    summary = json.loads((out / "summary.json").read_text())
    by_system = summary["summary"]["4.0"]
    # NOTE: the same seeded workload for each system: the two caches see the same repeats, the
    # cacheless baseline none.
    assert by_system["aggregated"]["hit_ratio"] == 0
    assert by_system["epd"]["hit_ratio"] == by_system["aggregated-lru"]["hit_ratio"] > 0
    assert all(s["errors"] == 0 and s["throughput_rps"] > 0 for s in by_system.values())
    memory = summary["systems"]["epd"]["memory_mib"]
    assert any(name.startswith("encoder_worker") for name in memory) and all(v > 0 for v in memory.values())
    for png in ("ttft_cdf.png", "throughput_vs_rate.png", "slo_vs_rate.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_video_workload_end_to_end(tmp_path):
    """The sliding-window video workload on tiny-qwen2-vl: the cache encodes only each window's new
    frames (half), the cacheless baseline all of them; measured, not assumed."""
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "epd.py"), "--profile", "tiny-qwen2-vl", "--workload", "video",
         "--systems", "epd,aggregated", "--models-dir", str(tmp_path / "models"), "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "machine:" in proc.stdout and "encoded/req" in proc.stdout
    doc = json.loads((out / "video.json").read_text())
    summary = doc["summary"]
    assert set(summary) == {"epd", "aggregated"}
    assert summary["epd"]["frames_per_request"] == summary["aggregated"]["frames_per_request"] == 16
    assert summary["aggregated"]["encoded_per_later_request"] == 16
    assert summary["epd"]["encoded_per_later_request"] == 8  # NOTE: windows overlap by half
    assert all(0 < r["ttft_s"] <= r["e2e_s"] for r in doc["rows"])


BENCH = ROOT / "benchmarks" / "epd.py"
SYSTEMS, RATES = ("epd", "aggregated", "aggregated-lru"), (0.08, 0.12)


def _fake_run(out: Path, seed: int) -> Path:
    """A results folder as ``epd.py`` writes one (its own ``_write``), with seeded synthetic
    requests: 32 per (system, rate). Nothing checked into benchmarks/results/ is read."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import epd

    rng = np.random.default_rng(seed)
    rows = []
    for system in SYSTEMS:
        for rate in RATES:
            hit_ratio = float(rng.uniform(0, 0.6))
            for i in range(32):
                ttft = float(rng.uniform(1, 30))
                rows.append({"system": system, "rate": rate, "index": i, "error": None, "ttft_s": ttft,
                             "tpot_s": float(rng.uniform(0.05, 0.3)), "e2e_s": ttft + float(rng.uniform(1, 10)),
                             "sent_s": i / rate + float(rng.uniform(0, 1)), "completion_tokens": int(rng.integers(4, 48)),
                             "images": int(rng.integers(1, 6)), "hit_ratio": hit_ratio, "run_encoded": 3})
    out.mkdir(parents=True)
    epd._write(out, rows, {}, {}, {"seed": seed, "machine": "synthetic",
                                   "profile_settings": {"ttft_slo_s": 10.0, "tpot_slo_s": 0.25}})
    return out


def test_combine_pools_earlier_runs(tmp_path):
    """``--combine`` over two runs (seeds 0 and 1): the pooled medians are those of all 64
    requests per (system, rate), the throughput sums the runs' spans."""
    dirs = [_fake_run(tmp_path / "seed0", 0), _fake_run(tmp_path / "seed1", 1)]
    out = tmp_path / "combined"
    proc = subprocess.run([sys.executable, str(BENCH), "--combine", *map(str, dirs), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "combined: 2 runs, 384 requests" in proc.stdout and "| median TTFT s |" in proc.stdout
    runs = [pq.read_table(d / "requests.parquet").to_pylist() for d in dirs]
    summary = json.loads((out / "summary.json").read_text())["summary"]
    for rate in map(str, RATES):
        for system in SYSTEMS:
            mine = [[r for r in run if r["system"] == system and str(r["rate"]) == rate] for run in runs]
            got = summary[rate][system]
            assert got["requests"] == 64
            assert got["ttft_median_s"] == pytest.approx(float(np.median([r["ttft_s"] for m in mine for r in m])))
            spans = [max(r["sent_s"] + r["e2e_s"] for r in m) - min(r["sent_s"] for r in m) for m in mine]
            assert got["throughput_rps"] == pytest.approx(64 / sum(spans))
            refs = [sum(r["images"] for r in m) for m in mine]
            assert got["hit_ratio"] == pytest.approx(sum(m[0]["hit_ratio"] * n for m, n in zip(mine, refs)) / sum(refs))
            assert got["images_encoded"] == 6
    assert len(pq.read_table(out / "requests.parquet")) == 384
    for name in ("ttft_cdf.png", "throughput_vs_rate.png", "slo_vs_rate.png"):
        assert (out / name).stat().st_size > 10_000


def test_combine_rejects_a_folder_that_is_not_results(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--combine", str(tmp_path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "not a results folder" in proc.stderr
    runs = [_fake_run(tmp_path / "a", 0), _fake_run(tmp_path / "b", 1)]
    combined = tmp_path / "ab"
    assert subprocess.run([sys.executable, str(BENCH), "--combine", *map(str, runs), "--out", str(combined)],
                          capture_output=True, text=True, timeout=120).returncode == 0
    proc = subprocess.run([sys.executable, str(BENCH), "--combine", str(combined), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "already a combination" in proc.stderr

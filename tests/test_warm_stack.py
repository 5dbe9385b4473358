"""``mmcache warm`` as users run it, with the built-in model: into a running
``mmcache up`` (found by its data dir), and through an encoder it starts itself (``--model``)
into a sidecar whose host tier is smaller than the Parquet file it warms."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import openai
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmcache_client import CacheClient, content_hash
from sidecar import SidecarProcess
from stack_process import up_for_tests

pytestmark = pytest.mark.slow


def png(seed: int, size=(48, 48)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def mmcache_warm(*args: str) -> tuple[int, dict, str]:
    """``mmcache warm ARGS`` (not a terminal: plain progress lines); its status, JSON summary, stderr."""
    proc = subprocess.run([sys.executable, "-m", "mmcache.cli", "warm", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout.strip(), proc.stderr
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_warm_a_folder_and_a_parquet_file_into_mmcache_up(model_dir, tmp_path):
    folder = tmp_path / "catalog"
    images = {}
    for i in range(50):
        sub = folder / ("shelf" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        images[f"f{i}"] = png(i)
        (sub / f"f{i}.png").write_bytes(images[f"f{i}"])
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but the rest is not an image")
    rows = [png(1000 + i) for i in range(50)]
    images.update({f"p{i}": r for i, r in enumerate(rows)})
    pq.write_table(pa.table({"sku": [f"sku-{i}" for i in range(50)], "image": rows}), tmp_path / "c.parquet",
                   row_group_size=10)

    with up_for_tests(model_dir, "--encoders", "2") as up:
        data_dir = up.args[up.args.index("--data-dir") + 1]
        status, summary, stderr = mmcache_warm(str(folder), str(tmp_path / "c.parquet"), "--data-dir", data_dir,
                                               "--interval", "0.5")
        assert status == 1, stderr  # one failure: said in the status too
        assert (summary["images"], summary["encoded"], summary["hits"], summary["failed"]) == (101, 100, 0, 1), summary
        assert summary["failures"][0]["name"] == "catalog/corrupt.png"
        assert "failed: catalog/corrupt.png: not a decodable image" in stderr
        assert "101/101 images (100%)" in stderr and "encoded 100" in stderr and "failures 1" in stderr

        with open(os.path.join(data_dir, "stack-status.json")) as f:
            cache_url = next(p["url"] for p in json.load(f)["processes"] if p["role"] == "cache")
        ns = summary["namespace"]
        with CacheClient(cache_url) as cache:
            tiers = cache.lookup([f"{ns}/{content_hash(data)}" for data in images.values()])
        assert all(t is not None for t in tiers.values())

        def hits() -> int:  # NOTE: the router learns the namespace from its first encode: until then the encoder looks up
            stats = up.stats()
            return stats["totals"]["router_cache_hits"] + sum(e["stats"]["cache_hits"] for e in stats["encoders"])

        before, hits_before = up.stats()["totals"], hits()
        uri = "data:image/png;base64," + base64.b64encode(images["p7"]).decode()
        chat = openai.OpenAI(base_url=up.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        chat.chat.completions.create(model="tiny-llava", max_tokens=4, temperature=0, messages=[
            {"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                         {"type": "image_url", "image_url": {"url": uri}}]}])
        after = up.stats()["totals"]
        assert after["images_encoded"] == before["images_encoded"]  # a warmed image: nothing encoded
        assert hits() == hits_before + 1

        status, again, stderr = mmcache_warm(str(folder), str(tmp_path / "c.parquet"), "--data-dir", data_dir)
        assert (again["encoded"], again["hits"], again["failed"]) == (0, 100, 1), again
        assert again["bytes_uploaded"] < 1000  # only the corrupt file went up again
        assert up.stats()["totals"]["images_encoded"] == after["images_encoded"]


def _peak_rss_mb(argv: list[str]) -> tuple[float, int, dict, str]:
    """Run ``argv``; (its own peak RSS in MB, status, summary, stderr). The peak is the kernel's
    high-water mark of that process (``VmHWM``), read until it exits: ``wait4``'s ``ru_maxrss``
    would start from this test process's size at the fork."""
    peak_kb = 0
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"})
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    peak_kb = max([peak_kb] + [int(line.split()[1]) for line in f if line.startswith("VmHWM:")])
            except (OSError, ValueError, IndexError):
                pass
            time.sleep(0.02)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    assert stdout.strip(), stderr
    return peak_kb / 1024, proc.returncode, json.loads(stdout.strip().splitlines()[-1]), stderr


def test_memory_stays_bounded_warming_a_parquet_file_larger_than_the_host_tier(model_dir, tmp_path):
    """A ~75 MB Parquet file (96 noise images) into a sidecar with 2 MiB of host memory: every
    entry cached (on disk: host holds few), the host tier within its capacity, and warm's own
    peak memory grows by a fraction of the file over the same run on a 2-image file. The
    encoder is a process of its own here (one that ``warm --model`` starts is warm's child, and
    the kernel's peak for warm would be the model's); ``--model`` itself warms the small file."""
    from mmcache.ops.warm_target import StartedEncoder

    sock = os.path.join(tempfile.mkdtemp(prefix="mmc-w-", dir="/tmp"), "s.sock")
    sidecar = SidecarProcess("--data-dir", str(tmp_path / "cache"), "--socket", sock, "--host-capacity", "2MiB",
                             "--disk-capacity", "256MiB").start()
    encoder = None
    try:
        big = [png(5000 + i, size=(520, 520)) for i in range(96)]
        pq.write_table(pa.table({"image": big}), tmp_path / "big.parquet", row_group_size=4)
        pq.write_table(pa.table({"image": big[:2]}), tmp_path / "small.parquet")
        file_mb = os.path.getsize(tmp_path / "big.parquet") / 2**20
        assert file_mb > 60
        warm = [sys.executable, "-m", "mmcache.cli", "warm", "--cache", f"unix://{sock}", "--memory", "4MiB",
                "--batch", "2", "--quiet"]
        _, status, summary, stderr = _peak_rss_mb(warm + ["--model", model_dir, "--data-dir", str(tmp_path / "m"),
                                                          str(tmp_path / "small.parquet")])
        assert status == 0 and summary["encoded"] == 2, stderr
        encoder = StartedEncoder(model_dir, f"unix://{sock}", str(tmp_path / "m"), None, ["--max-batch", "2"])
        warm += ["--encoder", encoder.wait_ready(120)]
        small_mb, status, summary, stderr = _peak_rss_mb(warm + [str(tmp_path / "small.parquet")])
        assert status == 0 and summary["hits"] == 2, stderr
        big_mb, status, summary, stderr = _peak_rss_mb(warm + [str(tmp_path / "big.parquet")])
        assert status == 0 and (summary["encoded"], summary["hits"]) == (94, 2), stderr
        assert summary["peak_held_bytes"] <= (4 << 20) + max(map(len, big))
        assert big_mb - small_mb < file_mb / 2, (small_mb, big_mb, file_mb)

        with CacheClient(sidecar.url) as cache:
            tiers = cache.lookup([f"{summary['namespace']}/{content_hash(b)}" for b in big])
            host = cache.stats()["host"]
        assert all(t is not None for t in tiers.values())
        assert host["bytes"] <= host["capacity_bytes"] == 2 << 20 and list(tiers.values()).count("disk") > 80
    finally:
        if encoder is not None:
            encoder.stop()
        sidecar.stop()

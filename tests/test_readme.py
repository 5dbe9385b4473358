"""The README's SDK example runs as written (against a sidecar of the test's own), hits and
misses alike: a new user's first copy-paste must not raise."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from mmcache.sidecar.config import ServeConfig
from sidecar import ThreadedSidecar

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_sdk_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = next(b for b in blocks if "from mmcache_client import CacheClient" in b and "c.get(" in b)
    sock_dir = tempfile.mkdtemp(prefix="mmc-rd-", dir="/tmp")
    cfg = ServeConfig(data_dir=str(tmp_path / "cache"), port=0, socket=os.path.join(sock_dir, "s.sock"),
                      host_capacity_bytes=64 << 20, disk_capacity_bytes=256 << 20)
    sc = ThreadedSidecar(cfg).start()
    try:
        monkeypatch.chdir(tmp_path)
        (tmp_path / "cat.jpg").write_bytes(b"not really a jpeg, but bytes to hash")
        code = example.replace("unix:///tmp/mmcache.sock", f"unix://{cfg.socket}")
        exec(compile(code, "README.md", "exec"), {})  # a put, a hit, and a get_many with a miss
        out = capsys.readouterr().out
        assert "host torch.Size([576, 4096]) 35.0" in out
    finally:
        sc.stop()

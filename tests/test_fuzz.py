"""The fuzz targets: each runs clean over its seed corpus (what libFuzzer
starts from, and the regressions found so far), and the driver reports a target that lets an
undocumented exception escape, naming the input that did it (so a finding cannot go unseen)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("atheris")

FUZZ = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fuzz")
sys.path.insert(0, FUZZ)
from run import TARGETS  # noqa: E402


@pytest.mark.parametrize("target", TARGETS)
def test_every_seed_runs_clean(target, tmp_path):
    corpus = os.path.join(FUZZ, "corpus", target)
    assert len(os.listdir(corpus)) >= 1
    proc = subprocess.run([sys.executable, os.path.join(FUZZ, f"{target}.py"), corpus, "-runs=0",
                           f"-artifact_prefix={tmp_path}/"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "INITED" in proc.stderr and "Uncaught" not in proc.stderr


def test_the_driver_reports_an_escaped_exception_and_keeps_the_input(tmp_path):
    fake = tmp_path / "fuzz"
    fake.mkdir()
    for name in ("harness.py", "run.py"):
        shutil.copy(os.path.join(FUZZ, name), fake / name)
    (fake / "corpus" / "key_parser").mkdir(parents=True)
    (fake / "corpus" / "key_parser" / "seed").write_bytes(b"ns/boom")
    (fake / "key_parser.py").write_text(
        "from harness import main\n"
        "def test_one_input(data):\n"
        "    if b'boom' in data:\n"
        "        raise RuntimeError('a parser bug')\n"
        "if __name__ == '__main__':\n"
        "    main(test_one_input)\n")
    proc = subprocess.run([sys.executable, str(fake / "run.py"), "--targets", "key_parser", "--seconds", "5",
                           "--artifacts", str(tmp_path / "found"), "--report", str(tmp_path / "report")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED" in proc.stdout and "Uncaught Python exception" in proc.stdout
    crashes = os.listdir(tmp_path / "found")
    assert crashes and (tmp_path / "found" / crashes[0]).read_bytes() == b"ns/boom"
    (result,) = json.loads((tmp_path / "report.json").read_text())["results"]
    assert result["returncode"] != 0 and result["findings"]

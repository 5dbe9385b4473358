"""The README's SDK example runs as written (against a sidecar of the test's own), hits and
misses alike: a new user's first copy-paste must not raise."""

from __future__ import annotations

import os

import pytest
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


ROOT = README.parent
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md", ROOT / "fuzz" / "README.md"]


def test_the_readme_is_a_doorway_a_newcomer_reads_in_five_minutes():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    for must in ("pip install openai", "random weights", "tiny-qwen2-vl", "mmcache.sock", "data_uri("):
        assert must in text, must


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_file_a_page_names_exists(doc):
    text = doc.read_text()
    missing = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):  # markdown links
        if not target.startswith(("http://", "https://")) and not (doc.parent / target).exists():
            missing.append(target)
    for path in re.findall(r"`((?:mmcache|llm_worker|encoder_worker|clients|benchmarks|tests|fuzz|docs)/[\w./-]+)`", text):
        path = path.rstrip(".")
        if not (ROOT / path).exists() and "*" not in path and "<" not in path:
            missing.append(path)
    assert not missing, f"{doc.name} names what the repository does not have: {sorted(set(missing))}"


@pytest.mark.slow
def test_the_readme_first_chat_runs_as_pasted_against_a_stack(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    from encoder_worker.models import ensure_model
    from stack_process import up_for_tests

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    chat = next(b for b in blocks if "from openai import OpenAI" in b)
    model_dir = ensure_model("tiny-llava", tmp_path / "models")
    with up_for_tests(str(model_dir)) as up:
        monkeypatch.chdir(tmp_path)
        exec(compile(chat.replace("http://127.0.0.1:8000", up.url), "README.md", "exec"), {})
        assert capsys.readouterr().out.strip()  # an answer (gibberish: random weights)
        assert any(line.startswith("mmcache up: the cache (sidecar) listens on unix://") for line in up.output)
        assert up.stats()["totals"]["images_encoded"] == 1

"""``llm_worker.planner.profile`` on the CPU with tiny-llava and tiny grids: the document's schema (what
the planner's simulator reads), figures that follow from the model's shapes, the CLI, and a
sidecar that is gone once the profile is taken. No speed relation is asserted: a loaded CPU is noisy."""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from pathlib import Path

import pytest
from transformers import AutoConfig

from encoder_worker.models import ensure_model
from llm_worker.planner import profile_cli
from llm_worker.planner.profile import measure
from llm_worker.planner.profile_cli import main
from llm_worker.planner.stage_costs import FORMAT, StageCosts
from mmcache.common.progress import Progress

TINY_GRID = dict(encode_batch_sizes=(2, 1), image_sizes=((336, 336), (64, 48)), prefill_tokens=(64, 16, 5000),
                 decode_batch_sizes=(3, 1), decode_contexts=(16, 40), cache_images=(1, 3))
"""Deliberately unsorted; 5000 prompt tokens exceed tiny-llava's 4096 positions and are left out."""
KEYS = {"format", "source", "model", "family", "device", "dtype", "threads", "machine", "created_at", "elapsed_s",
        "model_facts", "image_tokens", "encode", "prefill", "decode", "kv_put", "kv_get", "cache_read", "hop_ms"}
FACTS = {"kv_bytes_per_token", "embedding_bytes_per_token", "max_model_len", "tokens_per_word", "template_tokens"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("data")
    ensure_model("tiny-llava", path)
    return str(path)


def _children() -> set[int]:
    """This process's child processes (Linux /proc)."""
    tasks = Path(f"/proc/{os.getpid()}/task")
    return {int(pid) for task in tasks.iterdir() for pid in (task / "children").read_text().split()}


def _ascending(values: list, strictly: bool = True) -> bool:
    return all(a < b if strictly else a <= b for a, b in zip(values, values[1:]))


def _check_schema(doc: dict) -> None:
    assert set(doc) >= KEYS and set(doc["model_facts"]) >= FACTS
    assert doc["format"] == FORMAT and doc["source"] == "measured"
    assert StageCosts.from_doc(doc).measured  # NOTE: what the profiler writes, the planner reads
    assert (doc["family"], doc["device"], doc["dtype"]) == ("llava", "cpu", "float32")
    assert isinstance(doc["threads"], int) and "torch" in doc["machine"] and doc["elapsed_s"] > 0
    enc = doc["encode"]
    assert enc["image_sizes"] == doc["image_tokens"]["image_sizes"]
    assert _ascending(enc["batch_sizes"]) and _ascending([w * h for w, h in enc["image_sizes"]])
    assert [len(row) for row in enc["ms"]] == [len(enc["image_sizes"])] * len(enc["batch_sizes"])
    assert len(doc["image_tokens"]["tokens"]) == len(enc["image_sizes"])
    dec = doc["decode"]
    assert _ascending(dec["batch_sizes"]) and _ascending(dec["contexts"])
    assert [len(row) for row in dec["ms"]] == [len(dec["contexts"])] * len(dec["batch_sizes"])
    assert _ascending(doc["prefill"]["tokens"]) and len(doc["prefill"]["ms"]) == len(doc["prefill"]["tokens"])
    for stage in ("kv_put", "kv_get", "cache_read"):
        assert _ascending(doc[stage]["bytes"]) and len(doc[stage]["ms"]) == len(doc[stage]["bytes"])
    assert doc["kv_put"]["bytes"] == doc["kv_get"]["bytes"]
    assert len(doc["kv_put"]["bytes"]) == len(doc["prefill"]["tokens"])
    times = [*(t for row in enc["ms"] + dec["ms"] for t in row), *doc["prefill"]["ms"], doc["hop_ms"],
             *(t for stage in ("kv_put", "kv_get", "cache_read") for t in doc[stage]["ms"])]
    assert all(isinstance(t, float) and t > 0 for t in times)


def test_measure_returns_the_schema_and_stops_its_sidecar(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # NOTE: where the sidecar's dir goes
    before = _children()
    seen: list[tuple[int, int, str]] = []
    sidecars: set[int] = set()

    def progress(done: int, total: int, what: str) -> None:
        seen.append((done, total, what))
        sidecars.update(_children() - before)

    doc = measure("tiny-llava", data_dir, device="cpu", repeats=1, progress=progress, **TINY_GRID)
    _check_schema(doc)
    assert doc["model"] == "tiny-llava"
    assert doc["encode"]["batch_sizes"] == [1, 2] and doc["encode"]["image_sizes"] == [[64, 48], [336, 336]]
    assert doc["prefill"]["tokens"] == [16, 64]
    assert (doc["decode"]["batch_sizes"], doc["decode"]["contexts"]) == ([1, 3], [16, 40])

    text = AutoConfig.from_pretrained(data_dir + "/models/tiny-llava").text_config
    facts = doc["model_facts"]
    head_dim = text.hidden_size // text.num_attention_heads
    # NOTE: the hand-off entry holds K and V of every layer, kv head and position, in float32
    assert facts["kv_bytes_per_token"] == 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 4
    assert facts["embedding_bytes_per_token"] == text.hidden_size * 4
    assert facts["max_model_len"] == text.max_position_embeddings
    assert facts["tokens_per_word"] > 0 and facts["template_tokens"] > 0
    assert doc["image_tokens"]["tokens"] == [576, 576]
    for n, nbytes in zip(doc["prefill"]["tokens"], doc["kv_put"]["bytes"]):
        assert 0 < nbytes - n * facts["kv_bytes_per_token"] < 4096  # the tensors and the entry's header
    one_image = doc["cache_read"]["bytes"][0]
    assert doc["cache_read"]["bytes"] == [one_image, 3 * one_image]

    total = seen[-1][1]
    assert [s[0] for s in seen] == list(range(total + 1)) and {s[1] for s in seen} == {total}
    assert seen[0][2] == f"measuring {total} points"
    assert any(what.startswith("decode batch 3 context 40: ") for _, _, what in seen)
    assert sidecars, "no sidecar process was seen while the cache was measured"
    assert _children() == before and not os.listdir(tmp_path)
    for pid in sidecars:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_cli_quick_writes_the_profile(data_dir, tmp_path, capsys):
    out = tmp_path / "profiles" / "tiny.json"
    assert main(["--model", "tiny-llava", "--data-dir", data_dir, "--out", str(out), "--quick", "--repeats", "1"]) == 0
    doc = json.loads(out.read_text())
    _check_schema(doc)
    assert doc["prefill"]["tokens"] == [32, 128, 512] and doc["decode"]["batch_sizes"] == [1, 4, 16]
    captured = capsys.readouterr()
    # NOTE: the built model is reused: every line is the profiler's; stderr is no terminal here,
    # so plain lines: one per point with its figure, count and total, then the count's last line
    lines = captured.err.splitlines()
    assert lines and all(line.startswith("profile: ") for line in lines), lines
    points = [line for line in lines if line.endswith(")") and " ms (" in line]
    total = len(points)
    assert [p.rsplit("(", 1)[1] for p in points] == [f"{i}/{total})" for i in range(1, total + 1)]
    assert any(re.fullmatch(r"profile: encode batch 4 1280x720: [0-9.e+]+ ms \(\d+/\d+\)", p) for p in points)
    assert re.match(rf"profile: {total}/{total} points \(100%\), [0-9.]+ points/s, \d+ s", lines[-1]), lines[-1]
    assert captured.out.strip() == str(out)


def test_cli_progress_lines_every_interval(data_dir, tmp_path, capsys, monkeypatch):
    """Between the points' own lines, a line with the count, rate and time left once the
    interval has passed (a zero interval here: after every point); --quiet: plain lines too."""
    monkeypatch.setattr(profile_cli, "Progress", functools.partial(Progress, interval_s=0.0))
    out = tmp_path / "p.json"
    args = ["--data-dir", data_dir, "--out", str(out), "--quiet", "--repeats", "1", "--encode-batch-sizes", "1",
            "--image-sizes", "64x48", "--prefill-tokens", "16", "--decode-batch-sizes", "1", "--decode-contexts", "16",
            "--cache-images", "1"]
    assert main(args) == 0
    lines = capsys.readouterr().err.splitlines()
    counts = [line for line in lines if re.match(r"profile: \d+/\d+ points \(\d+%\)", line)]
    total = int(counts[-1].split()[1].split("/")[1])
    assert lines[0] == f"profile: measuring {total} points"
    assert len(counts) == total + 1  # one after each point, and the last line
    assert re.search(r", ~\d+ s left$", counts[0]) and " left" not in counts[-1]
    assert [line.endswith(f"({i}/{total})") for i, line in enumerate(lines[1:-1:2], 1)] == [True] * total


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model"], "neither an existing directory nor a built-in model"),
    (["--decode-batch-sizes", "1,0"], "every entry must be >= 1"),
    (["--prefill-tokens", "-4"], "every entry must be >= 1"),
    (["--image-sizes", "64x0"], "WIDTHxHEIGHT"),
    (["--repeats", "0"], "must be >= 1"),
    (["--device", "tpu:7"], "device='tpu:7'"),
    (["--decode-contexts", "9000", "--quick"], "fits the model's 4096 positions"),
])
def test_cli_bad_input_exits_2_with_a_message(data_dir, tmp_path, capsys, args, message):
    try:
        code = main(["--data-dir", data_dir, "--out", str(tmp_path / "p.json"), *args])
    except SystemExit as e:  # NOTE: argparse's own usage errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "p.json").exists()


def test_cli_refuses_an_unwritable_out_before_measuring(data_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["--data-dir", data_dir, "--out", str(blocker / "p.json")]) == 2
    err = capsys.readouterr().err
    assert "cannot write --out" in err and not any(line.startswith("profile: ") for line in err.splitlines())


def test_measure_refuses_a_bad_grid(data_dir):
    with pytest.raises(ValueError, match="decode_contexts"):
        measure("tiny-llava", data_dir, decode_contexts=(0, 64))
    with pytest.raises(ValueError, match="repeats"):
        measure("tiny-llava", data_dir, repeats=0)

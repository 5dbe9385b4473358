"""``mmcache.common.progress.Progress`` (plain lines with an injected clock, the tqdm bar, the
callback adapter, threads, a closed stream) and the progress of the built-in models' build on
first use (``encoder_worker.models.ensure_model``: its steps, and a wait on another build)."""

from __future__ import annotations

import asyncio
import fcntl
import importlib.util
import io
import json
import re
import sys
import threading
from pathlib import Path

import pytest
from aiohttp import web
from transformers.utils import logging as hf_logging

from encoder_worker import models
from encoder_worker.models import TINY_STEPS, ensure_model
from mmcache.common.progress import Progress, human_bytes

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _plain(**kwargs) -> tuple[Progress, io.StringIO, Clock]:
    stream, clock = io.StringIO(), Clock()
    return Progress(stream=stream, clock=clock, **kwargs), stream, clock


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


# -- plain lines -------------------------------------------------------------------------------

def test_a_plain_line_holds_count_total_bytes_rates_counters_and_time_left():
    p, stream, clock = _plain(what="warm", total=500, unit="images", counters=("hits", "failures"))
    clock.now += 10
    p.update(120, nbytes=36 << 20, hits=80, failures=2)
    assert _lines(stream) == ["warm: 120/500 images (24%), 36 MiB, 12 images/s, 3.6 MiB/s, hits 80, failures 2, "
                              "10 s, ~32 s left"]


def test_counters_named_show_while_zero_in_order_others_once_counted():
    p, stream, clock = _plain(what="export", unit="entries", counters=("skipped", "failures"))
    clock.now += 10
    p.update(4, retried=1)
    # NOTE: no total: no percentage and no time left; no bytes moved: no byte figures
    assert _lines(stream) == ["export: 4 entries, 0.4 entries/s, skipped 0, failures 0, retried 1, 10 s"]


def test_lines_come_once_per_interval_and_once_at_the_end():
    p, stream, clock = _plain(what="job", total=100, interval_s=10)
    for _ in range(9):
        clock.now += 1
        p.update(1)
    assert _lines(stream) == []  # 9 s: none yet
    clock.now += 1
    p.update(1)
    assert _lines(stream) == ["job: 10/100 items (10%), 1 items/s, 10 s, ~1 min 30 s left"]
    clock.now += 9.5
    p.update(5)
    assert len(_lines(stream)) == 1  # 9.5 s since the last line
    clock.now += 0.5
    p.update(5)
    assert _lines(stream)[-1] == "job: 20/100 items (20%), 1 items/s, 20 s, ~1 min 20 s left"
    clock.now += 3
    p.close()
    p.close()  # idempotent: one last line
    assert _lines(stream)[2:] == ["job: 20/100 items (20%), 0.87 items/s, 23 s, ~1 min 32 s left"]


def test_the_context_manager_prints_the_last_line_even_on_an_error():
    stream, clock = io.StringIO(), Clock()
    with pytest.raises(RuntimeError):
        with Progress("job", total=3, stream=stream, clock=clock) as p:
            p.update(3, nbytes=1536)
            clock.now += 3600 * 2 + 65
            raise RuntimeError("boom")
    assert _lines(stream) == ["job: 3/3 items (100%), 1.5 KiB, 0.000413 items/s, 0 B/s, 2 h 01 min"]


def test_a_job_that_fails_before_counting_anything_ends_with_its_error_alone():
    stream = io.StringIO()
    with pytest.raises(ValueError):
        with Progress("export", unit="entries", stream=stream, clock=Clock()):
            raise ValueError("out exists and is not a folder")
    assert stream.getvalue() == ""
    with Progress("export", unit="entries", stream=stream, clock=Clock()):
        pass  # NOTE: nothing to do is a finished job, and says so
    assert _lines(stream) == ["export: 0 entries, 0 entries/s, 0 s"]


def test_set_total_and_note():
    p, stream, clock = _plain(what="import", unit="entries")
    p.note("reading archive.tar")
    p.set_total(8)
    clock.now += 2
    p.update(2)
    p.close()
    assert _lines(stream) == ["import: reading archive.tar", "import: 2/8 entries (25%), 1 entries/s, 2 s, ~6 s left"]


def test_callback_sets_count_and_total_and_says_what():
    p, stream, clock = _plain(what="profile", unit="points")
    report = p.callback()
    report(1, 4, "encode batch 1: 3.2 ms")
    clock.now += 4
    report(3, 4, "prefill 32 tokens: 1.1 ms")
    p.close()
    assert _lines(stream) == ["profile: 1/4 points: encode batch 1: 3.2 ms",
                              "profile: 3/4 points: prefill 32 tokens: 1.1 ms",
                              "profile: 3/4 points (75%), 0.75 points/s, 4 s, ~1 s left"]
    q, stream, _ = _plain(what="model x", unit="steps")
    q.callback(counted=False)(1, 2, "tokenizer trained")
    assert _lines(stream) == ["model x: tokenizer trained"] and (q.done, q.total) == (1, 2)


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1023, 1536, 34.2 * 2**20, 3 * 2**40, 5000 * 2**40)] == \
        ["0 B", "1023 B", "1.5 KiB", "34.2 MiB", "3 TiB", "5e+03 TiB"]


# -- bar or lines ------------------------------------------------------------------------------

def test_bar_writes_tqdm_output_to_the_stream():
    stream = io.StringIO()
    with Progress("warm", total=5, unit="images", counters=("hits",), stream=stream, bar=True) as p:
        p.update(2, nbytes=2048, hits=1)
        p.note("image 3 failed: bad JPEG")
        p.update(3, hits=2)
    text = stream.getvalue()
    assert "\r" in text and "|" in text  # a bar redrawn in place, not lines
    assert "warm: image 3 failed: bad JPEG\n" in text  # the note on a line of its own
    last = text.rsplit("\r", 1)[1]
    assert last.startswith("warm: 100%|") and "5/5" in last and "hits 3" in last and "KiB" in last
    assert last.endswith("\n")


def test_a_terminal_gets_a_bar_unless_quiet():
    terminal = Terminal()
    with Progress("job", total=2, stream=terminal, clock=Clock()) as p:
        p.update(2)
    assert "|" in terminal.getvalue() and "\r" in terminal.getvalue()
    terminal, clock = Terminal(), Clock()
    with Progress("job", total=2, stream=terminal, quiet=True, clock=clock) as p:
        p.update(2)
        clock.now += 1
    assert terminal.getvalue() == "job: 2/2 items (100%), 2 items/s, 1 s\n"


def test_updates_from_several_threads_add_up():
    p, stream, _ = _plain(what="warm", counters=("hits",))
    start = threading.Barrier(8)

    def work() -> None:
        start.wait()
        for _ in range(2000):
            p.update(1, nbytes=3, hits=1)
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    p.close()
    assert (p.done, p.nbytes, p.counters) == (16000, 48000, {"hits": 16000})
    assert _lines(stream)[-1].startswith("warm: 16000 items, 46.9 KiB, ")


@pytest.mark.parametrize("bar", [None, False, True])
def test_a_closed_stream_does_not_fail_the_job(bar):
    stream = io.StringIO()
    stream.close()
    p = Progress("job", total=3, stream=stream, bar=bar, interval_s=0)
    p.update(1, nbytes=10, hits=1)
    p.note("a note")
    p.callback()(2, 3, "a point")
    p.set_total(4)
    p.close()
    assert p.done == 2


# -- the built-in model's build on first use ---------------------------------------------------

STEP = r"model tiny-llava: (\d)/4 steps: (.+), \d+\.\d s"


def test_ensure_model_shows_its_build_steps(tmp_path, capsys):
    assert hf_logging.is_progress_bar_enabled()
    target = tmp_path / "models" / "tiny-llava"
    assert ensure_model("tiny-llava", tmp_path) == str(target)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"model tiny-llava: building into {target} (first use: seeded random weights, built once)"
    steps = [re.fullmatch(STEP, line) for line in lines[1:-1]]
    assert all(steps), lines
    assert [int(m[1]) for m in steps] == list(range(1, TINY_STEPS + 1))
    assert [m[2].split(" (")[0] for m in steps] == ["tokenizer trained", "weights made", "weights saved",
                                                    "processor and tokenizer saved"]
    assert re.fullmatch(r"weights saved \(\d\.\d+ MiB\)", steps[2][2])
    assert "LlavaForConditionalGeneration" in steps[1][2] and "seed 0" in steps[1][2]
    assert re.match(r"model tiny-llava: 4/4 steps \(100%\), ", lines[-1])
    assert hf_logging.is_progress_bar_enabled()  # transformers' own bar: off while saving, back on after
    ensure_model("tiny-llava", tmp_path)
    assert capsys.readouterr().err == ""  # built once: nothing to show after


def _waiting_on_a_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, other_builds: bool) -> tuple[str, Path]:
    """``ensure_model`` in a thread while the test holds the build lock as another process would;
    (its answer, its stderr lines' text) once the test releases the lock, having built the model
    (a directory is enough) if ``other_builds``."""
    real_flock = fcntl.flock
    blocked = threading.Event()

    def flock(fd, operation):
        if operation == fcntl.LOCK_EX:  # NOTE: the blocking wait, after the non-blocking try failed
            blocked.set()
        return real_flock(fd, operation)
    monkeypatch.setattr(models.fcntl, "flock", flock)
    target = tmp_path / "models" / "tiny-llava"
    target.parent.mkdir(parents=True)
    got: dict[str, str] = {}
    with open(target.parent / ".tiny-llava.lock", "a") as lock:
        real_flock(lock, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: got.update(dir=ensure_model("tiny-llava", tmp_path)))
        waiter.start()
        assert blocked.wait(60)
        if other_builds:
            target.mkdir()
    waiter.join(120)
    assert not waiter.is_alive() and got["dir"] == str(target)
    return got["dir"], target


def test_ensure_model_says_it_waits_for_another_build(tmp_path, capsys, monkeypatch):
    _, target = _waiting_on_a_build(tmp_path, monkeypatch, other_builds=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"model tiny-llava: waiting for another process building it into {target}"
    assert re.fullmatch(r"model tiny-llava: built by the other process; waited \d+\.\d s", lines[1])
    assert len(lines) == 2 and not any((target.parent).glob(".tiny-llava.tmp-*"))


def test_ensure_model_builds_when_the_other_build_left_nothing(tmp_path, capsys, monkeypatch):
    _, target = _waiting_on_a_build(tmp_path, monkeypatch, other_builds=False)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("model tiny-llava: waiting for another process building it")
    assert "left no model" in lines[1] and lines[1].endswith("building it here")
    assert lines[2].startswith("model tiny-llava: building into ")
    assert sum(bool(re.fullmatch(STEP, line)) for line in lines) == TINY_STEPS
    assert (target / "model.safetensors").is_file()


# -- the benchmarks' runs ----------------------------------------------------------------------

def _chat_server() -> web.Application:
    """An OpenAI-style streaming chat endpoint answering one token, and HTTP 500 to every request
    whose prompt text has an odd length: requests that fail as a stack's can."""
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        text = "".join(part.get("text", "") for m in body["messages"] for part in
                       (m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}]))
        if len(text) % 2:
            return web.json_response({"error": {"message": "boom"}}, status=500)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": body["model"]}
        for data in ({**chunk, "choices": [{"index": 0, "delta": {"content": "a"}, "token_ids": [5],
                                            "finish_reason": None}]},
                     {**chunk, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1,
                                                        "total_tokens": 4}}):
            await response.write(f"data: {json.dumps(data)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


def test_the_benchmarks_drive_counts_each_request_and_its_errors():
    """``benchmarks/epd.py``'s ``drive`` (plan_validate and phase_shift drive through it too):
    one update per completed request, failures counted as ``errors``, as its rows say."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import epd
    from llm_worker.planner.workload import WorkloadSpec, generate

    workload = generate(WorkloadSpec(rate=float("inf"), num_requests=12, images_max=1, images_mean=1,
                                     output_tokens_max=8, seed=3))
    stream = io.StringIO()
    progress = Progress("epd (run 1/3) rate 4/s", total=len(workload.requests), unit="requests",
                        counters=("errors",), stream=stream)

    async def run() -> list[dict]:
        runner = web.AppRunner(_chat_server(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            return await epd.drive(f"http://127.0.0.1:{runner.addresses[0][1]}", "m", workload, progress)
        finally:
            await runner.cleanup()
    rows = asyncio.run(run())
    progress.close()
    errors = sum(r["error"] is not None for r in rows)
    assert 0 < errors < len(rows) and all(r["ttft_s"] > 0 for r in rows if r["error"] is None)
    assert (progress.done, progress.counters) == (12, {"errors": errors})
    assert re.fullmatch(rf"epd \(run 1/3\) rate 4/s: 12/12 requests \(100%\), [0-9.e+]+ requests/s, "
                        rf"errors {errors}, \d+ s\n", stream.getvalue())


def test_the_policy_benchmark_counts_its_runs_on_stderr(capsys):
    spec = importlib.util.spec_from_file_location("policy_bench_progress", ROOT / "benchmarks" / "policy.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # NOTE: dataclasses look their module up while being built
    spec.loader.exec_module(bench)
    assert bench.main(["--requests", "3000", "--pool", "200", "--capacities", "0.05,0.2"]) == 0
    captured = capsys.readouterr()
    assert re.fullmatch(r"policy: 12/12 runs \(100%\), [0-9.e+]+ runs/s, \d+ s\n", captured.err)
    assert "capacity 0.05 of pool" in captured.out and "policy:" not in captured.out

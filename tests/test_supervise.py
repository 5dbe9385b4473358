"""Supervision: a child that dies is restarted on the port it first bound, after a backoff that
doubles while it keeps dying (a crash loop costs no CPU); stopping restarts nothing. Under
``mmcache up``: a SIGKILLed worker comes back and serves, the restart shows in the router's
``/v1/stats``; a SIGKILLed sidecar's arena leaves /dev/shm and a new sidecar serves."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np
import openai
import pytest
from PIL import Image

from mmcache.core import data_dir as data_dir_mod
from mmcache.stack.up import ARENA_RECORD, STATUS_FILE, remove_dead_arena
from stack_process import StackProcess
from mmcache.stack.supervisor import Backoff, Supervisor, describe_exit
from conftest import wait_until

# -- the supervisor, with small stand-in children ----------------------------------------------

SERVER = """
import http.server, sys
from mmcache.common import bind, url_of
sock = bind("127.0.0.1", int(sys.argv[sys.argv.index("--port") + 1]))
print("fake ready:", url_of(sock), flush=True)
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = str(__import__("os").getpid()).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args): pass
server = http.server.HTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
server.socket = sock
server.serve_forever()
"""


def _python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def _supervise_while(sup: Supervisor, drive) -> None:
    """``sup.supervise()`` on this thread (the one that forks: children get the parent-death
    signal when it ends) while ``drive()`` runs on another; stops when ``drive`` returns."""
    errors = []

    def run() -> None:
        try:
            drive()
        except BaseException as e:  # NOTE: re-raised on the test's thread
            errors.append(e)
        finally:
            sup.request_stop()

    thread = threading.Thread(target=run)
    thread.start()
    sup.supervise()
    thread.join()
    if errors:
        raise errors[0]


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()
    except OSError:
        return None


def test_backoff_doubles_to_its_cap():
    backoff = Backoff()
    assert [backoff.delay_s(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff.delay_s(10_000) == 30
    for bad in ({"initial_s": 0}, {"initial_s": 5, "cap_s": 1}, {"reset_after_s": 0}):
        with pytest.raises(ValueError):
            Backoff(**bad)
    assert describe_exit(3) == "exit status 3" and describe_exit(-9) == "killed by SIGKILL"


def test_a_crash_loop_backs_off(tmp_path, capsys):
    """A child that exits at once: restarted after 0.5, 1, 2 s..., not hundreds of times a second.
    What is checked is the sequence of delays the supervisor chose, not a rate measured in a
    fixed window (a loaded machine stretches every window)."""
    status_path = str(tmp_path / "status.json")
    sup = Supervisor(Backoff(), status_path)
    crasher = sup.spawn("crasher", "encoder", _python("import sys; sys.exit(3)"), dict(os.environ))
    _supervise_while(sup, lambda: wait_until(lambda: crasher.restarts >= 3, 60, "restarted 3 times"))
    sup.stop([(("encoder",), 5)])
    err = capsys.readouterr().err
    delays = [line.split("restarting it in ")[1] for line in err.splitlines() if "restarting it in" in line]
    assert delays[:3] == ["0.5 s", "1.0 s", "2.0 s"], err
    assert crasher.last_exit == "exit status 3" and "crasher (not ready yet) exit status 3" in err
    assert not os.path.exists(status_path)  # NOTE: stop removes it


@pytest.mark.slow
def test_waiting_out_a_crash_loop_costs_no_cpu(tmp_path):
    """The supervisor sleeps between restarts: over 4 s of a crash loop it uses under half a core
    (a timing bound: in the slow set, where a loaded machine does not run it beside other tests)."""
    sup = Supervisor(Backoff(), str(tmp_path / "status.json"))
    crasher = sup.spawn("crasher", "encoder", _python("import sys; sys.exit(3)"), dict(os.environ))
    cpu_s, t0 = time.process_time(), time.monotonic()
    _supervise_while(sup, lambda: time.sleep(4.0))  # NOTE: the window the CPU is measured over
    elapsed_s, cpu_s = time.monotonic() - t0, time.process_time() - cpu_s
    sup.stop([(("encoder",), 5)])
    assert 1 <= crasher.restarts <= 4
    assert cpu_s < 0.5 * elapsed_s, f"{cpu_s=:.2f} over {elapsed_s=:.2f}"


def test_the_backoff_starts_over_once_a_child_stayed_up(capsys):
    sup = Supervisor(Backoff(initial_s=0.1, cap_s=5, reset_after_s=0.2))
    child = sup.spawn("flaky", "encoder", _python("import time, sys; time.sleep(0.3); sys.exit(1)"),
                      dict(os.environ))
    _supervise_while(sup, lambda: wait_until(lambda: child.restarts >= 3, 30, "restarted 3 times"))
    sup.stop([(("encoder",), 5)])
    delays = {line.split("restarting it in ")[1] for line in capsys.readouterr().err.splitlines()
              if "restarting it in" in line}
    assert delays == {"0.1 s"}


def test_a_killed_child_comes_back_on_its_port_and_stop_restarts_nothing(tmp_path, capsys):
    status_path = str(tmp_path / "status.json")
    sup = Supervisor(Backoff(initial_s=0.1), status_path)
    server = sup.spawn("server", "encoder", _python(SERVER, "--port", "0"), dict(os.environ))
    sleeper = sup.spawn("sleeper", "router", _python("import time; time.sleep(600)"), dict(os.environ))
    seen = {}

    def drive() -> None:
        url = wait_until(lambda: server.state == "up" and server.url, 30, "up")
        first_pid = int(wait_until(lambda: _get(url), 10, "answering"))
        os.kill(first_pid, signal.SIGKILL)
        second_pid = int(wait_until(lambda: (pid := _get(url)) and int(pid) != first_pid and pid, 30, "back"))
        assert server.url == url and server.restarts == 1 and server.last_exit == "killed by SIGKILL"
        def status():  # NOTE: the child may answer before the supervisor has written its "up"
            with open(status_path) as f:
                doc = {p["name"]: p for p in json.load(f)["processes"]}
            return doc if doc["server"]["state"] == "up" else None

        seen["status"] = wait_until(status, 10, "the status file says up")
        seen["pids"] = (second_pid, sleeper.proc.pid)

    _supervise_while(sup, drive)
    assert doc_is_ours(seen["status"]["server"], server.url)
    assert seen["status"]["sleeper"]["restarts"] == 0 and seen["status"]["sleeper"]["state"] == "starting"
    sup.stop([(("router",), 5), (("encoder",), 5)])  # NOTE: both exit on SIGTERM; neither comes back
    for pid in seen["pids"]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert server.restarts == 1 and sleeper.restarts == 0
    assert sup.next_event(0.2) is not None  # NOTE: their exits were reported, and nothing acted on them
    assert all(c.state == "stopped" and not c.alive() for c in sup.children)
    assert not os.path.exists(status_path)
    assert "server (http://127.0.0.1:" in capsys.readouterr().err


def doc_is_ours(entry: dict, url: str) -> bool:
    return entry["url"] == url and entry["restarts"] == 1 and entry["last_exit"] == "killed by SIGKILL" \
        and entry["state"] == "up" and entry["pid"] > 0


def test_a_dead_sidecars_arena_is_removed_and_nothing_else(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    assert ARENA_RECORD == data_dir_mod.ARENA_RECORD
    record = data_dir / ARENA_RECORD

    def arena(directory, pid: int) -> str:
        path = os.path.join(directory, f"mmcache-{pid}-{os.urandom(4).hex()}.arena")
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)
        record.write_text(path)
        return path

    shm = "/dev/shm" if os.path.isdir("/dev/shm") else str(data_dir)
    mine = arena(shm, 4242)
    assert remove_dead_arena(str(data_dir), 4241) is None and os.path.exists(mine)  # another pid's
    assert remove_dead_arena(str(data_dir), 4242) == os.path.realpath(mine) and not os.path.exists(mine)
    assert remove_dead_arena(str(data_dir), 4242) is None  # gone already
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    outside = arena(elsewhere, 4242)
    assert remove_dead_arena(str(data_dir), 4242) is None and os.path.exists(outside)  # not under shm / data dir
    target = arena(elsewhere, 7)
    link = data_dir / "mmcache-4242-00.arena"
    link.symlink_to(target)
    record.write_text(str(link))
    assert remove_dead_arena(str(data_dir), 4242) is None and os.path.exists(target) and link.is_symlink()
    record.unlink()
    assert remove_dead_arena(str(data_dir), 4242) is None


# -- under `mmcache up` ---------------------------------------------------------------------------

def image(seed: int) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(up: StackProcess, seed: int) -> str:
    client = openai.OpenAI(base_url=up.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    completion = client.chat.completions.create(
        model="tiny-llava", max_tokens=4, temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Describe it."},
                                               {"type": "image_url", "image_url": {"url": image(seed)}}]}])
    return completion.choices[0].finish_reason


def processes(up: StackProcess) -> dict[str, dict]:
    return {p["name"]: p for p in up.stats()["processes"]}


def restarted(up: StackProcess, name: str, times: int) -> dict | None:
    try:
        entry = processes(up)[name]
    except OSError:  # NOTE: the router itself is restarting
        return None
    return entry if entry["restarts"] == times and entry["state"] == "up" else None


@pytest.mark.slow
def test_up_restarts_a_killed_worker_and_a_killed_sidecar(model_dir):
    data_dir = tempfile.mkdtemp(prefix="mmc-sup-", dir="/tmp")  # NOTE: short, for the sidecar's AF_UNIX socket
    up = StackProcess("--model", model_dir, "--data-dir", data_dir, "--port", "0", "--encoders", "1",
                      "--host-capacity", "64MiB", "--log-level", "warning",
                      env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}).start()
    try:
        assert chat(up, 1) in ("stop", "length")
        before = processes(up)
        assert set(before) == {"sidecar", "encoder-0", "prefill-0", "decode-0", "router"}
        assert all(p["restarts"] == 0 and p["state"] == "up" and p["last_exit"] is None for p in before.values())

        for name in ("encoder-0", "decode-0", "router"):
            os.kill(before[name]["pid"], signal.SIGKILL)
            after = wait_until(lambda: restarted(up, name, 1), 120, f"{name} restarted")
            assert after["last_exit"] == "killed by SIGKILL" and after["url"] == before[name]["url"]
            assert after["pid"] != before[name]["pid"]
            assert chat(up, 2 + len(name)) in ("stop", "length")
            assert any(f"{name} ({before[name]['url']}) killed by SIGKILL" in line for line in up.output)

        with open(os.path.join(data_dir, ARENA_RECORD)) as f:
            arena = f.read().strip()
        assert os.path.exists(arena)
        os.kill(before["sidecar"]["pid"], signal.SIGKILL)
        sidecar = wait_until(lambda: restarted(up, "sidecar", 1), 120, "sidecar restarted")
        assert not os.path.exists(arena) and sidecar["last_exit"] == "killed by SIGKILL"
        assert any(f"removed the arena {arena}" in line for line in up.output)
        with open(os.path.join(data_dir, ARENA_RECORD)) as f:
            assert f.read().strip() != arena
        wait_until(lambda: up.stats()["cache"]["healthy"], 30, "cache healthy in the router's stats")
        assert chat(up, 20) in ("stop", "length")  # NOTE: the workers' SDK clients reconnected
        assert chat(up, 1) in ("stop", "length")
        pids = [p["pid"] for p in processes(up).values()]
        restarts_logged = sum("restarting it in" in line for line in up.output)
    finally:
        status = up.stop()
    assert status == 0, "\n".join(up.output[-30:])
    assert sum("restarting it in" in line for line in up.output) == restarts_logged  # none during shutdown
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not os.path.exists(os.path.join(data_dir, STATUS_FILE))

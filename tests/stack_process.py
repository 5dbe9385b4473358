"""``mmcache up`` as a subprocess of a script (tests, benchmarks), started and stopped the way a
user or a service manager does: ``with StackProcess("--port", "8000") as up: ... up.url``."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.request


def up_for_tests(model_dir: str, *flags: str, prefix: str = "mmc-up-") -> "StackProcess":
    """``mmcache up`` of ``model_dir`` as the tests run it (not started): a fresh short data dir
    (the sidecar's AF_UNIX socket path must be short), port 0 (the router binds a free port and
    reports it in its ready line; a port picked beforehand can be taken by one of the stack's own
    connections first), a small host tier, one torch thread, no hub."""
    data_dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    return StackProcess("--model", model_dir, "--data-dir", data_dir, "--port", "0", "--host-capacity", "256MiB",
                        "--log-level", "warning", *flags, env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})


class StackProcess:
    """``python -m mmcache.cli up ARGS``; ``start`` returns once it printed ``mmcache up: URL``."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        self.args = [sys.executable, "-m", "mmcache.cli", "up", *args]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.output: list[str] = []
        self._lines: queue.Queue = queue.Queue()

    def start(self, timeout: float = 300) -> "StackProcess":
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=self.env, start_new_session=True)
        threading.Thread(target=self._pump, daemon=True).start()
        while self.url is None:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                self.stop()
                raise TimeoutError("mmcache up did not come up:\n" + "\n".join(self.output[-40:])) from None
            if line is None:
                raise RuntimeError(f"mmcache up exited with {self.proc.wait()}:\n" + "\n".join(self.output[-40:]))
            if line.startswith("mmcache up: http"):
                self.url = line.split()[2].removesuffix("/v1")
        return self

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line.rstrip("\n"))
            self._lines.put(line)
        self._lines.put(None)

    def pid_tree(self) -> dict[int, str]:
        """pid -> a short name (``router``, ``encoder_worker serve``, ...) of each child process."""
        out = {}
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
            for pid in map(int, f.read().split()):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as c:
                        argv = c.read().decode().split("\0")
                except OSError:
                    continue  # NOTE: exited meanwhile
                if "-m" not in argv:  # NOTE: not one of ours (a --redis-cluster redis-server)
                    out[pid] = os.path.basename(argv[0].split()[0]) if argv[0] else "?"
                    continue
                module = argv[argv.index("-m") + 1]
                role = argv[argv.index("--role") + 1] if "--role" in argv else argv[argv.index("-m") + 2]
                out[pid] = f"{module.split('.')[0]} {role}"
        return out

    def stats(self, api_key: str | None = None) -> dict:
        req = urllib.request.Request(self.url + "/v1/stats",
                                     headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    def stop(self, timeout: float = 90, sig: int = signal.SIGTERM, group: bool = False) -> int:
        """``sig`` (SIGTERM, as a service manager does) to the process, or with ``group`` to its
        process group (as Ctrl-C in a terminal does); the exit status."""
        if self.proc.poll() is None:
            if group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise

    def __enter__(self) -> "StackProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

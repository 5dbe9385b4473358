"""Test helper: ``mmcache up`` as a real subprocess, started and stopped like a user does."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import urllib.request


class UpProcess:
    """``python -m mmcache.cli up ARGS``; ``start`` returns once it printed ``mmcache up: URL``."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        self.args = [sys.executable, "-m", "mmcache.cli", "up", *args]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.output: list[str] = []
        self._lines: queue.Queue = queue.Queue()

    def start(self, timeout: float = 300) -> "UpProcess":
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

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url + "/v1/stats", timeout=30) as r:
            return json.load(r)

    def stop(self, timeout: float = 90) -> int:
        """SIGTERM, as a service manager does; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise

    def __enter__(self) -> "UpProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

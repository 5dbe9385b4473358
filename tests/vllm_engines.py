"""Test tooling: real vLLM engines (``tests/vllm_runner.py``) in processes of their own, and the
``vllm`` mark's skip where vLLM (or, without torchvision, the shim of ``tests/vllm_env``) is absent."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import sysconfig
import threading

import pytest

HERE = pathlib.Path(__file__).resolve().parent
RUNNER = HERE / "vllm_runner.py"
SHIM_PTH = pathlib.Path(sysconfig.get_paths()["purelib"]) / "mmcache_test_torchvision_shim.pth"
START_TIMEOUT_S = 300
MARK = "@@mmcache-test "


def vllm_missing() -> str | None:
    """Why the ``vllm`` tests cannot run here, or None."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (.ci/install-vllm installs its CPU build)"
    if importlib.util.find_spec("torchvision") is None and not SHIM_PTH.exists():
        return "no torchvision and no test shim: run python tests/vllm_env/install.py"
    return None


needs_vllm = pytest.mark.skipif(vllm_missing() is not None, reason=vllm_missing() or "")


def ec_config(url: str, role: str = "ec_both", connector: str = "MMCacheECConnector",
              module: str = "mmcache_client.vllm", **extra) -> dict:
    return {"ec_connector": connector, "ec_connector_module_path": module, "ec_role": role,
            "ec_connector_extra_config": {"url": url, **extra}}


class Engine:
    """One ``vllm.LLM`` in a subprocess. ``generate(images)`` → token ids per image (greedy)."""

    def __init__(self, model: str, ec: dict | None = None, env: dict | None = None, name: str = "engine",
                 dtype: str = "float32", engine_args: dict | None = None):
        cmd = [sys.executable, str(RUNNER), "--model", model, "--dtype", dtype]
        if ec is not None:
            cmd += ["--ec", json.dumps(ec)]
        if engine_args:
            cmd += ["--engine-args", json.dumps(engine_args)]
        path = os.pathsep.join(p for p in (str(HERE / "vllm_env"), os.environ.get("PYTHONPATH")) if p)
        self.name = name
        self.log: list[str] = []
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "PYTHONPATH": path, **(env or {})})
        self._err = threading.Thread(target=self._drain, daemon=True)
        self._err.start()
        line = self._answer(START_TIMEOUT_S)
        if not line.get("ready"):
            raise RuntimeError(f"{name} did not start: {line}\n" + self.tail())

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    def tail(self, n: int = 60) -> str:
        return "".join(self.log[-n:])

    def _answer(self, timeout_s: float) -> dict:
        box: list = []

        def read() -> None:
            for line in self.proc.stdout:
                if line.startswith(MARK):
                    box.append(line[len(MARK):])
                    return
                self.log.append(line)
            box.append("")
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not box:
            raise TimeoutError(f"{self.name}: no answer in {timeout_s}s\n" + self.tail())
        if not box[0]:
            raise RuntimeError(f"{self.name} exited ({self.proc.poll()})\n" + self.tail())
        return json.loads(box[0])

    def send(self, images: list, uuids: list | None = None, max_tokens: int = 8) -> None:
        req = {"images": [str(p) for p in images], "max_tokens": max_tokens}
        if uuids is not None:
            req["uuids"] = uuids
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout_s: float = 180) -> list[list[int]]:
        answer = self._answer(timeout_s)
        if "error" in answer:
            raise RuntimeError(f"{self.name}: {answer['error']}\n" + self.tail())
        return answer["tokens"]

    def generate(self, images: list, uuids: list | None = None, max_tokens: int = 8) -> list[list[int]]:
        self.send(images, uuids, max_tokens)
        return self.receive()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

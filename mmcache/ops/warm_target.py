"""Where ``mmcache warm`` sends images: a running ``mmcache up`` found by its data dir (its status
file names the encoders and the sidecar), encoders named on the command line, or an encoder it
starts itself for ``--model`` (by module name: ``mmcache`` imports no worker) and stops at the
end; and the namespace they write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass

from mmcache.ops.warm_sources import WarmError


@dataclass
class Target:
    """Where the images go: encoders, the cache they write to, and the namespace they write."""

    encoders: list[str]
    cache: str
    cache_token: str | None = None
    namespace: str = ""
    started: "StartedEncoder | None" = None
    token_tenant: str | None = None
    """The tenant the cache token belongs to (the sidecar scopes every key it names to it)."""


def discover_stack(data_dir: str) -> tuple[list[str], str]:
    """The encoders and the sidecar of the ``mmcache up`` running in ``data_dir`` (from its
    status file), or WarmError saying why not."""
    path = os.path.join(data_dir, "stack-status.json")  # NOTE: mmcache.stack.up.STATUS_FILE
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise WarmError(f"no running `mmcache up` in {data_dir!r} (no {path}): start one, pass its --data-dir, "
                        "or name --encoder URL and --cache URL, or --model M and --cache URL") from None
    except (OSError, ValueError) as e:
        raise WarmError(f"cannot read {path}: {e}") from None
    pid = doc.get("pid")
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        raise WarmError(f"the `mmcache up` that wrote {path} (pid {pid}) is not running") from None
    except PermissionError:
        pass  # NOTE: it runs, as another user
    processes = [p for p in doc.get("processes", []) if p.get("url") and p.get("state") != "stopped"]
    caches = [p["url"] for p in processes if p.get("role") == "cache"]
    encoders = [p["url"] for p in processes if p.get("role") == "encoder"]
    if len(caches) != 1:
        raise WarmError(f"the stack in {data_dir!r} has {len(caches)} sidecars: name one with --cache URL and "
                        "its node's encoders with --encoder URL" if caches else
                        f"the stack in {data_dir!r} has no cache (an --aggregated stack has none to warm)")
    if not encoders:
        raise WarmError(f"the stack in {data_dir!r} has no encoder up")
    return encoders, caches[0]


class StartedEncoder:
    """``python -m encoder_worker.cli serve`` for ``--model``, on a free loopback port; its
    output goes to our standard error; stopped (SIGTERM, then SIGKILL) by ``stop``."""

    def __init__(self, model: str, cache: str, data_dir: str, token: str | None, extra: list[str]):
        env = {**os.environ}
        if token:
            env["MMCACHE_TOKEN"] = token
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "encoder_worker.cli", "serve", "--model", model, "--cache", cache,
             "--data-dir", data_dir, "--host", "127.0.0.1", "--port", "0", "--log-level", "warning", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        self.url: str | None = None
        self.tail: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        from mmcache.stack.supervisor import READY

        for line in self.proc.stdout:
            line = line.rstrip("\n")
            match = READY.match(line)
            if match and self.url is None:
                self.url = match["url"]
                self._ready.set()
                continue
            self.tail = (self.tail + [line])[-20:]
            print(f"[encoder] {line}", file=sys.stderr, flush=True)
        self._ready.set()

    def wait_ready(self, timeout_s: float) -> str:
        self._ready.wait(timeout_s)
        if self.url is None:
            status = self.proc.poll()
            self.stop()
            raise WarmError(f"the encoder did not start ({'exit status ' + str(status) if status is not None else 'timed out'}):"
                            "\n  " + "\n  ".join(self.tail[-10:]))
        return self.url

    def dead(self) -> bool:
        return self.proc.poll() is not None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()



async def namespace_of(session, encoders: list[str]) -> str:
    """The namespace every encoder writes (they must agree: one model, one salt)."""
    found = {}
    for url in encoders:
        try:
            async with session.get(f"{url}/v1/models") as resp:
                doc = await resp.json(content_type=None)
            found[url] = doc["data"][0]["namespace"]
        except Exception as e:  # noqa: BLE001
            raise WarmError(f"encoder {url} does not answer GET /v1/models: {type(e).__name__}: {e}") from None
    if len(set(found.values())) != 1:
        raise WarmError(f"the encoders write different namespaces ({found}): warm one model at a time")
    return next(iter(found.values()))



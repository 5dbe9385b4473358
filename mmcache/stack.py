"""``mmcache up``: the whole stack on one machine, as child processes of one command.

EPD: the sidecar, then the encoders, prefill and decode workers (together), then the router in
front of them on ``--port``. ``--aggregated``: ``both`` workers and the router, no cache — the
baseline behind the same API. Each child is started with ``--port 0`` and reports the port it
bound in its ready line (``mmcache.serving``); the stack waits for those lines and for each
``/healthz``, with no sleeps, then prints ``mmcache up: URL``. Children's output is forwarded
prefixed with their names. Ctrl-C / SIGTERM stops the router, then the workers, then the sidecar
(so it flushes to disk). A worker that dies is reported and the router routes around it; the
router or the sidecar dying stops the stack.

The workers are started as ``python -m encoder_worker.cli`` / ``python -m llm_worker.cli``:
``mmcache`` does not import them.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from encoder_worker.batcher import SCHEDULES

ROLES = ("cache", "encoder", "prefill", "decode", "generate", "router")
EPD_SPIN_COUNT = 10_000
"""libgomp's GOMP_SPINCOUNT for EPD workers, which share the cores (see ``Stack.__init__``)."""
_READY = re.compile(r"^(?P<name>[\w -]+) ready: (?P<url>http://\S+)")
_PR_SET_PDEATHSIG = 1
_MAX_SOCKET_PATH = 100


@dataclass(frozen=True)
class StackConfig:
    """Everything ``mmcache up`` takes."""

    model: str = "tiny-llava"
    data_dir: str = "./mmcache-data"
    host: str = "127.0.0.1"
    port: int = 8000
    encoders: int = 2
    prefill: int = 1
    decode: int = 1
    aggregated: bool = False
    """``both`` workers (``--decode`` of them) behind the router; no sidecar, no encoders."""
    host_capacity: str = "2GiB"
    device: str | None = None
    dtype: str | None = None
    allowed_dirs: tuple[str, ...] = ()
    max_batch: int = 64
    encoder_batch: int | None = None
    """Most images per encoder forward (the encoders' ``--max-batch``); None: theirs (8). Where
    the encoders run on a CPU, 1: a batch is no faster there than its images one by one, and
    every image of a batch (every request in it) waits for the last."""
    encoder_schedule: str | None = None
    """The encoders' ``--schedule``: ``fcfs`` (theirs) or ``sjf`` (the misses of the request with
    the fewest images left first)."""
    encoder_cache: str | None = None
    """With ``aggregated``: the ``both`` workers' in-process embedding LRU (e.g. ``2GiB``)."""
    threads: int | None = None
    """Torch threads per worker (``OMP_NUM_THREADS``); None: torch's default."""
    nice: tuple[tuple[str, int], ...] = ()
    """(role, niceness) pairs: the role's processes run at that CPU priority (0 normal, up to 19
    lowest); roles ``cache``, ``encoder``, ``prefill``, ``decode``, ``generate``, ``router``. For
    stages that share CPU cores: the stage nearest the first token first."""
    shared_cores: bool = False
    """EPD stages on the same cores take turns at them (the sidecar's compute gate): one forward
    at a time at full width, prefill first, then encode, then decode."""
    startup_timeout_s: float = 600.0
    log_level: str = "warning"
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("encoders", "prefill", "decode"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1")
        if self.encoder_cache and not self.aggregated:
            raise ValueError("--encoder-cache is for --aggregated (EPD workers share the sidecar)")
        if self.shared_cores and self.aggregated:
            raise ValueError("--shared-cores is for the EPD stack (an aggregated worker runs one forward at a time)")
        if self.encoder_batch is not None and self.encoder_batch < 1:
            raise ValueError("--encoder-batch must be >= 1")
        if self.encoder_schedule is not None and self.encoder_schedule not in SCHEDULES:
            raise ValueError(f"--encoder-schedule {self.encoder_schedule}: must be one of {', '.join(SCHEDULES)}")
        if self.aggregated and (self.encoder_schedule or self.encoder_batch):
            raise ValueError("--encoder-schedule and --encoder-batch are for the EPD stack's encoders")
        if self.threads is not None and self.threads < 1:
            raise ValueError("--threads must be >= 1")
        for role, niceness in self.nice:
            if role not in ROLES:
                raise ValueError(f"--nice {role}={niceness}: unknown role; roles: encoder, prefill, decode, "
                                 "sidecar (or cache), router, both (or generate)")
            if not 0 <= niceness <= 19:
                raise ValueError(f"--nice {role}={niceness}: niceness must be 0..19 (raising priority needs root)")


class StackError(RuntimeError):
    """A child failed to start, or the stack could not come up."""


class _Stop(Exception):
    """SIGINT/SIGTERM arrived."""


def _child_setup(niceness: int):
    def setup() -> None:
        # NOTE: a SIGKILLed `mmcache up` cannot stop its children; the kernel sends them SIGTERM.
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
        if niceness:
            os.nice(niceness)
        _autogroup_nice(os.nice(0))
    return setup


def _autogroup_nice(niceness: int) -> None:
    """Give this process's autogroup its niceness. With the kernel's autogroups on (the default
    on desktop and most server distributions), each session is one scheduling group, and a
    process's nice value ranks it only against the processes of its own session: a child in a
    session of its own would compete with its siblings at full weight whatever its nice value."""
    if niceness <= 0:
        return
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(niceness))
    except OSError:  # NOTE: no autogroups (not built in, or off): the plain nice value already acts
        pass


class Child:
    """One process of the stack; a thread forwards its output and reports its ready line and exit."""

    def __init__(self, name: str, role: str, argv: list[str], events: queue.Queue, env: dict[str, str],
                 niceness: int = 0):
        self.name, self.role, self.argv = name, role, argv
        self.url: str | None = None
        # NOTE: a session of its own: Ctrl-C in the terminal reaches `mmcache up` only, which stops
        # the children in order (a second signal in the middle of a child's shutdown could cut
        # the sidecar's final flush short).
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, preexec_fn=_child_setup(niceness), start_new_session=True, bufsize=1,
                                     text=True)
        self.tail: list[str] = []
        self._events = events
        threading.Thread(target=self._pump, name=f"pump-{name}", daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.tail = (self.tail + [line])[-40:]
            match = _READY.match(line)
            if match and self.url is None:
                self.url = match["url"]
                self._events.put(("ready", self))
            sys.stderr.write(f"[{self.name}] {line}\n")
        self._events.put(("exit", self, self.proc.wait()))

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            sys.stderr.write(f"mmcache up: {self.name} did not stop in {timeout:.0f} s; killing it\n")
            self.proc.kill()
            self.proc.wait()


class Stack:
    """Start with ``start()`` (returns once the router answers), stop with ``stop()``."""

    def __init__(self, config: StackConfig):
        self.config = config
        self.children: list[Child] = []
        self.events: queue.Queue = queue.Queue()
        self.url: str | None = None
        self.socket_path = _socket_path(config.data_dir)
        self.gate_path = _socket_path(config.data_dir, "compute-gate.sock") if config.shared_cores else None
        threads = {"OMP_NUM_THREADS": str(config.threads)} if config.threads else {}
        # NOTE: EPD runs several torch processes on the same cores. OpenMP threads that spin while
        # waiting (libgomp's default: 300k spins) burn the cores another worker needs; threads that
        # sleep at once (OMP_WAIT_POLICY=PASSIVE) pay a wake-up at every parallel region. Per
        # image (2-core EPYC, CLIP-L/336, batch 1): alone 3.3 s spinning, 3.6 s at 10k spins,
        # 4.0 s sleeping (3.5-4.9); two encoders at once 9.0, 6.4 and 5.9 s. 10k spins keep most
        # of both. A single aggregated worker keeps the default, and so do workers that take
        # turns at the cores (shared_cores): their forwards do not overlap. The caller's setting wins.
        caller = {*os.environ, *config.extra_env}
        keeps_default = config.aggregated or config.shared_cores or {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & caller
        short_spins = {} if keeps_default else {"GOMP_SPINCOUNT": str(EPD_SPIN_COUNT)}
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1", **threads, **config.extra_env}
        self._worker_env = {**short_spins, **self._env}
        self._nice = dict(config.nice)

    # -- starting ---------------------------------------------------------------------------

    def _spawn(self, name: str, role: str, module: str, *args: str) -> Child:
        env = self._worker_env if role in ("encoder", "prefill", "decode") else self._env
        child = Child(name, role, [sys.executable, "-m", module, *args], self.events, env, self._nice.get(role, 0))
        self.children.append(child)
        return child

    def _worker_args(self) -> list[str]:
        c = self.config
        args = ["--model", c.model, "--data-dir", c.data_dir, "--host", c.host, "--port", "0",
                "--log-level", c.log_level]
        return args

    def _llm_args(self, role: str) -> list[str]:
        c = self.config
        args = ["serve", "--role", role, *self._worker_args(), "--max-batch", str(c.max_batch)]
        if role != "both":
            args += ["--cache", f"unix://{self.socket_path}", *self._gate_args()]
        elif c.encoder_cache:
            args += ["--encoder-cache", c.encoder_cache]
        for flag, value in (("--device", c.device), ("--dtype", c.dtype)):
            if value:
                args += [flag, value]
        return args

    def _encoder_args(self) -> list[str]:
        c = self.config
        return [*(["--max-batch", str(c.encoder_batch)] if c.encoder_batch else []),
                *(["--schedule", c.encoder_schedule] if c.encoder_schedule else [])]

    def _gate_args(self) -> list[str]:
        return ["--compute-gate", self.gate_path] if self.gate_path else []

    def _allowed(self) -> list[str]:
        return [a for d in self.config.allowed_dirs for a in ("--allowed-dir", d)]

    def start(self) -> str:
        c = self.config
        Path(c.data_dir).mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + c.startup_timeout_s
        router_args = ["router", "--model", c.model, "--data-dir", c.data_dir, "--host", c.host,
                       "--port", str(c.port), "--log-level", c.log_level]
        if c.aggregated:
            workers = [self._spawn(f"both-{i}", "generate", "llm_worker.cli", *self._llm_args("both"),
                                   *self._allowed()) for i in range(c.decode)]
            self._wait_ready(workers, deadline)
            router_args += [a for w in workers for a in ("--generate", w.url)]
        else:
            sidecar = self._spawn("sidecar", "cache", "mmcache.cli", "serve", "--data-dir", c.data_dir,
                                  "--host", c.host, "--port", "0", "--socket", self.socket_path,
                                  "--host-capacity", c.host_capacity, "--log-level", c.log_level, *self._gate_args())
            self._wait_ready([sidecar], deadline)
            cache = f"unix://{self.socket_path}"
            workers = [self._spawn(f"encoder-{i}", "encoder", "encoder_worker.cli", "serve", *self._worker_args(),
                                   "--cache", cache, *self._gate_args(), *self._encoder_args(), *self._allowed())
                       for i in range(c.encoders)]
            workers += [self._spawn(f"prefill-{i}", "prefill", "llm_worker.cli", *self._llm_args("prefill"))
                        for i in range(c.prefill)]
            workers += [self._spawn(f"decode-{i}", "decode", "llm_worker.cli", *self._llm_args("decode"))
                        for i in range(c.decode)]
            self._wait_ready(workers, deadline)
            flags = {"encoder": "--encoder", "prefill": "--prefill", "decode": "--decode"}
            router_args += [a for w in workers for a in (flags[w.role], w.url)] + ["--cache", cache]
        router = self._spawn("router", "router", "llm_worker.cli", *router_args)
        self._wait_ready([router], deadline)
        self.url = router.url
        return router.url

    def _wait_ready(self, children: list[Child], deadline: float) -> None:
        """Until each of ``children`` printed its ready line and answers ``/healthz``."""
        waiting = {id(c) for c in children if c.url is None}
        while waiting:
            try:
                event = self.events.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                names = [c.name for c in children if id(c) in waiting]
                raise StackError(f"{', '.join(names)} not ready after {self.config.startup_timeout_s:.0f} s") from None
            kind, child = event[0], event[1]
            if kind == "exit":
                raise StackError(f"{child.name} exited with status {event[2]} while starting:\n  "
                                 + "\n  ".join(child.tail[-15:]))
            waiting.discard(id(child))
        for child in children:
            _check_health(child)

    # -- running and stopping -----------------------------------------------------------------

    def supervise(self) -> int:
        """Until SIGINT/SIGTERM (→ 0) or the router / sidecar exits (→ 1); a worker that exits is
        reported and the rest go on."""
        while True:
            kind, child, *rest = self.events.get()
            if kind != "exit":
                continue
            if child.role in ("router", "cache"):
                sys.stderr.write(f"mmcache up: {child.name} exited with status {rest[0]}; stopping the stack\n")
                return 1
            sys.stderr.write(f"mmcache up: {child.name} ({child.url}) exited with status {rest[0]}; "
                             "the router passes it over\n")

    def stop(self) -> None:
        """Router first (no new work), then the workers, then the sidecar (flushes to disk)."""
        for roles, timeout in ((("router",), 15), (("encoder", "prefill", "decode", "generate"), 30),
                               (("cache",), 30)):
            group = [c for c in self.children if c.role in roles]
            for child in group:
                child.terminate()
            for child in group:
                child.wait(timeout)


def _check_health(child: Child) -> None:
    try:
        with urllib.request.urlopen(child.url + "/healthz", timeout=30) as resp:
            if resp.status == 200:
                return
            status = resp.status
    except OSError as e:
        status = repr(e)
    raise StackError(f"{child.name} printed its ready line but {child.url}/healthz answered {status}")


def _socket_path(data_dir: str, name: str = "mmcache.sock") -> str:
    """A sidecar's Unix socket: in the data dir, or in /tmp when that path is too long for AF_UNIX."""
    path = os.path.join(os.path.abspath(data_dir), name)
    if len(path) <= _MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha1(path.encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"mmcache-{digest}-{name}")


def run(config: StackConfig) -> int:
    """``mmcache up``: start, print the URL, supervise, stop; the exit status."""
    def on_signal(signum, frame):
        raise _Stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    stack = Stack(config)
    status = 0
    try:
        url = stack.start()
        mode = f"aggregated: {config.decode} both worker(s), no cache" if config.aggregated else \
            f"EPD: sidecar, {config.encoders} encoder(s), {config.prefill} prefill, {config.decode} decode"
        print(f"mmcache up: {url}/v1 (model {config.model}; {mode}). Ctrl-C stops it.", flush=True)
        status = stack.supervise()
    except _Stop:
        pass
    except StackError as e:
        sys.stderr.write(f"mmcache up: error: {e}\n")
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return status

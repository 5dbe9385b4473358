"""``mmcache up``: the whole stack on one machine, as child processes of one command.

EPD: the sidecar, then the encoders, prefill and decode workers (together), then the router in
front of them on ``--port``. ``--aggregated``: ``both`` workers and the router, no cache — the
baseline behind the same API. Each child is started with ``--port 0`` and reports the port it
bound in its ready line (``mmcache.common``); the stack waits for those lines and for each
``/healthz``, with no sleeps, then prints ``mmcache up: URL``. Children's output is forwarded
prefixed with their names. Ctrl-C / SIGTERM stops the router, then the workers, then the sidecar
(so it flushes to disk).

Once up, the stack supervises (``mmcache.stack.supervisor``): a process that dies — a worker, the
router or the sidecar — is logged with its exit status or signal and started again on the port
it first bound, after an exponential backoff; meanwhile the router passes a dead worker over
(or answers 503 naming it). A sidecar that died leaves its shared-memory arena behind: it is
removed at once (see ``remove_dead_arena``); the restarted sidecar keeps the data dir (disk
entries survive) and the socket path, where the workers' SDK clients reconnect on their own.
Restarts and last exits show in the router's ``GET /v1/stats`` under ``processes`` (from the
status file ``<data_dir>/stack-status.json``).

The workers are started as ``python -m encoder_worker.cli`` / ``python -m llm_worker.cli``:
``mmcache`` does not import them.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from mmcache.core.data_dir import ARENA_RECORD
from mmcache.common.security import make_private_dir
from mmcache.stack.args import LOOPBACK, ChildArgs
from mmcache.stack.config import StackConfig
from mmcache.stack.supervisor import Child, Supervisor

STATUS_FILE = "stack-status.json"
"""In the data dir: the stack's processes, their restarts and last exits (read by the router)."""
_MAX_SOCKET_PATH = 100
_STOP_ORDER = ((("router",), 15), (("encoder", "prefill", "decode", "generate"), 30), (("cache",), 30))


@dataclass
class _Node:
    """One node group's places: ``name`` '' for the single-node stack (no prefixes)."""

    name: str
    data_dir: str
    socket: str
    sidecar: Child | None = None
    workers: list[Child] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return f"{self.name}." if self.name else ""


BUILTIN_MODEL_NAMES = ("llava-clip-l336-random", "llava-clip-l336-small", "tiny-llava", "tiny-qwen2-vl")
"""The workers' built-in models (``encoder_worker.models.BUILTIN_MODELS``; ``mmcache`` imports no
worker, so the names are listed here, and a test holds the two equal)."""


class StackError(RuntimeError):
    """A child failed to start, or the stack could not come up."""


class _Stop(Exception):
    """SIGINT/SIGTERM arrived."""


class Stack:
    """Start with ``start()`` (returns once the router answers), stop with ``stop()``."""

    def __init__(self, config: StackConfig):
        self.config = config
        self.args = ChildArgs(config)
        self.supervisor = Supervisor(config.backoff, os.path.join(config.data_dir, STATUS_FILE))
        self.children = self.supervisor.children
        self.url: str | None = None
        self.redis = None
        """The loopback redis cluster of ``--redis-cluster`` (``mmcache.stack.redis_local``), if any."""
        self.socket_path = _socket_path(config.data_dir)
        threads = {"OMP_NUM_THREADS": str(config.threads)} if config.threads else {}
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1", **threads, **config.extra_env}
        self.stack_token = os.environ.get("MMCACHE_STACK_TOKEN") or secrets.token_urlsafe(32)
        """The stack's control credential, given to every child (``MMCACHE_STACK_TOKEN``): the
        workers' state-changing routes need it. The user's if set, else made for this stack."""
        self._nice = dict(config.nice)

    # -- starting ---------------------------------------------------------------------------

    def _spawn(self, name: str, role: str, module: str, *args: str, on_exit=None) -> Child:
        env = self._with_secrets(self._env, role)
        return self.supervisor.spawn(name, role, [sys.executable, "-m", module, *args], env, self._nice.get(role, 0),
                                     on_exit)

    def _with_secrets(self, env: dict[str, str], role: str) -> dict[str, str]:
        """``env`` with the tokens ``role`` needs. NOTE: in the environment, never argv: any
        local user reads a process's argv (``ps``, ``/proc/PID/cmdline``); its environment only
        its owner. The API key goes to the router alone."""
        env = {k: v for k, v in env.items() if role == "router" or k != "MMCACHE_API_KEY"}
        if self.config.cache_token:
            env["MMCACHE_TOKEN"] = self.config.cache_token
        env["MMCACHE_STACK_TOKEN"] = self.stack_token
        if self.config.api_key and role == "router":
            env["MMCACHE_API_KEY"] = self.config.api_key
        return env

    def _sidecar_exited(self, data_dir: str):
        def on_exit(pid: int, returncode: int) -> None:
            removed = remove_dead_arena(data_dir, pid)
            if removed:
                sys.stderr.write(f"mmcache up: removed the arena {removed} of the sidecar that died\n")
        return on_exit

    def _nodes(self) -> list["_Node"]:
        c = self.config
        if c.nodes == 1:
            return [_Node("", c.data_dir, self.socket_path)]
        out = []
        for i in range(c.nodes):
            data_dir = os.path.join(c.data_dir, f"node-{i}")
            out.append(_Node(f"node-{i}", data_dir, _socket_path(data_dir)))
        return out

    def _start_remote(self) -> str | None:
        """The remote the sidecars share: the user's, or a loopback cluster started here."""
        c = self.config
        if c.remote or not c.redis_cluster:
            return c.remote
        from mmcache.stack.redis_local import RedisClusterProcs, RedisMissing

        workdir = os.path.join(c.data_dir, "redis-cluster")
        shutil.rmtree(workdir, ignore_errors=True)  # NOTE: a demo cluster starts empty, every time
        os.makedirs(workdir, mode=0o700)
        try:
            self.redis = RedisClusterProcs(workdir, masters=c.redis_cluster).start()
        except RedisMissing as e:
            raise StackError(str(e)) from None
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            raise StackError(f"the redis cluster did not start: {e}") from None
        sys.stderr.write(f"mmcache up: redis cluster of {c.redis_cluster} master(s) at {self.redis.url}\n")
        return self.redis.url

    def preflight(self) -> None:
        """What would make every worker fail, checked before any is started (one clear line,
        within seconds, instead of each worker printing it after loading): the model is a
        built-in name or an existing folder, and the router's port is free."""
        c = self.config
        if c.model not in BUILTIN_MODEL_NAMES and not Path(c.model).expanduser().is_dir():
            raise StackError(f"--model {c.model!r} is neither an existing folder nor a built-in model "
                             f"({', '.join(BUILTIN_MODEL_NAMES)})")
        if c.port:
            probe = socket.socket(socket.AF_INET6 if ":" in c.host else socket.AF_INET, socket.SOCK_STREAM)
            try:
                probe.bind((c.host, c.port))
            except OSError as e:
                raise StackError(f"--port {c.port} on {c.host} is not free ({e.strerror}): stop what holds it "
                                 "or pick another --port") from None
            finally:
                probe.close()

    def start(self) -> str:
        c = self.config
        self.preflight()
        make_private_dir(c.data_dir)  # NOTE: 0700 from birth (a sidecar then has nothing to warn about)
        deadline = time.monotonic() + c.startup_timeout_s
        router_args = ["router", "--model", c.model, "--data-dir", c.data_dir, "--host", c.host,
                       "--port", str(c.port), "--log-level", c.log_level,
                       *(["--tenants", os.path.abspath(c.tenants)] if c.tenants else []), *self.args.video()]
        if c.aggregated:
            workers = [self._spawn(f"both-{i}", "generate", "llm_worker.cli", *self.args.llm("both"),
                                   *self.args.media(), *self.args.video()) for i in range(c.decode)]
            self._wait_ready(workers, deadline)
            router_args += [a for w in workers for a in ("--generate", w.url)]
        else:
            router_args += self._start_epd(deadline)
        router = self._spawn("router", "router", "llm_worker.cli", *router_args)
        self._wait_ready([router], deadline)
        self.url = router.url
        return router.url

    def _start_epd(self, deadline: float) -> list[str]:
        """The sidecars, then every group's workers; the router's flags for them."""
        c = self.config
        remote = self._start_remote()
        nodes = self._nodes()
        remote_args = ["--remote", remote] if remote else []
        for node in nodes:
            make_private_dir(node.data_dir)
            node.sidecar = self._spawn(node.prefix + "sidecar", "cache", "mmcache.cli", "serve",
                                       "--data-dir", node.data_dir, "--host", LOOPBACK, "--port", "0",
                                       "--socket", node.socket, "--host-capacity", c.host_capacity,
                                       "--log-level", c.log_level, *remote_args,
                                       *(["--tenants", os.path.abspath(c.tenants)] if c.tenants else []),
                                       *(["--host-policy", c.host_policy] if c.host_policy else []),
                                       *(["--device-capacity", c.cache_device_capacity]
                                         if c.cache_device_capacity else []),
                                       *(["--node", node.name] if node.name else []),
                                       on_exit=self._sidecar_exited(node.data_dir))
        self._wait_ready([n.sidecar for n in nodes], deadline)
        for node in nodes:
            cache = f"unix://{node.socket}"
            if c.elastic:  # NOTE: the process roles (niceness, stop order) are the workers' first stages
                node.workers = [self._spawn(f"{node.prefix}{role}-{i}", role, "llm_worker.cli",
                                            *self.args.elastic(stage, node))
                                for role, stage, count in (("encoder", "encode", c.encoders),
                                                           ("prefill", "prefill", c.prefill),
                                                           ("decode", "decode", c.decode)) for i in range(count)]
                continue
            node.workers = [self._spawn(f"{node.prefix}encoder-{i}", "encoder", "encoder_worker.cli", "serve",
                                        *self.args.worker(), "--cache", cache,
                                        *self.args.encoder(), *self.args.media()) for i in range(c.encoders)]
            node.workers += [self._spawn(f"{node.prefix}prefill-{i}", "prefill", "llm_worker.cli",
                                         *self.args.llm("prefill", node)) for i in range(c.prefill)]
            node.workers += [self._spawn(f"{node.prefix}decode-{i}", "decode", "llm_worker.cli",
                                         *self.args.llm("decode", node)) for i in range(c.decode)]
        self._wait_ready([w for n in nodes for w in n.workers], deadline)
        flags = {"encoder": "encoder", "prefill": "prefill", "decode": "decode"}
        if len(nodes) == 1:
            node = nodes[0]
            return [a for w in node.workers for a in ("--" + flags[w.role], w.url)] + \
                ["--cache", f"unix://{node.socket}", *self.args.elastic_router()]
        args = ["--routing", c.routing]
        for node in nodes:
            spec = ",".join([f"name={node.name}", f"cache=unix://{node.socket}",
                             *(f"{flags[w.role]}={w.url}" for w in node.workers)])
            args += ["--node", spec]
        return args

    def _wait_ready(self, children: list[Child], deadline: float) -> None:
        """Until each of ``children`` printed its ready line and answers ``/healthz``."""
        waiting = {id(c) for c in children if c.url is None}
        while waiting:
            event = self.supervisor.next_event(max(deadline - time.monotonic(), 0.001))
            if event is None:
                names = [c.name for c in children if id(c) in waiting]
                raise StackError(f"{', '.join(names)} not ready after {self.config.startup_timeout_s:.0f} s")
            if event[0] == "stop":
                raise _Stop()
            kind, child = event[0], event[1]
            if kind == "exit":
                raise StackError(f"{child.name} exited with status {event[3]} while starting:\n  "
                                 + "\n  ".join(child.tail[-15:]))
            waiting.discard(id(child))
        for child in children:
            _check_health(child)

    # -- running and stopping -----------------------------------------------------------------

    def supervise(self) -> int:
        """Until SIGINT/SIGTERM (``request_stop``; → 0), restarting each child that exits."""
        self.supervisor.supervise()
        return 0

    def request_stop(self) -> None:
        """Safe in a signal handler: ``start`` raises ``_Stop``, ``supervise`` returns."""
        self.supervisor.request_stop()

    def stop(self) -> None:
        """Router first (no new work), then the workers, then the sidecar (flushes to disk); no
        restarts from here on."""
        try:
            self.supervisor.stop(_STOP_ORDER)
        finally:
            if self.redis is not None:
                self.redis.stop()  # NOTE: last: the sidecars stopped writing to it
                self.redis = None


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


def remove_dead_arena(data_dir: str, pid: int) -> str | None:
    """The arena file that the sidecar ``pid``, now dead, recorded in ``data_dir``, removed; its
    path, or None when there is none to remove. Removed only when it is surely that sidecar's:
    under /dev/shm or ``data_dir``, a regular file (no link followed) owned by this user, named
    as the sidecar names the arenas it creates (``mmcache-<pid>-<hex>.arena``). Anything else
    stays where it is (the next sidecar's own check of the record decides)."""
    try:
        with open(os.path.join(data_dir, ARENA_RECORD)) as f:
            path = f.read().strip()
    except FileNotFoundError:
        return None  # NOTE: it stopped cleanly (the store removes both) or never made one
    parent = os.path.realpath(os.path.dirname(path))
    roots = {os.path.realpath("/dev/shm"), os.path.realpath(data_dir)}
    if not any(parent == r or parent.startswith(r + os.sep) for r in roots) or \
            not re.fullmatch(rf"mmcache-{pid}-[0-9a-f]+\.arena", os.path.basename(path)):
        return None
    path = os.path.join(parent, os.path.basename(path))
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            return None
        os.unlink(path)
    except FileNotFoundError:
        return None
    return path


def run(config: StackConfig) -> int:
    """``mmcache up``: start, print the URL, supervise, stop; the exit status."""
    stack = Stack(config)

    def on_signal(signum, frame):
        stack.request_stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        url = stack.start()
        mode = f"aggregated: {config.decode} both worker(s), no cache" if config.aggregated else \
            f"EPD: sidecar, {config.encoders} encoder(s), {config.prefill} prefill, {config.decode} decode"
        if config.elastic:
            mode += " (elastic: they switch stage as the load shifts)"
        if config.nodes > 1:
            mode += f", in each of {config.nodes} node groups (routing: {config.routing})"
        if config.remote or config.redis_cluster:
            mode += "; remote tier " + (config.remote and "given" or f"a {config.redis_cluster}-master redis cluster")
        print(f"mmcache up: {url}/v1 (model {config.model}; {mode}). Ctrl-C stops it.", flush=True)
        if not config.aggregated and config.nodes == 1:
            print(f"mmcache up: the cache (sidecar) listens on unix://{stack.socket_path}", flush=True)
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

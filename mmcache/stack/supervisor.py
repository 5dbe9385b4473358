"""The processes of ``mmcache up``, kept running: a child that dies is started again.

Lifecycle of a ``Child``: ``starting`` (spawned, no ready line yet) → ``up`` (its ready line,
``mmcache.common``) → ``restarting`` (it died; started again after a backoff) → ``starting`` ...;
``stopped`` once the stack stops it. A restart runs the same argv on the port the child first
bound (its ready line said which), so whoever holds its URL (the router) reaches it again with no
change. Backoff: ``initial_s`` after the first death, doubling per death up to ``cap_s``; a child
that stayed up ``reset_after_s`` starts over at ``initial_s``. A crash loop waits on the event
queue meanwhile: it costs one process start per backoff, no spinning.

Threads: a pump per process forwards its output (prefixed with the child's name), and reports
its ready line and its exit as events; starting, restarting and stopping happen on the thread
that calls ``Supervisor`` (the main one: the kernel's parent-death signal fires when the thread
that forked a child exits). ``request_stop`` may be called from a signal handler.

The state of every child goes to a JSON status file (``{"pid", "processes": [...]}``), rewritten
on each change, which the router's ``/v1/stats`` shows.
"""

from __future__ import annotations

import ctypes
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

READY = re.compile(r"^(?P<name>[\w -]+) ready: (?P<url>http://\S+)")
_PORT = re.compile(r":(\d+)$")
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Backoff:
    """How long a dead child waits before it is started again, in seconds."""

    initial_s: float = 0.5
    """After its first death (or the first since it last stayed up ``reset_after_s``)."""
    cap_s: float = 30.0
    """The longest wait: each death in a row doubles it up to this."""
    reset_after_s: float = 60.0
    """A child that ran this long before dying is restarted after ``initial_s`` again."""

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.cap_s:
            raise ValueError(f"{self.initial_s=} must be > 0 and <= {self.cap_s=}")
        if self.reset_after_s <= 0:
            raise ValueError(f"{self.reset_after_s=} must be > 0")

    def delay_s(self, deaths_in_a_row: int) -> float:
        return min(self.cap_s, self.initial_s * 2.0 ** min(max(deaths_in_a_row - 1, 0), 64))


def describe_exit(returncode: int) -> str:
    """``exit status 3`` / ``killed by SIGKILL``."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


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


def _pinned_port(argv: list[str], url: str | None) -> list[str]:
    """``argv`` with its ``--port`` value replaced by the port of ``url`` (the one it bound)."""
    match = _PORT.search(url or "")
    if match is None or "--port" not in argv:
        return argv
    i = len(argv) - 1 - argv[::-1].index("--port")
    return [*argv[:i + 1], match[1], *argv[i + 2:]]


class Child:
    """One process of the stack, across its restarts. ``on_exit(pid, returncode)`` runs (on the
    pump thread) as soon as a process of it has exited, before the exit is reported."""

    def __init__(self, name: str, role: str, argv: list[str], env: dict[str, str], niceness: int = 0,
                 on_exit: Callable[[int, int], None] | None = None):
        self.name, self.role, self.argv, self.env, self.niceness = name, role, argv, env, niceness
        self.on_exit = on_exit
        self.url: str | None = None
        """Set by the first ready line; kept across restarts (they bind the same port)."""
        self.proc: subprocess.Popen | None = None
        self.state = "starting"
        self.restarts = 0
        self.last_exit: str | None = None
        self.deaths_in_a_row = 0
        self.started_at = 0.0
        self.restart_at: float | None = None
        """``time.monotonic()`` of the pending restart; None when none is."""
        self.tail: list[str] = []
        self._pump_thread: threading.Thread | None = None

    def spawn(self, events: queue.SimpleQueue) -> None:
        # NOTE: a session of its own: Ctrl-C in the terminal reaches `mmcache up` only, which stops
        # the children in order (a second signal in the middle of a child's shutdown could cut
        # the sidecar's final flush short).
        self.state, self.restart_at, self.started_at = "starting", None, time.monotonic()
        self.proc = subprocess.Popen(_pinned_port(self.argv, self.url), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                                     preexec_fn=_child_setup(self.niceness), start_new_session=True, bufsize=1,
                                     text=True)
        self._pump_thread = threading.Thread(target=self._pump, args=(self.proc, events), name=f"pump-{self.name}",
                                             daemon=True)
        self._pump_thread.start()

    def _pump(self, proc: subprocess.Popen, events: queue.SimpleQueue) -> None:
        ready = False
        for line in proc.stdout:
            line = line.rstrip("\n")
            self.tail = (self.tail + [line])[-40:]
            match = READY.match(line)
            if match and not ready:
                ready = True
                if self.url is None:
                    self.url = match["url"]
                events.put(("ready", self, proc, match["url"]))
            sys.stderr.write(f"[{self.name}] {line}\n")
        returncode = proc.wait()
        if self.on_exit is not None:
            try:
                self.on_exit(proc.pid, returncode)
            except OSError as e:
                sys.stderr.write(f"mmcache up: after {self.name} exited: {e}\n")
        events.put(("exit", self, proc, returncode))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            sys.stderr.write(f"mmcache up: {self.name} did not stop in {timeout:.0f} s; killing it\n")
            self.proc.kill()
            self.proc.wait()
        self._pump_thread.join(5)  # NOTE: its last output, and its on_exit, before `mmcache up` exits

    def status(self) -> dict:
        return {"name": self.name, "role": self.role, "url": self.url, "state": self.state,
                "pid": self.proc.pid if self.alive() else None, "restarts": self.restarts,
                "last_exit": self.last_exit}


class Supervisor:
    """The children and their events. ``spawn`` starts one; ``next_event`` keeps their state;
    ``supervise`` restarts the dead until ``request_stop``; ``stop`` stops them all, restarting none."""

    def __init__(self, backoff: Backoff = Backoff(), status_path: str | None = None):
        self.backoff = backoff
        self.status_path = status_path
        self.children: list[Child] = []
        self.events: queue.SimpleQueue = queue.SimpleQueue()  # NOTE: SimpleQueue.put is safe in a signal handler
        self.stopping = False

    def spawn(self, name: str, role: str, argv: list[str], env: dict[str, str], niceness: int = 0,
              on_exit: Callable[[int, int], None] | None = None) -> Child:
        child = Child(name, role, argv, env, niceness, on_exit)
        self.children.append(child)
        child.spawn(self.events)
        self.write_status()
        return child

    def request_stop(self) -> None:
        self.events.put(("stop",))

    def next_event(self, timeout: float | None) -> tuple | None:
        """The next event (``("ready", child, proc, url)``, ``("exit", child, proc, returncode)``
        or ``("stop",)``) with the child's state updated; None after ``timeout`` seconds."""
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            return None
        if event[0] != "stop" and event[2] is event[1].proc:
            kind, child = event[0], event[1]
            if kind == "ready":
                child.state = "up"
            else:
                child.state, child.last_exit = "stopped" if self.stopping else "exited", describe_exit(event[3])
            self.write_status()
        return event

    def supervise(self) -> None:
        """Restart each child that exits, after its backoff, until ``request_stop``."""
        while True:
            pending = [c.restart_at for c in self.children if c.restart_at is not None]
            timeout = max(min(pending) - time.monotonic(), 0.0) if pending else None
            event = self.next_event(timeout)
            if event is not None and event[0] == "stop":
                return
            if event is not None and event[2] is event[1].proc:
                self._on_event(*event)
            now = time.monotonic()
            for child in self.children:
                if child.restart_at is not None and child.restart_at <= now:
                    self._restart(child)

    def _on_event(self, kind: str, child: Child, proc: subprocess.Popen, arg) -> None:
        if kind == "ready":
            if child.restarts:
                sys.stderr.write(f"mmcache up: {child.name} is back at {arg} (restart {child.restarts})\n")
            return
        uptime_s = time.monotonic() - child.started_at
        if uptime_s >= self.backoff.reset_after_s:
            child.deaths_in_a_row = 0
        child.deaths_in_a_row += 1
        delay_s = self.backoff.delay_s(child.deaths_in_a_row)
        child.state, child.restart_at = "restarting", time.monotonic() + delay_s
        self.write_status()
        sys.stderr.write(f"mmcache up: {child.name} ({child.url or 'not ready yet'}) {child.last_exit} after "
                         f"{uptime_s:.1f} s; restarting it in {delay_s:.1f} s\n")

    def _restart(self, child: Child) -> None:
        child.restarts += 1
        try:
            child.spawn(self.events)
        except OSError as e:  # NOTE: e.g. out of processes: another try after a longer wait
            child.deaths_in_a_row += 1
            child.state, child.last_exit = "restarting", f"could not start: {e}"
            child.restart_at = time.monotonic() + self.backoff.delay_s(child.deaths_in_a_row)
            sys.stderr.write(f"mmcache up: {child.name}: {child.last_exit}\n")
        self.write_status()

    def stop(self, groups: Iterable[tuple[tuple[str, ...], float]]) -> None:
        """Stop the children, a group of roles at a time (each waited for up to its timeout);
        pending restarts are dropped, and exits from now on restart nothing."""
        self.stopping = True
        for child in self.children:
            child.restart_at = None
        for roles, timeout in groups:
            group = [c for c in self.children if c.role in roles]
            for child in group:
                child.terminate()
            for child in group:
                child.wait(timeout)
                child.state = "stopped"
        if self.status_path:
            try:
                os.unlink(self.status_path)
            except FileNotFoundError:
                pass

    def write_status(self) -> None:
        if not self.status_path or self.stopping:
            return
        doc = {"pid": os.getpid(), "processes": [c.status() for c in self.children]}
        tmp = f"{self.status_path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(doc, f)
            os.replace(tmp, self.status_path)  # NOTE: atomic: the router never reads half a file
        except OSError as e:  # NOTE: the status is for show; supervision goes on without it
            sys.stderr.write(f"mmcache up: cannot write {self.status_path}: {e}\n")

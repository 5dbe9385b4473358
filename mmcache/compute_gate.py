"""The compute gate: EPD stages that share one machine's cores take turns at them.

Where the encoders, prefill and decode workers run on the same cores (a CPU box, or one GPU),
forwards running at once time-slice the cores: each runs at a fraction of its speed, so the
prefill that would end a request's wait for its first token finishes only when the encode
beside it does. With the gate, each worker asks for a turn before a forward and gives it back
after. The gate (hosted by the sidecar, ``mmcache serve --compute-gate PATH``) grants ``slots``
turns at once, one by default: each forward runs alone, at the full width of the machine, as in
an aggregated engine, while the order is EPD's own:

- prefill first (it ends a request's wait for its first token), then encode, then decode;
  oldest first within a stage;
- except that a waiter past its stage's wait budget (``max_wait_s``; decode's by default, so
  tokens keep flowing during a burst of encodes) goes first, oldest first.

Turns are not preempted, but a long forward can be cut into turns: the holder of a turn may
``yield`` it at a safe point (the encoder does between its transformer layers), which gives the
turn back and queues for the next one in one step, so that a waiter the order puts first (a
prefill) runs next, and the yielder goes on at once when nobody is waiting. A waiter waits for
the turn in progress to end: at most one encoder layer (a fraction of a second on a CPU), not a
whole image.

Protocol, over a Unix socket, one line each way, one turn at a time per connection::

    client: want STAGE      server: go         (once granted)
    client: yield           server: go         (holding: the turn is given back, and granted
                                                again in its turn)
    client: done                               (the turn is given back)

A connection that closes gives back its turn, or its place in the queue. ``GateClient`` is the
blocking client a worker's forward thread uses; a worker whose gate is gone (the sidecar stopped)
runs ungated rather than failing its requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

logger = logging.getLogger(__name__)

STAGES = ("prefill", "encode", "decode")
"""In the order they are served."""
DEFAULT_MAX_WAIT_S = {"decode": 0.5}
"""Wait budgets: past it a waiter goes first. A decode step is short (tens of ms on a CPU)."""
MAX_LINE = 64
RECONNECT_AFTER_S = 5.0


@dataclass
class _Waiter:
    stage: str
    since: float
    seq: int
    granted: asyncio.Future


class ComputeGate:
    """The queue and the turns; driven by ``start_gate_server`` (or directly, in tests)."""

    def __init__(self, slots: int = 1, max_wait_s: dict[str, float] | None = None, clock=time.monotonic):
        if slots < 1:
            raise ValueError(f"{slots=} must be >= 1")
        budgets = DEFAULT_MAX_WAIT_S if max_wait_s is None else max_wait_s
        unknown = set(budgets) - set(STAGES)
        if unknown:
            raise ValueError(f"max_wait_s: unknown stages {sorted(unknown)}; stages: {', '.join(STAGES)}")
        self.slots = slots
        self.max_wait_s = dict(budgets)
        self._clock = clock
        self._seq = itertools.count()
        self._waiting: list[_Waiter] = []
        self.holding = 0
        self.counters = {s: {"turns": 0, "wait_s": 0.0, "max_wait_s": 0.0, "held_s": 0.0} for s in STAGES}

    async def acquire(self, stage: str, yielding: float | None = None) -> float:
        """Until granted a turn for ``stage``; the time granted (pass it to ``release``). Cancelled
        while waiting: the place in the queue is gone. ``yielding``: as for ``join``."""
        waiter = self.join(stage, yielding)
        try:
            return await asyncio.shield(waiter.granted)
        except asyncio.CancelledError:
            self.leave(waiter)
            raise

    def join(self, stage: str, yielding: float | None = None) -> _Waiter:
        """Queue for a turn for ``stage`` now (``waiter.granted`` resolves to the time granted).
        ``yielding``: the time the caller's own ``stage`` turn was granted; that turn is given
        back as the caller joins the queue, in one step, so the order alone says who goes next
        (a plain release would grant the freed turn before the caller is queued)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        waiter = _Waiter(stage, self._clock(), next(self._seq), asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        if yielding is not None:
            self._give_back(stage, yielding)
        self._grant()
        return waiter

    def leave(self, waiter: _Waiter) -> None:
        """Give up ``waiter``'s place in the queue, or its turn if it was granted meanwhile."""
        if waiter.granted.done():
            if not waiter.granted.cancelled():
                self.release(waiter.stage, waiter.granted.result())
        else:
            waiter.granted.cancel()
            if waiter in self._waiting:
                self._waiting.remove(waiter)

    def release(self, stage: str, granted_at: float) -> None:
        self._give_back(stage, granted_at)
        self._grant()

    def _give_back(self, stage: str, granted_at: float) -> None:
        self.holding -= 1
        self.counters[stage]["held_s"] += self._clock() - granted_at

    def _next(self) -> _Waiter:
        now = self._clock()
        overdue = [w for w in self._waiting if w.stage in self.max_wait_s and now - w.since > self.max_wait_s[w.stage]]
        if overdue:
            return min(overdue, key=lambda w: (w.since, w.seq))
        return min(self._waiting, key=lambda w: (STAGES.index(w.stage), w.since, w.seq))

    def _grant(self) -> None:
        while self.holding < self.slots and self._waiting:
            waiter = self._next()
            self._waiting.remove(waiter)
            if waiter.granted.done():  # NOTE: cancelled; its task has yet to run and leave the queue
                continue
            now = self._clock()
            self.holding += 1
            c = self.counters[waiter.stage]
            c["turns"] += 1
            c["wait_s"] += now - waiter.since
            c["max_wait_s"] = max(c["max_wait_s"], now - waiter.since)
            waiter.granted.set_result(now)

    def stats(self) -> dict:
        return {"slots": self.slots, "holding": self.holding, "waiting": len(self._waiting),
                "stages": {s: {k: round(v, 3) if isinstance(v, float) else v for k, v in c.items()}
                           for s, c in self.counters.items()}}


async def _serve_connection(gate: ComputeGate, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    held: tuple[str, float] | None = None
    try:
        while line := await reader.readline():
            words = line.decode("ascii", "replace").split()
            if held is None and len(words) == 2 and words[0] == "want" and words[1] in STAGES:
                held = await _wait_for_turn(gate, words[1], reader)
                if held is None:
                    return
                writer.write(b"go\n")
                await writer.drain()
            elif held is not None and words == ["yield"]:
                stage, granted_at = held
                held = None  # NOTE: given back by the acquire below, whatever happens next
                held = await _wait_for_turn(gate, stage, reader, yielding=granted_at)
                if held is None:
                    return
                writer.write(b"go\n")
                await writer.drain()
            elif held is not None and words == ["done"]:
                gate.release(*held)
                held = None
            else:
                state = f"holding a {held[0]} turn" if held else "no turn held"
                expected = "yield|done" if held else "want " + "|".join(STAGES)
                raise ValueError(f"bad gate message {line[:MAX_LINE]!r} ({state}); expected {expected}")
    except (ValueError, ConnectionError) as e:
        logger.warning("compute gate: dropping a client: %s", e)
    finally:
        if held is not None:
            gate.release(*held)
        writer.close()


async def _wait_for_turn(gate: ComputeGate, stage: str, reader: asyncio.StreamReader,
                         yielding: float | None = None) -> tuple[str, float] | None:
    """(stage, granted at), or None when the client hung up while it waited. A client that waits
    sends nothing, so a read that ends first means the connection closed (or a broken client).
    ``yielding``: the client's turn, granted then, is given back as it queues (``join``)."""
    waiter = gate.join(stage, yielding)  # NOTE: at once, not in a task that may never start
    hangup = asyncio.ensure_future(reader.read(1))
    try:
        await asyncio.wait((waiter.granted, hangup), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        hangup.cancel()
        gate.leave(waiter)
        raise
    if not hangup.done():
        hangup.cancel()  # NOTE: nothing was read: the stream is as it was, once the read has ended
        with contextlib.suppress(asyncio.CancelledError):
            await hangup
        return stage, waiter.granted.result()
    gate.leave(waiter)
    if hangup.result():
        raise ValueError(f"a client sent {hangup.result()!r} while waiting for its {stage} turn")
    return None


async def start_gate_server(gate: ComputeGate, path: str) -> asyncio.AbstractServer:
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # NOTE: a stale socket of an earlier run
        return await asyncio.start_unix_server(lambda r, w: _serve_connection(gate, r, w), path, limit=MAX_LINE * 4)
    except OSError as e:
        raise OSError(e.errno, f"cannot serve the compute gate on {path}: {e.strerror or e}") from None


class GateClient:
    """A worker's side: ``with client.turn(): forward()``, from any one thread at a time; a long
    forward calls ``yield_turn()`` at its safe points."""

    def __init__(self, path: str, stage: str):
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        self.path, self.stage = path, stage
        self._sock: socket.socket | None = None
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._holding: socket.socket | None = None  # the connection of the turn held, if any
        self.turns = self.ungated = self.yields = 0

    def _connect(self) -> socket.socket | None:
        if self._sock is None and time.monotonic() >= self._down_until:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
            except OSError as e:
                sock.close()
                self._gone(f"cannot connect to {self.path}: {e}")
            else:
                self._sock = sock
        return self._sock

    def _gone(self, why: str) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._down_until = time.monotonic() + RECONNECT_AFTER_S
        logger.warning("compute gate %s; running ungated for %.0f s", why, RECONNECT_AFTER_S)

    def _ask(self, sock: socket.socket, line: bytes) -> bool:
        try:
            sock.sendall(line)
            answer = sock.recv(MAX_LINE)
        except OSError as e:
            self._gone(f"failed: {e}")
            return False
        if answer != b"go\n":
            self._gone(f"answered {answer!r}" if answer else "closed the connection")
            return False
        return True

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        with self._lock:
            sock = self._connect()
            granted = sock is not None and self._ask(sock, f"want {self.stage}\n".encode())
            if granted:
                self.turns += 1
                self._holding = sock
            else:
                self.ungated += 1
            try:
                yield
            finally:
                self._holding = None
                if granted and self._sock is sock:
                    try:
                        sock.sendall(b"done\n")
                    except OSError as e:
                        self._gone(f"failed: {e}")

    def yield_turn(self) -> None:
        """Inside ``turn()``, on its thread, at a point where the work may pause: let whoever the
        gate's order puts first (a prefill, an overdue decode) run, and go on once it is this
        worker's turn again; at once when nobody else is waiting. A round trip on the socket
        (tens of microseconds). Ungated (no gate, or it is gone): returns at once."""
        sock = self._holding
        if sock is None:
            return
        self.yields += 1
        if not self._ask(sock, b"yield\n"):
            self._holding = None  # NOTE: _ask dropped the connection; the rest of the turn runs ungated

    def stats(self) -> dict:
        """Forwards run with a turn, without one (the gate was unreachable), and turns yielded."""
        return {"path": self.path, "stage": self.stage, "turns": self.turns, "ungated": self.ungated,
                "yields": self.yields}

    def close(self) -> None:
        """Hang up; a thread waiting for a turn wakes and runs ungated. Safe from any thread."""
        self._down_until = float("inf")
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

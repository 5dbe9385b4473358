"""What an elastic worker tells the router's controller about its load (``GET /v1/stats``
``"load"``), for the stage it serves now:

- ``queue_delay_s``: how long work waits before its compute begins. An EWMA of the waits
  observed, fading (half-life ``window_s / 2``) while nothing new is observed, and never less
  than the wait so far of the oldest item still waiting (a stuck queue shows at once).
  - encode: an image's wait in the single-flight batcher's queue before its batch ran;
  - prefill: a prefill's wait for the forward thread (behind other prefills);
  - decode: a request's wait to join the batch, plus what it loses to sharing each step:
    ``EWMA(step time - the fastest step seen) x EWMA(tokens per request)``, i.e. how much
    longer a request takes than it would alone in the batch (a step of one request loses 0).
- ``busy``: the fraction of the last ``window_s`` the compute ran (a run in progress counts).
- ``inflight``: requests being served (the caller's count).

Cheap: no locks. ``begin``/``end``/``observe_*`` may run on a compute thread; reads run on the
event loop. NOTE: CPython's deque append/popleft and tuple(deque) are atomic under the GIL, and
a torn read of two floats costs one slightly stale sample, never a wrong order of magnitude.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any


class LoadMeter:
    """Lifecycle: created per worker; ``reset()`` when the worker changes role (the signals are
    the new stage's). The fastest decode step seen survives resets (it is the hardware's)."""

    def __init__(self, window_s: float = 3.0, alpha: float = 0.3, clock: Callable[[], float] = time.monotonic):
        if window_s <= 0:
            raise ValueError(f"{window_s=} must be > 0")
        if not 0 < alpha <= 1:
            raise ValueError(f"{alpha=} must be within (0, 1]")
        self.window_s = window_s
        """Seconds ``busy`` looks back; the delays' half-life is half of it."""
        self.alpha = alpha
        """Weight of a new sample in the EWMAs."""
        self._clock = clock
        self.min_step_s = math.inf
        """The fastest decode step seen: a request alone in the batch."""
        self.oldest_wait: Callable[[], float] | None = None
        """Seconds the oldest item still waiting has waited (0 when none): set per role."""
        self._seq = itertools.count()
        self.reset()

    def reset(self) -> None:
        self._runs: deque[tuple[float, float]] = deque()
        """(start, end) of the runs that ended within the window, oldest first."""
        self._running: dict[int, float] = {}
        """Runs in progress: token → start."""
        self._waiting: dict[int, float] = {}
        """Items waiting for the compute (``metered``): token → since."""
        half_life_s = self.window_s / 2
        self._wait = _Ewma(self.alpha, half_life_s)
        self._step_loss = _Ewma(self.alpha, half_life_s)
        self._tokens = _Ewma(self.alpha, None)
        """Tokens per decode request: a factor, not a load (it does not fade)."""

    # -- recording (any thread) ---------------------------------------------------------------

    def begin(self) -> int:
        """A run starts now: a token for ``end``."""
        token = next(self._seq)
        self._running[token] = self._clock()
        return token

    def end(self, token: int) -> None:
        start = self._running.pop(token, None)
        if start is not None:
            self._runs.append((start, self._clock()))

    def metered(self, fn: Callable[..., Any], wait: bool = True) -> Callable[..., Any]:
        """``fn`` as a run; with ``wait``, the time from now until it starts is a wait (and, until
        it starts, it is a waiting item)."""
        token = next(self._seq)
        if wait:
            self._waiting[token] = self._clock()

        def run(*args: Any) -> Any:
            run_token = self.begin()
            since = self._waiting.pop(token, None)
            if since is not None:
                self.observe_wait(self._clock() - since)
            try:
                return fn(*args)
            finally:
                self.end(run_token)
        return run

    def observe_wait(self, wait_s: float) -> None:
        self._wait.add(max(0.0, wait_s), self._clock())

    def observe_step(self, step_s: float, batch_size: int = 2) -> None:
        """A decode step of ``batch_size`` requests took ``step_s``: each lost ``step_s - min_step_s``
        to sharing it. A request alone in its step shares nothing (a long context makes its step
        slower than the fastest seen, not a queue)."""
        self.min_step_s = min(self.min_step_s, step_s)
        self._step_loss.add(step_s - self.min_step_s if batch_size > 1 else 0.0, self._clock())

    def observe_tokens(self, num_tokens: int) -> None:
        """A decode request ended after ``num_tokens`` tokens."""
        self._tokens.add(float(num_tokens), self._clock())

    # -- reading (the event loop) -------------------------------------------------------------

    def queue_delay_s(self) -> float:
        now = self._clock()
        delay = self._wait.value(now) + self._step_loss.value(now) * self._tokens.value(now)
        waiting = tuple(self._waiting.values())
        oldest = max((now - since for since in waiting), default=0.0)
        if self.oldest_wait is not None:
            oldest = max(oldest, self.oldest_wait())
        return max(delay, oldest)

    def busy(self) -> float:
        now = self._clock()
        start = now - self.window_s
        while self._runs and self._runs[0][1] <= start:
            self._runs.popleft()
        total = sum(min(e, now) - max(s, start) for s, e in tuple(self._runs) if e > start)
        total += sum(now - max(s, start) for s in tuple(self._running.values()))
        return min(1.0, max(0.0, total / self.window_s))

    def snapshot(self, inflight: int) -> dict:
        return {"queue_delay_s": round(self.queue_delay_s(), 6), "busy": round(self.busy(), 4),
                "inflight": inflight, "window_s": self.window_s}


class _Ewma:
    """An EWMA of irregular samples that fades toward 0 (``half_life_s``; None: never) while no
    sample comes: a stage that went quiet stops looking loaded, and a new sample mixes with what
    is left of the old ones."""

    __slots__ = ("alpha", "half_life_s", "_value", "_at")

    def __init__(self, alpha: float, half_life_s: float | None) -> None:
        self.alpha, self.half_life_s = alpha, half_life_s
        self._value = 0.0
        self._at: float | None = None

    def add(self, sample: float, now: float) -> None:
        self._value = sample if self._at is None else self.value(now) + self.alpha * (sample - self.value(now))
        self._at = now

    def value(self, now: float) -> float:
        if self._at is None:
            return 0.0
        if self.half_life_s is None:
            return self._value
        return self._value * 0.5 ** (max(0.0, now - self._at) / self.half_life_s)

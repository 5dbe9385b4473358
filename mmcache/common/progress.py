"""Progress a person can watch, for every long-running command of the project.

``Progress("warm", total=500, unit="images")`` is a tqdm bar on a terminal, and plain lines
every ``interval_s`` (and one at the end) where a bar would be noise: ``quiet=True`` (a
``--quiet`` flag), or standard error not a terminal (a log file, CI, a pipe)::

    with Progress("warm", total=500, unit="images", counters=("hits", "failures")) as p:
        for item in items:
            ...
            p.update(1, nbytes=len(raw), hits=int(hit))

Besides the count it keeps bytes (shown with their rate) and named counters (hits, failures,
skipped, ...), shown on the bar and in each plain line:

    warm: 120/500 images (24%), 34.2 MiB, 12.1 images/s, 2.9 MiB/s, hits 80, failures 2, 10 s, ~31 s left

``Progress.callback(what)`` adapts the ``progress(done, total, what)`` callbacks that measuring
code takes (``llm_worker.planner.profile``). The bar and the lines go to standard error, so standard
output stays the command's answer. Thread-safe: ``update`` may be called from worker threads.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable, TextIO

__all__ = ["Progress", "human_bytes"]

DEFAULT_INTERVAL_S = 10.0


def human_bytes(n: float) -> str:
    """``1536`` → ``1.5 KiB``: binary units, three significant figures."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _isatty(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal; a closed or odd stream is not (and must not fail the job)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


class Progress:
    """A count towards an optional ``total``, plus bytes and named counters; a bar or plain lines.

    ``what`` names the job in every line; ``unit`` is what is counted (plural). ``counters``
    are shown in this order even while zero (so a reader sees that failures are being counted);
    others appear once non-zero. ``stream`` defaults to standard error; ``bar`` forces (True) or
    forbids (False) the tqdm bar, default: a bar when not ``quiet`` and ``stream`` is a terminal.
    """

    def __init__(self, what: str, total: int | None = None, unit: str = "items", *,
                 counters: tuple[str, ...] = (), quiet: bool = False, stream: TextIO | None = None,
                 interval_s: float = DEFAULT_INTERVAL_S, bar: bool | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.what, self.total, self.unit = what, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self.done = 0
        self.nbytes = 0
        self.counters: dict[str, int] = {name: 0 for name in counters}
        self._clock = clock
        self._start = clock()
        self._last_line = self._start
        self._lock = threading.Lock()
        self._closed = False
        if bar is None:
            bar = not quiet and _isatty(self.stream)
        self._bar = None
        if bar:
            from tqdm import tqdm  # NOTE: only on a terminal; plain lines need nothing

            self._bar = tqdm(total=total, unit=f" {unit}", desc=what, file=self.stream, dynamic_ncols=True,
                             smoothing=0.1, leave=True)
            self._bar.set_postfix_str(self._postfix(), refresh=False)

    # -- counting ------------------------------------------------------------------------------

    def update(self, n: int = 1, *, nbytes: int = 0, **counters: int) -> None:
        """``n`` more done, ``nbytes`` more bytes moved, and each named counter increased."""
        with self._lock:
            self.done += n
            self.nbytes += nbytes
            for name, value in counters.items():
                self.counters[name] = self.counters.get(name, 0) + value
            if self._bar is not None:
                self._bar.set_postfix_str(self._postfix(), refresh=False)
                self._bar.update(n)
                return
            now = self._clock()
            if now - self._last_line >= self.interval_s:
                self._last_line = now
                self._print(self.line())

    def set_total(self, total: int | None) -> None:
        """The total once known (a source counted while the job already runs)."""
        with self._lock:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
                self._bar.refresh()

    def note(self, text: str) -> None:
        """One line of its own (a failure named, a phase begun) that does not break the bar."""
        with self._lock:
            if self._bar is not None:
                try:
                    self._bar.write(f"{self.what}: {text}", file=self.stream)
                except (OSError, ValueError):  # NOTE: as in _print (tqdm guards only the bar's own writes)
                    pass
            else:
                self._print(f"{self.what}: {text}")

    def callback(self, *, counted: bool = True) -> Callable[[int, int, str], None]:
        """A ``progress(done, total, what)`` function for code that reports that way: each call
        sets the count and total, and ``what`` is noted (a plain line per call when not a bar)."""
        def report(done: int, total: int, what: str) -> None:
            with self._lock:
                self.total = total
                step = done - self.done
                if self._bar is not None:
                    self._bar.total = total
                    self._bar.set_postfix_str(what[:60], refresh=False)
                    self._bar.update(step)
                    self.done = done
                    return
                self.done = done
                self._last_line = self._clock()
                self._print(f"{self.what}: {done}/{total} {self.unit}: {what}" if counted else f"{self.what}: {what}")
        return report

    # -- showing -------------------------------------------------------------------------------

    def elapsed_s(self) -> float:
        return self._clock() - self._start

    def line(self) -> str:
        """The plain line for now: count (of total, %), bytes, rates, counters, elapsed, time left."""
        elapsed = max(self.elapsed_s(), 1e-9)
        if self.total:
            parts = [f"{self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%)"]
        else:
            parts = [f"{self.done} {self.unit}"]
        if self.nbytes:
            parts.append(human_bytes(self.nbytes))
        parts.append(f"{self.done / elapsed:.3g} {self.unit}/s")
        if self.nbytes:
            parts.append(f"{human_bytes(self.nbytes / elapsed)}/s")
        parts += [f"{name} {value}" for name, value in self.counters.items()]
        parts.append(_duration(elapsed))
        if self.total and 0 < self.done < self.total:
            parts.append(f"~{_duration((self.total - self.done) * elapsed / self.done)} left")
        return f"{self.what}: " + ", ".join(parts)

    def _postfix(self) -> str:
        parts = [human_bytes(self.nbytes)] if self.nbytes else []
        if self.nbytes:
            parts.append(f"{human_bytes(self.nbytes / max(self.elapsed_s(), 1e-9))}/s")
        parts += [f"{name} {value}" for name, value in self.counters.items()]
        return ", ".join(parts)

    def _print(self, text: str) -> None:
        try:
            print(text, file=self.stream, flush=True)
        except (OSError, ValueError):  # NOTE: a closed pipe must not fail the job it reports on
            pass

    def close(self, *, final_line: bool = True) -> None:
        """The bar finished, or the last plain line (unless not ``final_line``); idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._bar is not None:
                self._bar.set_postfix_str(self._postfix(), refresh=False)
                self._bar.close()
            elif final_line:
                self._print(self.line())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # NOTE: a job that failed before counting anything ends with its error alone, not "0 items"
        self.close(final_line=exc_type is None or self.done > 0)

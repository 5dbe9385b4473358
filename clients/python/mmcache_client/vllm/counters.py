"""The connector's counters: what it reports to vLLM's EC connector stats and logs."""

from __future__ import annotations

import threading
from typing import Iterable

COUNTS = (
    "lookups", "hits", "misses", "lookup_errors", "loads", "loaded_bytes", "load_errors", "vanished",
    "rejected", "saves", "saved_bytes", "saves_existing", "saves_dropped", "save_errors", "claims_won",
    "claims_waited", "claim_timeouts", "outages", "errors",
)
"""Integer counters. ``vanished``: items the scheduler found that the worker did not (encoded
locally instead); ``rejected``: entries whose shape or dtype is not what vLLM expects; ``errors``: a hook of ours that failed
(a bug: logged with its traceback) and was answered as a miss."""
TIMES = ("lookup_ms", "load_ms", "save_ms")
"""Summed milliseconds (averaged per call when reduced)."""


class Counters:
    """Named counts and summed times, thread-safe; ``take`` hands over what accrued since the
    last ``take`` (vLLM's stats are per interval), ``totals`` what accrued since the start."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, float] = {}
        self._totals: dict[str, float] = {}

    def add(self, name: str, n: float = 1) -> None:
        with self._lock:
            self._data[name] = self._data.get(name, 0) + n
            self._totals[name] = self._totals.get(name, 0) + n

    def merge(self, data: dict[str, float] | None) -> None:
        if not data:
            return
        with self._lock:
            for name, n in data.items():
                self._data[name] = self._data.get(name, 0) + n
                self._totals[name] = self._totals.get(name, 0) + n

    def take(self) -> dict[str, float]:
        with self._lock:
            data, self._data = self._data, {}
        return data

    def totals(self) -> dict[str, float]:
        with self._lock:
            return dict(self._totals)


def summed(items: Iterable[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for data in items:
        for name, n in data.items():
            out[name] = out.get(name, 0) + n
    return out


def reduced(data: dict[str, float]) -> dict[str, int | float]:
    """One interval's counters for vLLM's log line: counts as ints, times as averages per call."""
    out: dict[str, int | float] = {name: int(data[name]) for name in COUNTS if data.get(name)}
    per = {"lookup_ms": data.get("lookups", 0), "load_ms": data.get("loads", 0) + data.get("load_errors", 0),
           "save_ms": data.get("saves", 0) + data.get("saves_existing", 0) + data.get("save_errors", 0)}
    for name in TIMES:
        if data.get(name) and per[name]:
            out[f"avg_{name}"] = round(data[name] / per[name], 3)
    return out

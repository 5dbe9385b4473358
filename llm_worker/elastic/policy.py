"""When to switch a worker's role: the decision rule of role switching, shared by the router's
controller (``llm_worker.elastic.controller``) and the simulator (``llm_worker.planner.simulator``), so
that what the planner predicts for ``--elastic`` is what the stack does. The signals are the
workers' own (``llm_worker.elastic.load.LoadMeter``): per stage, the mean queue delay and busy fraction
of the workers serving it.

A stage is *hot* when its queue delay exceeds ``high_s``; it can *give* a worker when it keeps
at least one, its busy fraction spread over one worker fewer (``busy x n / (n - 1)``) stays under
``low``, and its queue delay is under ``high_s / 2``. Hysteresis: both conditions must hold for
``sustain`` ticks in a row, no switch within ``cooldown_s`` of the last one ending, one switch at
a time (the caller does not decide while one runs). The hottest stage takes from the donor whose
spread busy fraction is least, and of it the least busy worker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

STAGES = ("encode", "prefill", "decode")


@dataclass(frozen=True)
class ElasticPolicy:
    """The controller's settings (``mmcache up --elastic-*``), with the routers' defaults."""

    interval_s: float = 1.0
    """How often the controller samples the stages."""
    window_s: float = 3.0
    """The workers' load window (``LoadMeter``): busy looks back this far, delays fade at half of it."""
    high_s: float = 0.5
    """A stage whose mean queue delay exceeds this is hot."""
    low: float = 0.5
    """A stage may give a worker when its busy fraction over one worker fewer stays under this."""
    sustain: int = 2
    """Ticks in a row a condition must hold."""
    cooldown_s: float = 5.0
    """After a switch ends, how long before the next may start."""

    def __post_init__(self) -> None:
        finite = all(isinstance(v, (int, float)) and math.isfinite(v)
                     for v in (self.interval_s, self.window_s, self.high_s, self.low, self.cooldown_s))
        if not (finite and self.interval_s > 0 and self.window_s > 0 and self.high_s > 0 and 0 < self.low <= 1
                and isinstance(self.sustain, int) and self.sustain >= 1 and self.cooldown_s >= 0):
            raise ValueError("elastic settings: interval, window and high must be finite and > 0, low in (0, 1], "
                             "sustain an int >= 1, cooldown finite and >= 0")

    def policy(self) -> "Policy":
        return Policy(self.high_s, self.low, self.cooldown_s, self.sustain)


@dataclass(frozen=True)
class WorkerLoad:
    url: str
    queue_delay_s: float
    busy: float
    inflight: int


@dataclass(frozen=True)
class StageLoad:
    """One stage's signals: ``size`` workers in its pool, ``workers`` those that answered."""

    size: int
    workers: tuple[WorkerLoad, ...] = ()

    @property
    def queue_delay_s(self) -> float:
        return sum(w.queue_delay_s for w in self.workers) / len(self.workers) if self.workers else 0.0

    @property
    def busy(self) -> float:
        return sum(w.busy for w in self.workers) / len(self.workers) if self.workers else 0.0

    def busy_without_one(self) -> float:
        """The busy fraction once one worker has gone (the same work on ``size - 1``)."""
        return self.busy * self.size / (self.size - 1) if self.size > 1 else math.inf

    def to_json(self) -> dict:
        return {"workers": self.size, "answered": len(self.workers), "queue_delay_s": round(self.queue_delay_s, 6),
                "busy": round(self.busy, 4)}


@dataclass(frozen=True)
class Move:
    url: str
    src: str
    dst: str
    reason: dict


class Policy:
    """When to move a worker, and which; ``decide`` once per tick (it counts the ticks a condition
    has held), ``switched`` after each switch. No I/O: tested on synthetic signals."""

    def __init__(self, high_s: float, low: float, cooldown_s: float, sustain: int) -> None:
        self.high_s, self.low, self.cooldown_s, self.sustain = high_s, low, cooldown_s, sustain
        self.hot_ticks = dict.fromkeys(STAGES, 0)
        self.idle_ticks = dict.fromkeys(STAGES, 0)
        self.last_switch_at = -math.inf

    def is_hot(self, load: StageLoad) -> bool:
        return bool(load.workers) and load.queue_delay_s > self.high_s

    def can_give(self, load: StageLoad) -> bool:
        return bool(load.workers) and load.size > 1 and load.busy_without_one() < self.low \
            and load.queue_delay_s < self.high_s / 2

    def decide(self, loads: dict[str, StageLoad], now: float) -> Move | None:
        for stage in STAGES:
            load = loads.get(stage, StageLoad(0))
            self.hot_ticks[stage] = self.hot_ticks[stage] + 1 if self.is_hot(load) else 0
            self.idle_ticks[stage] = self.idle_ticks[stage] + 1 if self.can_give(load) else 0
        if now - self.last_switch_at < self.cooldown_s:
            return None
        hot = sorted((s for s in STAGES if self.hot_ticks[s] >= self.sustain),
                     key=lambda s: -loads[s].queue_delay_s)
        donors = sorted((s for s in STAGES if self.idle_ticks[s] >= self.sustain),
                        key=lambda s: loads[s].busy_without_one())
        for dst in hot:
            for src in donors:
                if src == dst:
                    continue
                worker = min(loads[src].workers, key=lambda w: (w.busy, w.inflight, w.url))
                h, d = loads[dst], loads[src]
                return Move(worker.url, src, dst, {
                    "hot": {"stage": dst, "queue_delay_s": round(h.queue_delay_s, 6), "busy": round(h.busy, 4),
                            "ticks": self.hot_ticks[dst], "high_s": self.high_s},
                    "donor": {"stage": src, "queue_delay_s": round(d.queue_delay_s, 6), "busy": round(d.busy, 4),
                              "busy_without_one": round(d.busy_without_one(), 4), "ticks": self.idle_ticks[src],
                              "low": self.low, "worker_busy": round(worker.busy, 4)}})
        return None

    def switched(self, now: float) -> None:
        """A switch ended (either way): the cooldown starts, and every condition must hold anew."""
        self.last_switch_at = now
        self.hot_ticks = dict.fromkeys(STAGES, 0)
        self.idle_ticks = dict.fromkeys(STAGES, 0)

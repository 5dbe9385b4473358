"""When to switch a worker's role: the decision rule of role switching, shared by the router's
controller (``llm_worker.elastic_controller``) and the simulator (``llm_worker.simulator``), so
that what the planner predicts for ``--elastic`` is what the stack does.

Every ``interval_s`` the controller samples each stage (encode, prefill, decode): its workers,
its **queue delay** (the mean time work waited before its compute began over the last
``window_s``: an image for its encoder batch, a prompt for the prefill worker's forward thread,
a decode request for the time it lost to a shared batch) and its **busy fraction** (the share of
the interval its workers' compute was busy). A stage is *hot* when its queue delay exceeds
``high_s``. A stage can *give* a worker when it has more than one, its delay is under half of
``high_s``, and its busy fraction spread over one worker fewer (``busy * n / (n - 1)``) stays
under ``low``. Hysteresis: the same (donor, hot) pair must hold for ``sustain`` samples in a row,
no switch starts within ``cooldown_s`` of the last one ending, and one switch at a time. The
hottest stage takes from the idlest donor.
"""

from __future__ import annotations

from dataclasses import dataclass

STAGES = ("encode", "prefill", "decode")


@dataclass(frozen=True)
class ElasticPolicy:
    interval_s: float = 1.0
    """How often the controller samples the stages."""
    window_s: float = 5.0
    """Queue delays of the work that waited within this window count."""
    high_s: float = 0.5
    """A stage whose mean queue delay exceeds this is hot."""
    low: float = 0.5
    """A stage may give a worker when its busy fraction over one worker fewer stays under this."""
    sustain: int = 2
    """Samples in a row the same move must be called for."""
    cooldown_s: float = 5.0
    """After a switch ends, how long before the next may start."""

    def __post_init__(self) -> None:
        if not (self.interval_s > 0 and self.window_s > 0 and self.high_s > 0 and 0 < self.low <= 1
                and self.sustain >= 1 and self.cooldown_s >= 0):
            raise ValueError("elastic policy: interval, window and high must be > 0, low in (0, 1], sustain >= 1, "
                             "cooldown >= 0")


@dataclass(frozen=True)
class StageSignal:
    workers: int
    delay_s: float
    busy: float

    def as_dict(self) -> dict:
        return {"workers": self.workers, "queue_delay_s": round(self.delay_s, 4), "busy": round(self.busy, 3)}


def wanted_move(signals: dict[str, StageSignal], policy: ElasticPolicy) -> tuple[str, str] | None:
    """(donor stage, hot stage) that these signals call for, or None."""
    hot = [s for s in STAGES if s in signals and signals[s].delay_s > policy.high_s]
    if not hot:
        return None
    target = max(hot, key=lambda s: signals[s].delay_s)
    donors = []
    for s in STAGES:
        sig = signals.get(s)
        if s == target or sig is None or sig.workers < 2 or sig.delay_s >= policy.high_s / 2:
            continue
        if sig.busy * sig.workers / (sig.workers - 1) < policy.low:
            donors.append(s)
    if not donors:
        return None
    return min(donors, key=lambda s: (signals[s].busy, -signals[s].workers)), target


class Hysteresis:
    """``wanted_move`` over time: a move only once it held ``sustain`` samples, outside the cooldown."""

    def __init__(self, policy: ElasticPolicy):
        self.policy = policy
        self._last: tuple[str, str] | None = None
        self._count = 0
        self._quiet_until = 0.0

    def observe(self, now: float, signals: dict[str, StageSignal], switching: bool) -> tuple[str, str] | None:
        move = wanted_move(signals, self.policy)
        self._count = self._count + 1 if move is not None and move == self._last else (1 if move else 0)
        self._last = move
        if move is None or switching or now < self._quiet_until or self._count < self.policy.sustain:
            return None
        self._count = 0
        self._last = None
        return move

    def switched(self, now: float) -> None:
        """A switch ended (or failed) at ``now``: the cooldown starts."""
        self._quiet_until = now + self.policy.cooldown_s

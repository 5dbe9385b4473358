"""An elastic worker's role (``mmcache-llm serve --role elastic``): which stage it serves now,
and the switch from one to another that loses no request.

States: *serving R* → (``switch(T)``) → *draining R* → (R's work all done) → *serving T*.
While draining, every request — for R or T — is refused with ``NotServing`` (503 with
``Retry-After``: the router retries it on another worker of that stage), the requests already
in R run to their end, and R's own queues empty (the decode batch, the encode batcher: the
``idle`` checks). Then the role flips, with no await between the last check and the flip, so
no request slips in between. A switch whose caller leaves (cancelled) while draining goes back
to serving R. One switch at a time (``SwitchInProgress``); a switch to the current role is a
no-op.

Requests are counted where they enter (``serving``), per role, so that a switch knows what it
waits for without asking the services.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator

from llm_worker.serve.config import ELASTIC_ROLES

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1.0
"""What a request refused by a draining (or other-role) worker is told to wait."""
_POLL_S = 0.02
"""How often a drain looks at the queues behind the requests (they have no events of their own)."""


class NotServing(RuntimeError):
    """This worker does not serve that stage now (another role, or draining): 503 + Retry-After."""

    retry_after_s = RETRY_AFTER_S


class SwitchInProgress(RuntimeError):
    """Another switch is under way: 409."""


class ElasticRole:
    """The role state machine. ``idle``: per role, whether the work behind its requests is done
    (e.g. the decode batch is empty); a role without one is idle once its requests have left.
    ``on_switch(previous, role)`` runs at the flip (e.g. resets the load signals)."""

    def __init__(self, initial: str, idle: dict[str, Callable[[], bool]] | None = None,
                 on_switch: Callable[[str, str], None] | None = None, history: int = 32) -> None:
        if initial not in ELASTIC_ROLES:
            raise ValueError(f"role {initial!r} must be one of {', '.join(ELASTIC_ROLES)}")
        self.role = initial
        self.target: str | None = None
        """The role being switched to while draining; None otherwise."""
        self.inflight = dict.fromkeys(ELASTIC_ROLES, 0)
        """Requests in progress per role (only the current one's can be > 0, but for a drain)."""
        self.switches = 0
        self.history: deque[dict] = deque(maxlen=history)
        """This worker's last switches: ``{"at", "from", "to", "drained_s", "ok"}``."""
        self._idle = idle or {}
        self._on_switch = on_switch
        self._left = asyncio.Event()
        """Set whenever a request leaves (a drain waits on it)."""

    @property
    def switching(self) -> bool:
        return self.target is not None

    @contextlib.contextmanager
    def serving(self, role: str) -> Iterator[None]:
        """Around one request for ``role``: ``NotServing`` unless the worker serves it now."""
        if role != self.role or self.target is not None:
            now = f"draining {self.role} to become {self.target}" if self.target else f"serving {self.role}"
            raise NotServing(f"this elastic worker is {now}, not {role}; retry on another {role} worker")
        self.inflight[role] += 1
        try:
            yield
        finally:
            self.inflight[role] -= 1
            self._left.set()

    def _drained(self, role: str) -> bool:
        idle = self._idle.get(role)
        return self.inflight[role] == 0 and (idle is None or idle())

    async def switch(self, to: str) -> dict:
        """Drain the current role, then serve ``to``: ``{"role", "previous", "drained_s"}``."""
        if to not in ELASTIC_ROLES:
            raise ValueError(f"role {to!r} must be one of {', '.join(ELASTIC_ROLES)}")
        if self.target is not None:
            raise SwitchInProgress(f"a switch from {self.role} to {self.target} is under way")
        previous = self.role
        if to == previous:
            return {"role": to, "previous": previous, "drained_s": 0.0}
        self.target = to
        t0 = time.monotonic()
        logger.info("elastic: draining %s (%d in flight) to become %s", previous, self.inflight[previous], to)
        try:
            while not self._drained(previous):
                self._left.clear()
                if self.inflight[previous]:
                    await self._left.wait()
                else:  # NOTE: the requests left; what they queued (a batch, an encode) is ending
                    await asyncio.sleep(_POLL_S)
        except BaseException:
            self.target = None  # NOTE: the caller left: serve the old role again
            self.history.append({"at": time.time(), "from": previous, "to": to,
                                 "drained_s": round(time.monotonic() - t0, 4), "ok": False})
            logger.info("elastic: the switch from %s to %s was abandoned; serving %s", previous, to, previous)
            raise
        drained_s = time.monotonic() - t0
        self.role, self.target = to, None
        self.switches += 1
        self.history.append({"at": time.time(), "from": previous, "to": to, "drained_s": round(drained_s, 4),
                             "ok": True})
        if self._on_switch is not None:
            self._on_switch(previous, to)
        logger.info("elastic: now %s (was %s; drained in %.3f s)", to, previous, drained_s)
        return {"role": to, "previous": previous, "drained_s": round(drained_s, 4)}

    def info(self) -> dict:
        return {"role": self.role, "switching": self.switching, "target": self.target, "switches": self.switches,
                "inflight": self.inflight[self.role], "history": list(self.history)}

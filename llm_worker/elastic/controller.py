"""The router's role-switching controller (``mmcache-llm router --elastic``): every worker of
the EPD stack is elastic (``llm_worker.elastic.app``), and when the load shifts (image-heavy ↔
text-only) a worker of an idle stage is moved to the stage that is queueing.

Each tick (``interval_s``) it polls every worker's ``GET /v1/stats`` ``"load"`` (concurrently,
short timeout) and computes per stage the mean queue delay and busy fraction
(``llm_worker.elastic.load``). ``Policy.decide`` (``llm_worker.elastic.policy``, shared with the simulator)
then moves a worker when

- a stage is *hot*: its queue delay > ``high_s``, for ``sustain`` ticks in a row, and
- another stage can *give* one: it keeps at least one worker, its busy fraction spread over one
  worker fewer (``busy x n / (n - 1)``) stays < ``low``, and its queue delay < ``high_s / 2`` —
  for ``sustain`` ticks in a row too,

and no switch ended less than ``cooldown_s`` ago (hysteresis: two thresholds, sustained
conditions, a cooldown). The hottest stage takes the donor whose spread busy fraction is least,
and of it the least busy worker.

A switch (``switch``; also ``POST /v1/elastic/switch`` for operators, through the same path and
history): the worker leaves its pool first (no new work reaches it), ``POST /v1/role`` drains and
flips it, then it joins the new stage's pool. One that fails (unreachable, an error) goes back
to its pool, and is recorded. One switch at a time. A worker whose own role disagrees with its
pool (a switch the router gave up on but the worker finished) is moved where it is at the next
tick, unless that would empty its pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Callable

import aiohttp

from llm_worker.router.backends import Backend, Pool
from llm_worker.elastic.policy import STAGES, Move, Policy, StageLoad, WorkerLoad


logger = logging.getLogger(__name__)

__all__ = ["ElasticController", "Move", "Policy", "StageLoad", "SwitchRefused", "WorkerLoad"]


class SwitchRefused(Exception):
    """A switch that cannot be made now (busy, the stage's last worker, unknown worker): ``status``."""

    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.status = status


class ElasticController:
    """Lifecycle: ``start()`` with the router (after its HTTP session), ``close()`` before it."""

    def __init__(self, config: Any, pools: dict[str, Pool], http: Callable[[], aiohttp.ClientSession]) -> None:
        """``config``: the router's (``elastic_*``, ``stack_token``, ``timeout_s``); ``pools``: the
        worker pools it moves workers between; ``http``: the router's HTTP session (made at start)."""
        c = config
        self.config, self._pools, self._http = config, pools, http
        self.interval_s = c.elastic_interval_s
        self.policy = c.elastic_policy.policy()
        self.history: deque[dict] = deque(maxlen=200)
        """``{"at", "url", "from", "to", "reason", "drained_s", "ok"}`` per switch (and ``error``)."""
        self.stages: dict[str, dict] = {}
        """The last tick's signals per stage."""
        self.ticks = 0
        self.roles: dict[str, str] | None = None
        """What each worker said it serves at the last poll (url -> role); None before the first."""
        self._switches = 0
        """Switches begun: a poll that overlapped one is stale for reconciling."""
        self._restoring: set[str] = set()
        self.switching: Backend | None = None
        """The worker being switched (out of every pool meanwhile)."""
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None

    @property
    def pools(self) -> dict[str, Pool]:
        return self._pools

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="elastic-controller")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.tick()
            except Exception:  # NOTE: one bad tick (a bug, a worker's odd answer) must not stop the controller
                logger.exception("elastic controller tick failed")

    async def _poll(self) -> dict[Backend, dict | None]:
        timeout = aiohttp.ClientTimeout(total=min(2.0, max(0.2, self.interval_s)))

        async def probe(backend: Backend) -> dict | None:
            try:
                async with self._http().get(backend.url + "/v1/stats", timeout=timeout) as r:
                    doc = await r.json(content_type=None) if r.status == 200 else None
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                return None
            return doc if isinstance(doc, dict) else None
        backends = [b for pool in self.pools.values() for b in pool.backends]
        return dict(zip(backends, await asyncio.gather(*map(probe, backends))))

    async def tick(self) -> Move | None:
        """Poll, reconcile, decide; switch when the policy says so. The move made, if any."""
        self.ticks += 1
        begun = self._switches
        polled = await self._poll()
        self.roles = {b.url: doc.get("role") for b, doc in polled.items() if doc and not doc.get("switching")}
        if not self._lock.locked() and begun == self._switches:  # NOTE: a switch during the poll: stale roles
            self._reconcile(polled)
        # NOTE: a stage's size is the workers that answered serving it: a dead one gives nothing
        loads = {stage: StageLoad(sum(self.roles.get(b.url) == stage for b in pool.backends), tuple(
            WorkerLoad(b.url, float(load.get("queue_delay_s", 0)), float(load.get("busy", 0)),
                       int(load.get("inflight", 0)))
            for b in pool.backends if (load := _load(polled.get(b), stage)) is not None))
            for stage, pool in self.pools.items() if stage in STAGES}
        # NOTE: while a switch (an operator's) is under way the signals are in flux: no decision
        move = None if self._lock.locked() else self.policy.decide(loads, time.monotonic())
        self.stages = {s: {**load.to_json(), "hot_ticks": self.policy.hot_ticks[s],
                           "idle_ticks": self.policy.idle_ticks[s]} for s, load in loads.items()}
        if move is None:
            return None
        backend = next(b for b in self.pools[move.src].backends if b.url == move.url)
        logger.info("elastic: %s is hot (queue delay %.3f s), %s can give %s", move.dst,
                    move.reason["hot"]["queue_delay_s"], move.src, move.url)
        await self.switch(backend, move.dst, move.reason)
        return move

    def _reconcile(self, polled: dict[Backend, dict | None]) -> None:
        """A worker whose own role differs from its pool's: moved to the pool it serves, or, when it
        is its pool's last, told to serve its pool's role again (a restarted worker comes back in
        its first role; an operator may have switched it directly)."""
        for backend, doc in polled.items():
            role = doc.get("role") if doc else None
            if role not in STAGES or role == backend.role or doc.get("switching") or role not in self.pools:
                continue
            if len(self.pools[backend.role]) > 1:
                logger.warning("elastic: %s serves %s, not %s: moving it to the %s pool", backend.url, role,
                               backend.role, role)
                self.pools[backend.role].backends.remove(backend)
                backend.role = role
                self.pools[role].backends.append(backend)
            elif backend.url not in self._restoring:
                logger.warning("elastic: %s serves %s but is the last %s worker: switching it back", backend.url,
                               role, backend.role)
                self._restoring.add(backend.url)
                asyncio.get_running_loop().create_task(self._restore(backend, backend.role))

    async def _restore(self, backend: Backend, role: str) -> None:
        """Tell ``backend`` to serve ``role`` again (it stays in that role's pool meanwhile)."""
        try:
            answer = await self._post_role(backend, role)
            self.history.append({"at": time.time(), "url": backend.url, "from": None, "to": role,
                                 "reason": {"restore": "the worker served another role than its pool's last"},
                                 "drained_s": answer.get("drained_s"), "ok": answer.get("role") == role,
                                 **({"error": answer["error"]} if "error" in answer else {})})
        finally:
            self._restoring.discard(backend.url)

    def find(self, url: str) -> Backend | None:
        url = url.rstrip("/")
        return next((b for pool in self.pools.values() for b in pool.backends if b.url == url), None)

    async def switch(self, backend: Backend, to: str, reason: dict) -> dict:
        """Move ``backend`` to stage ``to``: its history record (``ok`` false when the worker could
        not be switched; it is back in its pool then). ``SwitchRefused`` before anything is done
        when another switch is under way or the worker is its stage's last."""
        if to not in STAGES:
            raise SwitchRefused(f"role {to!r} must be one of {', '.join(STAGES)}", 400)
        if self._lock.locked():
            raise SwitchRefused(f"a switch of {self.switching.url if self.switching else 'a worker'} is under way")
        async with self._lock:
            src = backend.role
            if to == src and (self.roles is None or self.roles.get(backend.url) in (None, to)):
                return {"at": time.time(), "url": backend.url, "from": src, "to": to, "reason": reason,
                        "drained_s": 0.0, "ok": True, "noop": True}
            pool = self.pools[src]
            if backend not in pool.backends:
                raise SwitchRefused(f"{backend.url} is not a {src} worker of this router", 404)
            if to != src:
                others = [b for b in pool.backends if b is not backend
                          and (self.roles is None or self.roles.get(b.url) == src)]
                if not others:
                    raise SwitchRefused(f"{backend.url} is the last {src} worker that answers: a stage keeps one")
            self._switches += 1
            if to == src:  # NOTE: the router's role and the worker's differ: tell the worker, keep the pool
                answer = await self._post_role(backend, to)
                record = {"at": time.time(), "url": backend.url, "from": (self.roles or {}).get(backend.url),
                          "to": to, "reason": reason, "drained_s": answer.get("drained_s"),
                          "ok": answer.get("role") == to, **({"error": answer["error"]} if "error" in answer else {})}
                self.history.append(record)
                return record
            pool.backends.remove(backend)  # NOTE: first: no new work reaches it while it drains
            self.switching = backend
            record: dict[str, Any] = {"at": time.time(), "url": backend.url, "from": src, "to": to, "reason": reason}
            try:
                answer = await self._post_role(backend, to)
            except asyncio.CancelledError:
                pool.backends.append(backend)
                self.history.append({**record, "ok": False, "error": "cancelled (the router is stopping)"})
                self.policy.switched(time.monotonic())
                raise
            finally:
                self.switching = None
            ok = answer.get("role") == to and "error" not in answer
            record.update(drained_s=answer.get("drained_s"), ok=ok)
            if ok:
                backend.role = to
                self.pools[to].backends.append(backend)
            else:
                record["error"] = answer.get("error", f"the worker answered {answer!r}")
                pool.backends.append(backend)
                logger.warning("elastic: switching %s from %s to %s failed: %s", backend.url, src, to, record["error"])
            self.history.append(record)
            self.policy.switched(time.monotonic())
            return record

    async def _post_role(self, backend: Backend, to: str) -> dict:
        """The worker's answer to ``POST /v1/role``, or ``{"error"}``."""
        try:
            token = self.config.stack_token
            headers = {"Authorization": f"Bearer {token}"} if token else None
            async with self._http().post(backend.url + "/v1/role", json={"role": to}, headers=headers,
                                             timeout=aiohttp.ClientTimeout(total=self.config.timeout_s)) as r:
                doc = await r.json(content_type=None)
                if r.status != 200:
                    return {"error": f"HTTP {r.status}: {doc.get('error') if isinstance(doc, dict) else doc}"}
                return doc if isinstance(doc, dict) else {"error": f"the worker answered {doc!r}"}
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            return {"error": f"{type(e).__name__}: {e}"}

    def stats(self, workers: list[dict]) -> dict:
        """The router's ``/v1/stats`` ``"elastic"``; ``workers``: the probed workers (``gather_stats``)."""
        out = [{"url": w["url"], "role": (w.get("stats") or {}).get("role"),
                "switching": bool((w.get("stats") or {}).get("switching")), "load": (w.get("stats") or {}).get("load"),
                "healthy": w.get("healthy")} for w in workers]
        if self.switching is not None:
            out.append({"url": self.switching.url, "role": self.switching.role, "switching": True, "load": None})
        p = self.policy
        return {"workers": out, "history": list(self.history), "stages": self.stages, "ticks": self.ticks,
                "settings": {"interval_s": self.interval_s, "high_s": p.high_s, "low": p.low,
                             "cooldown_s": p.cooldown_s, "sustain": p.sustain}}


def _load(doc: dict | None, stage: str) -> dict | None:
    """A polled worker's load signals, when it answered as an elastic worker serving ``stage``
    and not switching (a worker that does not is left out of the stage's signals)."""
    if not doc or doc.get("switching") or doc.get("role") != stage or not isinstance(doc.get("load"), dict):
        return None
    return doc["load"]

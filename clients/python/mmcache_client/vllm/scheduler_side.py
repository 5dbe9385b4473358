"""The connector in vLLM's scheduler: which items the cache has, and one encode per new image.

It reads vLLM's ``Request`` by attribute only (``request_id``, ``mm_features[i].identifier`` and
``.mm_position``), so it imports no vLLM. The scheduler calls, per step:

1. ``ensure_cache_available(request, num_computed_tokens)`` for each request with media, before
   it schedules it: one bounded round trip for all of the request's items whose answer is not
   known (a ``lookup``; for an engine that encodes, a ``claim``, which answers "exists" or
   takes the claim in the same trip). Answers are kept for ``ANSWER_TTL_S``.
2. ``has_cache_item(identifier)`` per item: answered from 1 (a round trip only for an item 1 did
   not see); True makes vLLM load the item instead of encoding it.
3. ``update_state_after_alloc(request, index)`` for each item it loads or encodes this step;
   the loads go to the worker in ``build_connector_meta``.

Nothing raises into vLLM's scheduler: a cache that is down, slow or answering nonsense is a
miss (counted), and the item is encoded here.

Waiting on another engine's encode (``ec_both``): a ``claim`` answered "wait" defers the request
(``ensure_cache_available`` returns False; vLLM's scheduler skips it and schedules the others:
``skip_request``, not a stall). It is claimed again on later steps, polling at most every
``_poll_s`` (5 ms doubling to 100 ms), until the entry exists (loaded), the claim is ours (the
owner died or gave it back: encoded here) or ``claim_ttl_ms`` passed (encoded here, counted).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from mmcache_client.errors import MMCacheError
from mmcache_client.vllm.counters import Counters, reduced
from mmcache_client.vllm.keys import hash_for
from mmcache_client.vllm.link import CacheLink

logger = logging.getLogger(__name__)

ANSWER_TTL_S = 1.0
"""How long a lookup's answer is trusted. A stale hit costs nothing but a local encode (the
worker falls back); a stale miss, an encode a producer may have made meanwhile."""
POLL_FIRST_S, POLL_MAX_S = 0.005, 0.1
MAX_ANSWERS = 65536
"""Answers kept at most (expired ones are swept first)."""
LOG_INTERVAL_S = 60.0


@dataclass(frozen=True)
class LoadItem:
    """One item the worker loads this step: vLLM's ``mm_hash`` (its encoder-cache key), our entry
    hash, and what vLLM expects of it."""

    req_id: str
    index: int
    mm_hash: str
    hash: str
    num_embeds: int
    modality: str


@dataclass
class _Answer:
    state: str
    """``hit``, ``miss``, ``won`` (ours to encode) or ``wait`` (another engine encodes it)."""
    until: float
    poll_s: float = POLL_FIRST_S


class SchedulerSide:
    """State: answers per identifier, this step's hits and loads, claims won per request, waits."""

    def __init__(self, link: CacheLink, namespace: str, counters: Counters, *, is_producer: bool,
                 is_consumer: bool, claim_owner: str, claim_ttl_ms: int,
                 clock: Callable[[], float] = time.monotonic):
        self._link, self._namespace, self._counters = link, namespace, counters
        self.is_producer, self.is_consumer = is_producer, is_consumer
        self._owner, self._claim_ttl_ms = claim_owner, claim_ttl_ms
        self._clock = clock
        self._answers: dict[str, _Answer] = {}
        self._step_hits: set[str] = set()
        self._loads: list[LoadItem] = []
        self._claimed: dict[str, set[str]] = {}
        """request id → identifiers this engine claimed for it and has not encoded yet."""
        self._waiting_since: dict[tuple[str, str], float] = {}
        self._logged_at = clock()
        self._logged: dict[str, float] = {}

    # ------------------------------------------------------------------ vLLM's calls
    def ensure_cache_available(self, request: Any, num_computed_tokens: int) -> bool:
        now = self._clock()
        pending = _pending_items(request, num_computed_tokens)
        unknown = sorted({ident for _, ident, _ in pending if self._stale(ident, now)})
        if unknown:
            self._ask(unknown, now)
        if self.is_producer:
            for _, ident, _ in pending:
                answer = self._answers.get(ident)
                if answer is not None and answer.state == "won":
                    self._claimed.setdefault(request.request_id, set()).add(ident)
        if not self.is_consumer or not self.is_producer:
            return True  # NOTE: only an engine that can both load and encode waits on a claim
        ready = True
        for _, ident, _ in pending:
            answer = self._answers.get(ident)
            if answer is None or answer.state != "wait":
                self._waiting_since.pop((request.request_id, ident), None)
                continue
            since = self._waiting_since.setdefault((request.request_id, ident), now)
            if now - since >= self._claim_ttl_ms / 1000.0:
                # NOTE: waited as long as this engine would hold a claim: encode it here
                self._counters.add("claim_timeouts")
                self._answers[ident] = _Answer("miss", now + ANSWER_TTL_S)
                self._waiting_since.pop((request.request_id, ident), None)
                continue
            ready = False
        return ready

    def has_cache_item(self, identifier: str) -> bool:
        if not self.is_consumer:
            return False
        now = self._clock()
        if self._stale(identifier, now):
            self._ask([identifier], now)
        answer = self._answers.get(identifier)
        hit = answer is not None and answer.state == "hit"
        if hit:
            self._step_hits.add(identifier)
        return hit

    def update_state_after_alloc(self, request: Any, index: int) -> None:
        feature = request.mm_features[index]
        ident = feature.identifier
        if ident in self._step_hits:
            self._loads.append(LoadItem(request.request_id, index, ident, hash_for(ident),
                                        int(feature.mm_position.get_num_embeds()), str(feature.modality)))
            return
        claimed = self._claimed.get(request.request_id)
        if claimed is not None:
            claimed.discard(ident)  # NOTE: encoded this step: its save (a put) ends the claim

    def take_loads(self) -> list[LoadItem]:
        """This step's loads, for the metadata; the step's state is reset."""
        loads, self._loads = self._loads, []
        self._step_hits.clear()
        self._maybe_log()
        return loads

    def worker_report(self, counters: dict[str, float] | None, vanished: list[str] | None) -> None:
        """What the workers said after a step: their counters, and hits they did not find."""
        self._counters.merge(counters)
        for ident in vanished or ():
            self._answers.pop(ident, None)

    def request_finished(self, request: Any) -> None:
        """Give back claims this engine took for the request and never encoded (aborted, or
        served from vLLM's own encoder cache), so no other engine waits on them."""
        rid = request.request_id
        for ident in {ident for (r, ident) in self._waiting_since if r == rid}:
            self._waiting_since.pop((rid, ident), None)
        idents = self._claimed.pop(rid, None)
        if not idents:
            return
        keys = [f"{self._namespace}/{hash_for(i)}" for i in sorted(idents)]
        for ident in idents:
            self._answers.pop(ident, None)
        try:
            self._link.call(lambda c: c.release_claims(keys, self._owner), 0, "release claims")
        except MMCacheError as e:
            logger.debug("mmcache: giving back claims failed: %s", e)

    def close(self) -> None:
        self._link.close()

    # ------------------------------------------------------------------ the round trip
    def _stale(self, ident: str, now: float) -> bool:
        answer = self._answers.get(ident)
        return answer is None or answer.until <= now

    def _ask(self, idents: list[str], now: float) -> None:
        """One bounded round trip for ``idents``; every failure is a miss, counted."""
        if not self._link.available():
            self._remember(idents, "miss", now)
            self._counters.add("misses", len(idents))
            return
        keys = [f"{self._namespace}/{hash_for(i)}" for i in idents]
        claiming = self.is_producer
        t0 = time.perf_counter()
        try:
            if claiming:
                got = self._link.call(lambda c: c.claim(keys, self._owner, self._claim_ttl_ms), None, "claim")
            else:
                got = self._link.call(lambda c: c.lookup(keys), None, "lookup")
        except MMCacheError as e:  # the sidecar refused the question: our bug, not the engine's
            logger.warning("mmcache: the sidecar refused a %s: %s", "claim" if claiming else "lookup", e)
            got = None
        self._counters.add("lookups")
        self._counters.add("lookup_ms", (time.perf_counter() - t0) * 1000.0)
        if not isinstance(got, dict):
            self._counters.add("lookup_errors")
            self._counters.add("misses", len(idents))
            self._remember(idents, "miss", now)
            return
        for ident, key in zip(idents, keys):
            state = _state(got.get(key), claiming)
            previous = self._answers.get(ident)
            if state == "wait":
                polling = previous is not None and previous.state == "wait"
                poll = min(previous.poll_s * 2, POLL_MAX_S) if polling else POLL_FIRST_S
                self._answers[ident] = _Answer("wait", now + poll, poll)
                if not polling:
                    self._counters.add("claims_waited")
                continue
            self._answers[ident] = _Answer(state, now + ANSWER_TTL_S)
            self._counters.add("hits" if state == "hit" else "misses")
            if state == "won":
                self._counters.add("claims_won")
        self._sweep(now)

    def _remember(self, idents: list[str], state: str, now: float) -> None:
        for ident in idents:
            self._answers[ident] = _Answer(state, now + ANSWER_TTL_S)
        self._sweep(now)

    def _sweep(self, now: float) -> None:
        if len(self._answers) <= MAX_ANSWERS:
            return
        for ident in [i for i, a in self._answers.items() if a.until <= now]:
            del self._answers[ident]
        while len(self._answers) > MAX_ANSWERS:
            self._answers.pop(next(iter(self._answers)))

    def _maybe_log(self) -> None:
        now = self._clock()
        if now - self._logged_at < LOG_INTERVAL_S:
            return
        self._logged_at = now
        totals = self._counters.totals()
        if totals != self._logged:
            self._logged = totals
            line = ", ".join(f"{k}={v}" for k, v in reduced(totals).items())
            if line:
                logger.info("mmcache EC connector, since start: %s", line)


def _pending_items(request: Any, num_computed_tokens: int) -> list[tuple[int, str, Any]]:
    """``(index, identifier, feature)`` of the request's items not yet behind its computed tokens."""
    out = []
    for index, feature in enumerate(request.mm_features or ()):
        pos = feature.mm_position
        if pos.offset + pos.length <= num_computed_tokens:
            continue
        out.append((index, feature.identifier, feature))
    return out


def _state(answer: Any, claiming: bool) -> str:
    """A lookup's answer (a tier name or None) or a claim's (``{"state": ...}``) as our state;
    anything unexpected is a miss."""
    if not claiming:
        return "hit" if isinstance(answer, str) and answer else "miss"
    state = answer.get("state") if isinstance(answer, dict) else None
    return {"exists": "hit", "won": "won", "wait": "wait"}.get(state, "miss")

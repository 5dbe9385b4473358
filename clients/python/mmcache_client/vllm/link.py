"""A link to the sidecar that never lets an outage reach vLLM.

Every call is bounded by ``timeout_ms`` (the socket's own timeout; the SDK client makes no
retries). A call that fails marks the link down: the outage is logged once, calls are skipped
(the caller's fallback answers at once: a miss, a dropped save) until a backoff passes, and the
first call after it tries again (0.25 s doubling to 8 s, with jitter); the first success logs the
recovery. A sidecar restarted meanwhile is simply reconnected to: the client opens a fresh
connection (and maps the new arena) on the next call.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any, Callable, TypeVar

from mmcache_client.client import CacheClient
from mmcache_client.errors import BadRequest, CacheFull, EntryTooLarge, MMCacheError, TooManyRequests
from mmcache_client.vllm.counters import Counters

logger = logging.getLogger(__name__)
T = TypeVar("T")

BACKOFF_FIRST_S = 0.25
BACKOFF_MAX_S = 8.0

ANSWERS = (BadRequest, CacheFull, EntryTooLarge, TooManyRequests)
"""The sidecar answered (it is up): the call failed on its own merits, not an outage."""


class CacheLink:
    """One ``CacheClient`` and its up/down state. ``call(fn, fallback)`` runs ``fn(client)`` or
    answers ``fallback`` (down, or the call failed). One thread per link: the client is not
    shared."""

    def __init__(self, url: str, token: str | None, timeout_ms: float, counters: Counters, role: str,
                 clock: Callable[[], float] = time.monotonic, loud: bool = True):
        self.url, self.role = url, role
        self._log_level = logging.WARNING if loud else logging.DEBUG
        """NOTE: one engine has several links (the scheduler's, each worker's load and save links,
        in other processes); only the scheduler's is loud, so an outage is logged once."""
        self._token, self._timeout_s = token, timeout_ms / 1000.0
        self.counters = counters
        self._clock = clock
        self._client: CacheClient | None = None
        self.up = True
        self._retry_at = 0.0
        self._backoff_s = BACKOFF_FIRST_S
        self._lock = threading.Lock()

    @property
    def client(self) -> CacheClient:
        if self._client is None:
            self._client = CacheClient(self.url, token=self._token, timeout=self._timeout_s, retries=0)
        return self._client

    def available(self) -> bool:
        """False while down and the backoff has not passed (no call would be made)."""
        return self.up or self._clock() >= self._retry_at

    def call(self, fn: Callable[[CacheClient], T], fallback: T, what: str) -> T:
        if not self.available():
            return fallback
        try:
            result = fn(self.client)
        except ANSWERS:
            self._mark_up()
            raise
        except (MMCacheError, OSError, ValueError) as e:
            self._mark_down(what, e)
            return fallback
        self._mark_up()
        return result

    def _mark_down(self, what: str, error: BaseException) -> None:
        with self._lock:
            if self.up:
                self.up = False
                self._backoff_s = BACKOFF_FIRST_S
                self.counters.add("outages")
                logger.log(self._log_level, "mmcache %s: the sidecar at %s is unreachable (%s: %s); vLLM goes on without "
                               "the cache (items are encoded here, saves dropped) and retries with backoff",
                               self.role, self.url, what, error)
            else:
                self._backoff_s = min(self._backoff_s * 2, BACKOFF_MAX_S)
            self._retry_at = self._clock() + self._backoff_s * (0.75 + random.random() / 2)
        self.close_client()

    def _mark_up(self) -> None:
        if not self.up:
            with self._lock:
                if not self.up:
                    self.up = True
                    logger.log(self._log_level, "mmcache %s: the sidecar at %s answers again; the cache is back in use",
                                   self.role, self.url)

    def close_client(self) -> None:
        """Drop the client (a broken one is rebuilt on the next call). Tensors still viewing its
        arena keep their connection open until they go (``mmcache_client.leased_tensors``)."""
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except (MMCacheError, OSError) as e:
                logger.debug("closing the mmcache client: %s", e)

    def close(self) -> None:
        self.close_client()

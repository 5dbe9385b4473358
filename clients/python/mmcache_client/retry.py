"""The SDK's one retry policy (sans-IO: it decides, the clients sleep and call).

A call is retried only when the sidecar could not be reached or the connection broke before an
answer (the transport's *transient* errors, ``CacheUnavailable`` among them): then again after
``backoff_s * 2**attempt`` seconds with ±50 % jitter, at most ``retries`` times, and then
``CacheUnavailable`` naming the sidecar. Never retried: a timed-out call (``CacheTimeout``: it
may have happened, and a put or a claim must not happen twice) and every answer the sidecar gave
(a 4xx or 5xx is an ``MMCacheError`` of its own kind; a 503's ``Retry-After`` is the caller's).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

from mmcache_client.errors import CacheTimeout, CacheUnavailable, MMCacheError


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 3
    backoff_s: float = 0.05

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries={self.retries!r} must be an int >= 0")
        if not 0 <= self.backoff_s < float("inf"):
            raise ValueError(f"backoff_s={self.backoff_s!r} must be a finite number >= 0")

    def attempts(self) -> Iterator[int]:
        """0, 1, ... ``retries``: the attempt numbers, first try included."""
        return iter(range(self.retries + 1))

    def retryable(self, error: BaseException, transient: tuple[type[BaseException], ...]) -> bool:
        """Whether ``error`` may be tried again: one of the transport's ``transient`` errors, and
        neither a timed-out call nor an answer of the sidecar."""
        if isinstance(error, CacheTimeout):
            return False
        if isinstance(error, MMCacheError) and not isinstance(error, CacheUnavailable):
            return False
        return isinstance(error, transient)

    def delay_s(self, attempt: int) -> float:
        """The wait before attempt ``attempt + 1``."""
        return self.backoff_s * (2 ** attempt) * (0.5 + random.random())

    def gave_up(self, what: str, error: BaseException) -> CacheUnavailable:
        """The error after the last attempt failed with ``error``."""
        return CacheUnavailable(f"{what}: {error}")

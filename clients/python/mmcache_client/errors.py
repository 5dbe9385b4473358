"""Named exceptions of the SDK; every failure a caller can act on has its own class."""

from __future__ import annotations


class MMCacheError(Exception):
    """Base of every mmcache_client error."""


class CacheUnavailable(MMCacheError):
    """The sidecar could not be reached (after retries)."""


class CacheTimeout(CacheUnavailable):
    """The sidecar did not answer in time; the connection (and its leases) is kept."""


class AuthError(MMCacheError):
    """The sidecar refused the bearer token (HTTP 401)."""


class Forbidden(AuthError, PermissionError):
    """The token's tenant may not do this (HTTP 403): name another tenant's keys, read /metrics."""


class BadRequest(MMCacheError, ValueError):
    """The sidecar rejected the request: bad key, bad body, bad message."""


class EntryTooLarge(BadRequest):
    """The entry exceeds the sidecar's ``--max-entry-size`` (HTTP 413) or its arena."""


class TooManyKeys(EntryTooLarge):
    """One call named more keys than a call takes (``MAX_KEYS_PER_CALL``; HTTP 413): split it."""


class CacheFull(MMCacheError):
    """No room now: every byte the entry would need is leased or being written (HTTP 503).

    Not the caller's fault and not permanent: retry after ``retry_after_s`` seconds. Entries over
    the size limit raise ``EntryTooLarge`` instead.
    """

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooManyRequests(MMCacheError):
    """A cap on a shared resource was reached (HTTP 429): too many live claims (in all, or of one
    owner), too many event followers. ``retry_after_s`` says when to try again."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class LeaseLost(CacheUnavailable):
    """An entry's lease ended with its connection (the sidecar went away): its views are void."""


class CorruptEntry(MMCacheError):
    """An entry failed validation (format or checksum) on its way to the caller."""


class ServerError(MMCacheError):
    """The sidecar failed on a valid request (HTTP 5xx / internal error)."""


_KIND_TO_ERROR = {
    "ChecksumMismatch": CorruptEntry,
    "InternalError": ServerError,
    "EntryTooLarge": EntryTooLarge,
    "CacheFull": CacheFull,
    "TooManyRequests": TooManyRequests,
    "Forbidden": Forbidden,
}


def raise_for_kind(kind: str, message: str, retry_after_s: object = None) -> None:
    """Raise the SDK exception for an error ``kind`` named by the local protocol (with the
    sidecar's ``retry_after_s`` for the pressure answers)."""
    cls = _KIND_TO_ERROR.get(kind, BadRequest)
    if cls in (CacheFull, TooManyRequests) and isinstance(retry_after_s, (int, float)) and retry_after_s > 0:
        raise cls(message, float(retry_after_s))
    raise cls(message)

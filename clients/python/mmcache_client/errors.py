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


class BadRequest(MMCacheError, ValueError):
    """The sidecar rejected the request: bad key, bad body, bad message."""


class EntryTooLarge(BadRequest):
    """The entry exceeds the sidecar's ``--max-entry-size`` (HTTP 413) or its arena."""


class CorruptEntry(MMCacheError):
    """An entry failed validation (format or checksum) on its way to the caller."""


class ServerError(MMCacheError):
    """The sidecar failed on a valid request (HTTP 5xx / internal error)."""


_KIND_TO_ERROR = {
    "ChecksumMismatch": CorruptEntry,
    "InternalError": ServerError,
    "EntryTooLarge": EntryTooLarge,
}


def raise_for_kind(kind: str, message: str) -> None:
    """Raise the SDK exception for an error ``kind`` named by the local protocol."""
    raise _KIND_TO_ERROR.get(kind, BadRequest)(message)

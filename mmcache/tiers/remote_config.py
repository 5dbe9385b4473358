"""The remote tier's settings and its ``--remote`` URL (``redis://`` / ``rediss://``, one server or
a cluster's seed nodes), parsed and checked at start; a light module (no redis import) that the
sidecar's config checks a URL with."""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass

PASSWORD_ENV = "MMCACHE_REMOTE_PASSWORD"


class RemoteURLError(ValueError):
    """A ``--remote`` URL that cannot be used (the message says why)."""


@dataclass(frozen=True)
class RemoteConfig:
    url: str
    """``redis://[user:pass@]host:port[,host:port...]`` (one server or a cluster, detected), or
    ``rediss://`` for TLS. The password may come from ``MMCACHE_REMOTE_PASSWORD`` instead."""
    ttl_s: float | None = None
    """Expire remote entries after this long (None: the remote's own memory policy evicts)."""
    timeout_ms: float = 200.0
    """Longest wait for one remote call (connect, read or write)."""
    max_queued_bytes: int = 256 << 20
    """Write-behind bytes queued at most; past it, puts are dropped (counted)."""
    batch_max: int = 64
    breaker_failures: int = 3
    retry_s: float = 1.0
    required: bool = False
    """Refuse to start when the remote cannot be reached (else start with it marked down)."""
    max_entry_bytes: int = 256 << 20
    """A remote value longer than this is a miss, and at most this much of it is ever read
    (``--max-entry-size``: a value planted in the shared store cannot make a sidecar load more)."""


@dataclass(frozen=True)
class RemoteAddress:
    tls: bool
    nodes: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None


def parse_remote_url(url: str) -> RemoteAddress:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("redis", "rediss"):
        raise RemoteURLError(f"--remote {url!r}: the scheme must be redis:// or rediss://")
    netloc = parsed.netloc
    userinfo, _, hosts = netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, _, pw = userinfo.partition(":")
        username, password = urllib.parse.unquote(user) or None, urllib.parse.unquote(pw) or None
    password = password or os.environ.get(PASSWORD_ENV) or None
    nodes = []
    for part in hosts.split(","):
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise RemoteURLError(f"--remote {url!r}: {part!r} is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    if parsed.path not in ("", "/") or parsed.query:
        raise RemoteURLError(f"--remote {url!r}: no path or query is understood (database 0 only)")
    return RemoteAddress(parsed.scheme == "rediss", tuple(nodes), username, password)

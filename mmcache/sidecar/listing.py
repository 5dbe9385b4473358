"""One page of the sidecar's inventory (``GET /v1/entries``, the local ``list`` op): the keys
a caller may see, in key order, with the tier each would be read from and its size. What
``mmcache export`` walks; a tenant sees its own keys only, written without its tenant."""

from __future__ import annotations

from typing import Any

from mmcache.common.tenants import Principal
from mmcache.core.store import TieredStore
from mmcache_client.keys import Key

DEFAULT_LIST_LIMIT = 1000
MAX_LIST_LIMIT = 10_000
_MAX_AFTER_CHARS = 512


def list_page(store: TieredStore, principal: Principal, *, namespace: Any = None, after: Any = None,
              limit: Any = DEFAULT_LIST_LIMIT, acting_for: str | None = None) -> dict:
    """``{"entries": [{"key", "tier", "nbytes"}, ...], "next": KEY | None}``: up to ``limit``
    entries after ``after`` (a key as this caller writes it; the last page's ``next``), of
    ``namespace`` or of every namespace. ``next`` is None on the last page. ValueError names a
    bad argument. Blocking (a scan of the indexes): off the event loop."""
    if namespace is not None and not isinstance(namespace, str):
        raise ValueError(f"namespace must be a string, got {type(namespace).__name__}")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
        raise ValueError(f"limit={limit!r} must be an integer from 1 to {MAX_LIST_LIMIT}")
    if after is not None and (not isinstance(after, str) or len(after) > _MAX_AFTER_CHARS):
        raise ValueError(f"after must be a key string of at most {_MAX_AFTER_CHARS} chars (the last page's next)")
    prefix = principal.list_prefix(namespace, acting_for)
    start = "" if not after else (after if principal.trusted else f"{principal.tenant}@{after}")
    page = store.list_entries(prefix, start, limit)
    entries = [{"key": principal.shown(Key.from_string(key)), "tier": tier, "nbytes": nbytes}
               for key, tier, nbytes in page]
    return {"entries": entries, "next": entries[-1]["key"] if len(entries) == limit else None}

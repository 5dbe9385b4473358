"""mmcache_client: the Python SDK of mmcache (numpy required, torch optional).

    from mmcache_client import CacheClient, content_hash
    c = CacheClient("unix:///run/mmcache.sock")      # or "http://127.0.0.1:8470"
    c.put(ns, h, tensor)
    with c.get(ns, h) as entry:                     # None on a miss
        entry.tensor                                # a view of shared memory on the local path
"""

from mmcache_client.aclient import AsyncCacheClient
from mmcache_client.client import CacheClient
from mmcache_client.entry import AsyncEntry, AsyncEntryBatch, Entry, EntryBatch
from mmcache_client.errors import (AuthError, BadRequest, Forbidden, CacheFull, CacheTimeout, CacheUnavailable, CorruptEntry,
                                   EntryTooLarge, LeaseLost, MMCacheError, ServerError, TooManyKeys,
                                   TooManyRequests)
from mmcache_client.keys import Key, content_hash, validate_hash, validate_namespace

__all__ = [
    "AsyncCacheClient", "AsyncEntry", "AsyncEntryBatch", "AuthError", "BadRequest", "CacheClient", "CacheFull", "CacheTimeout", "CacheUnavailable",
    "CorruptEntry", "Entry", "EntryBatch", "EntryTooLarge", "Forbidden", "Key", "LeaseLost", "MMCacheError", "ServerError", "content_hash",
    "TooManyKeys", "TooManyRequests", "validate_hash", "validate_namespace",
]

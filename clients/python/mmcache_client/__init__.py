"""mmcache_client: the Python SDK of mmcache (numpy required, torch optional)."""

from mmcache_client.keys import Key, content_hash, validate_hash, validate_namespace

__all__ = ["Key", "content_hash", "validate_hash", "validate_namespace"]

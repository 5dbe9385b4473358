"""Content keys; defined in ``mmcache_client`` so the SDK installs alone, re-exported here."""

from mmcache_client.keys import Key, content_hash, validate_hash, validate_namespace

__all__ = ["Key", "content_hash", "validate_hash", "validate_namespace"]

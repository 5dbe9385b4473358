"""mmcache: a tiered, zero-copy multimodal embedding cache for EPD-disaggregated serving."""

from mmcache_client.keys import Key, content_hash, validate_hash, validate_namespace  # the SDK defines them (it installs alone)

__all__ = ["Key", "content_hash", "validate_hash", "validate_namespace"]
__version__ = "0.1.0"

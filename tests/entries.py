"""Entry blobs for tests: ``plan_entry(...).to_bytes()`` in one call."""

from __future__ import annotations

from typing import Any, Mapping

from mmcache_client.format import plan_entry


def encode_entry(namespace: str, hash_hex: str, tensors: Mapping[str, Any], metadata=None, **kw) -> bytes:
    return plan_entry(namespace, hash_hex, tensors, metadata, **kw).to_bytes()

"""mmcache as a vLLM encoder-cache ("EC") connector::

    vllm serve MODEL --ec-transfer-config '{"ec_connector": "MMCacheECConnector",
        "ec_connector_module_path": "mmcache_client.vllm", "ec_role": "ec_both",
        "ec_connector_extra_config": {"url": "unix:///run/mmcache.sock"}}'

vLLM is imported only when ``MMCacheECConnector`` (or ``MMCacheECStats``) is first asked for,
so the rest of this package (settings, keys, the sides' logic) and the SDK import without it.
"""

from __future__ import annotations

from typing import Any

_LAZY = ("MMCacheECConnector", "MMCacheECConnectorMetadata", "MMCacheECStats", "MMCacheECWorkerMetadata")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from mmcache_client.vllm import connector

        return getattr(connector, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)

"""The connector's settings, read from vLLM's ``ec_connector_extra_config`` (no vLLM import here)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

from mmcache_client.core import parse_url
from mmcache_client.keys import validate_namespace

KNOWN_KEYS = ("url", "token", "namespace", "durable", "timeout_ms", "claim_ttl_ms", "save_queue")


@dataclass(frozen=True)
class ConnectorSettings:
    """What ``ec_connector_extra_config`` says, checked. Bad values raise ``ValueError`` naming the
    key, so a wrong config stops the engine at start with a message that says what to fix."""

    url: str
    """The node's sidecar: ``unix:///run/mmcache.sock`` (zero-copy) or ``http(s)://host:port``."""
    token: str | None = None
    """Bearer token (else ``MMCACHE_TOKEN``); a token that maps to a tenant scopes the entries."""
    namespace: str | None = None
    """The namespace to use instead of the one digested from the model (``mmcache_client.vllm.keys``)."""
    durable: bool = False
    """Saves answer only once the entry is on disk (``PUT ?durable=1``); off the forward path either way."""
    timeout_ms: float = 50.0
    """The longest one call to the sidecar may take (a lookup, a load, a save) before it counts as a miss."""
    claim_ttl_ms: int = 30_000
    """How long this engine holds a claim on an image it encodes, and the longest an ``ec_both``
    engine waits for another engine's encode of the same image before encoding it itself."""
    save_queue: int = 64
    """Outputs waiting to be saved at most; past it a save is dropped and counted."""

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None, environ: Mapping[str, str] = os.environ) -> "ConnectorSettings":
        extra = dict(extra or {})
        unknown = sorted(set(extra) - set(KNOWN_KEYS))
        if unknown:
            raise ValueError(f"ec_connector_extra_config: unknown key(s) {unknown}; known: {list(KNOWN_KEYS)}")
        url = extra.get("url")
        if not url or not isinstance(url, str):
            raise ValueError('ec_connector_extra_config needs "url": the mmcache sidecar, e.g. '
                             '{"url": "unix:///run/mmcache.sock"} or {"url": "http://127.0.0.1:8470"}')
        try:
            parse_url(url)
        except ValueError as e:
            raise ValueError(f"ec_connector_extra_config url={url!r}: {e}") from None
        token = extra.get("token") or environ.get("MMCACHE_TOKEN") or None
        if token is not None and not isinstance(token, str):
            raise ValueError("ec_connector_extra_config token must be a string")
        namespace = extra.get("namespace")
        if namespace is not None:
            try:
                validate_namespace(namespace)
            except ValueError as e:
                raise ValueError(f"ec_connector_extra_config namespace: {e}") from None
        durable = extra.get("durable", False)
        if not isinstance(durable, bool):
            raise ValueError(f"ec_connector_extra_config durable={durable!r} must be true or false")
        timeout_ms = _number(extra, "timeout_ms", 50.0, low=1.0, high=60_000.0)
        claim_ttl_ms = int(_number(extra, "claim_ttl_ms", 30_000, low=100, high=600_000))
        save_queue = int(_number(extra, "save_queue", 64, low=1, high=1 << 16))
        return cls(url, token, namespace, durable, timeout_ms, claim_ttl_ms, save_queue)


def _number(extra: Mapping[str, Any], name: str, default: float, *, low: float, high: float) -> float:
    value = extra.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"ec_connector_extra_config {name}={value!r} must be a number")
    if not low <= value <= high:
        raise ValueError(f"ec_connector_extra_config {name}={value!r} must lie in [{low:g}, {high:g}]")
    return value

"""What a store holds, asked without reading it as a client does: entries described for a
prompt's layout, listed a page at a time, and counted per tenant. Functions over the tiers they
scan (the store's methods of the same names call them); call them off the event loop."""

from __future__ import annotations

import threading
from typing import Any

from mmcache.core.tier import Tier
from mmcache_client.format import EntryView, parse_entry


def describe(host: Any, lower: list[Tier], keys: list[str]) -> dict[str, dict | None]:
    """Per key ``{"tier", "num_tokens"[, "image_grid_thw"]}`` or None: what a reader needs to
    lay out its prompt without leasing the entry. Host entries are read from their (immutable,
    verified-at-seal) header in place; disk ones through a verified view. Not a client read:
    nothing counted, nothing promoted. Off the event loop."""
    owner = ("describe", threading.get_ident())
    out: dict[str, dict | None] = {}
    for key in keys:
        lease = host.lease(key, owner, count=False)
        if lease is not None:
            try:
                out[key] = _describe("host", EntryView(lease.view, parse_entry(lease.view)))
            finally:
                host.release(lease)
            continue
        out[key] = None
        for tier in lower:
            below = tier.lease(key, owner, count=False)  # NOTE: the tier verifies what it hands out
            if below is not None:
                try:
                    out[key] = _describe(tier.name, EntryView(below.view, parse_entry(below.view)))
                finally:
                    tier.release(below)
                break
    return out


def list_entries(host: Any, disk: Any, prefix: str, after: str, limit: int) -> list[tuple[str, str, int]]:
    """``(key, tier, nbytes)`` of up to ``limit`` local entries (host, then disk: the tier a
    read would come from) whose key starts with ``prefix`` and sorts after ``after``, in key
    order: one page of a listing (``GET /v1/entries``). The remote tier is not listed: it is
    shared by many sidecars and evicts on its own. Disk pages come from an LMDB cursor
    (O(log entries + limit)); the host index, bounded by the arena, is filtered whole. Off
    the event loop."""
    import heapq

    found = {key: ("disk", nbytes) for key, nbytes in disk.list_range(prefix, after, limit)}
    hosted = ((key, nbytes) for key, nbytes in host.inventory() if key > after and key.startswith(prefix))
    for key, nbytes in heapq.nsmallest(limit, hosted):
        found[key] = ("host", nbytes)  # NOTE: an entry in both reads from host
    return [(key, *found[key]) for key in sorted(found)[:limit]]


def usage_by_tenant(host: Any, disk: Any) -> dict[str | None, dict[str, dict[str, int]]]:
    """``{tenant: {tier: {"entries", "bytes"}}}`` for host and disk (None: the default
    tenant). A scan of both indexes: call it off the event loop."""
    out: dict[str | None, dict[str, dict[str, int]]] = {}
    for tier in (host, disk):
        for tenant, (entries, nbytes) in tier.usage_by_tenant().items():
            out.setdefault(tenant, {})[tier.name] = {"entries": entries, "bytes": nbytes}
    return out


def _describe(tier: str, view: EntryView) -> dict:
    doc: dict[str, Any] = {"tier": tier, "num_tokens": int(view.parsed.tensors["embeddings"].shape[0])}
    if "image_grid_thw" in view.parsed.tensors:
        doc["image_grid_thw"] = view.get_array("image_grid_thw").tolist()
    return doc

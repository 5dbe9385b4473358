"""The router's ``GET /v1/stats``: its counters, the cache's stats and every worker's health and
counters gathered in one answer (per node group with several)."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import aiohttp

from llm_worker.router.backends import Backend
from llm_worker.router.nodes import NodeGroup



async def gather_stats(http: aiohttp.ClientSession, config: Any, groups: list[NodeGroup], counters: dict,
                       inventory: Any, elastic: Any = None) -> dict:
    """The router's ``counters``, the cache's stats and every worker's health and counters; with
    several node ``groups``, ``nodes``: one per group, each with its sidecar's stats and workers
    (and the keys ``inventory`` indexes on it); ``elastic``: the role controller, if any."""
    async def probe(backend: Backend) -> dict:
        out = backend.info()
        try:
            async with http.get(backend.url + "/v1/stats", timeout=aiohttp.ClientTimeout(total=5)) as r:
                out.update(healthy=r.status == 200, stats=await r.json(content_type=None))
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            out.update(healthy=False, error=repr(e))
        return out

    async def cache_stats(group: NodeGroup) -> dict:
        if group.cache is None:
            return {"url": None}
        try:
            return {"url": group.cache_url, "healthy": True, "stats": await asyncio.wait_for(group.cache.stats(), 5)}
        except Exception as e:  # NOTE: whatever the cache's trouble, the answer goes on
            return {"url": group.cache_url, "healthy": False, "error": repr(e)}

    async def of_group(group: NodeGroup) -> dict:
        roles = list(group.pools)
        answers = await asyncio.gather(cache_stats(group), *(asyncio.gather(*map(probe, group.pools[r].backends))
                                                             for r in roles))
        doc: dict[str, Any] = {"name": group.name, "cache": answers[0], "active": group.active, **group.counts,
                               "following_events": group.following,
                               "indexed_keys": inventory.keys_on(group.name)}
        for role, workers in zip(roles, answers[1:]):
            doc[{"encode": "encoders"}.get(role, role)] = list(workers)
        return doc

    nodes = await asyncio.gather(*map(of_group, groups))
    out: dict[str, Any] = {"mode": config.mode, "model": config.model_id,
                           "router": dict(counters), "cache": nodes[0]["cache"]}
    for role in ("encoders", "prefill", "decode", "generate"):
        workers = [w for n in nodes for w in n.get(role, ())]
        if workers:
            out[role] = workers
    if len(groups) > 1:
        out["nodes"] = nodes
        out["routing"] = {"mode": config.routing, "inventory_events": inventory.events}
    if elastic is not None:
        out["elastic"] = elastic.stats([w for role in ("encoders", "prefill", "decode") for w in out.get(role, ())])
    processes = _stack_processes(config.data_dir)
    if processes is not None:
        out["processes"] = processes
    encoders = [w.get("stats", {}) for w in out.get("encoders", [])]
    router_hits = counters.get("router_cache_hits", 0)
    # NOTE: "images" counts every image reference: those the router found in the cache itself
    # (they never reach an encoder) and those the encoders saw.
    out["totals"] = {"images_encoded": sum(s.get("encoded", 0) for s in encoders),
                     "encoder_cache_hits": sum(s.get("cache_hits", 0) for s in encoders),
                     "router_cache_hits": router_hits,
                     "encoder_joins": sum(s.get("single_flight_joins", 0) for s in encoders),
                     "images": sum(s.get("images", 0) for s in encoders) + router_hits,
                     "videos": sum(s.get("videos", 0) for s in encoders),
                     "frames": sum(s.get("frames", 0) for s in encoders),
                     "frames_encoded": sum(s.get("frames_encoded", 0) for s in encoders),
                     "frames_reused": sum(s.get("frames_reused", 0) for s in encoders)}
    return out


def _stack_processes(data_dir: str) -> list | None:
    """Under ``mmcache up``: its processes (state, restarts, last exit), from the status file it
    keeps in the data dir; None for a router that ``mmcache up`` did not start."""
    try:
        with open(os.path.join(data_dir, "stack-status.json")) as f:  # NOTE: mmcache.stack.up.STATUS_FILE
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc.get("processes") if doc.get("pid") == os.getppid() else None

"""Node groups behind one router, and where a request's image embeddings are.

A *node group* is one sidecar with its own encoders, prefill and decode workers (``mmcache up
--nodes N`` starts N on one machine; on separate hosts each runs its own). The router sends each
request to one group, whose workers all read the same sidecar:

- **cache-aware**: to the group whose host tier holds most of the request's image bytes (its
  prefill then leases them in place, and nothing is encoded or fetched from the remote);
- **by load** where no group holds any (or with ``--routing load``): the group with the fewest
  requests in progress.

Where the bytes are comes from the sidecars' inventory events (``mmcache.core.events``): the router
follows each group's sidecar (``GET /v1/events`` or its Unix socket's event stream) and keeps
``key → {group: bytes}`` for what each host tier stored, minus what it evicted or deleted. A
stream that breaks (or says it lost events) drops that group's part of the index until it is
followed again: an index that is behind costs a routing choice, never a wrong answer (every
group reads every entry through the shared remote).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from llm_worker.router.backends import Pool
from mmcache_client import AsyncCacheClient

logger = logging.getLogger(__name__)

ROUTINGS = ("cache", "load")


@dataclass(frozen=True)
class NodeSpec:
    """One group as the router is given it: ``--node name=A,cache=URL,encoder=URL,prefill=URL,decode=URL``
    (``encoder``, ``prefill``, ``decode`` repeatable)."""

    name: str
    cache_url: str | None
    encoders: tuple[str, ...]
    prefill: tuple[str, ...]
    decode: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> "NodeSpec":
        fields: dict[str, list[str]] = {"name": [], "cache": [], "encoder": [], "prefill": [], "decode": []}
        for part in text.split(","):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in fields or not value.strip():
                raise ValueError(f"--node {text!r}: {part!r} is not one of name=, cache=, encoder=, prefill=, "
                                 "decode= with a value")
            fields[name].append(value.strip())
        if len(fields["name"]) != 1 or len(fields["cache"]) > 1:
            raise ValueError(f"--node {text!r}: give one name= and at most one cache=")
        if not (fields["encoder"] and fields["prefill"] and fields["decode"]):
            raise ValueError(f"--node {text!r}: a node group needs an encoder=, a prefill= and a decode= URL")
        return cls(fields["name"][0], (fields["cache"] or [None])[0], tuple(fields["encoder"]),
                   tuple(fields["prefill"]), tuple(fields["decode"]))


@dataclass(eq=False)
class NodeGroup:
    """A group's worker pools and sidecar client, and what the router counts of it."""

    name: str
    cache_url: str | None
    pools: dict[str, Pool]
    cache: AsyncCacheClient | None = None
    active: int = 0
    """Requests of this group in progress (opened, their stream not closed yet)."""
    counts: dict[str, int] = field(default_factory=lambda: {"requests": 0, "routed_by_cache": 0, "routed_by_load": 0})
    sidecar_node: str | None = None
    """The name the sidecar gives itself in its events (learnt when its stream opens)."""
    following: bool = False


class Inventory:
    """``key → {group name: bytes}`` of what each group's host tier holds (see the module docstring)."""

    def __init__(self) -> None:
        self._where: dict[str, dict[str, int]] = {}
        self.events = 0

    def apply(self, group: str, event: dict) -> None:
        kind, key, tier = event.get("kind"), event.get("key"), event.get("tier")
        if not isinstance(key, str):
            return
        self.events += 1
        if kind == "stored" and tier == "host":
            self._where.setdefault(key, {})[group] = int(event.get("bytes") or 0)
        elif (kind == "evicted" and tier == "host") or kind == "deleted":
            holders = self._where.get(key)
            if holders is not None:
                holders.pop(group, None)
                if not holders:
                    del self._where[key]

    def forget(self, group: str) -> None:
        for key in [k for k, holders in self._where.items() if group in holders]:
            holders = self._where[key]
            holders.pop(group, None)
            if not holders:
                del self._where[key]

    def bytes_on(self, keys: list[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for key in keys:
            for group, n in self._where.get(key, {}).items():
                out[group] = out.get(group, 0) + n
        return out

    def keys_on(self, group: str) -> int:
        return sum(group in holders for holders in self._where.values())


def choose(groups: list[NodeGroup], inventory: Inventory, keys: list[str], routing: str) -> tuple[NodeGroup, str]:
    """The group for a request whose images are ``keys`` (stored keys; empty when unknown), and
    why: ``cache`` (it holds the most of their bytes) or ``load``."""
    if len(groups) == 1:
        return groups[0], "load"
    if routing == "cache" and keys:
        held = inventory.bytes_on(keys)
        if held:
            best = max(groups, key=lambda g: (held.get(g.name, 0), -g.active))
            if held.get(best.name, 0) > 0:
                return best, "cache"
    return min(groups, key=lambda g: (g.active, g.counts["requests"])), "load"


async def follow(group: NodeGroup, inventory: Inventory) -> None:
    """Keep ``inventory`` up to date with ``group``'s sidecar, reconnecting while it is away."""
    backoff = 0.2
    while True:
        try:
            async for ev in group.cache.events(scope="local"):
                kind = ev.get("kind")
                if kind == "subscribed":
                    group.sidecar_node, group.following, backoff = ev.get("node"), True, 0.2
                elif kind == "lost":
                    inventory.forget(group.name)
                elif ev.get("node") == group.sidecar_node:  # NOTE: not those relayed from other nodes
                    inventory.apply(group.name, ev)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the sidecar restarting: follow it again
            logger.debug("router: the event stream of %s ended: %r", group.name, e)
        if group.following:
            inventory.forget(group.name)  # NOTE: what it did meanwhile is unknown
        group.following = False
        await asyncio.sleep(backoff)
        backoff = min(2 * backoff, 5.0)


class GroupStream:
    """A token stream that counts its group's requests in progress until it is closed."""

    def __init__(self, inner: Any, group: NodeGroup):
        self._inner, self._group, self._open = inner, group, True

    async def next(self) -> dict:
        return await self._inner.next()

    def close(self) -> None:
        if self._open:
            self._open = False
            self._group.active -= 1
        self._inner.close()

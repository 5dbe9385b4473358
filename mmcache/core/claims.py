"""Claims: encode each new image once, across every encoder of every node ("cold-key convergence").

Before an encoder encodes a miss it claims the key through its sidecar, and is told one of:

- ``exists``: some tier (host, disk, the remote) holds it now; nothing to encode;
- ``won``: this owner holds the claim (for ``ttl_ms``): encode it and put it; the put ends the
  claim. Claiming again with the same owner renews it (an encode queued behind others);
- ``wait``: another owner holds it for ``ttl_ms`` more: wait for the entry's ``stored`` event
  (``mmcache.core.events``), re-claim on it, and never wait past the claim's deadline: an owner that
  died leaves a claim that expires, and the next claim after that wins (a takeover).

Claims live on the remote when there is one (``SET NX PX`` in a script, so every sidecar on the
store sees them) and in this sidecar's table otherwise, or while the remote is down (then
single-flight holds per node only). An owner that fails gives its claims back (``release``),
which only removes a claim it still holds.

Ordering that keeps "exactly once": a put ends the local claim once host (or disk) holds the
entry, and the remote claim only after the remote holds it (``RemoteTier`` deletes it after the
``SET``), so no encoder anywhere sees "no claim" before it can see the entry; a claim that was
won is checked against the tiers once more before it is answered ``won``.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from mmcache_client.errors import TooManyRequests


DEFAULT_TTL_MS = 30_000
MAX_TTL_MS = 600_000
"""The longest TTL a request may name (larger is a 400); ``ttl_max_ms`` clamps what is granted."""
DEFAULT_TTL_MAX_MS = 120_000
DEFAULT_MAX_CLAIMS = 100_000
DEFAULT_MAX_CLAIMS_PER_OWNER = 4096
MAX_OWNER_CHARS = 128
MAX_KEYS = 4096
"""Keys in one claim or release at most."""
_SWEEP_AT = 4096


class Claims:
    """One sidecar's claims. Thread-safe; blocking (remote calls): call it off the event loop.

    Bounded: the claims granted through this sidecar that are still live count against
    ``max_claims`` (in all) and ``max_claims_per_owner``; a claim that would pass either is
    refused whole (``TooManyRequests``: HTTP 429, ``Retry-After`` until the owner's, or anyone's,
    first claim expires), so one client cannot grow the table without bound. A TTL is clamped to
    ``ttl_max_ms``: nobody can make encoders wait longer than that on a key."""

    def __init__(self, exists: Callable[[str], bool], remote: Any = None, *,
                 max_claims: int = DEFAULT_MAX_CLAIMS, max_claims_per_owner: int = DEFAULT_MAX_CLAIMS_PER_OWNER,
                 ttl_max_ms: int = DEFAULT_TTL_MAX_MS):
        for name, value in (("max_claims", max_claims), ("max_claims_per_owner", max_claims_per_owner),
                            ("ttl_max_ms", ttl_max_ms)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be an integer > 0")
        self._exists = exists
        self.remote = remote
        """The shared remote tier (its ``claim``/``release_claim``), or None: claims are this node's."""
        self.max_claims, self.max_claims_per_owner, self.ttl_max_ms = max_claims, max_claims_per_owner, ttl_max_ms
        self._lock = threading.Lock()
        self._table: dict[str, tuple[str, float]] = {}
        """Local claims: key → (owner, monotonic deadline)."""
        self._granted: dict[str, dict[str, float]] = {}
        """Claims granted here (local or on the remote) and maybe live: owner → key → deadline."""
        self._live = 0
        self.counts = dict(won=0, waited=0, exists=0, released=0, ended=0, local=0, refused=0)
        self._sweep_at = _SWEEP_AT

    def claim(self, keys: list[str], owner: str, ttl_ms: int = DEFAULT_TTL_MS) -> dict[str, dict]:
        """Per key ``{"state": "exists"|"won"|"wait", "ttl_ms": ...}`` (see the module docstring).
        Raises ``TooManyRequests`` past a cap (nothing claimed)."""
        owner, ttl_ms = check_owner(owner), min(check_ttl(ttl_ms), self.ttl_max_ms)
        if len(keys) > MAX_KEYS:
            raise ValueError(f"{len(keys)} keys in one claim; at most {MAX_KEYS}")
        self._admit(owner, keys)
        out: dict[str, dict] = {}
        for key in keys:
            if self._exists(key):
                out[key] = {"state": "exists"}
            else:
                won, left = self._take(key, owner, ttl_ms)
                if won and self._exists(key):  # NOTE: stored (and its claim ended) between the two
                    self.release([key], owner)
                    out[key] = {"state": "exists"}
                else:
                    out[key] = {"state": "won" if won else "wait", "ttl_ms": left}
                    if won:
                        self._grant(owner, key, ttl_ms)
            with self._lock:
                self.counts[{"exists": "exists", "won": "won", "wait": "waited"}[out[key]["state"]]] += 1
        return out

    def _admit(self, owner: str, keys: list[str]) -> None:
        """Refuse (429) a claim that could pass a cap: ``keys`` counted as if all were new."""
        now = time.monotonic()
        with self._lock:
            mine = self._granted.get(owner, {})
            over_owner = len(mine) + len(keys) > self.max_claims_per_owner
            over_all = self._live + len(keys) > self.max_claims
            if over_owner or over_all:
                self._expire(now)
                mine = self._granted.get(owner, {})
                over_owner = len(mine) + len(keys) > self.max_claims_per_owner
                over_all = self._live + len(keys) > self.max_claims
            if not (over_owner or over_all):
                return
            self.counts["refused"] += 1
            pool = mine.values() if over_owner else (d for m in self._granted.values() for d in m.values())
            retry_s = max(1.0, min(pool, default=now + 1.0) - now)
        which = (f"owner {owner!r:.80} holds {len(mine)} live claims (at most {self.max_claims_per_owner}, "
                 "--max-claims-per-owner)") if over_owner else \
            f"{self._live} claims are live on this sidecar (at most {self.max_claims}, --max-claims)"
        raise TooManyRequests(f"claim of {len(keys)} key(s) refused: {which}; retry in {retry_s:.0f} s", retry_s)

    def _grant(self, owner: str, key: str, ttl_ms: int) -> None:
        with self._lock:
            mine = self._granted.setdefault(owner, {})
            if key not in mine:
                self._live += 1
            mine[key] = time.monotonic() + ttl_ms / 1000

    def _forget(self, owner: str | None, key: str) -> None:
        """Under the lock: ``key``'s grant (``owner``'s, or whoever's if None) is over."""
        owners = [owner] if owner is not None else [o for o, m in self._granted.items() if key in m]
        for o in owners:
            mine = self._granted.get(o)
            if mine is not None and mine.pop(key, None) is not None:
                self._live -= 1
                if not mine:
                    del self._granted[o]

    def _expire(self, now: float) -> None:
        """Under the lock: drop the grants whose deadline passed."""
        for o in list(self._granted):
            mine = self._granted[o]
            for key in [k for k, d in mine.items() if d <= now]:
                del mine[key]
                self._live -= 1
            if not mine:
                del self._granted[o]

    def _take(self, key: str, owner: str, ttl_ms: int) -> tuple[bool, int]:
        if self.remote is not None:
            taken = self.remote.claim(key, owner, ttl_ms)
            if taken is not None:
                return taken
        with self._lock:  # NOTE: no remote, or it is down: this node's table
            self.counts["local"] += 1
            now = time.monotonic()
            held = self._table.get(key)
            if held is None or held[1] <= now or held[0] == owner:
                if len(self._table) >= self._sweep_at:
                    self._sweep(now)
                    self._sweep_at = max(_SWEEP_AT, 2 * len(self._table))  # NOTE: amortized O(1)
                self._table[key] = (owner, now + ttl_ms / 1000)
                return True, ttl_ms
            return False, max(1, int((held[1] - now) * 1000))

    def _sweep(self, now: float) -> None:
        for k in [k for k, (_, deadline) in self._table.items() if deadline <= now]:
            del self._table[k]

    def release(self, keys: list[str], owner: str) -> int:
        """Give back ``owner``'s claims on ``keys`` (an encode that failed); others' stay."""
        owner = check_owner(owner)
        if len(keys) > MAX_KEYS:
            raise ValueError(f"{len(keys)} keys in one release; at most {MAX_KEYS}")
        n = 0
        for key in keys:
            with self._lock:
                self._forget(owner, key)
                held = self._table.get(key)
                if held is not None and held[0] == owner:
                    del self._table[key]
                    n += 1
            if self.remote is not None:
                n += self.remote.release_claim(key, owner)
        with self._lock:
            self.counts["released"] += n
        return n

    def stored(self, key: str) -> None:
        """``key`` is readable here now: its local claim (whoever's) has done its work."""
        with self._lock:
            held = self._table.pop(key, None)
            if held is not None:
                self.counts["ended"] += 1
            if self._granted:
                self._forget(held[0] if held is not None else None, key)

    def stats(self) -> dict:
        with self._lock:
            return {**self.counts, "held_here": len(self._table), "live": self._live,
                    "max_claims": self.max_claims, "max_claims_per_owner": self.max_claims_per_owner,
                    "ttl_max_ms": self.ttl_max_ms}


def check_owner(owner: object) -> str:
    if not isinstance(owner, str) or not owner or len(owner) > MAX_OWNER_CHARS or not owner.isprintable():
        raise ValueError(f"claim owner {owner!r:.80} must be a printable string of 1 to {MAX_OWNER_CHARS} characters")
    return owner


def check_ttl(ttl_ms: object) -> int:
    if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int) or not 1 <= ttl_ms <= MAX_TTL_MS:
        raise ValueError(f"claim ttl_ms={ttl_ms!r} must be an integer from 1 to {MAX_TTL_MS}")
    return ttl_ms

"""Tenant quotas of one local tier: how many bytes each tenant holds there, and whose entries a
put may evict.

A quota (``--tenants FILE``, ``TOKEN = {tenant = "alice", quota = "4GiB"}``) is both a cap and
a guarantee, as a memory cgroup's ``memory.max`` and ``memory.min`` are:

- **Cap.** A tenant holds at most ``quota`` bytes in host and at most ``quota`` bytes on disk
  (each tier keeps its own ``TenantLedger``; reservations count from the moment they are made).
  A put that would take it past its quota first evicts the tenant's *own* entries, by the tier's
  policy; when those are leased or not yet written down, the put gets ``NO_SPACE`` (503 with
  ``Retry-After``) and nothing of anyone else's is touched.
- **Guarantee.** Entries of a tenant that has a quota are evicted only to make room for that same
  tenant. Everyone else (tenants without a quota, the default tenant) shares the rest of the tier
  under the ordinary policy, and a tenant with a quota, once within it, may also evict from that
  shared part. So a quota'd tenant's durable entries survive any other tenant's flood; keep the
  sum of the quotas below each tier's capacity (the sidecar warns at start when it is not), or
  a full tier answers 503 to whoever has nothing of its own left to evict.

A key names its tenant before an ``@`` (``alice@ns/hash``); a key without one is the default
tenant's. Not thread-safe: each tier calls it under its own lock.
"""

from __future__ import annotations

from typing import Callable, Mapping


def tenant_of(key: str) -> str | None:
    """The tenant a stored key belongs to (None: the default tenant)."""
    tenant, at, _ = key.partition("@")
    return tenant if at else None


class TenantLedger:
    """Bytes held per tenant in one tier, against the tenants' quotas."""

    def __init__(self, quotas: Mapping[str, int] | None = None):
        self.quotas: dict[str, int] = dict(quotas or {})
        for tenant, quota in self.quotas.items():
            if not isinstance(quota, int) or isinstance(quota, bool) or quota <= 0:
                raise ValueError(f"the quota of tenant {tenant!r} must be a positive number of bytes, got {quota!r}")
        self._bytes: dict[str, int] = {}
        """Bytes held by each tenant with a quota (only those are counted: no cost for the rest)."""
        self.refused = 0
        """Puts refused because the tenant was over its quota with nothing of its own evictable."""

    def __bool__(self) -> bool:
        return bool(self.quotas)

    def charge(self, key: str, nbytes: int) -> None:
        tenant = tenant_of(key)
        if tenant in self.quotas:
            self._bytes[tenant] = self._bytes.get(tenant, 0) + nbytes

    def credit(self, key: str, nbytes: int) -> None:
        tenant = tenant_of(key)
        if tenant in self.quotas:
            left = self._bytes.get(tenant, 0) - nbytes
            if left > 0:
                self._bytes[tenant] = left
            else:
                self._bytes.pop(tenant, None)

    def held(self, tenant: str) -> int:
        return self._bytes.get(tenant, 0)

    def excess(self, key: str, nbytes: int, pending: int = 0) -> int:
        """Bytes of its own that ``key``'s tenant must free before ``nbytes`` more fit in its
        quota (``pending``: bytes it holds that the ledger does not know yet); 0 when they fit
        or the tenant has no quota."""
        tenant = tenant_of(key)
        quota = self.quotas.get(tenant) if tenant is not None else None
        if quota is None:
            return 0
        return max(self.held(tenant) + pending + nbytes - quota, 0)

    def own(self, key: str) -> Callable[[str], bool]:
        """Which keys are ``key``'s tenant's own (what it evicts to stay within its quota)."""
        tenant = tenant_of(key)
        return lambda victim: tenant_of(victim) == tenant

    def may_evict(self, key: str) -> Callable[[str], bool]:
        """Which entries a put of ``key`` may evict to make room in a full tier: its tenant's
        own, and those of tenants without a quota; never another quota'd tenant's."""
        if not self.quotas:
            return anything
        tenant, quotas = tenant_of(key), self.quotas

        def allowed(victim: str) -> bool:
            owner = tenant_of(victim)
            return owner == tenant or owner not in quotas
        return allowed

    def stats(self) -> dict[str, dict[str, int]]:
        """``{tenant: {"quota_bytes", "bytes"}}`` for every tenant with a quota."""
        return {t: {"quota_bytes": q, "bytes": self.held(t)} for t, q in sorted(self.quotas.items())}


def usage_by_tenant(items) -> dict[str | None, list[int]]:
    """``{tenant: [entries, bytes]}`` over ``(key, nbytes)`` pairs (None: the default tenant)."""
    out: dict[str | None, list[int]] = {}
    for key, nbytes in items:
        row = out.setdefault(tenant_of(key), [0, 0])
        row[0] += 1
        row[1] += nbytes
    return out


def anything(key: str) -> bool:
    """Every entry may be evicted (a tier without quotas)."""
    return True

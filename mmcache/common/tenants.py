"""Tenants of a shared sidecar: who a bearer token is, and which keys it may name.

``mmcache serve --tenants FILE`` maps tokens to tenants (TOML or JSON, at the top level or under
a ``[tokens]`` table): ``TOKEN = "alice"``, or ``TOKEN = {tenant = "alice", quota = "4GiB"}`` to
cap (and guarantee) the bytes alice holds in host and on disk (``mmcache.core.quotas``; a quota is an
integer or a size such as ``"512MiB"``). Several tokens may name one tenant; its quota is then
said once, or the same each time. Every request is then scoped to its
token's tenant: the sidecar stores tenant B's ``ns/hash`` as ``B@ns/hash`` (``Key.tenant``), so
A's and B's entries are different entries and B can neither read, probe, delete nor overwrite
A's. The sidecar's own token (``--token`` / ``MMCACHE_TOKEN``) and a local connection without a
token are the *default tenant*: unscoped keys, and trusted to name another tenant's keys
(``tenant@ns/hash`` in a JSON or Unix-socket key, ``X-MMCache-Tenant`` on an HTTP path), as an
encoder or prefill worker does for a router's tenant. A tenant's token may not.

Tokens are compared in constant time by digest, over every configured token (the time does not
depend on which one, if any, matched).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import stat
import tomllib
from dataclasses import dataclass
from typing import Mapping

from mmcache.common.sizes import parse_size
from mmcache_client.keys import Key, validate_namespace, validate_tenant

logger = logging.getLogger(__name__)

TENANT_HEADER = "X-MMCache-Tenant"
"""On an HTTP request of the default tenant: act in this tenant's scope."""


class Forbidden(PermissionError):
    """A tenant named a key outside its scope (403)."""


@dataclass(frozen=True)
class Principal:
    """Who is asking: ``tenant`` None is the default tenant (trusted to name any tenant's keys)."""

    tenant: str | None = None

    @property
    def trusted(self) -> bool:
        return self.tenant is None

    def scope(self, key: Key, acting_for: str | None = None) -> Key:
        """``key`` in this principal's scope. A tenant's key always gets its own tenant (one that
        names a tenant itself is refused); the default tenant's keeps the tenant it names, else
        takes ``acting_for`` (``X-MMCache-Tenant``), else stays unscoped."""
        if not self.trusted:
            if key.tenant is not None or acting_for is not None:
                raise Forbidden(f"tenant {self.tenant!r} may not name another tenant's keys "
                                f"({key.to_string()[:200]!r}); send plain 'namespace/hash'")
            return key.scoped(self.tenant)
        if key.tenant is None and acting_for is not None:
            return key.scoped(validate_tenant(acting_for))
        return key

    def list_prefix(self, namespace: str | None = None, acting_for: str | None = None) -> str:
        """The stored-key prefix of what this principal may list: a tenant its own keys (of
        ``namespace``); the default tenant everything, or ``namespace``'s unscoped keys, or those
        of the tenant it acts for."""
        if namespace is not None:
            validate_namespace(namespace)
        if not self.trusted:
            if acting_for is not None:
                raise Forbidden(f"tenant {self.tenant!r} may not list another tenant's keys")
            return f"{self.tenant}@" + (f"{namespace}/" if namespace is not None else "")
        scope = f"{validate_tenant(acting_for)}@" if acting_for is not None else ""
        return scope + (f"{namespace}/" if namespace is not None else "")

    def shown(self, key: Key) -> str:
        """How ``key`` (in this principal's scope) is written back to it: without its own tenant."""
        return key.plain if not self.trusted else key.to_string()


DEFAULT = Principal()


def _tenant_and_quota(value: object) -> tuple[str, int | None]:
    """A token's value: a tenant's name, or ``{tenant = NAME, quota = BYTES}``."""
    if isinstance(value, str):
        return value, None
    if not isinstance(value, Mapping):
        raise ValueError(f"a token must map to a tenant's name or to {{tenant = NAME, quota = BYTES}}, "
                         f"got {type(value).__name__}")
    unknown = set(value) - {"tenant", "quota"}
    if unknown or not isinstance(value.get("tenant"), str):
        raise ValueError("a token's table takes 'tenant' (a name) and 'quota' (bytes or a size such as \"4GiB\")"
                         + (f"; unknown field(s) {sorted(map(str, unknown))[:5]}" if unknown else ""))
    quota = value.get("quota")
    if quota is None:
        return value["tenant"], None
    if isinstance(quota, bool) or not isinstance(quota, (int, str)):
        raise ValueError(f"the quota of tenant {value['tenant']!r} must be bytes or a size such as \"4GiB\", "
                         f"got {quota!r}")
    try:
        nbytes = parse_size(quota)
    except ValueError as e:
        raise ValueError(f"the quota of tenant {value['tenant']!r}: {e}") from None
    if nbytes <= 0:
        raise ValueError(f"the quota of tenant {value['tenant']!r} must be > 0 bytes, got {quota!r}")
    return value["tenant"], nbytes


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Tenants:
    """Token → tenant, from a file; ``authenticate`` answers who a token is."""

    def __init__(self, tokens: Mapping[str, str | Mapping], admin_token: str | None = None):
        names: dict[str, str] = {}
        self.quotas: dict[str, int] = {}
        """Tenant → the bytes it may hold in host and, separately, on disk (``mmcache.core.quotas``)."""
        for token, value in tokens.items():
            if not isinstance(token, str) or not token or token != token.strip():
                raise ValueError("tenant tokens must be non-empty strings without surrounding spaces")
            tenant, quota = _tenant_and_quota(value)
            validate_tenant(tenant)
            if quota is not None:
                if self.quotas.get(tenant, quota) != quota:
                    raise ValueError(f"tenant {tenant!r} is given two quotas ({self.quotas[tenant]} and {quota} bytes)")
                self.quotas[tenant] = quota
            names[token] = tenant
            if len(token) < 16:
                logger.warning("tenant %r has a token of %s characters; use 32 or more random ones", tenant, len(token))
        if admin_token is not None and admin_token in tokens:
            raise ValueError("the sidecar's own token is also a tenant's token; give each tenant its own")
        self._entries = [(_digest(t), name) for t, name in names.items()]
        self._admin = _digest(admin_token) if admin_token else None
        self.names = sorted(set(names.values()))

    @classmethod
    def load(cls, path: str, admin_token: str | None = None) -> "Tenants":
        """Read ``path`` (``.json``, else TOML); a file others can read is refused."""
        try:
            st = os.stat(path)
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise ValueError(f"cannot read the tenants file {path}: {e.strerror}") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ValueError(f"the tenants file {path} holds tokens but is mode {stat.S_IMODE(st.st_mode):o}; "
                             "chmod 600 it")
        return cls.parse(raw, path, admin_token)

    @classmethod
    def parse(cls, raw: bytes, path: str, admin_token: str | None = None) -> "Tenants":
        """The tenants file's bytes (JSON when ``path`` ends in ``.json``, else TOML); any fault
        is a ``ValueError`` naming ``path``."""
        try:
            doc = json.loads(raw) if path.endswith(".json") else tomllib.loads(raw.decode())
        except RecursionError:
            raise ValueError(f"the tenants file {path} nests too deeply") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"the tenants file {path} is not valid {'JSON' if path.endswith('.json') else 'TOML'}: {e}") from None
        if isinstance(doc, dict) and isinstance(doc.get("tokens"), dict) and len(doc) == 1:
            doc = doc["tokens"]
        if not isinstance(doc, dict) or not doc:
            raise ValueError(f"the tenants file {path} must map tokens to tenant names, e.g. \"TOKEN\" = \"alice\" "
                             "or \"TOKEN\" = {tenant = \"alice\", quota = \"4GiB\"}")
        return cls(doc, admin_token)

    def authenticate(self, token: str | None) -> Principal | None:
        """The principal ``token`` is, or None when it is no one's."""
        if not token:
            return None
        given = _digest(token)
        found: str | None = None
        for digest, name in self._entries:  # NOTE: no early exit: every token compared
            if hmac.compare_digest(given, digest):
                found = name
        if self._admin is not None and hmac.compare_digest(given, self._admin):
            return DEFAULT
        return Principal(found) if found is not None else None


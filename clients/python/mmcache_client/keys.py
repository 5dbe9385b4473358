"""Content keys: what names an entry.

An entry is addressed as ``{namespace}/{hash}``:

- ``hash`` is the full BLAKE3-256 digest of the raw media bytes, 64 lowercase hex chars. Clients
  compute it before uploading, so a hit costs no upload. A cryptographic hash because the cache is
  shared: with a fast non-cryptographic one (xxh3) a client could craft an image that collides
  with a popular one and poison what everyone else reads. xxh3 stays the entry *checksum*.
- ``namespace`` names everything besides the bytes that changes the embedding (encoder weights,
  projector, processor config, dtype, tenant salt), as readable text ``[A-Za-z0-9._-]{1,128}``.
- ``tenant`` (optional) scopes the key to one tenant of a shared sidecar: ``{tenant}@{namespace}/{hash}``.
  A tenant's client never writes it: the sidecar adds its token's tenant to every key it names,
  so tenant A's ``ns/hash`` and tenant B's are different entries. Only trusted callers (the
  default tenant: the sidecar's own token, a local connection) name another tenant's keys, as an
  encoder or prefill worker does on behalf of a router's tenant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import blake3

HASH_HEX_CHARS = 64
"""A key's hash: the full BLAKE3-256 digest, never truncated."""
_HASH_RE = re.compile(r"[0-9a-f]{64}")
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_TENANT_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def content_hash(data: bytes | bytearray | memoryview) -> str:
    """Full BLAKE3-256 digest of ``data`` as 64 lowercase hex chars (never truncated)."""
    # NOTE: one thread: the stages of a stack share the cores, and one core hashes GB/s
    # (benchmarks/bench_core.py prints the cost per MiB next to xxh3's).
    return blake3.blake3(data).hexdigest()


def _validate_name(value: str, what: str, pattern: re.Pattern, max_chars: int) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a str, got {type(value).__name__}")
    if not pattern.fullmatch(value) or value in (".", ".."):
        raise ValueError(f"{what}={value[:200]!r} must match [A-Za-z0-9._-]{{1,{max_chars}}} and not be '.' or '..'")
    return value


def validate_namespace(namespace: str) -> str:
    """Return ``namespace`` unchanged, or raise ``ValueError`` saying what is wrong with it."""
    return _validate_name(namespace, "namespace", _NAMESPACE_RE, 128)


def validate_tenant(tenant: str) -> str:
    """Return ``tenant`` unchanged, or raise ``ValueError`` saying what is wrong with it."""
    return _validate_name(tenant, "tenant", _TENANT_RE, 64)


def validate_hash(hash_hex: str) -> str:
    """Return ``hash_hex`` unchanged, or raise ``ValueError`` naming the problem."""
    if not isinstance(hash_hex, str):
        raise ValueError(f"hash must be a str, got {type(hash_hex).__name__}")
    if not _HASH_RE.fullmatch(hash_hex):
        width = f"{len(hash_hex)} chars" if len(hash_hex) != HASH_HEX_CHARS else "not lowercase hex"
        raise ValueError(f"hash={hash_hex[:80]!r} ({width}) must be {HASH_HEX_CHARS} lowercase hex chars "
                         "(the full BLAKE3-256 of the media bytes)")
    return hash_hex


@dataclass(frozen=True, slots=True)
class Key:
    """The address of one cache entry: ``namespace/hash``, or ``tenant@namespace/hash`` when it
    belongs to a tenant. Validated on construction."""

    namespace: str
    hash: str
    tenant: str | None = None

    def __post_init__(self) -> None:
        validate_namespace(self.namespace)
        validate_hash(self.hash)
        if self.tenant is not None:
            validate_tenant(self.tenant)

    def to_string(self) -> str:
        plain = f"{self.namespace}/{self.hash}"
        return plain if self.tenant is None else f"{self.tenant}@{plain}"

    @property
    def plain(self) -> str:
        """``namespace/hash``: the key without its tenant (what the entry's metadata names)."""
        return f"{self.namespace}/{self.hash}"

    def scoped(self, tenant: str | None) -> "Key":
        """This key in ``tenant``'s scope (None: the default tenant's)."""
        return Key(self.namespace, self.hash, tenant)

    @classmethod
    def from_string(cls, text: str) -> "Key":
        if not isinstance(text, str):
            raise ValueError(f"key must be a str, got {type(text).__name__}")
        tenant, at, rest = text.partition("@")
        if not at:
            tenant, rest = None, text
        namespace, sep, hash_hex = rest.rpartition("/")
        if not sep:
            raise ValueError(f"key={text[:200]!r} must be 'namespace/hash' (or 'tenant@namespace/hash')")
        return cls(namespace, hash_hex, tenant)

    def __str__(self) -> str:
        return self.to_string()

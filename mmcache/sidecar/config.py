"""Sidecar configuration: one dataclass, filled from defaults < TOML file < environment < flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from mmcache.common.security import is_loopback
from mmcache.common.sizes import parse_size  # noqa: F401 - the sidecar's flags read sizes

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None

MAX_UNIX_PATH_BYTES = 107
"""Linux's ``sun_path`` holds 108 bytes, NUL included."""



@dataclass(frozen=True)
class ServeConfig:
    """Everything ``mmcache serve`` takes. Sizes are bytes."""

    data_dir: str = "./mmcache-data"
    """Directory for the LMDB environment (entries survive restarts here)."""
    host: str = "127.0.0.1"
    """HTTP bind address; loopback unless told otherwise."""
    port: int = 8470
    """HTTP port (0 picks a free one)."""
    socket: str | None = None
    """Unix socket of the local zero-copy protocol; None turns it off."""
    host_capacity_bytes: int = 1 << 30
    """Size of the shared-memory arena."""
    disk_capacity_bytes: int = 16 << 30
    """Payload bytes kept in LMDB before eviction."""
    max_entry_size_bytes: int = 256 << 20
    """Largest accepted PUT body; larger gets 413."""
    token: str | None = field(default=None, repr=False)
    """Bearer token every route but /healthz requires; None means no auth (loopback only).
    From ``MMCACHE_TOKEN`` or ``--token-file`` rather than ``--token``, which ``ps`` shows."""
    arena_path: str | None = None
    """Arena file; default a fresh file under /dev/shm."""
    host_policy: str = "lru"
    """Host-tier eviction policy (lru, gdsf, cost-lfu)."""
    disk_policy: str = "lru"
    """Disk-tier eviction policy (lru, gdsf, cost-lfu)."""
    log_level: str = "info"
    """Python logging level name."""
    write_timeout_s: float = 30.0
    """Seconds a GET or batch_get reader has to take each part of its answer; a slower one has its
    connection aborted and its leases freed, so it cannot pin entries forever."""
    batch_get_budget_bytes: int = 32 << 20
    """Entry bytes ``POST /v1/batch_get`` gathers into one Arrow record batch before sending it;
    the answer streams, so the sidecar holds about twice this much per request, not the total."""
    max_connections: int | None = None
    """Open HTTP connections at most (None: what the descriptor limit allows, less a reserve)."""
    header_timeout_s: float = 5.0
    """Seconds a new HTTP connection has to send its first whole request head (slowloris)."""
    tenants: str | None = None
    """A TOML or JSON file mapping bearer tokens to tenant names (``mmcache.common.tenants``): each
    request is scoped to its token's tenant; ``token`` stays the default tenant's."""
    disk_queue_bytes: int = 1 << 30
    """Bytes of puts that host cannot take (they land on disk) queued for the disk writer at
    most; one more answers 503 with Retry-After at once instead of queueing behind the fsyncs."""

    remote: str | None = None
    """A Redis/Valkey server or cluster below disk, shared by many sidecars:
    ``redis://[user:pass@]host:port[,host:port...]`` or ``rediss://`` (TLS); the password may
    come from ``MMCACHE_REMOTE_PASSWORD``. None: no remote tier."""
    remote_ttl_s: float | None = None
    """Expire remote entries after this many seconds (None: the remote's memory policy evicts)."""
    remote_timeout_ms: float = 200.0
    """Longest wait for one remote call; past it the call is a miss (or a dropped write)."""
    remote_required: bool = False
    """Refuse to start when the remote cannot be reached (else start with it marked down)."""
    node: str | None = None
    """This sidecar's name in inventory events and claims (default ``hostname:port``)."""
    device_capacity_bytes: int = 0
    """GPU memory of the device tier above host (0: none, and no CUDA context)."""
    device: str = "cuda:0"
    """The GPU of the device tier."""
    max_claims: int = 100_000
    """Live claims at most (all owners); one more is refused with 429 and ``Retry-After``."""
    max_claims_per_owner: int = 4096
    """Live claims of one owner at most (a small share of ``max_claims``); past it: 429."""
    max_event_followers: int = 256
    """Event followers at most (``GET /v1/events`` streams and local ones); one more: 429."""
    max_event_followers_per_tenant: int = 64
    """Event followers of one tenant (or of the default one) at most; one more: 429."""
    claim_ttl_max_s: float = 120.0
    """Longest claim TTL granted; a longer ask is clamped, so nobody makes encoders wait longer."""

    def __post_init__(self) -> None:
        if not 0 < self.remote_timeout_ms < float("inf"):
            raise ValueError(f"remote_timeout_ms={self.remote_timeout_ms} must be a positive number")
        if self.remote_ttl_s is not None and not 0 < self.remote_ttl_s < float("inf"):
            raise ValueError(f"remote_ttl_s={self.remote_ttl_s} must be a positive number of seconds")
        if self.remote is not None:
            from mmcache.tiers.remote_config import parse_remote_url

            parse_remote_url(self.remote)  # NOTE: a bad URL is a clear error at start
        for name in ("write_timeout_s", "header_timeout_s"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"{name}={getattr(self, name)} must be a positive number of seconds")
        if self.max_connections is not None and self.max_connections <= 0:
            raise ValueError(f"max_connections={self.max_connections} must be > 0")
        for name in ("max_claims", "max_claims_per_owner", "max_event_followers", "max_event_followers_per_tenant"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be an integer > 0")
        if not 0.001 <= self.claim_ttl_max_s <= 600:
            raise ValueError(f"claim_ttl_max_s={self.claim_ttl_max_s} must lie in [0.001, 600] seconds")
        for name in ("host_capacity_bytes", "disk_capacity_bytes", "max_entry_size_bytes", "batch_get_budget_bytes",
                     "disk_queue_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.device_capacity_bytes < 0:
            raise ValueError(f"device_capacity_bytes={self.device_capacity_bytes} must be >= 0")
        if self.device_capacity_bytes and self.tenants:
            # NOTE: CUDA IPC opens the allocator's whole segment, other entries included, and
            # writable: a tenant's reader could see (or change) another tenant's embeddings.
            raise ValueError("a device tier (--device-capacity) cannot serve --tenants: CUDA IPC shares whole "
                             "GPU memory segments, so one tenant's reader could read another's entries")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port} must be within 0..65535")
        if self.token == "":
            # NOTE: an empty MMCACHE_TOKEN means none, as it does for the workers; safe, because
            # the loopback rule below still holds.
            object.__setattr__(self, "token", None)
        if not self.token and not self.tenants and not is_loopback(self.host):
            raise ValueError(f"refusing to serve on host={self.host!r} (beyond loopback) without a token: "
                             "anyone who reaches the port could read, write and delete entries. Give "
                             "MMCACHE_TOKEN or --token-file PATH, or bind 127.0.0.1")
        for name in ("socket",):
            path = getattr(self, name)
            size = len(os.fsencode(path)) if path is not None else 0
            if size > MAX_UNIX_PATH_BYTES:
                raise ValueError(f"{name}={path!r} is {size} bytes; a Unix socket path must be at most "
                                 f"{MAX_UNIX_PATH_BYTES} (use a shorter directory)")

    @classmethod
    def from_sources(cls, flags: Mapping[str, Any], env: Mapping[str, str] | None = None,
                     toml_path: str | None = None, warn=None) -> "ServeConfig":
        """Merge a TOML file, ``MMCACHE_<NAME>`` variables and flags (None = not given). NAME is
        the flag's (``MMCACHE_HOST_CAPACITY`` for ``--host-capacity``) or the field's
        (``MMCACHE_HOST_CAPACITY_BYTES``); a ``MMCACHE_*`` name that is neither, nor another
        command's, is reported through ``warn`` (a typo must not pass for a setting)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        if toml_path:
            if tomllib is None:
                raise ValueError("a TOML config needs Python >= 3.11 (tomllib)")
            with open(toml_path, "rb") as f:
                values.update(tomllib.load(f))
        names = env_names()
        for var, value in env.items():
            if not var.startswith("MMCACHE_"):
                continue
            field_name = names.get(var)
            if field_name is not None:
                values[field_name] = value
            elif var not in OTHER_ENV and warn is not None:
                warn(f"{var} is not a setting of mmcache serve; known: {', '.join(sorted(names))}")
        values.update({k: v for k, v in flags.items() if v is not None})
        return cls(**_coerce(values))


FLAG_OF_FIELD = {"host_capacity_bytes": "host_capacity", "disk_capacity_bytes": "disk_capacity",
                 "max_entry_size_bytes": "max_entry_size", "arena_path": "arena", "write_timeout_s": "write_timeout",
                 "batch_get_budget_bytes": "batch_get_budget", "header_timeout_s": "header_timeout",
                 "disk_queue_bytes": "disk_queue", "remote_ttl_s": "remote_ttl",
                 "device_capacity_bytes": "device_capacity", "claim_ttl_max_s": "claim_ttl_max"}
"""``mmcache serve``'s flag names where they differ from the field's (``--host-capacity``)."""
OTHER_ENV = frozenset({"MMCACHE_API_KEY", "MMCACHE_REMOTE_PASSWORD", "MMCACHE_TOKEN_FILE"})
"""``MMCACHE_*`` names other commands read (not reported as unknown by ``mmcache serve``)."""


def env_names() -> dict[str, str]:
    """``MMCACHE_<NAME>`` → field, for the flag's name and the field's."""
    out = {}
    for f in fields(ServeConfig):
        out[f"MMCACHE_{f.name.upper()}"] = f.name
        if f.name in FLAG_OF_FIELD:
            out[f"MMCACHE_{FLAG_OF_FIELD[f.name].upper()}"] = f.name
    return out


def _coerce(values: Mapping[str, Any]) -> dict[str, Any]:
    known = {f.name: f for f in fields(ServeConfig)}
    out: dict[str, Any] = {}
    for name, value in values.items():
        name = name.replace("-", "_")
        if name not in known:
            raise ValueError(f"unknown setting {name!r}; known: {', '.join(sorted(known))}")
        if name.endswith("_bytes"):
            try:
                value = parse_size(value)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        elif name == "remote_timeout_ms":
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{name}={value!r} must be a number of milliseconds") from None
        elif name == "remote_required":
            value = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        elif name in ("port", "max_connections", "max_claims", "max_claims_per_owner", "max_event_followers",
                      "max_event_followers_per_tenant"):
            try:
                value = int(value)
            except (TypeError, ValueError):
                raise ValueError(f"{name}={value!r} must be an integer") from None
        elif name.endswith("_s"):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{name}={value!r} must be a number of seconds") from None
        out[name] = value
    return out

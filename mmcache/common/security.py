"""Security defaults shared by every server of the stack (docs/operating.md, "Security").

- Secrets (the sidecar's token, the router's API key) come from a file or the environment, so
  they never show in ``ps``: ``resolve_secret`` reads ``--x`` < ``--x-file`` < ``$ENV`` in that
  order of preference (an argv value is still accepted, for scripts that already pass one).
- ``bearer_matches``: ``Authorization: Bearer <token>``, the scheme matched case-insensitively
  (RFC 7235), the token compared in constant time.
- ``is_loopback``: whether a bind address stays on this machine (a sidecar bound beyond it
  needs a token).
- ``make_private_dir``: the data dir and its LMDB files readable by their owner only.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import socket
import stat
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
_MAX_SECRET_FILE_BYTES = 64 << 10


def resolve_secret(value: str | None, path: str | None, env_var: str, what: str,
                   env: Mapping[str, str] | None = None) -> str | None:
    """The secret given as ``value`` (argv), read from the file ``path``, or from ``env_var``;
    None when none is given. A file holds the secret alone (one trailing newline is stripped);
    an empty one, or both ``value`` and ``path``, is a ``ValueError`` naming ``what``."""
    if value is not None and path is not None:
        raise ValueError(f"give the {what} either on the command line or in a file, not both")
    if path is not None:
        with open(path, "rb") as f:
            raw = f.read(_MAX_SECRET_FILE_BYTES + 1)
            loose = os.fstat(f.fileno()).st_mode & 0o077
        if len(raw) > _MAX_SECRET_FILE_BYTES:
            raise ValueError(f"{what} file {path}: larger than {_MAX_SECRET_FILE_BYTES} bytes")
        if loose:
            logger.warning("%s file %s is readable by other users; chmod 600 it", what, path)
        value = raw.decode("utf-8").strip()
        if not value:
            raise ValueError(f"{what} file {path} is empty")
        return value
    if value is not None:
        if not value:
            raise ValueError(f"the {what} must not be empty")
        return value
    env = os.environ if env is None else env
    return env.get(env_var) or None


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header: the scheme in any case
    (``bearer``, ``BEARER``), one or more spaces after it; None for any other header."""
    if not header:
        return None
    scheme, _, given = header.strip().partition(" ")
    return (given.strip() or None) if scheme.lower() == "bearer" else None


def bearer_matches(header: str | None, token: str) -> bool:
    """Whether ``header`` (an ``Authorization`` value) is ``Bearer <token>``, in constant time."""
    given = bearer_token(header)
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` listens on this machine only: ``127.0.0.0/8``, ``::1``,
    ``localhost``, or a name that resolves to loopback addresses only. ``""``, ``0.0.0.0``,
    ``::`` and anything unresolvable are not."""
    name = host.strip().strip("[]")
    if not name:
        return False
    if name.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def make_private_dir(path: str) -> None:
    """Create ``path`` as 0700, or make an existing one this user owns 0700 when group or
    others can reach it (with a warning); its ``lmdb/`` subdirectory likewise, and the LMDB files
    in it 0600. A directory of another user is left alone (the store's own checks decide)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    _tighten(path, 0o700)
    lmdb_dir = os.path.join(path, "lmdb")
    if os.path.isdir(lmdb_dir):
        _tighten(lmdb_dir, 0o700)
        for name in ("data.mdb", "lock.mdb"):
            _tighten(os.path.join(lmdb_dir, name), 0o600)


def _tighten(path: str, mode: int) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.getuid() or not st.st_mode & 0o077:
        return
    logger.warning("%s was mode %o (group/others could read cached entries); now %o",
                   path, stat.S_IMODE(st.st_mode), mode)
    os.chmod(path, mode)


def check_control(request: Any, token: str | None) -> None:
    """Refuse (401, JSON) a request to a worker's state-changing route (``POST /v1/role``) that
    does not carry the stack's control credential as ``Authorization: Bearer``. A worker started
    without one (no ``MMCACHE_STACK_TOKEN``) has such routes off: anyone on the machine could
    otherwise flip its role."""
    from aiohttp import web

    if token and bearer_matches(request.headers.get("Authorization"), token):
        return
    why = ("this route changes the worker's state and needs the stack's token (Authorization: Bearer "
           "$MMCACHE_STACK_TOKEN, which mmcache up gives its workers)") if token else \
        "this worker was started without a stack token (MMCACHE_STACK_TOKEN): its control routes are off"
    raise web.HTTPUnauthorized(text=json.dumps({"error": why}), content_type="application/json",
                               headers={"WWW-Authenticate": "Bearer"})

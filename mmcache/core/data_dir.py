"""The sidecar's data dir: one sidecar per dir (a lock), and the record of its arena file, so that
a sidecar restarted after a kill -9 removes the arena its predecessor left in /dev/shm."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os

logger = logging.getLogger(__name__)

ARENA_RECORD = "arena.path"
"""In the data dir: the path of the running sidecar's arena file."""
ARENA_PREFIX = "mmcache-"


def arena_dir(data_dir: str) -> str:
    if os.path.isdir("/dev/shm"):
        return "/dev/shm"
    shm = os.path.join(data_dir, "shm")
    os.makedirs(shm, mode=0o700, exist_ok=True)
    return shm


class DataDirInUse(OSError):
    """Another sidecar holds the data dir's lock."""


def lock_data_dir(data_dir: str) -> int:
    """One sidecar per data dir: an exclusive flock held for the store's lifetime."""
    fd = os.open(os.path.join(data_dir, "LOCK"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataDirInUse(f"data dir {data_dir!r} is in use by another mmcache process (one sidecar per "
                           "data dir: stop that one or give --data-dir another directory)") from None
    return fd


def record_arena(data_dir: str, path: str) -> None:
    with open(os.path.join(data_dir, ARENA_RECORD), "w") as f:
        f.write(path)


def forget_arena(data_dir: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(data_dir, ARENA_RECORD))


def remove_stale_arena(data_dir: str, arena_path: str | None) -> None:
    """An arena recorded in the data dir whose sidecar died (kill -9) is ours to remove, if it
    is one of ours: an ``mmcache-*.arena`` file under the arena directory, owned by this user."""
    record = os.path.join(data_dir, ARENA_RECORD)
    try:
        with open(record) as f:
            stale = f.read().strip()
    except FileNotFoundError:
        return
    if not stale or not os.path.lexists(stale):
        return
    expected_dirs = {os.path.realpath(arena_dir(data_dir))}
    if arena_path:
        expected_dirs.add(os.path.realpath(os.path.dirname(os.path.abspath(arena_path))))
    st = os.lstat(stale)
    ours = (os.path.realpath(os.path.dirname(stale)) in expected_dirs and os.path.basename(stale).endswith(".arena")
            and not os.path.islink(stale) and st.st_uid == os.getuid())
    if not ours:
        logger.warning("not removing %s recorded as a stale arena: not an arena file of this user", stale)
        return
    logger.warning("removing the arena %s left by a sidecar that did not stop cleanly", stale)
    os.unlink(stale)

"""Real ``redis-server`` processes for tests (``mmcache.stack.redis_local``), and the mark that skips
a test where Redis is not installed (``.ci/run`` installs Debian's ``redis-server``)."""

from __future__ import annotations

import pytest

from mmcache.stack.redis_local import REDIS_CLI, REDIS_SERVER, RedisClusterProcs, RedisServer

__all__ = ["RedisClusterProcs", "RedisServer", "needs_redis"]

needs_redis = pytest.mark.skipif(REDIS_SERVER is None or REDIS_CLI is None,
                                 reason="redis-server and redis-cli are not installed (Debian: redis-server)")

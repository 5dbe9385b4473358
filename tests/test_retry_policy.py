"""The SDK's one retry policy (``mmcache_client.retry``), as both clients apply it: transient
transport errors are retried with backoff and then named; a timed-out call and every answer of
the sidecar are never repeated; the sync and the async client make the same attempts."""

from __future__ import annotations

import asyncio
import socket

import pytest

from mmcache_client import AsyncCacheClient, CacheClient
from mmcache_client.client import with_retries
from mmcache_client.errors import BadRequest, CacheFull, CacheTimeout, CacheUnavailable
from mmcache_client.retry import RetryPolicy


def test_what_is_retried_and_what_never_is():
    policy = RetryPolicy(3, 0.0)
    transient = (ConnectionError, OSError, CacheUnavailable)
    assert policy.retryable(ConnectionRefusedError(), transient)
    assert policy.retryable(CacheUnavailable("gone"), transient)
    assert not policy.retryable(CacheTimeout("late"), transient)  # it may have happened
    assert not policy.retryable(CacheFull("full", 1.0), transient)  # an answer: the caller's call
    assert not policy.retryable(BadRequest("no"), transient)
    assert not policy.retryable(ValueError("bug"), transient)
    assert list(policy.attempts()) == [0, 1, 2, 3]
    delays = [RetryPolicy(3, 0.1).delay_s(a) for a in range(3)]
    assert 0.05 <= delays[0] <= 0.15 and 0.1 <= delays[1] <= 0.3 and 0.2 <= delays[2] <= 0.6
    with pytest.raises(ValueError):
        RetryPolicy(-1)


def test_the_blocking_helper_retries_then_names_the_sidecar():
    calls = []

    def refused():
        calls.append(1)
        raise ConnectionRefusedError("refused")
    with pytest.raises(CacheUnavailable, match="sidecar-x: refused"):
        with_retries(refused, RetryPolicy(2, 0.0), "sidecar-x")
    assert len(calls) == 3
    calls.clear()

    def timed_out():
        calls.append(1)
        raise CacheTimeout("slow")
    with pytest.raises(CacheTimeout):
        with_retries(timed_out, RetryPolicy(5, 0.0), "sidecar-x")
    assert len(calls) == 1


def _dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # NOTE: nothing listens there now; a connect is refused at once
    return port


def test_both_clients_try_a_dead_sidecar_the_same_number_of_times(tmp_path, monkeypatch):
    waits: list[int] = []
    monkeypatch.setattr(RetryPolicy, "delay_s", lambda self, attempt: waits.append(attempt) or 0.0)
    url = f"http://127.0.0.1:{_dead_port()}"
    with CacheClient(url, retries=2, backoff_s=0.0) as c, pytest.raises(CacheUnavailable, match=url):
        c.stats()
    assert waits == [0, 1]  # three attempts, two waits

    async def run():
        async with AsyncCacheClient(url, retries=2, backoff_s=0.0) as a:
            await a.stats()
    waits.clear()
    with pytest.raises(CacheUnavailable, match=url):
        asyncio.run(run())
    assert waits == [0, 1]
    waits.clear()
    sock = str(tmp_path / "none.sock")
    with CacheClient(f"unix://{sock}", retries=1, backoff_s=0.0) as u, pytest.raises(CacheUnavailable):
        u.stats()
    assert waits == [0]

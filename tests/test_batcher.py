"""Single-flight and dynamic batching, with a fake model that records its calls."""

from __future__ import annotations

import asyncio
import threading

import pytest

from encoder_worker.batcher import SingleFlightBatcher


class FakeModel:
    def __init__(self, fail_on: set | None = None):
        self.calls: list[list] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_on = fail_on or set()

    def __call__(self, items):
        self.gate.wait(10)
        self.calls.append(list(items))
        if self.fail_on & set(items):
            raise RuntimeError(f"cannot encode {sorted(self.fail_on & set(items))}")
        return [f"emb({x})" for x in items]


@pytest.fixture
async def make():
    made = []

    def factory(model, **kw):
        b = SingleFlightBatcher(model, **kw)
        b.start()
        made.append(b)
        return b
    yield factory
    for b in made:
        await b.close()


async def test_concurrent_requests_for_one_key_share_one_encode(make):
    model = FakeModel()
    model.gate.clear()  # hold the first batch so every request arrives while it is in flight
    b = make(model, max_batch=8, max_wait_ms=1)
    tasks = [asyncio.create_task(b.submit("k", "img")) for _ in range(16)]
    await asyncio.sleep(0)  # let them all register (no timing: the gate holds the model)
    model.gate.set()
    assert await asyncio.gather(*tasks) == ["emb(img)"] * 16
    assert model.calls == [["img"]]


async def test_different_keys_arriving_together_are_batched(make):
    model = FakeModel()
    b = make(model, max_batch=4, max_wait_ms=200)
    results = await asyncio.gather(*(b.submit(i, i) for i in range(10)))
    assert results == [f"emb({i})" for i in range(10)]
    assert max(len(c) for c in model.calls) > 1
    assert all(len(c) <= 4 for c in model.calls)


async def test_a_failed_batch_fails_its_waiters_and_the_batcher_goes_on(make):
    model = FakeModel(fail_on={"bad"})
    b = make(model, max_batch=2, max_wait_ms=50)
    r = await asyncio.gather(b.submit("bad", "bad"), b.submit("ok", "ok"), return_exceptions=True)
    assert all(isinstance(x, RuntimeError) for x in r)  # same batch
    assert await b.submit("ok", "ok") == "emb(ok)"  # retried afresh: not cached as failed
    assert b.inflight == 0


async def test_a_waiter_giving_up_does_not_cancel_the_shared_encode(make):
    model = FakeModel()
    model.gate.clear()
    b = make(model, max_wait_ms=0)
    first = asyncio.create_task(b.submit("k", "x"))
    second = asyncio.create_task(b.submit("k", "x"))
    await asyncio.sleep(0)
    first.cancel()
    model.gate.set()
    assert await second == "emb(x)"
    assert len(model.calls) == 1


async def test_after_hook_runs_before_waiters_see_the_result(make):
    seen = []

    async def after(key, result):
        seen.append((key, result))
    b = make(FakeModel(), after=after)
    assert await b.submit("k", 1) == "emb(1)"
    assert seen == [("k", "emb(1)")]


def test_bad_settings():
    with pytest.raises(ValueError):
        SingleFlightBatcher(FakeModel(), max_batch=0)
    with pytest.raises(ValueError):
        SingleFlightBatcher(FakeModel(), max_wait_ms=-1)

"""Single-flight and dynamic batching, with a fake model that records its calls."""

from __future__ import annotations

import asyncio
import threading

import pytest

from encoder_worker.batcher import Job, QueueFull, SingleFlightBatcher


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


async def test_finished_since_tells_a_key_that_succeeded_after_the_mark(make, monkeypatch):
    model = FakeModel(fail_on={"bad"})
    b = make(model, max_batch=1, max_wait_ms=0)
    before = b.mark()
    assert not b.finished_since("k", before)
    await b.submit("k", "k")
    after = b.mark()
    assert b.finished_since("k", before) and not b.finished_since("k", after)
    with pytest.raises(RuntimeError):
        await b.submit("bad", "bad")
    assert not b.finished_since("bad", before)  # a failure stored nothing
    monkeypatch.setattr(SingleFlightBatcher, "FINISHED_MEMORY", 2)
    for key in ("x", "y", "z"):
        await b.submit(key, key)
    assert not b.finished_since("k", before) and b.finished_since("z", after)  # the oldest are forgotten
    assert len(b._finished) == 2


def test_bad_settings():
    with pytest.raises(ValueError):
        SingleFlightBatcher(FakeModel(), max_batch=0)
    with pytest.raises(ValueError):
        SingleFlightBatcher(FakeModel(), max_wait_ms=-1)
    with pytest.raises(ValueError, match="max_queued=0"):
        SingleFlightBatcher(FakeModel(), max_queued=0)


async def test_the_queue_is_bounded_and_refuses_a_request_whole(make):
    model = FakeModel()
    model.gate.clear()
    b = make(model, max_batch=1, max_wait_ms=0, max_queued=2)
    running = b.enqueue("k0", "k0")
    await _when(lambda: b.queued == 0 and b.inflight == 1)  # k0 is in the model: not queued
    queued = b.enqueue_many([("k1", "k1"), ("k2", "k2")], Job(2))
    assert b.queued == 2
    with pytest.raises(QueueFull, match="2 images wait for the model, 1 more would pass max_queued=2") as e:
        b.enqueue("k3", "k3")
    assert e.value.retry_after_s > 0
    with pytest.raises(QueueFull):  # NOTE: all or none: k1 is not joined either
        b.enqueue_many([("k1", "k1"), ("k3", "k3")], Job(2))
    assert b.joins == 0 and b.queued == 2 and b.refused == 2
    joined = b.enqueue_many([("k1", "k1"), ("k0", "k0")], Job(2))  # NOTE: nothing new: no room needed
    assert b.joins == 2 and b.queued == 2
    model.gate.set()
    assert await asyncio.gather(running, *queued, *joined) == ["emb(k0)", "emb(k1)", "emb(k2)", "emb(k1)", "emb(k0)"]
    assert [c[0] for c in model.calls] == ["k0", "k1", "k2"]
    # NOTE: a request larger than the whole queue is taken when the queue is empty
    big = b.enqueue_many([(f"b{i}", i) for i in range(3)], Job(3))
    assert b.inflight == 3
    assert await asyncio.gather(*big) == ["emb(0)", "emb(1)", "emb(2)"]


async def _when(cond, timeout=10.0):
    """Wait (polling the loop) until ``cond()``; fail after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.005)


async def _run_two_requests(b, model):
    """Request A (4 images) starts its first image; then request B (1 image) arrives. The
    order the model ran them in."""
    model.gate.clear()
    job_a = Job(4)
    tasks = [asyncio.create_task(b.submit(k, k, job_a)) for k in ("a0", "a1", "a2", "a3")]
    await _when(lambda: b.queued == 3)  # a0 is in the model
    job_b = Job(1)
    tasks.append(asyncio.create_task(b.submit("b0", "b0", job_b)))
    await _when(lambda: b.queued == 4)
    model.gate.set()
    await asyncio.gather(*tasks)
    return [c[0] for c in model.calls]


async def test_fcfs_runs_images_in_arrival_order(make):
    model = FakeModel()
    b = make(model, max_batch=1, max_wait_ms=0)
    assert await _run_two_requests(b, model) == ["a0", "a1", "a2", "a3", "b0"]
    assert b.overtakes == 0


async def test_sjf_runs_the_request_with_fewest_images_left_first(make):
    model = FakeModel()
    b = make(model, max_batch=1, max_wait_ms=0, schedule="sjf")
    assert await _run_two_requests(b, model) == ["a0", "b0", "a1", "a2", "a3"]
    assert b.overtakes == 1 and b.inflight == 0 and b.queued == 0


async def test_sjf_ranks_a_shared_image_by_its_shortest_request(make):
    """C (1 image) waits for a3, already queued for A: a3 goes first; then A (2 left) before
    B (2 left), the older request winning the tie; then B in its own order."""
    model = FakeModel()
    b = make(model, max_batch=1, max_wait_ms=0, schedule="sjf")
    model.gate.clear()
    job_a = Job(4)
    tasks = [asyncio.create_task(b.submit(k, k, job_a)) for k in ("a0", "a1", "a2", "a3")]
    await _when(lambda: b.queued == 3)
    job_b = Job(2)
    tasks += [asyncio.create_task(b.submit(k, k, job_b)) for k in ("b0", "b1")]
    tasks.append(asyncio.create_task(b.submit("a3", "a3", Job(1))))
    await _when(lambda: b.queued == 5 and b.joins == 1)
    model.gate.set()
    await asyncio.gather(*tasks)
    assert [c[0] for c in model.calls] == ["a0", "a3", "a1", "a2", "b0", "b1"]


async def test_sjf_runs_an_item_queued_past_the_delay_bound_first(make):
    model = FakeModel()
    b = make(model, max_batch=1, max_wait_ms=0, schedule="sjf", max_queue_delay_ms=0)
    assert await _run_two_requests(b, model) == ["a0", "a1", "a2", "a3", "b0"]


async def test_sjf_batches_take_the_shortest_requests(make):
    model = FakeModel()
    b = make(model, max_batch=2, max_wait_ms=0, schedule="sjf")
    model.gate.clear()
    job_a = Job(4)
    tasks = [asyncio.create_task(b.submit(k, k, job_a)) for k in ("a0", "a1", "a2", "a3")]
    await _when(lambda: b.queued == 2)  # [a0, a1] is in the model
    tasks += [asyncio.create_task(b.submit(k, k, Job(1))) for k in ("b0", "c0")]
    await _when(lambda: b.queued == 4)
    model.gate.set()
    assert await asyncio.gather(*tasks) == [f"emb({k})" for k in ("a0", "a1", "a2", "a3", "b0", "c0")]
    assert model.calls == [["a0", "a1"], ["b0", "c0"], ["a2", "a3"]]


def test_bad_schedules():
    with pytest.raises(ValueError, match="schedule"):
        SingleFlightBatcher(FakeModel(), schedule="lifo")
    with pytest.raises(ValueError, match="max_queue_delay_ms"):
        SingleFlightBatcher(FakeModel(), schedule="sjf", max_queue_delay_ms=-1)
    with pytest.raises(ValueError, match="num_items"):
        Job(0)

"""A discrete-event simulator of the EPD pipeline and of the aggregated baseline, driven by the
stage costs of a profile (``llm_worker.planner.stage_costs``) and a workload (``llm_worker.planner.workload``):
it predicts each request's TTFT, TPOT and end-to-end latency, and from them throughput, SLO
attainment and the cache's hit ratio. ``llm_worker.planner.planner`` searches allocations with it.

What it models, as the stack does it (file names say where):

- **Router** (``router.py``): a request's images are looked up in the cache; each miss goes to
  the encoder that owns it (rendezvous hashing over the encoders: one image always meets the same
  encoder), the encoders in parallel; an image being encoded for another request is waited for,
  not encoded again (single flight). Then prefill on the prefill worker with the fewest calls in
  flight, then decode on the next decode worker in turn (streams are not counted in flight).
  Every call to a worker costs one HTTP hop.
- **Encoders** (``encoder_worker/batcher.py``): a call's new images are decoded and hashed (host
  work: on a CPU it shares the device with the forwards), then queued; a batch starts with the oldest
  and waits up to ``encoder_wait_s`` for company, up to ``encoder_batch`` images; after the forward
  each image is put into the cache, one after the other, before the next batch starts.
- **Prefill** (``service.py``): the embeddings are read from the cache, the forward waits for the
  worker's one forward thread, then the KV entry is put; the prefill's answer is the first token.
- **Decode** (``decode_loop.py``): the KV is read; requests join a continuous batch (at most
  ``decode_batch``) between steps; each step costs the profile's step time at the batch's size
  and mean context, and gives each request one token. A request ends at its ``max_tokens``.
- **Aggregated** (``both`` workers): one forward thread per worker runs, first come first served,
  each request's encode + prefill (an in-process LRU of embeddings skips cached images) and the
  decode steps; a prefill that arrives during a step runs before the next step.
- **Devices**: each worker runs on a device; workers that share one share its speed (processor
  sharing: with ``k`` forwards at once on a device of capacity ``c``, each runs at ``min(1, c/k)``
  of its profiled speed). On a CPU machine every worker shares the one CPU, as ``mmcache up`` runs.
- **Cache** (host tier): an LRU of embeddings in bytes; KV hand-off entries are not counted.
- **Role switching** (``ElasticPolicy``): each worker keeps the load meter the elastic workers
  keep (``llm_worker.elastic.load.LoadMeter``, on the simulated clock: queue delay and busy fraction as
  they define them), and every interval the router's rule (``llm_worker.elastic.policy.Policy``)
  decides on them; a switching worker takes no new work, drains, then serves its new role.

What it leaves out: HTTP and event-loop time beyond one hop per call, memory limits (a request
is never refused for memory), prompts past the model's context are cut as the router cuts them
(``max_tokens`` to the room left), and an EOS before ``max_tokens``.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from llm_worker.elastic.policy import STAGES, ElasticPolicy, StageLoad, WorkerLoad
from llm_worker.elastic.load import LoadMeter
from llm_worker.planner.stage_costs import StageCosts

_SHORT = {"encode": "E", "prefill": "P", "decode": "D"}


@dataclass(frozen=True)
class Allocation:
    """How many workers of each role, their batch sizes, and which share a device."""

    encoders: int = 1
    prefill: int = 1
    decode: int = 1
    encoder_batch: int = 8
    decode_batch: int = 64
    aggregated: bool = False
    """``decode`` ``both`` workers (encode + prefill + decode each); the EPD counts are unused."""
    embedding_cache: bool = True
    """Aggregated: an in-process LRU of embeddings per worker (``--encoder-cache``)."""
    placement: str = "E|P|D"
    """Which stages share devices when there are fewer devices than workers: groups of stages
    split by ``|`` (``E|P|D``: each stage its own devices; ``EP|D``: encoders and prefill share
    theirs; ``EPD``: all share). Devices go to groups in proportion to their workers."""
    devices: int | None = None
    """Accelerators to place the workers on; None: one per worker."""
    device_capacity: float = 1.0
    """Forwards a device runs at once at full speed (a CPU whose cores a profile's one process
    did not fill has more than 1)."""

    def __post_init__(self) -> None:
        for name in ("encoders", "prefill", "decode", "encoder_batch", "decode_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.devices is not None and self.devices < 1:
            raise ValueError("devices must be >= 1")
        if self.device_capacity <= 0:
            raise ValueError("device_capacity must be > 0")
        groups = self.placement.split("|")
        if sorted("".join(groups)) != sorted("EPD") or any(not g for g in groups):
            raise ValueError(f"placement {self.placement!r}: want the letters E, P, D once each, in groups split by |")

    @property
    def workers(self) -> int:
        return self.decode if self.aggregated else self.encoders + self.prefill + self.decode

    @property
    def name(self) -> str:
        if self.aggregated:
            return f"aggregated x{self.decode}" + ("" if self.embedding_cache else " (no LRU)")
        shared = f" [{self.placement}]" if self.devices is not None and self.devices < self.workers else ""
        return f"E{self.encoders} P{self.prefill} D{self.decode} eb{self.encoder_batch} db{self.decode_batch}{shared}"

    def up_flags(self) -> list[str]:
        """The ``mmcache up`` flags that start this allocation."""
        if self.aggregated:
            return ["--aggregated", "--decode", str(self.decode), "--max-batch", str(self.decode_batch)]
        return ["--encoders", str(self.encoders), "--prefill", str(self.prefill), "--decode", str(self.decode),
                "--encoder-batch", str(self.encoder_batch), "--max-batch", str(self.decode_batch)]

    def device_of(self) -> list[tuple[str, int]]:
        """(role, device index) per worker, encoders first, then prefill, then decode."""
        roles = ["both"] * self.decode if self.aggregated else \
            ["encode"] * self.encoders + ["prefill"] * self.prefill + ["decode"] * self.decode
        if self.devices is None or self.devices >= len(roles):
            return [(r, i) for i, r in enumerate(roles)]
        if self.aggregated:
            return [(r, i % self.devices) for i, r in enumerate(roles)]
        groups = self.placement.split("|")
        sizes = [sum(roles.count(s) for s in STAGES if _SHORT[s] in g) for g in groups]
        if self.devices < len(groups):
            raise ValueError(f"placement {self.placement!r} needs at least {len(groups)} devices, not {self.devices}")
        share = _apportion(self.devices, sizes)
        out, first = [], 0
        starts = {}
        for g, n in zip(groups, share):
            starts[g] = (first, n)
            first += n
        turn = {g: 0 for g in groups}
        for r in roles:
            g = next(g for g in groups if _SHORT[r] in g)
            start, n = starts[g]
            out.append((r, start + turn[g] % n))
            turn[g] += 1
        return out


def _apportion(total: int, weights: list[int]) -> list[int]:
    """``total`` split in proportion to ``weights``, each at least 1 (largest remainders)."""
    if total < len(weights):
        raise ValueError(f"{total} devices cannot give each of {len(weights)} groups one")
    raw = [total * w / sum(weights) for w in weights]
    out = [max(1, int(r)) for r in raw]
    while sum(out) > total:  # NOTE: only from a group that keeps at least one
        out[max((i for i in range(len(out)) if out[i] > 1), key=lambda i: (out[i] - raw[i], out[i]))] -= 1
    while sum(out) < total:
        out[max(range(len(out)), key=lambda i: raw[i] - out[i])] += 1
    return out


@dataclass(frozen=True)
class SimRequest:
    arrival_s: float
    image_ids: tuple[int, ...]
    image_sizes: tuple[tuple[int, int], ...]
    prompt_words: int
    output_tokens: int
    phase: int = 0


@dataclass(frozen=True)
class SimConfig:
    cache_capacity_bytes: int = 2 << 30
    """The sidecar's host tier (``mmcache up --host-capacity``, 2 GiB by default)."""
    encoder_wait_s: float = 0.005
    """How long a batch waits for company (the encoders' ``max_wait_ms``)."""
    elastic: ElasticPolicy | None = None
    ttft_slo_s: float = math.inf
    tpot_slo_s: float = math.inf


@dataclass
class RequestResult:
    index: int
    phase: int
    arrival_s: float
    images: int
    hits: int
    prompt_tokens: int
    output_tokens: int
    ttft_s: float | None = None
    e2e_s: float | None = None
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.e2e_s is None or self.output_tokens <= 1:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def met(self, ttft_slo_s: float, tpot_slo_s: float) -> bool:
        tpot = self.tpot_s
        return self.e2e_s is not None and self.ttft_s <= ttft_slo_s and (tpot is None or tpot <= tpot_slo_s)


@dataclass
class SimResult:
    allocation: Allocation
    requests: list[RequestResult]
    switches: list[dict] = field(default_factory=list)
    busy: dict[str, float] = field(default_factory=dict)
    """Per role: the share of the run its workers' forward threads were busy."""

    def summary(self, ttft_slo_s: float = math.inf, tpot_slo_s: float = math.inf,
                phase: int | None = None) -> dict:
        rows = [r for r in self.requests if phase is None or r.phase == phase]
        ok = [r for r in rows if r.e2e_s is not None]
        ttft = [r.ttft_s for r in ok]
        tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
        span = (max(r.arrival_s + r.e2e_s for r in ok) - min(r.arrival_s for r in rows)) if ok else math.nan
        refs = sum(r.images for r in rows)
        return {"requests": len(rows), "errors": len(rows) - len(ok),
                "ttft_median_s": _q(ttft, .5), "ttft_p90_s": _q(ttft, .9), "ttft_p99_s": _q(ttft, .99),
                "tpot_median_s": _q(tpot, .5), "e2e_median_s": _q([r.e2e_s for r in ok], .5),
                "throughput_rps": len(ok) / span if ok and span > 0 else (math.inf if ok else 0.0),
                "slo_attainment": sum(r.met(ttft_slo_s, tpot_slo_s) for r in rows) / len(rows) if rows else 0.0,
                "hit_ratio": sum(r.hits for r in rows) / refs if refs else 0.0}


def _q(values: list[float], q: float) -> float:
    return float(np.quantile(values, q)) if values else math.nan


def requests_of(workload, costs: StageCosts, phases: Sequence[int] | None = None) -> list[SimRequest]:
    """The requests of a ``llm_worker.planner.workload.Workload`` for the simulator (``phases``: each
    request's phase, for per-phase figures)."""
    out = []
    for i, r in enumerate(workload.requests):
        out.append(SimRequest(r.arrival_s, tuple(r.image_ids), tuple(workload.image_size_by_id[j] for j in r.image_ids),
                              len(r.prompt.split()), r.max_tokens, phases[i] if phases is not None else 0))
    return out


# -- the event engine -------------------------------------------------------------------------


class _Engine:
    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list = []
        self._seq = 0

    def at(self, t: float, fn: Callable, *args) -> None:
        heapq.heappush(self._heap, (t, self._seq, fn, args))
        self._seq += 1

    def after(self, dt: float, fn: Callable, *args) -> None:
        self.at(self.now + dt, fn, *args)

    def run(self) -> None:
        while self._heap:
            t, _, fn, args = heapq.heappop(self._heap)
            self.now = t
            fn(*args)


class _Device:
    """Processor sharing among the forwards running on it."""

    def __init__(self, engine: _Engine, capacity: float):
        self.engine, self.capacity = engine, capacity
        self.jobs: dict[int, list] = {}  # id -> [remaining work s, on_done]
        self._t = 0.0
        self._version = 0
        self._ids = 0

    def _rate(self) -> float:
        k = len(self.jobs)
        return 1.0 if k <= self.capacity else self.capacity / k

    def _advance(self) -> None:
        done = (self.engine.now - self._t) * self._rate()
        for job in self.jobs.values():
            job[0] -= done
        self._t = self.engine.now

    def _schedule(self) -> None:
        self._version += 1
        rate = self._rate()
        for jid, (remaining, _) in self.jobs.items():
            self.engine.after(max(remaining, 0.0) / rate, self._finish, jid, self._version)

    def start(self, work_s: float, on_done: Callable[[], None]) -> None:
        self._advance()
        self._ids += 1
        self.jobs[self._ids] = [work_s, on_done]
        self._schedule()

    def _finish(self, jid: int, version: int) -> None:
        if version != self._version:
            return
        self._advance()
        _, on_done = self.jobs.pop(jid)
        self._schedule()
        on_done()


# -- the pipeline -----------------------------------------------------------------------------


@dataclass
class _Req:
    spec: SimRequest
    result: RequestResult
    prompt_tokens: int
    output_tokens: int
    pending_calls: int = 0
    generated: int = 0
    decode_start: float = 0.0


class _Worker:
    """One worker process: a role, a device, one forward at a time (a FIFO of tasks)."""

    def __init__(self, sim: "_Simulation", index: int, role: str, device: _Device):
        self.sim, self.index, self.role, self.device = sim, index, role, device
        self.tasks: deque = deque()
        self.busy = False
        self.busy_s = 0.0
        self._since = 0.0
        self.calls = 0  # router-side: calls in flight to it
        # encode
        self.items: deque = deque()  # (image id, size, enqueued at)
        self.encoding: dict[int, list[Callable]] = {}  # single flight: image id -> waiters
        self.batch_timer = False
        self.free_at = 0.0
        # decode
        self.waiting: deque = deque()
        self.running: list[_Req] = []
        self.stepping = False
        self.prefill_since: deque = deque()  # when each queued prefill arrived
        # role switching
        self.draining_to: str | None = None
        self.meter: LoadMeter | None = None
        self._run = 0

    # -- the forward thread ------------------------------------------------------------------

    def submit(self, work: Callable[[], tuple[float, float]], done: Callable[[], None]) -> None:
        """``work()`` (called when the task starts) → (device seconds, seconds blocked after)."""
        self.tasks.append((work, done))
        self._kick()

    def _kick(self) -> None:
        if self.busy or not self.tasks:
            return
        work, done = self.tasks.popleft()
        self.busy = True
        self._since = self.sim.engine.now
        if self.meter is not None:
            self._run = self.meter.begin()
        device_s, tail_s = work()
        self.device.start(device_s, lambda: self.sim.engine.after(tail_s, self._done, done))

    def _done(self, done: Callable[[], None]) -> None:
        self.busy_s += self.sim.engine.now - self._since
        if self.meter is not None:
            self.meter.end(self._run)
        self.busy = False
        self.free_at = self.sim.engine.now
        done()
        self._kick()
        self.sim.maybe_switched(self)

    def idle(self) -> bool:
        return not self.busy and not self.tasks and not self.items and not self.running and not self.waiting \
            and not self.encoding and self.calls == 0

    def waited(self, wait_s: float) -> None:
        if self.meter is not None:
            self.meter.observe_wait(wait_s)

    def oldest_wait(self) -> float:
        """What the worker's queue of its role has waited longest (the meter's ``oldest_wait``)."""
        now = self.sim.engine.now
        since = {"encode": self.items[0][2] if self.items else None,
                 "prefill": self.prefill_since[0] if self.prefill_since else None,
                 "decode": self.waiting[0].decode_start if self.waiting else None}.get(self.role)
        return now - since if since is not None else 0.0


class _Simulation:
    def __init__(self, costs: StageCosts, alloc: Allocation, requests: Sequence[SimRequest], config: SimConfig):
        self.costs, self.alloc, self.config = costs, alloc, config
        self.engine = _Engine()
        places = alloc.device_of()
        devices = {d: _Device(self.engine, alloc.device_capacity) for _, d in places}
        self.workers = [_Worker(self, i, role, devices[d]) for i, (role, d) in enumerate(places)]
        self.cache: OrderedDict[int, int] = OrderedDict()  # image id -> bytes (host LRU)
        self.cache_bytes = 0
        self.lrus: dict[int, OrderedDict] = {w.index: OrderedDict() for w in self.workers}
        self.lru_bytes = {w.index: 0 for w in self.workers}
        self._turn = 0
        self.requests: list[_Req] = []
        for i, spec in enumerate(requests):
            prompt = costs.text_tokens(spec.prompt_words) + sum(costs.image_tokens(s) for s in spec.image_sizes)
            result = RequestResult(i, spec.phase, spec.arrival_s, len(spec.image_ids), 0, prompt, spec.output_tokens)
            room = costs.max_model_len - prompt
            output = min(spec.output_tokens, room)
            if room < 1:
                result.error = f"the prompt's {prompt} tokens fill the model's context of {costs.max_model_len}"
            result.output_tokens = max(output, 0)
            self.requests.append(_Req(spec, result, prompt, max(output, 0)))
        self.on_cpu = str(costs.doc.get("device", "")).startswith("cpu")
        self.switches: list[dict] = []
        self.policy = config.elastic.policy() if config.elastic else None
        if config.elastic is not None:
            for w in self.workers:
                w.meter = LoadMeter(config.elastic.window_s, clock=lambda: self.engine.now)
                w.meter.oldest_wait = w.oldest_wait

    # -- running -----------------------------------------------------------------------------

    def run(self) -> SimResult:
        for req in self.requests:
            if req.result.error is None:
                self.engine.at(req.spec.arrival_s, self.arrive, req)
        if self.policy is not None and self.requests:
            self.engine.at(self.config.elastic.interval_s, self.tick)
        self.engine.run()
        span = max((r.spec.arrival_s + (r.result.e2e_s or 0.0) for r in self.requests), default=0.0)
        busy: dict[str, list[float]] = {}
        for w in self.workers:
            busy.setdefault(w.role, []).append(w.busy_s)
        return SimResult(self.alloc, [r.result for r in self.requests], self.switches,
                         {role: sum(v) / len(v) / span if span else 0.0 for role, v in busy.items()})

    def pool(self, role: str) -> list[_Worker]:
        return [w for w in self.workers if w.role == role and w.draining_to is None]

    def arrive(self, req: _Req) -> None:
        if self.alloc.aggregated:
            both = self.pool("both")
            worker = both[self._turn % len(both)]
            self._turn += 1
            self.engine.after(self.costs.hop_s, self._generate, worker, req)
            return
        if not req.spec.image_ids:
            self._prefill(req)
            return
        # NOTE: the router's own lookup (one hop to the sidecar); hits never reach an encoder.
        self.engine.after(self.costs.hop_s, self._encode, req)

    # -- EPD ---------------------------------------------------------------------------------

    def _cached(self, image_id: int) -> bool:
        if image_id in self.cache:
            self.cache.move_to_end(image_id)
            return True
        return False

    def _encode(self, req: _Req) -> None:
        runs: dict[int, list[tuple[int, tuple[int, int]]]] = {}
        encoders = self.pool("encode")
        for image_id, size in zip(req.spec.image_ids, req.spec.image_sizes):
            if self._cached(image_id):
                req.result.hits += 1
                continue
            owner = max(encoders, key=lambda w: _weight(image_id, w.index))
            runs.setdefault(owner.index, []).append((image_id, size))
        if not runs:
            self._prefill(req)
            return
        req.pending_calls = len(runs)
        for index, items in runs.items():
            worker = self.workers[index]
            worker.calls += 1
            self.engine.after(self.costs.hop_s, self._encoder_call, worker, req, items)

    def _encoder_call(self, worker: _Worker, req: _Req, items: list) -> None:
        left = [0]

        def one_done() -> None:
            left[0] -= 1
            if left[0] == 0:
                worker.calls -= 1
                req.pending_calls -= 1
                if req.pending_calls == 0:
                    self._prefill(req)
                self.maybe_switched(worker)

        new = []
        for image_id, size in items:
            if self._cached(image_id):  # NOTE: the encoder looks up too: it was stored meanwhile
                req.result.hits += 1
                continue
            left[0] += 1
            if image_id in worker.encoding:
                req.result.hits += 1  # NOTE: single flight: a join, not an encode of its own
                worker.encoding[image_id].append(one_done)
                continue
            worker.encoding[image_id] = [one_done]
            new.append((image_id, size))
        if left[0] == 0:
            left[0] = 1
            one_done()
            return

        def decoded() -> None:
            worker.items.extend((image_id, size, self.engine.now) for image_id, size in new)
            self._encoder_kick(worker)
        # NOTE: its new images' bytes are decoded and hashed first (threads beside the forward: the device's)
        self._media(worker, sum(self.costs.media_s(size) for _, size in new), decoded)

    def _encoder_kick(self, worker: _Worker) -> None:
        if worker.busy or worker.tasks or not worker.items:
            return
        # NOTE: the batcher takes the oldest item once it is free, then waits for company
        full = len(worker.items) >= self.alloc.encoder_batch
        deadline = max(worker.items[0][2], worker.free_at) + self.config.encoder_wait_s
        if not full and self.engine.now < deadline:
            if not worker.batch_timer:
                worker.batch_timer = True
                self.engine.at(deadline, self._batch_timer, worker)
            return
        batch = [worker.items.popleft() for _ in range(min(self.alloc.encoder_batch, len(worker.items)))]
        now = self.engine.now
        for _, _, since in batch:
            worker.waited(now - since)
        puts = sum(self.costs.kv_put_s(self.costs.embedding_bytes(self.costs.image_tokens(s))) for _, s, _ in batch)

        def done() -> None:
            for image_id, size, _ in batch:
                self._store(image_id, self.costs.embedding_bytes(self.costs.image_tokens(size)))
                for waiter in worker.encoding.pop(image_id):
                    waiter()
            self._encoder_kick(worker)
        worker.submit(lambda: (self.costs.encode_s([s for _, s, _ in batch]), puts), done)

    def _batch_timer(self, worker: _Worker) -> None:
        worker.batch_timer = False
        self._encoder_kick(worker)

    def _store(self, image_id: int, nbytes: int) -> None:
        if image_id in self.cache or nbytes > self.config.cache_capacity_bytes:
            return
        self.cache[image_id] = nbytes
        self.cache_bytes += nbytes
        while self.cache_bytes > self.config.cache_capacity_bytes:
            self.cache_bytes -= self.cache.popitem(last=False)[1]

    def _prefill(self, req: _Req) -> None:
        worker = min(self.pool("prefill"), key=lambda w: (w.calls, w.index))
        worker.calls += 1
        emb = sum(self.costs.embedding_bytes(self.costs.image_tokens(s)) for s in req.spec.image_sizes)
        self.engine.after(self.costs.hop_s + self.costs.cache_read_s(emb), self._prefill_queue, worker, req)

    def _prefill_queue(self, worker: _Worker, req: _Req) -> None:
        kv_put = self.costs.kv_put_s(self.costs.kv_bytes(req.prompt_tokens))
        worker.prefill_since.append(self.engine.now)

        def work() -> tuple[float, float]:
            worker.waited(self.engine.now - worker.prefill_since.popleft())
            return self.costs.prefill_s(req.prompt_tokens), 0.0

        def done() -> None:
            self.engine.after(kv_put, self._prefilled, worker, req)
        worker.submit(work, done)

    def _prefilled(self, worker: _Worker, req: _Req) -> None:
        worker.calls -= 1
        self.maybe_switched(worker)
        req.result.ttft_s = self.engine.now - req.spec.arrival_s
        if req.output_tokens <= 1:
            req.result.e2e_s = req.result.ttft_s
            return
        decoders = self.pool("decode")
        worker = decoders[self._turn % len(decoders)]
        self._turn += 1
        worker.calls += 1
        kv_get = self.costs.kv_get_s(self.costs.kv_bytes(req.prompt_tokens))
        self.engine.after(self.costs.hop_s + kv_get, self._join, worker, req)

    # -- decode (decode and both workers) ----------------------------------------------------

    def _join(self, worker: _Worker, req: _Req) -> None:
        req.generated = 1  # NOTE: the prefill's first token
        req.decode_start = self.engine.now
        worker.waiting.append(req)
        self._step(worker)

    def _step(self, worker: _Worker) -> None:
        if worker.stepping or not (worker.running or worker.waiting):
            return
        worker.stepping = True

        def work() -> tuple[float, float]:
            while worker.waiting and len(worker.running) < self.alloc.decode_batch:
                joined = worker.waiting.popleft()
                worker.waited(self.engine.now - joined.decode_start)
                worker.running.append(joined)
            batch = len(worker.running)
            context = sum(r.prompt_tokens + r.generated for r in worker.running) / batch
            step = self.costs.decode_step_s(batch, context)
            if worker.meter is not None:
                worker.meter.observe_step(step, batch)
            return step, 0.0

        def done() -> None:
            worker.stepping = False
            still = []
            for r in worker.running:
                r.generated += 1
                if r.generated >= r.output_tokens:
                    r.result.e2e_s = self.engine.now - r.spec.arrival_s
                    worker.calls -= 1
                    if worker.meter is not None:
                        worker.meter.observe_tokens(r.output_tokens)
                else:
                    still.append(r)
            worker.running = still
            self._step(worker)
        worker.submit(work, done)

    # -- aggregated --------------------------------------------------------------------------

    def _generate(self, worker: _Worker, req: _Req) -> None:
        worker.calls += 1
        # NOTE: every image is fetched, decoded and hashed before the LRU is asked
        self._media(worker, sum(self.costs.media_s(size) for size in req.spec.image_sizes),
                    lambda: self._generate_loaded(worker, req))

    def _media(self, worker: _Worker, seconds: float, then: Callable[[], None]) -> None:
        """Image decoding: host CPU work. On a CPU profile it shares the worker's device (the CPU);
        beside an accelerator it runs on the host, taking time but no accelerator."""
        if seconds <= 0:
            then()
        elif self.on_cpu:
            worker.device.start(seconds, then)
        else:
            self.engine.after(seconds, then)

    def _generate_loaded(self, worker: _Worker, req: _Req) -> None:
        lru = self.lrus[worker.index]
        misses = []
        for image_id, size in zip(req.spec.image_ids, req.spec.image_sizes):
            if self.alloc.embedding_cache and image_id in lru:
                lru.move_to_end(image_id)
                req.result.hits += 1
            else:
                misses.append((image_id, size))

        def work() -> tuple[float, float]:
            return self.costs.encode_s([s for _, s in misses]) + self.costs.prefill_s(req.prompt_tokens), 0.0

        def done() -> None:
            if self.alloc.embedding_cache:
                for image_id, size in misses:
                    nbytes = self.costs.embedding_bytes(self.costs.image_tokens(size))
                    if image_id not in lru and nbytes <= self.config.cache_capacity_bytes:
                        lru[image_id] = nbytes
                        self.lru_bytes[worker.index] += nbytes
                        while self.lru_bytes[worker.index] > self.config.cache_capacity_bytes:
                            self.lru_bytes[worker.index] -= lru.popitem(last=False)[1]
            req.result.ttft_s = self.engine.now - req.spec.arrival_s
            if req.output_tokens <= 1:
                req.result.e2e_s = req.result.ttft_s
                worker.calls -= 1
                return
            req.generated = 1
            req.decode_start = self.engine.now
            worker.waiting.append(req)
            self._step(worker)
        worker.submit(work, done)

    # -- role switching ----------------------------------------------------------------------

    def loads(self) -> dict[str, StageLoad]:
        """Per stage, what the router's controller reads from its workers' ``/v1/stats``."""
        return {stage: StageLoad(len(pool), tuple(WorkerLoad(str(w.index), w.meter.queue_delay_s(), w.meter.busy(),
                                                             w.calls) for w in pool))
                for stage in STAGES for pool in [self.pool(stage)]}

    def tick(self) -> None:
        switching = any(w.draining_to for w in self.workers)
        # NOTE: as the controller: no decision while a switch is under way
        move = None if switching else self.policy.decide(self.loads(), self.engine.now)
        if move is not None:
            worker = self.workers[int(move.url)]
            worker.draining_to = move.dst
            self.switches.append({"at_s": round(self.engine.now, 3), "worker": worker.index, "from": move.src,
                                  "to": move.dst, "reason": move.reason})
            self.maybe_switched(worker)
        if any(r.result.e2e_s is None and r.result.error is None for r in self.requests):
            self.engine.after(self.config.elastic.interval_s, self.tick)

    def maybe_switched(self, worker: _Worker) -> None:
        if worker.draining_to is None or not worker.idle():
            return
        worker.role, worker.draining_to = worker.draining_to, None
        worker.meter.reset()
        self.switches[-1]["done_s"] = round(self.engine.now, 3)
        self.policy.switched(self.engine.now)


def _weight(image_id: int, worker: int) -> bytes:
    return hashlib.blake2b(f"{worker}\0{image_id}".encode(), digest_size=8).digest()


def simulate(costs: StageCosts, alloc: Allocation, requests: Sequence[SimRequest],
             config: SimConfig = SimConfig()) -> SimResult:
    """Every request of ``requests`` through ``alloc``; per-request results."""
    if alloc.aggregated and config.elastic is not None:
        raise ValueError("role switching is for EPD allocations")
    return _Simulation(costs, alloc, requests, config).run()


def scaled(requests: Sequence[SimRequest], factor: float) -> list[SimRequest]:
    """The same requests arriving ``factor`` times as fast."""
    return [replace(r, arrival_s=r.arrival_s / factor) for r in requests]


def goodput(costs: StageCosts, alloc: Allocation, requests: Sequence[SimRequest], config: SimConfig,
            target: float = 0.9, iterations: int = 7) -> float:
    """The highest arrival rate (requests/s) at which at least ``target`` of the requests meet the
    SLOs, the workload's arrival pattern sped up or slowed down (DistServe's goodput); 0 when
    even a trickle misses them."""
    span = requests[-1].arrival_s - requests[0].arrival_s if len(requests) > 1 else 0.0
    if span <= 0:
        raise ValueError("goodput needs a workload with a finite arrival rate")
    base = (len(requests) - 1) / span

    def ok(factor: float) -> bool:
        return simulate(costs, alloc, scaled(requests, factor), config).summary(
            config.ttft_slo_s, config.tpot_slo_s)["slo_attainment"] >= target

    lo, hi = 0.0, 1.0
    while ok(hi):
        lo, hi = hi, hi * 2
        if hi > 1024:
            return base * lo
    if lo == 0.0:
        if not ok(1 / 64):
            return 0.0
        lo = 1 / 64
    for _ in range(iterations):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return base * lo

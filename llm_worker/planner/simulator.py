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
from collections import OrderedDict
from typing import Callable, Sequence

from llm_worker.elastic.policy import STAGES, StageLoad, WorkerLoad
from llm_worker.elastic.load import LoadMeter
from llm_worker.planner.allocation import Allocation, apportion  # noqa: F401 - the planner's names, here too
from llm_worker.planner.sim_engine import Device, Engine, Req, Worker
from llm_worker.planner.sim_types import RequestResult, SimConfig, SimRequest, SimResult, requests_of  # noqa: F401
from llm_worker.planner.stage_costs import StageCosts


class _Simulation:
    def __init__(self, costs: StageCosts, alloc: Allocation, requests: Sequence[SimRequest], config: SimConfig):
        self.costs, self.alloc, self.config = costs, alloc, config
        self.engine = Engine()
        places = alloc.device_of()
        devices = {d: Device(self.engine, alloc.device_capacity) for _, d in places}
        self.workers = [Worker(self.engine, i, role, devices[d], self.maybe_switched) for i, (role, d) in enumerate(places)]
        self.cache: OrderedDict[int, int] = OrderedDict()  # image id -> bytes (host LRU)
        self.cache_bytes = 0
        self.lrus: dict[int, OrderedDict] = {w.index: OrderedDict() for w in self.workers}
        self.lru_bytes = {w.index: 0 for w in self.workers}
        self._turn = 0
        self.requests: list[Req] = []
        for i, spec in enumerate(requests):
            prompt = costs.text_tokens(spec.prompt_words) + sum(costs.image_tokens(s) for s in spec.image_sizes)
            result = RequestResult(i, spec.phase, spec.arrival_s, len(spec.image_ids), 0, prompt, spec.output_tokens)
            room = costs.max_model_len - prompt
            output = min(spec.output_tokens, room)
            if room < 1:
                result.error = f"the prompt's {prompt} tokens fill the model's context of {costs.max_model_len}"
            result.output_tokens = max(output, 0)
            self.requests.append(Req(spec, result, prompt, max(output, 0)))
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

    def pool(self, role: str) -> list[Worker]:
        return [w for w in self.workers if w.role == role and w.draining_to is None]

    def arrive(self, req: Req) -> None:
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

    def _encode(self, req: Req) -> None:
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

    def _encoder_call(self, worker: Worker, req: Req, items: list) -> None:
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

    def _encoder_kick(self, worker: Worker) -> None:
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

    def _batch_timer(self, worker: Worker) -> None:
        worker.batch_timer = False
        self._encoder_kick(worker)

    def _store(self, image_id: int, nbytes: int) -> None:
        if image_id in self.cache or nbytes > self.config.cache_capacity_bytes:
            return
        self.cache[image_id] = nbytes
        self.cache_bytes += nbytes
        while self.cache_bytes > self.config.cache_capacity_bytes:
            self.cache_bytes -= self.cache.popitem(last=False)[1]

    def _prefill(self, req: Req) -> None:
        worker = min(self.pool("prefill"), key=lambda w: (w.calls, w.index))
        worker.calls += 1
        emb = sum(self.costs.embedding_bytes(self.costs.image_tokens(s)) for s in req.spec.image_sizes)
        self.engine.after(self.costs.hop_s + self.costs.cache_read_s(emb), self._prefill_queue, worker, req)

    def _prefill_queue(self, worker: Worker, req: Req) -> None:
        kv_put = self.costs.kv_put_s(self.costs.kv_bytes(req.prompt_tokens))
        worker.prefill_since.append(self.engine.now)

        def work() -> tuple[float, float]:
            worker.waited(self.engine.now - worker.prefill_since.popleft())
            return self.costs.prefill_s(req.prompt_tokens), 0.0

        def done() -> None:
            self.engine.after(kv_put, self._prefilled, worker, req)
        worker.submit(work, done)

    def _prefilled(self, worker: Worker, req: Req) -> None:
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

    def _join(self, worker: Worker, req: Req) -> None:
        req.generated = 1  # NOTE: the prefill's first token
        req.decode_start = self.engine.now
        worker.waiting.append(req)
        self._step(worker)

    def _step(self, worker: Worker) -> None:
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

    def _generate(self, worker: Worker, req: Req) -> None:
        worker.calls += 1
        # NOTE: every image is fetched, decoded and hashed before the LRU is asked
        self._media(worker, sum(self.costs.media_s(size) for size in req.spec.image_sizes),
                    lambda: self._generate_loaded(worker, req))

    def _media(self, worker: Worker, seconds: float, then: Callable[[], None]) -> None:
        """Image decoding: host CPU work. On a CPU profile it shares the worker's device (the CPU);
        beside an accelerator it runs on the host, taking time but no accelerator."""
        if seconds <= 0:
            then()
        elif self.on_cpu:
            worker.device.start(seconds, then)
        else:
            self.engine.after(seconds, then)

    def _generate_loaded(self, worker: Worker, req: Req) -> None:
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

    def maybe_switched(self, worker: Worker) -> None:
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

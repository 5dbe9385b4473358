"""Eviction policies alone: replay a Zipf trace of variable-size image embeddings against LRU,
GDSF and Belady's offline reference, and print hit ratio and byte hit ratio, in one run.

    python benchmarks/policy.py [--requests 200000] [--pool 10000] [--zipf 0.9] [--reuse 0.5]
        [--capacities 0.01,0.05,0.1,0.2] [--seed 0] [--hidden 4096] [--json PATH]

Trace (``make_trace``, seeded numpy): a pool of ``--pool`` distinct images. A request draws from
the pool with probability ``--reuse``, else it is for an image never seen before and never
requested again (ids from ``pool`` up: a new upload); a pool draw takes image ``i`` (rank
``i + 1``) with probability proportional to ``1 / (i + 1) ** zipf``, independently (the
independent reference model; no temporal locality beyond popularity). The default, 0.5, is the
issue's "reused images 50%" (the share of requests that repeat an earlier image comes out a
little lower, as each pool image's first request is new too; the table header prints it);
``--reuse 1`` is a pure Zipf trace. Each image's embedding has a token count fixed per image:
- ``LLAVA_SHARE`` of the pool: LLaVA-1.5 images, always 576 tokens (CLIP ViT-L/14-336);
- the rest: Qwen2-VL images, one token per 28x28 pixels after its ``smart_resize`` with
  ``min_pixels = 256*28*28`` and ``max_pixels = 4096*28*28`` (so 256..4096 tokens), from a mix of
  common resolutions (``RESOLUTIONS``: thumbnails to phone photos) with +-25% jitter per side.
Popularity and size are independent. An entry holds ``tokens * hidden * 2`` bytes (fp16), and
costs ``ENCODE_FIXED_MS + ENCODE_MS_PER_TOKEN * tokens`` to recompute: what the encoder reports
as ``cost_ms`` on insert, which is what the cost-aware policy sees.

Policies (``lru``, ``gdsf``, ``cost-lfu``), driven as a tier drives them (``simulate``): a hit calls ``on_access``; a miss admits
the entry if it fits the capacity at all, after evicting ``choose_victims(need_bytes)`` with
``on_remove(evicted=True)`` for each victim. Offline references (``belady``), knowing the future:
- belady:      Belady's MIN generalised to sizes: evict the entry whose next request is
               furthest away (never-again first), the requested entry included, so it may
               bypass the cache. Not optimal for variable sizes (that is NP-hard) and not an
               upper bound, but the usual reference; for byte hit ratio its ranking is the
               natural one (a cached byte earns one hit byte at its next use, whatever the size).
- belady-size: the object-hit-ratio variant from the literature (e.g. Berger et al.,
               SIGMETRICS'18): evict the largest ``size * (next request - now)``. Shown for
               hit ratio only; gaps are measured against ``belady``.
All requests count, the cold start included; capacities are fractions of the Zipf pool's bytes.
Target (with reused images 50%): the cost-aware policy closes at least half the gap in byte
hit ratio between LRU and belady, ``(policy - lru) / (belady - lru) >= 0.5``, at every capacity;
printed for both cost-aware policies, ``gdsf`` and ``cost-lfu`` (decayed frequency instead of
GDSF's inflation).
"""

from __future__ import annotations

import argparse
import functools
import heapq
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# NOTE: benchmarks/ is a folder of scripts; they share hostinfo.py from it.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from hostinfo import describe

from mmcache.core.policies import EvictionPolicy, make_policy
from mmcache.common.progress import Progress

HIDDEN = 4096
FP16_BYTES = 2
LLAVA_TOKENS = 576
LLAVA_SHARE = 0.3
QWEN_PIXELS_PER_TOKEN = 28 * 28  # 14-pixel patches, merged 2x2
QWEN_MIN_TOKENS = 256
QWEN_MAX_TOKENS = 4096
# (width, height, weight): a guess at what users send a chat model, thumbnails to phone photos.
RESOLUTIONS = (
    (512, 512, 0.10),
    (640, 480, 0.15),
    (800, 600, 0.10),
    (1024, 768, 0.15),
    (1280, 720, 0.15),
    (1080, 1920, 0.10),  # phone screenshot
    (1920, 1080, 0.10),
    (2048, 1536, 0.05),
    (4032, 3024, 0.10),  # phone photo; capped at max_pixels
)
ENCODE_FIXED_MS = 5.0  # preprocessing and launch overhead per image
ENCODE_MS_PER_TOKEN = 0.06  # ViT forward, taken as linear in tokens
NEVER = 1 << 62  # next-use index of an entry requested no more


@dataclass(frozen=True)
class Trace:
    """A request trace over a pool of images; arrays are indexed by image id (0 = most popular)."""

    keys: np.ndarray  # int64 [num_requests]: image id per request
    num_tokens: np.ndarray  # int64 [pool]: embedding tokens per image
    size_bytes: np.ndarray  # int64 [pool]: num_tokens * hidden * 2 (fp16)
    cost_ms: np.ndarray  # float64 [pool]: encode time per image, ms
    zipf_s: float
    seed: int
    hidden: int
    pool: int | None = None  # images 0..pool-1 form the Zipf pool, the rest are one-off; None: all
    reuse: float = 1.0  # share of requests drawn from the pool

    @property
    def pool_size(self) -> int:
        return len(self.size_bytes) if self.pool is None else self.pool

    @property
    def pool_bytes(self) -> int:
        """Total bytes of every image in the Zipf pool, requested or not (one-off images not counted)."""
        return int(self.size_bytes[: self.pool_size].sum())

    @property
    def distinct(self) -> int:
        """Images requested at least once."""
        return len(np.unique(self.keys))

    @property
    def repeat_share(self) -> float:
        """Share of requests for an image requested before."""
        return 1.0 - self.distinct / len(self.keys) if len(self.keys) else 0.0


@dataclass(frozen=True)
class SimResult:
    """Counts from one replay; ratios are of requests and of requested bytes."""

    policy: str
    capacity_bytes: int
    requests: int
    hits: int
    requested_bytes: int
    hit_bytes: int

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def byte_hit_ratio(self) -> float:
        return self.hit_bytes / self.requested_bytes if self.requested_bytes else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "hit_ratio": self.hit_ratio, "byte_hit_ratio": self.byte_hit_ratio}


def qwen2vl_tokens(width: np.ndarray, height: np.ndarray) -> np.ndarray:
    """Tokens Qwen2-VL emits for images of these sizes (its ``smart_resize``, vectorised)."""
    f = 28
    min_pixels, max_pixels = QWEN_MIN_TOKENS * f * f, QWEN_MAX_TOKENS * f * f
    w, h = width.astype(np.float64), height.astype(np.float64)
    w_bar, h_bar = np.round(w / f) * f, np.round(h / f) * f
    big, small = w_bar * h_bar > max_pixels, w_bar * h_bar < min_pixels
    beta_down = np.sqrt(w * h / max_pixels)
    beta_up = np.sqrt(min_pixels / (w * h))
    w_bar = np.where(big, np.floor(w / beta_down / f) * f, np.where(small, np.ceil(w * beta_up / f) * f, w_bar))
    h_bar = np.where(big, np.floor(h / beta_down / f) * f, np.where(small, np.ceil(h * beta_up / f) * f, h_bar))
    return (w_bar * h_bar / QWEN_PIXELS_PER_TOKEN).astype(np.int64)


def image_tokens(rng: np.random.Generator, count: int) -> np.ndarray:
    """Embedding tokens of ``count`` images drawn from the LLaVA / Qwen2-VL mix in the module doc."""
    table = np.array(RESOLUTIONS)
    pick = rng.choice(len(table), size=count, p=table[:, 2] / table[:, 2].sum())
    width = table[pick, 0] * rng.uniform(0.75, 1.25, count)
    height = table[pick, 1] * rng.uniform(0.75, 1.25, count)
    return np.where(rng.random(count) < LLAVA_SHARE, LLAVA_TOKENS, qwen2vl_tokens(width, height))


def make_trace(num_requests: int = 200_000, pool: int = 10_000, zipf_s: float = 0.9, seed: int = 0,
               hidden: int = HIDDEN, reuse: float = 0.5) -> Trace:
    """A seeded trace: Zipf draws over ``pool`` images (share ``reuse``) and one-off images."""
    if num_requests < 1 or pool < 1 or hidden < 1:
        raise ValueError(f"{num_requests=}, {pool=} and {hidden=} must be >= 1")
    if not zipf_s >= 0:
        raise ValueError(f"{zipf_s=} must be >= 0")
    if not 0.0 < reuse <= 1.0:
        raise ValueError(f"{reuse=} must be in (0, 1]")
    rng = np.random.default_rng(seed)
    num_tokens = image_tokens(rng, pool)
    popularity = 1.0 / np.arange(1, pool + 1, dtype=np.float64) ** zipf_s
    keys = rng.choice(pool, size=num_requests, p=popularity / popularity.sum())
    # NOTE: separate streams for the one-off images, so that reuse=1 is the pure Zipf trace of
    # earlier results, seed for seed.
    one_off = np.random.default_rng([seed, 1]).random(num_requests) >= reuse
    keys[one_off] = pool + np.arange(int(one_off.sum()))
    num_tokens = np.concatenate([num_tokens, image_tokens(np.random.default_rng([seed, 2]), int(one_off.sum()))])
    return Trace(
        keys=keys.astype(np.int64),
        num_tokens=num_tokens.astype(np.int64),
        size_bytes=num_tokens.astype(np.int64) * hidden * FP16_BYTES,
        cost_ms=ENCODE_FIXED_MS + ENCODE_MS_PER_TOKEN * num_tokens,
        zipf_s=zipf_s, seed=seed, hidden=hidden, pool=pool, reuse=reuse,
    )


def simulate(policy: str | EvictionPolicy, trace: Trace, capacity_bytes: int) -> SimResult:
    """Replay ``trace`` through a fresh policy (by name) or a given empty one, as a tier would."""
    if capacity_bytes < 0:
        raise ValueError(f"{capacity_bytes=} must be >= 0")
    p = make_policy(policy) if isinstance(policy, str) else policy
    # NOTE: plain Python ints and floats: the policies reject numpy scalars, as a tier's are not.
    sizes, costs = trace.size_bytes.tolist(), trace.cost_ms.tolist()
    hits = hit_bytes = requested_bytes = 0
    for key in trace.keys.tolist():
        size_bytes = sizes[key]
        requested_bytes += size_bytes
        if key in p:
            hits += 1
            hit_bytes += size_bytes
            p.on_access(key)
            continue
        if size_bytes > capacity_bytes:
            continue  # never evict for an entry that cannot fit anyway
        need_bytes = p.total_bytes + size_bytes - capacity_bytes
        for victim in p.choose_victims(need_bytes):
            p.on_remove(victim, evicted=True)
        p.on_insert(key, size_bytes, costs[key])
    return SimResult(p.name, capacity_bytes, len(trace.keys), hits, requested_bytes, hit_bytes)


def next_uses(keys: np.ndarray) -> np.ndarray:
    """For each request, the index of the next request for the same key, or ``NEVER``."""
    out = np.full(len(keys), NEVER, dtype=np.int64)
    order = np.argsort(keys, kind="stable")  # requests grouped by key, in time order
    same = keys[order[1:]] == keys[order[:-1]]
    out[order[:-1][same]] = order[1:][same]
    return out


def belady(trace: Trace, capacity_bytes: int, *, bypass: bool = True) -> SimResult:
    """Belady's MIN generalised to sizes: evict the entry requested furthest in the future.

    With ``bypass`` the requested entry competes too, so an entry needed later than everything
    cached is not admitted (the offline optimum may decline to cache). ``bypass=False`` is
    classic demand paging: the requested entry is always admitted. Victims come off a max-heap
    of next-use indices with lazy deletion: O(log n) per request.
    """
    if capacity_bytes < 0:
        raise ValueError(f"{capacity_bytes=} must be >= 0")
    keys, sizes = trace.keys.tolist(), trace.size_bytes.tolist()
    nexts = next_uses(trace.keys).tolist()
    key_to_next: dict[int, int] = {}  # cached key -> index of its next request
    heap: list[tuple[int, int]] = []  # (-next index, key); stale once key_to_next disagrees
    used_bytes = hits = hit_bytes = requested_bytes = 0

    def admit(key: int, next_at: int) -> None:
        key_to_next[key] = next_at
        heapq.heappush(heap, (-next_at, key))

    for now, key in enumerate(keys):
        size_bytes = sizes[key]
        requested_bytes += size_bytes
        if key in key_to_next:
            hits += 1
            hit_bytes += size_bytes
            admit(key, nexts[now])  # the old heap item goes stale
            continue
        if size_bytes > capacity_bytes:
            continue
        if bypass:
            admit(key, nexts[now])
            used_bytes += size_bytes
        while used_bytes + (0 if bypass else size_bytes) > capacity_bytes:
            neg_next, victim = heapq.heappop(heap)
            if key_to_next.get(victim) == -neg_next:  # else stale: hit since, or evicted
                del key_to_next[victim]
                used_bytes -= sizes[victim]
        if not bypass:
            admit(key, nexts[now])
            used_bytes += size_bytes
    name = "belady" if bypass else "belady-demand"
    return SimResult(name, capacity_bytes, len(keys), hits, requested_bytes, hit_bytes)


def belady_size(trace: Trace, capacity_bytes: int) -> SimResult:
    """The size-aware variant: evict the largest ``size_bytes * (next request - now)``.

    The requested entry competes (bypass), never-again entries go first (largest first). The
    score depends on ``now``, so it is recomputed over the cached entries at each eviction.
    """
    if capacity_bytes < 0:
        raise ValueError(f"{capacity_bytes=} must be >= 0")
    keys, sizes = trace.keys.tolist(), trace.size_bytes.tolist()
    nexts = next_uses(trace.keys).tolist()
    # NOTE: float64 scores: NEVER * size_bytes would overflow int64, and the order is all we need.
    next_at = np.zeros(len(trace.size_bytes), dtype=np.float64)
    size_f = trace.size_bytes.astype(np.float64)
    cached = np.zeros(len(trace.size_bytes), dtype=np.int64)  # cached keys in [0, num_cached)
    key_to_slot: dict[int, int] = {}
    num_cached = used_bytes = hits = hit_bytes = requested_bytes = 0
    for now, key in enumerate(keys):
        size_bytes = sizes[key]
        requested_bytes += size_bytes
        next_at[key] = nexts[now]
        if key in key_to_slot:
            hits += 1
            hit_bytes += size_bytes
            continue
        if size_bytes > capacity_bytes:
            continue
        key_to_slot[key], cached[num_cached] = num_cached, key
        num_cached += 1
        used_bytes += size_bytes
        while used_bytes > capacity_bytes:
            live = cached[:num_cached]
            slot = int(np.argmax((next_at[live] - now) * size_f[live]))
            victim = int(live[slot])
            num_cached -= 1
            last = int(cached[num_cached])
            cached[slot], key_to_slot[last] = last, slot  # swap-remove
            del key_to_slot[victim]
            used_bytes -= sizes[victim]
    return SimResult("belady-size", capacity_bytes, len(keys), hits, requested_bytes, hit_bytes)


def static_popularity(trace: Trace, capacity_bytes: int) -> SimResult:
    """An oracle of popularity, not of the future: pin the most probable images that fit.

    Pool images are taken in order of true request probability (id = Zipf rank), skipping any
    that no longer fit; each is loaded at its first request (a miss) and never evicted. Under
    the independent reference model this is about the best any policy that learns popularity,
    rather than seeing the future, can reach: a ceiling for LRU and GDSF, not for Belady.
    """
    sizes = trace.size_bytes.tolist()
    pinned = np.zeros(len(sizes), dtype=bool)
    used_bytes = 0
    for key, size_bytes in enumerate(sizes[: trace.pool_size]):  # one-off images are never pinned
        if used_bytes + size_bytes <= capacity_bytes:
            pinned[key] = True
            used_bytes += size_bytes
    requested = trace.size_bytes[trace.keys]
    first = np.zeros(len(trace.keys), dtype=bool)
    first[np.unique(trace.keys, return_index=True)[1]] = True
    hit = pinned[trace.keys] & ~first
    return SimResult("static-popularity", capacity_bytes, len(trace.keys), int(hit.sum()),
                     int(requested.sum()), int(requested[hit].sum()))


# -- the benchmark ---------------------------------------------------------------------------

TARGET_GAP_CLOSED = 0.5
COST_AWARE = ("gdsf", "cost-lfu")


def gap_closed(result: SimResult, lru: SimResult, best: SimResult) -> float:
    """Share of the byte-hit-ratio gap from ``lru`` to ``best`` that ``result`` closes (NaN if none)."""
    gap = best.byte_hit_ratio - lru.byte_hit_ratio
    return (result.byte_hit_ratio - lru.byte_hit_ratio) / gap if gap > 0 else math.nan


RUNS = (
    ("lru", functools.partial(simulate, "lru")),
    ("gdsf", functools.partial(simulate, "gdsf")),
    ("cost-lfu", functools.partial(simulate, "cost-lfu")),
    ("static-popularity", static_popularity),
    ("belady", belady),
    ("belady-size", belady_size),
)
"""Every policy and reference, in table order: (name, run(trace, capacity_bytes))."""


def run_capacity(trace: Trace, capacity_bytes: int, progress: Progress | None = None) -> list[SimResult]:
    """Every policy and reference at one capacity, in table order; ``progress`` counts each run."""
    results = []
    for _, run in RUNS:
        results.append(run(trace, capacity_bytes))
        if progress is not None:
            progress.update(1)
    return results


def describe_trace(trace: Trace) -> str:
    tokens = trace.num_tokens
    llava = int((tokens == LLAVA_TOKENS).sum())
    p5, p50, p95 = np.percentile(tokens, [5, 50, 95])
    one_off, distinct = len(tokens) - trace.pool_size, trace.distinct
    return (
        f"trace: {len(trace.keys):,} requests over a pool of {trace.pool_size:,} images, Zipf s={trace.zipf_s}, "
        f"seed {trace.seed}; reuse {trace.reuse:g}: {one_off:,} requests for one-off images; "
        f"{distinct:,} distinct requested, {1 - distinct / len(trace.keys):.1%} of requests repeats\n"
        f"  tokens per image: {llava:,} LLaVA-1.5 at {LLAVA_TOKENS}, the rest Qwen2-VL "
        f"{QWEN_MIN_TOKENS}..{QWEN_MAX_TOKENS}; all: min {tokens.min()}, p5 {p5:.0f}, median {p50:.0f}, "
        f"p95 {p95:.0f}, max {tokens.max()}, mean {tokens.mean():.0f}\n"
        f"  entry bytes = tokens * {trace.hidden} * 2 (fp16); pool {trace.pool_bytes / 2**30:.1f} GiB; "
        f"cost_ms = {ENCODE_FIXED_MS:g} + {ENCODE_MS_PER_TOKEN:g} * tokens"
    )


def print_table(fraction: float, rows: list[SimResult]) -> dict[str, float]:
    """Print one capacity's table; return the cost-aware policies' gap closed by name."""
    lru, best = rows[0], next(r for r in rows if r.policy == "belady")
    capacity_bytes = rows[0].capacity_bytes
    print(f"\ncapacity {fraction:g} of pool = {capacity_bytes / 2**30:.2f} GiB")
    print(f"  {'policy':<18} {'hit ratio':>9} {'byte hit ratio':>14} {'gap closed':>10}")
    for r in rows:
        closed = gap_closed(r, lru, best)
        closed_text = "n/a" if math.isnan(closed) else f"{closed:.2f}"
        print(f"  {r.policy:<18} {r.hit_ratio:>9.4f} {r.byte_hit_ratio:>14.4f} {closed_text:>10}")
    return {r.policy: gap_closed(r, lru, best) for r in rows if r.policy in COST_AWARE}


def parse_fractions(text: str) -> list[float]:
    fractions = [float(part) for part in text.split(",") if part.strip()]
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise argparse.ArgumentTypeError(f"{text=} must be a comma-separated list of fractions in (0, 1]")
    return fractions


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200_000, help="trace length")
    ap.add_argument("--pool", type=int, default=10_000, help="distinct images")
    ap.add_argument("--zipf", type=float, default=0.9, help="Zipf exponent s of image popularity")
    ap.add_argument("--reuse", type=float, default=0.5,
                    help="share of requests drawn from the Zipf pool; the rest are one-off images (1: pure Zipf)")
    ap.add_argument("--capacities", type=parse_fractions, default=[0.01, 0.05, 0.1, 0.2],
                    help="cache capacities as fractions of the pool's total bytes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=HIDDEN, help="LLM hidden size (embedding width)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    try:
        trace = make_trace(args.requests, args.pool, args.zipf, args.seed, args.hidden, args.reuse)
    except ValueError as e:
        ap.error(str(e))
    print(f"machine: {describe()}")
    print(describe_trace(trace))
    print("gap closed = (policy - lru) / (belady - lru) in byte hit ratio. belady: MIN, evicts the furthest\n"
          "  next use, may bypass; belady-size: evicts the largest size * next-use distance;\n"
          "  static-popularity: pins the truly most popular images (a ceiling for online policies)")
    tables, verdicts = [], []
    # NOTE: progress on stderr, counted per simulated run (a policy at a capacity), never per request
    with Progress("policy", total=len(args.capacities) * len(RUNS), unit="runs") as progress:
        for fraction in args.capacities:
            rows = run_capacity(trace, int(trace.pool_bytes * fraction), progress)
            closed = print_table(fraction, rows)
            verdicts.append((fraction, closed))
            tables.append({"capacity_fraction": fraction, "gap_closed": closed,
                           "results": [r.to_dict() for r in rows]})
    passed = {}
    print()
    for name in COST_AWARE:
        passed[name] = all(c[name] >= TARGET_GAP_CLOSED for _, c in verdicts)
        per_capacity = ", ".join(f"{f:g}: {c[name]:.2f}" for f, c in verdicts)
        print(f"target: {name} closes >= {TARGET_GAP_CLOSED} of the lru-to-belady gap in byte hit ratio "
              f"at every capacity; gap closed {per_capacity} -> {'PASS' if passed[name] else 'MISS'}")
    elapsed_s = time.perf_counter() - started
    print(f"ran in {elapsed_s:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": describe(), "trace": {"requests": args.requests, "pool": args.pool,
                       "zipf_s": args.zipf, "reuse": args.reuse,
                       "repeat_share": trace.repeat_share, "seed": args.seed, "hidden": args.hidden,
                       "pool_bytes": trace.pool_bytes},
                       "capacities": tables, "target_gap_closed": TARGET_GAP_CLOSED, "passed": passed,
                       "elapsed_s": elapsed_s}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""EPD against aggregated serving, measured the way the EPD paper does (Singh et al., 2025):
TTFT, time per output token, end-to-end latency, throughput, SLO attainment, cache hit ratio and
peak memory per worker process, for each request rate.

    python benchmarks/epd.py --profile tiny                  # seconds; CI runs it as a smoke test
    python benchmarks/epd.py --profile realistic             # CLIP-L/336 + a 0.13B Llama; tens of minutes on a CPU
    python benchmarks/epd.py --profile tiny-qwen2-vl --workload video   # sliding-window clips (benchmarks/epd_video.py)
        [--rates 0.08,0.12] [--requests 32] [--reuse 0.5] [--systems epd,aggregated,aggregated-lru]
        [--ttft-slo S] [--tpot-slo S] [--out results/DIR] [--seed 0]

Systems, each started with ``mmcache up`` and driven through its OpenAI API (streaming, one
client task per request at its Poisson arrival time):
- ``epd``: sidecar + encoders + prefill + decode + router;
- ``aggregated``: one ``both`` worker (encode + prefill + decode in one process), no cache;
- ``aggregated-lru``: the same with an in-process LRU encoder cache of the EPD cache's capacity
  (vLLM's engine-internal encoder cache), so the table separates what the cache buys from what
  disaggregation buys.
Each rate gets its own seeded workload with its own images, and each (rate, system) a fresh stack
(cold caches) warmed up by one request; per rate the systems take turns, in an order that rotates
with the rate, so that drift in the machine's speed is spread over them.

Writes ``requests.parquet`` (one row per request), ``summary.json``, ``ttft_cdf.png``,
``throughput_vs_rate.png`` and ``slo_vs_rate.png`` into ``--out``, and prints the table.

    python benchmarks/epd.py --combine DIR [DIR ...] [--out results/DIR]

runs nothing: it pools the requests of earlier results folders (the same systems and rates, e.g.
other seeds: independent replications) and prints and plots the table over all of them. A
32-request median on a shared machine moves by tens of percent from run to run; the pooled one
is steadier. Throughput is completed requests over the runs' summed spans, the hit ratio is
weighted by image references, and the SLOs are the first folder's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hostinfo import describe
from workload import Workload, WorkloadSpec, generate

from mmcache.common.progress import Progress

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from stack_process import StackProcess  # noqa: E402 - the stack as a child process (the tests' helper)


SYSTEMS = {"epd": (), "aggregated": ("--aggregated",), "aggregated-lru": ("--aggregated",)}
NODE_SYSTEMS = {
    "shared-cache": ("--redis-cluster", "3", "--routing", "cache"),
    "shared-load": ("--redis-cluster", "3", "--routing", "load"),
    "independent": ("--routing", "load"),
}
"""With ``--nodes N``: N node groups behind one router, sharing a remote (a 3-master redis
cluster on loopback) with cache-aware routing, the same with load-only routing, and N
independent nodes (no shared remote) by load."""


@dataclass(frozen=True)
class Profile:
    model: str
    rates: tuple[float, ...]
    requests: int
    output_mean: float
    output_max: int
    images_max: int
    ttft_slo_s: float
    tpot_slo_s: float
    cache_capacity: str
    dtype: str | None = None
    encoders: int = 2
    threads_epd: int | None = None
    """Torch threads per EPD worker: 4 processes share the cores instead of each taking all."""
    threads_aggregated: int | None = None
    """The one aggregated worker takes every core (torch's default)."""
    nice_epd: tuple[tuple[str, int], ...] = ()
    """``mmcache up --nice ROLE=N`` for the EPD stack: stage priorities where stages share cores."""
    encoder_batch: int | None = None
    """``mmcache up --encoder-batch N`` for the EPD stack; None: the encoders' default."""
    encoder_schedule: str | None = None
    """``mmcache up --encoder-schedule`` for the EPD stack; None: the encoders' default (fcfs)."""
    env_epd: tuple[tuple[str, str], ...] = (("GOMP_SPINCOUNT", "10000"),)
    """Environment of the EPD stack's workers, unless the caller set the name. EPD runs several
    torch processes on the same cores. OpenMP threads that spin while waiting (libgomp's
    default: 300k spins) burn the cores another worker needs; threads that sleep at once
    (OMP_WAIT_POLICY=PASSIVE) pay a wake-up at every parallel region. Per image (2-core EPYC,
    CLIP-L/336, batch 1): alone 3.3 s spinning, 3.6 s at 10k spins, 4.0 s sleeping (3.5-4.9);
    two encoders at once 9.0, 6.4 and 5.9 s. 10k spins keep most of both. The aggregated worker
    keeps the default."""


PROFILES = {
    "tiny": Profile(model="tiny-llava", rates=(2.0, 4.0, 8.0), requests=24, output_mean=16, output_max=32,
                    images_max=6, ttft_slo_s=0.5, tpot_slo_s=0.05, cache_capacity="512MiB"),
    # NOTE: on a CPU (no GPU visible) every stage shares the same cores, so the EPD stack is sized for that: one
    # encoder (a second one only time-slices the cores with the first, and each image then takes
    # twice as long), and stage priorities that run the stage nearest the first token first
    # (prefill, then encode, then decode), as the aggregated worker's single queue does by
    # putting each prefill before the next decode step; and one image per encoder forward (a
    # batch is no faster on a CPU, and each of its requests would wait for the last image: a
    # burst of 8 requests had a median TTFT of 52 s with batches of up to 8, 30 s without); decode
    # at the lowest priority (at nice 15 it still took a quarter of the cores from an encode at
    # 10), and the encoder's queue shortest request first (one image left before five). Not
    # the compute gate that stages once took turns at (removed since; the encoder yielding between layers):
    # in full runs of both seeds (benchmarks/results/epd-realistic-2core-cpu-shared-cores*) its
    # median TTFT against aggregated-lru's was 1.01 / 1.99 / 0.95 / 1.16x, against 1.01 / 1.27 /
    # 1.86 / 1.28x with priorities, and its median TPOT 0.15-0.91 s instead of 0.10-0.20 s: a
    # decode step waits behind whole prefills. ``--epd-flags`` overrides them. 32 requests per
    # rate: with 16 the median moved by 10-20% between runs of the same workload (the same
    # isolated 2-image request took 10.6-13.9 s on this machine).
    "tiny-qwen2-vl": Profile(model="tiny-qwen2-vl", rates=(2.0, 4.0, 8.0), requests=24, output_mean=16,
                             output_max=32, images_max=6, ttft_slo_s=0.5, tpot_slo_s=0.05, cache_capacity="512MiB"),
    "realistic": Profile(model="llava-clip-l336-small", rates=(0.08, 0.12), requests=32, output_mean=24,
                         output_max=48, images_max=6, ttft_slo_s=10.0, tpot_slo_s=0.25, cache_capacity="2GiB",
                         encoders=1, nice_epd=(("encoder", 10), ("decode", 19)), encoder_batch=1,
                         encoder_schedule="sjf"),
}


def native_bf16() -> bool:
    """Whether bf16 matmuls run natively here (a GPU, or a CPU with AVX512-BF16/AMX)."""
    import torch

    if torch.cuda.is_available():
        return True
    return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX")  # NOTE: AVX2/AVX512 emulate bf16


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()  # NOTE: counts devices without creating a CUDA context


# -- driving one stack ---------------------------------------------------------------------


async def _one_request(client, model: str, messages: list, max_tokens: int, delay: float, t0: float,
                       progress: Progress | None) -> dict:
    await asyncio.sleep(max(0.0, t0 + delay - time.perf_counter()))
    sent = time.perf_counter()
    first = end = None
    tokens = prompt_tokens = 0
    error = None
    try:
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"return_token_ids": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].to_dict().get("token_ids"):
                first = first or time.perf_counter()
            if chunk.usage is not None:
                tokens, prompt_tokens = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
        end = time.perf_counter()
    except Exception as e:  # NOTE: a failed request is data (it misses the SLO), not a crash
        error = f"{type(e).__name__}: {e}"[:300]
    ok = error is None and first is not None
    if progress is not None:  # NOTE: once per request, after its clock stopped
        progress.update(1, errors=int(error is not None))
    return {"sent_s": sent - t0, "ttft_s": first - sent if ok else None, "e2e_s": end - sent if ok else None,
            "tpot_s": (end - first) / (tokens - 1) if ok and tokens > 1 else None,
            "completion_tokens": tokens, "prompt_tokens": prompt_tokens, "error": error}


async def drive(url: str, model: str, workload: Workload, progress: Progress | None = None) -> list[dict]:
    """Every request of ``workload`` at its arrival time; per-request records. ``progress``:
    counts each request as it completes, failed ones as ``errors`` too."""
    import openai

    payloads = [r.to_openai_messages(workload) for r in workload.requests]  # NOTE: images rendered before t0
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600) as client:
        t0 = time.perf_counter()
        rows = await asyncio.gather(*(_one_request(client, model, m, r.max_tokens, r.arrival_s, t0, progress)
                                      for r, m in zip(workload.requests, payloads)))
    for r, row in zip(workload.requests, rows):
        row.update(index=r.index, arrival_s=r.arrival_s, images=len(r.image_ids), max_tokens=r.max_tokens)
    return rows


def warm_up(url: str, model: str, spec: WorkloadSpec, requests: int = 1, label: str = "warm-up") -> None:
    """``requests`` requests of ``spec``'s kind, all at once, with images of their own: a stack's
    first forwards are slow, and that is no workload's cost. Progress on stderr as ``label``."""
    with Progress(label, total=requests, unit="requests", counters=("errors",)) as progress:
        asyncio.run(drive(url, model, generate(replace(spec, num_requests=requests, seed=spec.seed + 999_999,
                                                       rate=float("inf"))), progress))


def run_progress(label: str, workload: Workload) -> Progress:
    """The progress of one measured run on stderr (stdout stays the results): requests completed
    of the workload's, failed ones as ``errors``."""
    return Progress(label, total=len(workload.requests), unit="requests", counters=("errors",))


def cache_counters(system: str, stats: dict) -> tuple[int, int]:
    """(image references, cache hits) so far, from the router's /v1/stats. A hit is a reference
    that did not need an encode of its own: for EPD, a cache hit or a wait on the encode of the
    same image already in flight for another request (single flight), which the aggregated
    worker's one queue, running requests in turn, meets as a cache hit instead."""
    if not system.startswith("aggregated"):
        totals = stats["totals"]
        return totals["images"], totals["images"] - totals["images_encoded"]
    worker = stats["generate"][0].get("stats", {})
    cache = worker.get("embedding_cache")
    return (cache["hits"] + cache["misses"], cache["hits"]) if cache else (0, 0)


def peak_memory_mib(up: StackProcess) -> tuple[dict[str, float], dict[str, float]]:
    """Per process of the stack, MiB: peak resident memory (VmHWM), and the shared-memory pages
    resident at the end (RssShmem). VmHWM counts the arena pages a process has mapped in: the
    sidecar's whole arena, and a writer's too (its mapping is pre-faulted, MAP_POPULATE), so the
    shared part is shown apart: it is one arena, not memory each process holds."""
    peak, shared = {}, {}
    for pid, name in sorted(up.pid_tree().items()):
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = {line.split(":")[0]: int(line.split()[1]) for line in f
                          if line.startswith(("VmHWM", "RssShmem"))}
        except (OSError, ValueError, IndexError):
            continue
        if "VmHWM" not in fields:
            continue
        key, n = name, 1
        while key in peak:
            n += 1
            key = f"{name} #{n}"
        peak[key] = round(fields["VmHWM"] / 1024, 1)
        shared[key] = round(fields.get("RssShmem", 0) / 1024, 1)
    return peak, shared


def epd_shape_flags(profile: Profile) -> list[str]:
    """The profile's ``mmcache up`` flags for the EPD stack's shape: encoders and stage priorities."""
    batch = ["--encoder-batch", str(profile.encoder_batch)] if profile.encoder_batch else []
    schedule = ["--encoder-schedule", profile.encoder_schedule] if profile.encoder_schedule else []
    return ["--encoders", str(profile.encoders), *(a for role, n in profile.nice_epd for a in ("--nice", f"{role}={n}")),
            *batch, *schedule]


def run_system(system: str, profile: Profile, model_dir: str, specs: list[WorkloadSpec], dtype: str | None,
               workdir: Path, extra_flags: tuple[str, ...] = (), nodes: int = 1,
               run: str = "") -> tuple[list[dict], dict]:
    """Start ``system``, warm it up, run each spec; (rows, {"memory_mib", "shared_mib", "startup_s"}).
    ``run`` (e.g. ``run 2/6``) names the run in the progress lines."""
    flags = [*SYSTEMS.get(system, NODE_SYSTEMS.get(system, ())), "--model", model_dir, "--data-dir", tempfile.mkdtemp(prefix=f"{system}-", dir=workdir),
             "--port", "0", "--host-capacity", profile.cache_capacity, "--log-level", "warning"]
    if not system.startswith("aggregated"):
        flags += epd_shape_flags(profile)
    if system in NODE_SYSTEMS:
        flags += ["--nodes", str(nodes)]
    if system == "aggregated-lru":
        flags += ["--encoder-cache", profile.cache_capacity]
    threads = profile.threads_aggregated if system.startswith("aggregated") else profile.threads_epd
    if threads:
        flags += ["--threads", str(threads)]
    if dtype:
        flags += ["--dtype", dtype]
    flags += list(extra_flags)
    t0 = time.perf_counter()
    rows = []
    env = {} if system.startswith("aggregated") or {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ) \
        else dict(profile.env_epd)
    with StackProcess(*flags, env=env) as up:
        startup_s = time.perf_counter() - t0
        model = Path(model_dir).name
        name = f"{system} ({run})" if run else system
        warm_up(up.url, model, specs[0], label=f"{name} warm-up")
        for spec in specs:
            workload = generate(spec)
            before = cache_counters(system, up.stats())
            with run_progress(f"{name} rate {spec.rate:g}/s", workload) as progress:
                t = time.perf_counter()
                got = asyncio.run(drive(up.url, model, workload, progress))
                wall = time.perf_counter() - t
            after = cache_counters(system, up.stats())
            refs, hits = after[0] - before[0], after[1] - before[1]
            for row in got:
                row.update(system=system, rate=spec.rate, run_wall_s=wall, hit_ratio=hits / refs if refs else 0.0,
                           run_encoded=refs - hits,
                           repeat_share=workload.repeat_share())
            rows += got
            print(f"  {system:15s} rate {spec.rate:g}/s: {sum(r['error'] is None for r in got)}/{len(got)} ok "
                  f"in {wall:.1f} s, hit ratio {hits}/{refs}", flush=True)
        memory, shared = peak_memory_mib(up)
    return rows, {"memory_mib": memory, "shared_mib": shared, "startup_s": round(startup_s, 1)}


# -- summarising -----------------------------------------------------------------------------


def summarise(rows: list[dict], ttft_slo: float, tpot_slo: float) -> dict:
    """One (system, rate)'s metrics over ``rows``, which may pool several runs (``run`` column)."""
    ok = [r for r in rows if r["error"] is None]
    ttft = [r["ttft_s"] for r in ok]
    tpot = [r["tpot_s"] for r in ok if r["tpot_s"] is not None]
    runs: dict[int, list[dict]] = {}
    for r in rows:
        runs.setdefault(r.get("run", 0), []).append(r)
    spans = [max(r["sent_s"] + r["e2e_s"] for r in g if r["error"] is None) - min(r["sent_s"] for r in g)
             for g in runs.values() if any(r["error"] is None for r in g)]
    span = sum(spans) if spans else float("nan")
    refs = [sum(r["images"] for r in g) for g in runs.values()]
    hit_ratio = (sum(g[0]["hit_ratio"] * n for g, n in zip(runs.values(), refs)) / sum(refs)) if sum(refs) else 0.0
    met = sum(r["ttft_s"] <= ttft_slo and (r["tpot_s"] is None or r["tpot_s"] <= tpot_slo) for r in ok)
    return {
        "requests": len(rows), "errors": len(rows) - len(ok),
        "ttft_median_s": _q(ttft, 0.5), "ttft_p90_s": _q(ttft, 0.9),
        "tpot_median_s": _q(tpot, 0.5), "e2e_median_s": _q([r["e2e_s"] for r in ok], 0.5),
        "throughput_rps": len(ok) / span if ok else 0.0,
        "tokens_per_s": sum(r["completion_tokens"] for r in ok) / span if ok else 0.0,
        "slo_attainment": met / len(rows) if rows else 0.0,
        "hit_ratio": hit_ratio,
        "images_encoded": sum(g[0].get("run_encoded", 0) for g in runs.values()),
    }


def _q(values: list[float], q: float) -> float:
    return float(np.quantile(values, q)) if values else float("nan")


_TABLE_ROWS = (("median TTFT s", "ttft_median_s", "{:.3f}"), ("p90 TTFT s", "ttft_p90_s", "{:.3f}"),
               ("median TPOT s", "tpot_median_s", "{:.4f}"), ("median e2e s", "e2e_median_s", "{:.3f}"),
               ("throughput req/s", "throughput_rps", "{:.3f}"), ("tokens/s", "tokens_per_s", "{:.1f}"),
               ("SLO attainment", "slo_attainment", "{:.0%}"), ("cache hit ratio", "hit_ratio", "{:.0%}"),
               ("images encoded", "images_encoded", "{:d}"),
               ("errors", "errors", "{:d}"))


def print_table(summary: dict, systems: list[str]) -> None:
    """Per rate, metrics by system side by side, with each baseline's ratio to the first system."""
    first = systems[0]
    for rate, by_system in summary.items():
        base = systems[1:]
        head = ["metric", *systems, *(f"{s}/{first}" for s in base)]
        print(f"\nrate {rate} req/s")
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for label, key, fmt in _TABLE_ROWS:
            cells = [fmt.format(by_system[s][key]) for s in systems]
            ratios = [_ratio(by_system[s][key], by_system[first][key]) for s in base]
            print("| " + " | ".join([label, *cells, *ratios]) + " |")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if isinstance(a, float) and b and np.isfinite(a) and np.isfinite(b) else "-"


def plot(rows: list[dict], summary: dict, systems: list[str], out: Path, ttft_slo: float) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    written = []
    rates = sorted({r["rate"] for r in rows})
    fig, axes = plt.subplots(1, len(rates), figsize=(4.5 * len(rates), 3.6), squeeze=False)
    for ax, rate in zip(axes[0], rates):
        for system in systems:
            ttft = np.sort([r["ttft_s"] for r in rows if r["system"] == system and r["rate"] == rate
                            and r["ttft_s"] is not None])
            ax.step(ttft, np.arange(1, len(ttft) + 1) / max(len(ttft), 1), where="post", label=system)
        ax.axvline(ttft_slo, color="grey", linestyle=":", label="TTFT SLO")
        ax.set(title=f"{rate:g} req/s", xlabel="TTFT (s)", ylabel="fraction of requests", xscale="log")
        # NOTE: plain numbers on the log axis; matplotlib's minor labels (2x10^0, 3x10^0, ...) overlap
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
            lambda x, _: f"{x:g}" if f"{x:.2g}"[0] in "25" else ""))
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(out / "ttft_cdf.png", dpi=120)
    written.append("ttft_cdf.png")
    for name, key, label in (("throughput_vs_rate.png", "throughput_rps", "completed requests/s"),
                             ("slo_vs_rate.png", "slo_attainment", "SLO attainment")):
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for system in systems:
            ax.plot(rates, [summary[str(r)][system][key] for r in rates], marker="o", label=system)
        if key == "throughput_rps":
            ax.plot(rates, rates, color="grey", linestyle=":", label="offered load")
        ax.set(xlabel="request rate (req/s)", ylabel=label)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        written.append(name)
    plt.close("all")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="tiny")
    p.add_argument("--workload", choices=("images", "video"), default="images",
                   help="images: Poisson arrivals of image requests (default); video: a sliding-window captioner's "
                        "clips, one after the other (benchmarks/epd_video.py)")
    p.add_argument("--rates", help="comma-separated request rates (req/s); default: the profile's")
    p.add_argument("--requests", type=int, help="requests per rate; default: the profile's")
    p.add_argument("--reuse", type=float, default=0.5, help="share of image references that repeat one")
    p.add_argument("--systems", help=f"default: {','.join(SYSTEMS)}; with --nodes: {','.join(NODE_SYSTEMS)}")
    p.add_argument("--nodes", type=int, default=1,
                   help="N node groups behind one router: compare a shared remote with cache-aware routing, "
                        "the same by load, and N independent nodes (systems " + ",".join(NODE_SYSTEMS) + ")")
    p.add_argument("--ttft-slo", type=float, help="seconds; default: the profile's")
    p.add_argument("--tpot-slo", type=float, help="seconds; default: the profile's")
    p.add_argument("--dtype", help="default: bfloat16 where it runs natively (GPU, AVX512-BF16/AMX), else float32")
    p.add_argument("--models-dir", default="./mmcache-data", help="where the built-in models are generated")
    p.add_argument("--out", help="results folder (default results/epd-PROFILE-TIMESTAMP)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--combine", nargs="+", metavar="DIR", help="run nothing: pool these results folders' requests")
    p.add_argument("--epd-flags", default="", help="more `mmcache up` flags for the EPD stack, e.g. --epd-flags='--nice decode=5' "
                                                     "(with '=': the value starts with --)")
    args = p.parse_args(argv)

    try:
        epd_extra = tuple(shlex.split(args.epd_flags))
    except ValueError as e:
        p.error(f"--epd-flags {args.epd_flags!r}: {e}")
    if args.combine:
        return combine([Path(d) for d in args.combine], args.out)
    profile = PROFILES[args.profile]
    if profile.nice_epd and _gpu_count() > 0:
        # NOTE: the CPU sizing above is for stages that share the cores; on a GPU node the
        # workers' forwards run on the GPU, so the default EPD shape (two encoders, batches)
        # applies; the shortest-request-first queue is no CPU matter and stays.
        profile = replace(profile, encoders=2, nice_epd=(), encoder_batch=None, env_epd=())
    rates = tuple(float(r) for r in args.rates.split(",")) if args.rates else profile.rates
    num_requests = args.requests or profile.requests
    ttft_slo, tpot_slo = args.ttft_slo or profile.ttft_slo_s, args.tpot_slo or profile.tpot_slo_s
    known = NODE_SYSTEMS if args.nodes > 1 else SYSTEMS
    systems = [s.strip() for s in (args.systems or ",".join(known)).split(",") if s.strip()]
    unknown = sorted(set(systems) - set(known))
    if unknown:
        p.error(f"unknown systems {unknown}; known{' with --nodes' if args.nodes > 1 else ''}: {', '.join(known)}")
    dtype = args.dtype
    dtype_note = ""
    if dtype is None and args.profile == "realistic":
        dtype = "bfloat16" if native_bf16() else "float32"
        if dtype == "float32":
            dtype_note = (" (bf16 is emulated on this CPU, 6-7x slower than float32 for the same work; the "
                          "encode-to-prefill cost ratio is about the same in both, so float32 keeps the run short)")
    out = Path(args.out or f"results/epd-{args.profile}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)

    from encoder_worker.models import ensure_model

    model_dir = ensure_model(profile.model, args.models_dir)
    if args.workload == "video":
        import epd_video

        def flags_for(system: str) -> list[str]:
            shape = [] if system.startswith("aggregated") else [*epd_shape_flags(profile), *epd_extra]
            return [*shape, *(["--dtype", dtype] if dtype else [])]
        return epd_video.run(args.profile, model_dir, [s for s in systems if s in epd_video.SYSTEMS], flags_for,
                             profile.cache_capacity, out, args.seed)
    specs = [WorkloadSpec(rate=rate, num_requests=num_requests, reuse=args.reuse, images_max=profile.images_max,
                          output_tokens_mean=profile.output_mean, output_tokens_max=profile.output_max,
                          output_tokens_min=4, seed=args.seed + 1000 * i) for i, rate in enumerate(rates)]
    print(f"machine: {describe(torch=True)}")
    print(f"profile {args.profile}: model {profile.model} ({model_dir}), dtype {dtype or 'default'}{dtype_note}")
    print(f"workload: {num_requests} requests per rate, rates {', '.join(f'{r:g}' for r in rates)} req/s (Poisson), "
          f"reuse {args.reuse:.0%} (Zipf), 1-{profile.images_max} images/request (mean 2), output mean "
          f"{profile.output_mean:g} tokens; SLO: TTFT <= {ttft_slo:g} s and TPOT <= {tpot_slo:g} s")
    print(f"stacks: epd = mmcache up {shlex.join([*epd_shape_flags(profile), *epd_extra])} (sidecar, encoders, prefill, decode, "
          f"router); aggregated = mmcache up --aggregated; aggregated-lru = mmcache up --aggregated --encoder-cache "
          f"{profile.cache_capacity}")
    rows, extras = [], {s: {"memory_mib": {}, "shared_mib": {}, "startup_s": []} for s in systems}
    with tempfile.TemporaryDirectory(prefix="mmc-epd-", dir="/tmp") as workdir:
        for i, spec in enumerate(specs):
            # NOTE: a fresh stack per (rate, system), the systems taking turns per rate in an order
            # that rotates with the rate: this shared machine's speed drifts by tens of percent
            # over minutes, and running each system's rates back to back would bill the drift to it.
            for j, system in enumerate(systems[i % len(systems):] + systems[:i % len(systems)]):
                extra = epd_extra if not system.startswith("aggregated") else ()
                run = f"run {i * len(systems) + j + 1}/{len(specs) * len(systems)}"
                got, info = run_system(system, profile, model_dir, [spec], dtype, Path(workdir), extra, args.nodes,
                                       run)
                rows += got
                extras[system]["startup_s"].append(info["startup_s"])
                for what in ("memory_mib", "shared_mib"):
                    peak = extras[system][what]
                    for name, mib in info[what].items():
                        peak[name] = max(peak.get(name, 0.0), mib)

    summary = {str(rate): {s: summarise([r for r in rows if r["system"] == s and r["rate"] == rate],
                                        ttft_slo, tpot_slo) for s in systems} for rate in rates}
    print_table(summary, systems)
    print("\npeak memory per process (VmHWM, MiB; in brackets the shared arena pages in it, RssShmem):")
    for system in systems:
        shared = extras[system]["shared_mib"]
        print(f"  {system}: " + ", ".join(f"{k} {v:g} ({shared.get(k, 0):g} shm)"
                                           for k, v in extras[system]["memory_mib"].items()))
    _write(out, rows, summary, extras, vars(args) | {"dtype": dtype, "model_dir": model_dir,
                                                      "profile_settings": asdict(profile), "machine": describe(torch=True)})
    written = plot(rows, summary, systems, out, ttft_slo)
    print(f"\nwrote {out}/requests.parquet, summary.json, {', '.join(written)}")
    return 0


def combine(dirs: list[Path], out_dir: str | None) -> int:
    """Pool the requests of earlier results folders into one table and one set of plots."""
    import pyarrow.parquet as pq

    rows, settings, slos = [], [], []
    for run, d in enumerate(dirs):
        try:
            got = pq.read_table(d / "requests.parquet").to_pylist()
            settings.append(json.loads((d / "summary.json").read_text())["settings"])
            if "combined" in settings[-1]:
                raise SystemExit(f"--combine {d}: already a combination; pass the folders it pools instead")
            profile = settings[-1]["profile_settings"]
            slos.append((settings[-1].get("ttft_slo") or profile["ttft_slo_s"],
                         settings[-1].get("tpot_slo") or profile["tpot_slo_s"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"--combine {d}: not a results folder of this benchmark ({e!r})") from None
        rows += [{**r, "run": run} for r in got]
    systems = list(dict.fromkeys(r["system"] for r in rows))
    rates = sorted({r["rate"] for r in rows})
    ttft_slo, tpot_slo = slos[0]
    print(f"combined: {len(dirs)} runs, {len(rows)} requests; SLO: TTFT <= {ttft_slo:g} s and TPOT <= {tpot_slo:g} s")
    for d, s in zip(dirs, settings):
        print(f"  {d}: seed {s.get('seed')}, {s.get('machine')}")
    summary = {str(rate): {s: summarise([r for r in rows if r["system"] == s and r["rate"] == rate],
                                        ttft_slo, tpot_slo) for s in systems} for rate in rates}
    for rate, by_system in summary.items():
        for s, m in by_system.items():
            print(f"  {s:15s} rate {rate}/s: {m['requests'] - m['errors']}/{m['requests']} ok")
    print_table(summary, systems)
    out = Path(out_dir or f"results/epd-combined-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    _write(out, rows, summary, {}, {"combined": [str(d) for d in dirs], "runs": settings})
    written = plot(rows, summary, systems, out, ttft_slo)
    print(f"\nwrote {out}/requests.parquet, summary.json, {', '.join(written)}")
    return 0


def _write(out: Path, rows: list[dict], summary: dict, extras: dict, settings: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), out / "requests.parquet")
    (out / "summary.json").write_text(json.dumps({"settings": settings, "summary": summary, "systems": extras},
                                                 indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())

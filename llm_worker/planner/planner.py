"""``mmcache plan``: the allocation of encoders, prefill and decode workers (and their batch
sizes, and which stages share a device) that gives the most goodput under the SLOs, found by
simulating the pipeline (``llm_worker.planner.simulator``) with the stage costs measured on the real
workers (``llm_worker.planner.profile``).

    mmcache plan --profile P.json [--model tiny-llava] [--quick]        measure this machine into P.json
    mmcache plan --profile P.json --workload W --workers N --slo-ttft S --slo-tpot T [--devices G]

``W`` is a workload as ``llm_worker.planner.workload`` describes it (the benchmarks run the same ones):
``PRESET[,FIELD=VALUE...]`` (presets: default, image-heavy, text-heavy, long-output), several
phases joined by ``+``, or a JSON file. Goodput is DistServe's: the highest arrival rate (the
workload's arrival pattern sped up or slowed down) at which ``--attainment`` of the requests
(90%) meet both SLOs. The search: every split of ``N`` workers into encoders / prefill / decode
(each at least one) and every way of placing the stages on ``G`` devices, at the default batch
sizes, and the aggregated baseline with ``N`` workers; then the best few splits again over batch
sizes. It prints the ranking with the predicted figures at the workload's own rate, and the
``mmcache up`` flags of the winner. A workload of several phases also gets the winner with role
switching (``--elastic``) simulated, phase by phase.

Devices: a profile measured on a CPU puts every worker on the one CPU they share (``--devices
1``), as ``mmcache up`` runs there; a GPU profile gives each worker its own device unless
``--devices`` says fewer. Every figure is a prediction from the profile named in the output's
first line (measured, or set down from published figures and labelled so).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

from llm_worker.elastic.policy import ElasticPolicy
from llm_worker.planner.simulator import Allocation, SimConfig, SimRequest, requests_of, simulate
from llm_worker.planner.stage_costs import ProfileError, StageCosts
from llm_worker.planner.workload import concatenate, load_phases

PLACEMENTS = ("E|P|D", "EP|D", "E|PD", "ED|P", "EPD")
MAX_WORKERS = 32
"""Most workers searched: every split of N is N^2/2 allocations, each a dozen simulations."""
ENCODER_BATCHES = (1, 4, 8, 16)
DECODE_BATCHES = (16, 64, 128)


@dataclass
class Candidate:
    allocation: Allocation
    goodput_rps: float = 0.0
    summary: dict | None = None
    busy: dict[str, float] | None = None
    """Per role, the share of the run its workers were busy (at the workload's rate)."""

    @property
    def key(self) -> tuple:
        s = self.summary or {}
        ttft = s.get("ttft_median_s", math.inf)
        return (-round(self.goodput_rps, 6), -s.get("slo_attainment", 0.0), ttft if math.isfinite(ttft) else math.inf)

    def row(self) -> dict:
        return {"allocation": self.allocation.name, "goodput_rps": self.goodput_rps, **(self.summary or {}),
                "busy": self.busy,
                "up_flags": self.allocation.up_flags(), **{f"alloc_{k}": v for k, v in asdict(self.allocation).items()}}


def splits(workers: int) -> list[tuple[int, int, int]]:
    """Every (encoders, prefill, decode), each at least 1, summing to ``workers``."""
    return [(e, p, workers - e - p) for e in range(1, workers - 1) for p in range(1, workers - e)]


def first_round(workers: int, devices: int | None, capacity: float, encoder_batch: int,
                decode_batch: int) -> list[Allocation]:
    shared = devices is not None and devices < workers
    places = [p for p in PLACEMENTS if len(p.split("|")) <= devices] if shared else ["E|P|D"]
    out = [Allocation(e, p, d, encoder_batch, decode_batch, placement=pl, devices=devices, device_capacity=capacity)
           for e, p, d in splits(workers) for pl in places]
    out.append(Allocation(decode=workers, decode_batch=decode_batch, aggregated=True, devices=devices,
                          device_capacity=capacity))
    return out


def plan(costs: StageCosts, requests: Sequence[SimRequest], workers: int, config: SimConfig, *,
         devices: int | None = None, capacity: float = 1.0, attainment: float = 0.9, refine: int = 3,
         encoder_batch: int = 8, decode_batch: int = 64,
         progress: Callable[[int, int, str], None] | None = None) -> list[Candidate]:
    """Every candidate allocation of ``workers`` workers, best first (goodput, then attainment at
    the workload's rate, then median TTFT)."""
    if not 3 <= workers <= MAX_WORKERS:
        raise ValueError(f"--workers {workers}: EPD needs at least 3 workers (one per stage), and at most "
                         f"{MAX_WORKERS} are searched")
    if devices is not None and devices < 1:
        raise ValueError("--devices must be >= 1")
    if not 0 < attainment <= 1:
        raise ValueError("--attainment must be in (0, 1]")
    seen: dict[Allocation, Candidate] = {}

    def evaluate(allocs: list[Allocation], stage: str) -> None:
        todo = [a for a in allocs if a not in seen]
        for i, a in enumerate(todo):
            c = Candidate(a)
            result = simulate(costs, a, requests, config)
            c.summary, c.busy = result.summary(config.ttft_slo_s, config.tpot_slo_s), result.busy
            c.goodput_rps = goodput(costs, a, requests, config, attainment)
            seen[a] = c
            if progress is not None:
                progress(i + 1, len(todo), f"{stage}: {a.name}")

    evaluate(first_round(workers, devices, capacity, encoder_batch, decode_batch), "allocations")
    best = sorted((c for c in seen.values() if not c.allocation.aggregated), key=lambda c: c.key)[:refine]
    aggregated = [c.allocation for c in seen.values() if c.allocation.aggregated]
    evaluate([replace(c.allocation, encoder_batch=eb, decode_batch=db) for c in best
              for eb in ENCODER_BATCHES for db in DECODE_BATCHES]
             + [replace(a, decode_batch=db) for a in aggregated for db in DECODE_BATCHES], "batch sizes")
    return sorted(seen.values(), key=lambda c: c.key)


# -- the command ----------------------------------------------------------------------------


def _fmt(value: float, unit: str = "", digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}{unit}"


def print_ranking(ranking: list[Candidate], top: int, out=sys.stdout) -> None:
    head = ("#", "allocation", "goodput req/s", "SLO met", "median TTFT s", "p90 TTFT s", "median TPOT s",
            "throughput req/s", "hit ratio")
    print("| " + " | ".join(head) + " |", file=out)
    print("|" + "---|" * len(head), file=out)
    for i, c in enumerate(ranking[:top], 1):
        s = c.summary
        print("| " + " | ".join([str(i), c.allocation.name, _fmt(c.goodput_rps), f"{s['slo_attainment']:.0%}",
                                 _fmt(s["ttft_median_s"]), _fmt(s["ttft_p90_s"]), _fmt(s["tpot_median_s"], digits=4),
                                 _fmt(s["throughput_rps"]), f"{s['hit_ratio']:.0%}"]) + " |", file=out)


def phase_report(costs: StageCosts, alloc: Allocation, requests: list[SimRequest], config: SimConfig,
                 policy: ElasticPolicy) -> dict:
    """Per phase, SLO attainment and median TTFT of ``alloc`` static and with role switching."""
    static = simulate(costs, alloc, requests, config)
    elastic = simulate(costs, alloc, requests, replace(config, elastic=policy))
    phases = sorted({r.phase for r in requests})
    return {"phases": [{"phase": p, "static": static.summary(config.ttft_slo_s, config.tpot_slo_s, p),
                        "elastic": elastic.summary(config.ttft_slo_s, config.tpot_slo_s, p)} for p in phases],
            "switches": elastic.switches}


def _measure(args: argparse.Namespace) -> int:
    from llm_worker.planner import profile_cli

    argv = ["--model", args.model, "--data-dir", args.data_dir, "--out", args.profile or "profile.json"]
    for flag, value in (("--device", args.device), ("--dtype", args.dtype)):
        if value:
            argv += [flag, value]
    argv += [flag for flag, on in (("--quick", args.quick), ("--quiet", args.quiet)) if on]
    return profile_cli.main(argv)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmcache plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", metavar="PATH",
                   help="with --workload: the stage costs to plan with; without: measure this machine into PATH "
                        "(default profile.json)")
    p.add_argument("--workload", metavar="W", help="PRESET[,FIELD=VALUE...], phases joined by +, or a JSON file")
    p.add_argument("--workers", type=int, help="workers (processes, or accelerators with one worker each) to allocate")
    p.add_argument("--slo-ttft", type=float, metavar="S", help="time to first token SLO, seconds")
    p.add_argument("--slo-tpot", type=float, metavar="S", help="time per output token SLO, seconds")
    p.add_argument("--devices", type=int, metavar="G",
                   help="devices the workers share (default: 1 for a CPU profile, one per worker for a GPU one)")
    p.add_argument("--device-capacity", type=float, default=1.0, metavar="C",
                   help="forwards one device runs at full speed at once: 1 for a GPU, or a CPU whose cores the "
                        "profile's one process filled (default 1)")
    p.add_argument("--attainment", type=float, default=0.9, help="share of requests that must meet the SLOs (default 0.9)")
    p.add_argument("--cache-capacity", default="2GiB", help="the sidecar's host tier (default 2GiB)")
    p.add_argument("--top", type=int, default=10, help="rows of the ranking to print (default 10)")
    p.add_argument("--json", metavar="PATH", help="also write the ranking (and phases) as JSON here")
    p.add_argument("--model", default="tiny-llava", help="measuring: the model (default tiny-llava)")
    p.add_argument("--data-dir", default="./mmcache-data", help="measuring: where built-in models are generated")
    p.add_argument("--device", help="measuring: cpu, cuda, cuda:N (default: cuda when visible)")
    p.add_argument("--dtype", help="measuring: weights dtype (default: float32 on a CPU)")
    p.add_argument("--quick", action="store_true", help="measuring: a small grid (minutes for a large model)")
    p.add_argument("--quiet", action="store_true", help="measuring: plain progress lines instead of a bar")
    args = p.parse_args(argv)
    if args.workload is None:
        if args.workers is not None or args.slo_ttft is not None or args.slo_tpot is not None:
            p.error("--workers and the SLOs need --workload (without it, --profile measures this machine)")
        return _measure(args)
    missing = [f for f, v in (("--profile", args.profile), ("--workers", args.workers), ("--slo-ttft", args.slo_ttft),
                              ("--slo-tpot", args.slo_tpot)) if v is None]
    if missing:
        p.error(f"planning needs {', '.join(missing)}")
    try:
        from mmcache.common.sizes import parse_size

        costs = StageCosts.load(args.profile)
        phases = load_phases(args.workload)
        if any(math.isinf(s.rate) for s in phases):
            raise ValueError("the workload needs a finite rate (goodput scales its arrivals)")
        if not (0 < args.slo_ttft < math.inf and 0 < args.slo_tpot < math.inf):
            raise ValueError("the SLOs must be finite numbers of seconds > 0")
        if args.devices is not None and args.devices < 1:
            raise ValueError("--devices must be >= 1")
        folder = os.path.dirname(os.path.abspath(args.json)) if args.json else None
        if folder is not None and not os.access(folder, os.W_OK):  # NOTE: refused now, not after the run
            raise ValueError(f"--json {args.json}: cannot write into {folder}")
        if not 0 < args.device_capacity < math.inf:
            raise ValueError("--device-capacity must be a finite number > 0")
        workload = concatenate(phases)
        phase_of = [i for i, s in enumerate(phases) for _ in range(s.num_requests)]
        requests = requests_of(workload, costs, phase_of)
        devices = args.devices if args.devices is not None else \
            (1 if str(costs.doc.get("device", "cpu")).startswith("cpu") else None)
        config = SimConfig(cache_capacity_bytes=parse_size(args.cache_capacity), ttft_slo_s=args.slo_ttft,
                           tpot_slo_s=args.slo_tpot)
        print(f"profile: {costs.label}", flush=True)
        print(f"workload: {args.workload} ({len(requests)} requests, "
              f"{sum(len(r.image_ids) for r in requests)} image references); {args.workers} workers on "
              f"{'one device each' if devices is None else f'{devices} shared device(s)'}; SLO: TTFT <= "
              f"{args.slo_ttft:g} s, TPOT <= {args.slo_tpot:g} s, for {args.attainment:.0%} of requests", flush=True)
        t0 = time.perf_counter()
        last = [0.0]

        def progress(done: int, total: int, what: str) -> None:
            if time.perf_counter() - last[0] > 2 or done == total:
                last[0] = time.perf_counter()
                print(f"  {what} ({done}/{total})", file=sys.stderr, flush=True)
        ranking = plan(costs, requests, args.workers, config, devices=devices, capacity=args.device_capacity,
                       attainment=args.attainment, progress=progress)
    except (ProfileError, ValueError, OSError, ArithmeticError) as e:
        print(f"mmcache plan: error: {e}", file=sys.stderr)
        return 2
    print(f"\n{len(ranking)} allocations simulated in {time.perf_counter() - t0:.1f} s; predicted at the workload's "
          f"own rate (goodput: the highest rate with {args.attainment:.0%} within the SLOs):\n")
    print_ranking(ranking, args.top)
    winner = ranking[0]
    epd = next(c for c in ranking if not c.allocation.aggregated)
    baseline = next(c for c in ranking if c.allocation.aggregated)
    print(f"\nwinner: mmcache up {' '.join(winner.allocation.up_flags())}")
    print("  its workers busy, by role: " + ", ".join(f"{role} {share:.0%}" for role, share in winner.busy.items()))
    if winner is baseline:
        print(f"(the aggregated baseline predicts the most goodput for this workload; the best EPD split: "
              f"mmcache up {' '.join(epd.allocation.up_flags())}, {_fmt(epd.goodput_rps)} req/s)")
    else:
        print(f"against the aggregated baseline with {args.workers} workers: goodput "
              f"{_fmt(winner.goodput_rps)} vs {_fmt(baseline.goodput_rps)} req/s")
    winner = epd  # NOTE: what role switching and placement apply to
    if winner.allocation.placement != "E|P|D" and winner.allocation.devices is not None \
            and winner.allocation.devices > 1:
        print(f"placement {winner.allocation.placement}: stages in one group share their devices "
              "(mmcache up runs every worker on its --device; place them with one stack per device group)")
    doc = {"profile": costs.label, "workload": args.workload, "workers": args.workers, "devices": devices,
           "slo_ttft_s": args.slo_ttft, "slo_tpot_s": args.slo_tpot, "ranking": [c.row() for c in ranking]}
    if len(phases) > 1:
        report = phase_report(costs, winner.allocation, requests, config, ElasticPolicy())
        doc["phases"] = report
        print(f"\nrole switching (--elastic) on the best EPD split ({winner.allocation.name}), phase by phase:")
        for ph in report["phases"]:
            s, e = ph["static"], ph["elastic"]
            print(f"  phase {ph['phase']}: SLO met {s['slo_attainment']:.0%} static, {e['slo_attainment']:.0%} elastic; "
                  f"median TTFT {_fmt(s['ttft_median_s'])} / {_fmt(e['ttft_median_s'])} s")
        for sw in report["switches"]:
            print(f"  switch at {sw['at_s']:g} s: worker {sw['worker']} {sw['from']} -> {sw['to']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
    return 0


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


if __name__ == "__main__":
    sys.exit(main())

"""A workload that shifts from image-heavy to text-heavy, served by a static allocation and by
the same one with role switching (``mmcache up --elastic``): SLO attainment per phase.

    python benchmarks/phase_shift.py --simulate-only                      # the simulator, GPU-like costs
    python benchmarks/phase_shift.py [--out results/phase-shift]          # and this machine's stack

Two parts, in one run:
1. **Simulated with GPU-like stage costs**: ``benchmarks/profiles/llava-1.5-7b-a100-estimated.json``
   (no GPU was at hand: the profile is set down from published figures and says so; pass
   ``--gpu-profile`` with one measured by ``mmcache plan --profile`` on a GPU instead), each worker
   on its own GPU.
2. **This machine**: ``mmcache up`` (tiny-llava) with the static shape and with ``--elastic``,
   driven through the OpenAI API with the same kind of shift, next to the simulator's prediction
   from the profile measured here (``--profile``), every worker on the one shared CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from epd import drive, run_progress, warm_up  # noqa: E402
from hostinfo import describe  # noqa: E402
from stack_process import StackProcess  # noqa: E402

from llm_worker.elastic.policy import ElasticPolicy  # noqa: E402
from llm_worker.planner.planner import splits  # noqa: E402
from llm_worker.planner.simulator import Allocation, SimConfig, requests_of, simulate  # noqa: E402
from llm_worker.planner.stage_costs import StageCosts  # noqa: E402
from llm_worker.planner.workload import concatenate, load_phases  # noqa: E402

GPU_PROFILE = ROOT / "benchmarks/profiles/llava-1.5-7b-a100-estimated.json"
GPU_WORKLOAD = ("image-heavy,rate=14,requests=400,seed=1"
                "+text-heavy,rate=30,requests=900,output_mean=300,output_max=600,seed=2")
"""Images (prefill-heavy: 576 tokens each), then chat with long answers (decode-heavy)."""
GPU_SHAPE = (2, 2, 2)
"""Six GPUs; the static shape is the split of six with the best attainment over both phases."""
GPU_SLO = (0.5, 0.05)
CPU_PROFILE = ROOT / "benchmarks/profiles/tiny-llava-cpu.json"
CPU_WORKLOAD = ("image-heavy,rate=8,requests=48,output_min=4,output_mean=12,output_max=24,seed=1"
                "+text-heavy,rate=20,requests=200,output_min=16,output_mean=48,output_max=96,seed=2")
"""Images, then chat with longer answers: the encoders idle while decode (every token streamed
through the router) is the busy stage."""
CPU_SHAPE = (2, 1, 1)
CPU_SLO = (0.5, 0.05)
CPU_POLICY = ElasticPolicy(interval_s=0.5, window_s=3.0, high_s=0.05, low=0.5, sustain=2, cooldown_s=3.0)
"""Short intervals: the phases last seconds on this machine. Passed to ``mmcache up`` as flags."""


def per_phase(rows: list[dict], phases: list[int], ttft_slo: float, tpot_slo: float) -> list[dict]:
    out = []
    for p in sorted(set(phases)):
        mine = [r for r, ph in zip(rows, phases) if ph == p]
        met = sum(r["error"] is None and r["ttft_s"] is not None and r["ttft_s"] <= ttft_slo
                  and (r["tpot_s"] is None or r["tpot_s"] <= tpot_slo) for r in mine)
        ttft = sorted(r["ttft_s"] for r in mine if r["ttft_s"] is not None)
        out.append({"phase": p, "requests": len(mine), "errors": sum(r["error"] is not None for r in mine),
                    "slo_attainment": met / len(mine), "ttft_median_s": ttft[len(ttft) // 2] if ttft else math.nan})
    return out


def simulated(costs: StageCosts, workload_text: str, shape: tuple[int, int, int], slo: tuple[float, float],
              policy: ElasticPolicy, devices: int | None) -> dict:
    """Static against elastic, per phase. With a GPU per worker (``devices`` None) the static shapes
    are the planner's: the best split of ``sum(shape)`` workers for the first phase (what an
    operator planned before the shift) and the best for the whole run (one who knew it was
    coming); role switching starts from the first. On a shared CPU, ``shape`` as given."""
    phases = load_phases(workload_text)
    workload = concatenate(phases)
    phase_of = [i for i, s in enumerate(phases) for _ in range(s.num_requests)]
    requests = requests_of(workload, costs, phase_of)
    config = SimConfig(ttft_slo_s=slo[0], tpot_slo_s=slo[1])
    if devices is None:
        first = [r for r in requests if r.phase == 0]
        candidates = [Allocation(e, p, d) for e, p, d in splits(sum(shape))]
        planned = max(candidates, key=lambda a: simulate(costs, a, first, config).summary(*slo)["slo_attainment"])
        whole = max(candidates, key=lambda a: simulate(costs, a, requests, config).summary(*slo)["slo_attainment"])
        statics = {"static": planned, "static, best for the whole run": whole}
    else:
        planned = Allocation(*shape, placement="EPD", devices=devices)
        statics = {"static": planned}
    out: dict = {"shape": planned.name, "whole_run_shape": statics.get("static, best for the whole run", planned).name}
    for name, alloc in statics.items():
        result = simulate(costs, alloc, requests, config)
        out[name] = {"phases": [result.summary(*slo, phase=p) for p in range(len(phases))], "switches": []}
    result = simulate(costs, planned, requests, replace(config, elastic=policy))
    out["elastic"] = {"phases": [result.summary(*slo, phase=p) for p in range(len(phases))],
                      "switches": result.switches}
    return out


def _policy_flags(policy: ElasticPolicy) -> list[str]:
    return ["--elastic-interval", str(policy.interval_s), "--elastic-high", str(policy.high_s),
            "--elastic-low", str(policy.low), "--elastic-cooldown", str(policy.cooldown_s),
            "--elastic-sustain", str(policy.sustain)]


def measured(model_dir: str, workload_text: str, shape: tuple[int, int, int], slo: tuple[float, float],
             policy: ElasticPolicy) -> dict:
    phases = load_phases(workload_text)
    workload = concatenate(phases)
    phase_of = [i for i, s in enumerate(phases) for _ in range(s.num_requests)]
    e, p, d = shape
    out: dict = {"shape": f"E{e} P{p} D{d}"}
    with tempfile.TemporaryDirectory(prefix="mmc-shift-", dir="/tmp") as workdir:
        for k, (name, extra) in enumerate((("static", []), ("elastic", ["--elastic", *_policy_flags(policy)])), 1):
            flags = ["--encoders", str(e), "--prefill", str(p), "--decode", str(d), "--encoder-batch", "1",
                     "--model", model_dir, "--port", "0", "--log-level", "warning",
                     "--data-dir", tempfile.mkdtemp(dir=workdir), *extra]
            with StackProcess(*flags) as up:
                model = Path(model_dir).name
                label = f"{name} E{e} P{p} D{d} (run {k}/2)"
                warm_up(up.url, model, phases[0], requests=2, label=f"{label} warm-up")
                with run_progress(label, workload) as progress:
                    t0 = time.perf_counter()
                    rows = asyncio.run(drive(up.url, model, workload, progress))
                    wall = time.perf_counter() - t0
                stats = up.stats()
            out[name] = {"phases": per_phase(rows, phase_of, *slo), "wall_s": round(wall, 1),
                         "switches": (stats.get("elastic") or {}).get("history", []),
                         "outputs": [r["completion_tokens"] for r in rows]}
            print(f"  {name}: {sum(r['error'] is None for r in rows)}/{len(rows)} ok in {wall:.1f} s", flush=True)
    return out


def _print(title: str, result: dict) -> None:
    names = [n for n in result if isinstance(result[n], dict) and "phases" in result[n]]
    print(f"\n{title}; static: {result['shape']}" + (f", best static for the whole run: {result.get('whole_run_shape')}"
                                                     if result.get("whole_run_shape", result["shape"]) != result["shape"] else ""))
    print("| phase | " + " | ".join(f"SLO met {n}" for n in names) + " | " +
          " | ".join(f"median TTFT s {n}" for n in names) + " |")
    print("|---|" + "---|" * 2 * len(names))
    for p in range(len(result["static"]["phases"])):
        cells = [f"{result[n]['phases'][p]['slo_attainment']:.0%}" for n in names] + \
            [f"{result[n]['phases'][p]['ttft_median_s']:.3f}" for n in names]
        print(f"| {p} | " + " | ".join(cells) + " |")
    for sw in result["elastic"]["switches"]:
        print(f"  switch: {json.dumps({k: v for k, v in sw.items() if k != 'reason'})}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu-profile", default=str(GPU_PROFILE))
    p.add_argument("--profile", default=str(CPU_PROFILE), help="a profile measured on this machine")
    p.add_argument("--simulate-only", action="store_true", help="skip the runs of the stack on this machine")
    p.add_argument("--models-dir", default="./mmcache-data")
    p.add_argument("--out", default="results/phase-shift")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {describe(torch=True)}")
    doc: dict = {"machine": describe(torch=True)}

    gpu = StageCosts.load(args.gpu_profile)
    print(f"simulated, GPU-like: {gpu.label}\n  workload {GPU_WORKLOAD}; {sum(GPU_SHAPE)} workers, one GPU "
          f"each; SLO TTFT <= {GPU_SLO[0]} s, TPOT <= {GPU_SLO[1]} s")
    doc["gpu_simulated"] = simulated(gpu, GPU_WORKLOAD, GPU_SHAPE, GPU_SLO, ElasticPolicy(), None)
    _print("simulated (GPU-like costs, " + gpu.source.split(":")[0] + ")", doc["gpu_simulated"])

    cpu = StageCosts.load(args.profile)
    print(f"\nthis machine: {cpu.label}\n  workload {CPU_WORKLOAD}; E{CPU_SHAPE[0]} P{CPU_SHAPE[1]} D{CPU_SHAPE[2]} "
          f"on the shared CPU; SLO TTFT <= {CPU_SLO[0]} s, TPOT <= {CPU_SLO[1]} s")
    doc["cpu_simulated"] = simulated(cpu, CPU_WORKLOAD, CPU_SHAPE, CPU_SLO, CPU_POLICY, 1)
    _print("simulated (this machine's profile)", doc["cpu_simulated"])
    if not args.simulate_only:
        from encoder_worker.models import ensure_model

        doc["cpu_measured"] = measured(ensure_model(cpu.doc["model"], args.models_dir), CPU_WORKLOAD, CPU_SHAPE,
                                       CPU_SLO, CPU_POLICY)
        _print("measured (mmcache up on this machine)", doc["cpu_measured"])
    (out / "summary.json").write_text(json.dumps(doc, indent=1, default=str))
    print(f"\nwrote {out}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The planner's predictions against measured runs of the stack, side by side: for each
allocation, ``mmcache up`` with its flags is driven through the OpenAI API with a workload, and
the simulator (``llm_worker.planner.simulator``) predicts the same workload from a profile measured on
this machine (``mmcache plan --profile``).

    python benchmarks/plan_validate.py --profile benchmarks/profiles/tiny-llava-cpu.json
        [--model tiny-llava] [--workload default,rate=2,requests=24,...]
        [--allocations "1,1,1;2,1,1;1,2,1;1,1,2;agg1"] [--out results/plan-validation-tiny]

An allocation is ``E,P,D[,ENCODER_BATCH,DECODE_BATCH]`` or ``aggN`` (the aggregated baseline
with N ``both`` workers). On a CPU every worker shares the machine's cores: the simulator puts
them on one shared device, as they run. The outputs are as long as the model makes them (a
random tiny model stops at EOS before ``max_tokens`` now and then), so the simulator is given
the lengths the first run produced (greedy decoding gives the same ones every run).

Writes ``summary.json`` and prints the table: median TTFT and throughput, measured and predicted,
and how far off the prediction is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from epd import drive, run_progress, summarise, warm_up  # noqa: E402
from hostinfo import describe  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from stack_process import StackProcess  # noqa: E402

from llm_worker.planner.simulator import Allocation, SimConfig, requests_of, simulate  # noqa: E402
from llm_worker.planner.stage_costs import StageCosts  # noqa: E402
from llm_worker.planner.workload import generate, parse_spec  # noqa: E402

DEFAULT_WORKLOAD = "default,rate=2,requests=24,images_max=4,images_mean=1.5,output_min=4,output_mean=16,output_max=32"
DEFAULT_ALLOCATIONS = "1,1,1;2,1,1;1,2,1;1,1,2;agg1"


def parse_allocation(text: str, capacity: float) -> Allocation:
    text = text.strip()
    if text.startswith("agg"):
        return Allocation(decode=int(text[3:] or 1), aggregated=True, devices=1, device_capacity=capacity)
    parts = [int(x) for x in text.split(",")]
    if len(parts) not in (3, 5):
        raise ValueError(f"allocation {text!r}: want E,P,D[,ENCODER_BATCH,DECODE_BATCH] or aggN")
    e, p, d, *batches = parts
    eb, db = batches or (8, 64)
    return Allocation(e, p, d, eb, db, placement="EPD", devices=1, device_capacity=capacity)


def measure(alloc: Allocation, model_dir: str, workload, workdir: Path, run: str = "") -> tuple[list[dict], float]:
    """One measured run of ``workload`` on ``alloc``'s stack: (rows, start-up s). ``run`` (e.g.
    ``run 2/5``) names it in the progress lines on stderr."""
    flags = [*alloc.up_flags(), "--model", model_dir, "--port", "0", "--log-level", "warning",
             "--data-dir", tempfile.mkdtemp(prefix="plan-", dir=workdir)]
    t0 = time.perf_counter()
    with StackProcess(*flags) as up:
        startup = time.perf_counter() - t0
        model = Path(model_dir).name
        name = f"{alloc.name} ({run})" if run else alloc.name
        warm_up(up.url, model, workload.spec, label=f"{name} warm-up")
        with run_progress(name, workload) as progress:
            rows = asyncio.run(drive(up.url, model, workload, progress))
    return rows, startup


def _off(predicted: float, measured: float) -> str:
    return f"{(predicted - measured) / measured:+.0%}" if measured else "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", required=True, help="a profile measured on this machine (mmcache plan --profile)")
    p.add_argument("--model", help="the model the profile measured (default: the profile's)")
    p.add_argument("--models-dir", default="./mmcache-data", help="where built-in models are generated")
    p.add_argument("--workload", default=DEFAULT_WORKLOAD)
    p.add_argument("--allocations", default=DEFAULT_ALLOCATIONS, help="';'-separated E,P,D[,EB,DB] or aggN")
    p.add_argument("--capacity", type=float, default=1.0,
                   help="forwards the shared CPU runs at full speed at once (1: the profile's process took every core)")
    p.add_argument("--out", help="results folder (default results/plan-validation-MODEL)")
    args = p.parse_args(argv)

    costs = StageCosts.load(args.profile)
    model = args.model or costs.doc["model"]
    allocations = [parse_allocation(a, args.capacity) for a in args.allocations.split(";") if a.strip()]
    spec = parse_spec(args.workload)
    workload = generate(spec)
    out = Path(args.out or f"results/plan-validation-{Path(model).name}")
    out.mkdir(parents=True, exist_ok=True)

    from encoder_worker.models import ensure_model

    model_dir = ensure_model(model, args.models_dir)
    print(f"machine: {describe(torch=True)}")
    print(f"profile: {costs.label}")
    print(f"workload: {args.workload}; {len(workload.requests)} requests, {workload.num_image_refs()} images")
    rows, lengths = [], None
    with tempfile.TemporaryDirectory(prefix="mmc-plan-", dir="/tmp") as workdir:
        for k, alloc in enumerate(allocations, 1):
            got, startup = measure(alloc, model_dir, workload, Path(workdir), f"run {k}/{len(allocations)}")
            if lengths is None:
                lengths = [max(1, r["completion_tokens"]) if r["error"] is None else w.max_tokens
                           for r, w in zip(got, workload.requests)]
            measured = summarise([{**r, "hit_ratio": 0.0} for r in got], float("inf"), float("inf"))
            requests = [replace(r, output_tokens=n) for r, n in zip(requests_of(workload, costs), lengths)]
            predicted = simulate(costs, alloc, requests, SimConfig()).summary()
            rows.append({"allocation": alloc.name, "flags": alloc.up_flags(), "startup_s": round(startup, 1),
                         "measured": measured, "predicted": predicted, "alloc": asdict(alloc)})
            print(f"  {alloc.name}: {len(got) - measured['errors']}/{len(got)} ok; median TTFT measured "
                  f"{measured['ttft_median_s']:.3f} s, predicted {predicted['ttft_median_s']:.3f} s", flush=True)
    head = ("allocation", "median TTFT s measured", "predicted", "off", "throughput req/s measured", "predicted",
            "off", "median TPOT s measured", "predicted")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m, s = r["measured"], r["predicted"]
        lines.append("| " + " | ".join([
            r["allocation"], f"{m['ttft_median_s']:.3f}", f"{s['ttft_median_s']:.3f}",
            _off(s["ttft_median_s"], m["ttft_median_s"]), f"{m['throughput_rps']:.3f}", f"{s['throughput_rps']:.3f}",
            _off(s["throughput_rps"], m["throughput_rps"]), f"{m['tpot_median_s']:.4f}", f"{s['tpot_median_s']:.4f}"])
            + " |")
    print("\n" + "\n".join(lines))
    (out / "summary.json").write_text(json.dumps({"machine": describe(torch=True), "profile": costs.label,
                                                  "workload": args.workload, "rows": rows}, indent=1, default=str))
    print(f"\nwrote {out}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run the fuzz targets: ``python fuzz/run.py --seconds 20`` (CI: a short while each) or
``python fuzz/run.py --runs 1000000 --report benchmarks/results/fuzz/...`` (the long run).

Each target runs in its own process over a scratch copy of its seed corpus (``fuzz/corpus/``;
the seeds are never rewritten), ``--jobs`` at a time. A target that crashes, hangs past
``-timeout``, leaks past ``-rss_limit_mb`` or lets an undocumented exception escape fails the run;
libFuzzer writes the input that did it under ``--artifacts``. Exit status: 0 when every target
ran clean. The report gives per target: executions, seconds, executions per second, coverage
(libFuzzer's ``cov``: instrumented edges reached; ``ft``: features), corpus size, and findings."""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = ("entry_parser", "key_parser", "tenants_file", "unix_frames", "export_manifest", "export_shard",
           "video_probe")
_STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/")
_DONE = re.compile(r"^Done (\d+) runs in (\d+) second")


def run_target(name: str, *, seconds: float | None, runs: int | None, work: str, artifacts: str,
               timeout_s: int, rss_mb: int) -> dict:
    corpus = os.path.join(work, name)
    shutil.rmtree(corpus, ignore_errors=True)
    shutil.copytree(os.path.join(HERE, "corpus", name), corpus)
    os.makedirs(artifacts, exist_ok=True)
    args = [sys.executable, os.path.join(HERE, f"{name}.py"), corpus, f"-timeout={timeout_s}",
            f"-rss_limit_mb={rss_mb}", f"-artifact_prefix={os.path.join(artifacts, name)}-", "-print_final_stats=1"]
    args += [f"-runs={runs}"] if runs is not None else [f"-max_total_time={int(seconds)}"]
    t0 = time.monotonic()
    proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                          env={**os.environ, "PYTHONHASHSEED": "0"})
    wall = time.monotonic() - t0
    status = [m for m in map(_STATUS.match, proc.stdout.splitlines()) if m]
    done = [m for m in map(_DONE.match, proc.stdout.splitlines()) if m]
    execs = int(done[-1].group(1)) if done else int(status[-1].group(1)) if status else 0
    found = [line for line in proc.stdout.splitlines()
             if "Uncaught Python exception" in line or line.startswith("==") and "ERROR" in line
             or "Test unit written to" in line]
    result = {"target": name, "executions": execs, "seconds": round(wall, 1),
              "exec_per_s": round(execs / wall) if wall else 0,
              "cov": int(status[-1].group(2)) if status else None, "ft": int(status[-1].group(3)) if status else None,
              "corpus": int(status[-1].group(4)) if status else None, "returncode": proc.returncode,
              "findings": found}
    if proc.returncode != 0:
        result["tail"] = proc.stdout[-4000:]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    how = p.add_mutually_exclusive_group()
    how.add_argument("--seconds", type=float, default=20, help="each target's run, in seconds (default 20)")
    how.add_argument("--runs", type=int, help="each target's executions instead (the long run: 1000000)")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated (default: all)")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--work", help="scratch corpora (default: a temporary folder)")
    p.add_argument("--artifacts", default="fuzz-artifacts", help="where a crashing input is written")
    p.add_argument("--timeout", type=int, default=10, help="libFuzzer -timeout: one input's seconds at most")
    p.add_argument("--rss-mb", type=int, default=2048)
    p.add_argument("--report", help="write the results here: PATH.json and PATH.txt")
    args = p.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        p.error(f"unknown target(s) {unknown}; known: {', '.join(TARGETS)}")
    work = args.work or tempfile.mkdtemp(prefix="mmc-fuzz-work-")
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda t: run_target(
            t, seconds=args.seconds, runs=args.runs, work=work, artifacts=os.path.abspath(args.artifacts),
            timeout_s=args.timeout, rss_mb=args.rss_mb), targets))
    lines = [f"mmcache fuzzing (atheris {_atheris_version()}, libFuzzer), {time.strftime('%Y-%m-%d %H:%M', time.gmtime(t0))} UTC",
             f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
             f"{args.jobs} target(s) at a time; " + (f"{args.runs} runs each" if args.runs else f"{args.seconds:g} s each"),
             "", f"{'target':<16} {'executions':>11} {'seconds':>8} {'exec/s':>7} {'cov':>5} {'ft':>6} {'corpus':>6}  findings"]
    for r in results:
        lines.append(f"{r['target']:<16} {r['executions']:>11} {r['seconds']:>8} {r['exec_per_s']:>7} {r['cov']!s:>5} "
                     f"{r['ft']!s:>6} {r['corpus']!s:>6}  {'none' if r['returncode'] == 0 else 'FAILED: ' + '; '.join(r['findings'][:3])}")
    text = "\n".join(lines)
    print(text)
    for r in results:
        if r["returncode"] != 0:
            print(f"\n--- {r['target']} (exit {r['returncode']}) ---\n{r.get('tail', '')}", file=sys.stderr)
    if args.report:
        os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
        with open(args.report + ".json", "w") as f:
            json.dump({"started": t0, "results": results}, f, indent=1)
        with open(args.report + ".txt", "w") as f:
            f.write(text + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["returncode"] == 0 for r in results) else 1


def _atheris_version() -> str:
    from importlib.metadata import version

    return version("atheris")


if __name__ == "__main__":
    sys.exit(main())

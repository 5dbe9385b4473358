"""One line on the machine a measurement ran on (a benchmark's output, a planner's profile): OS, architecture, CPU model, cores, memory, Python, and on request torch
(version, threads, GPU or none)."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def describe(torch: bool = False) -> str:
    """``Linux x86_64, <CPU>, 2 cores, 24 GiB, Python 3.11.7`` (+ ``, torch V (N threads), GPU``)."""
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    out = (f"{platform.system()} {platform.machine()}, {cpu_model()}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, "
           f"Python {platform.python_version()}")
    if torch:
        import torch as t

        gpu = t.cuda.get_device_name(0) if t.cuda.is_available() else "no GPU"
        out += f", torch {t.__version__} ({t.get_num_threads()} threads), {gpu}"
    return out

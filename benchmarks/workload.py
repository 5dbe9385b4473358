"""The EPD benchmark's workload generator, now ``llm_worker.planner.workload`` (the planner simulates the
same workloads the benchmarks run); this script prints the summary of a spec:

    python benchmarks/workload.py [--rate 2] [--requests 100] [--reuse 0.5] ...
"""

from __future__ import annotations

from llm_worker.planner.workload import *  # noqa: F401,F403 - the benchmarks import it from here
from llm_worker.planner.workload import main

if __name__ == "__main__":
    main()

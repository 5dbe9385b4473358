"""One line on the machine a benchmark ran on: ``mmcache.common.hostinfo`` (the planner's
profiler writes the same line into its profiles)."""

from __future__ import annotations

from mmcache.common.hostinfo import describe  # noqa: F401 - the benchmarks import it from here

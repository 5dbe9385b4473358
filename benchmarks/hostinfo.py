"""One line on the machine a benchmark ran on: ``mmcache.serving.hostinfo`` (the planner's
profiler writes the same line into its profiles)."""

from __future__ import annotations

from mmcache.serving.hostinfo import describe  # noqa: F401 - the benchmarks import it from here

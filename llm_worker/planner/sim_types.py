"""What the simulator takes and gives: a request (``SimRequest``), its settings (``SimConfig``),
and per-request and whole-run results (``RequestResult``, ``SimResult``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from llm_worker.elastic.policy import ElasticPolicy
from llm_worker.planner.allocation import Allocation
from llm_worker.planner.stage_costs import StageCosts


@dataclass(frozen=True)
class SimRequest:
    arrival_s: float
    image_ids: tuple[int, ...]
    image_sizes: tuple[tuple[int, int], ...]
    prompt_words: int
    output_tokens: int
    phase: int = 0


@dataclass(frozen=True)
class SimConfig:
    cache_capacity_bytes: int = 2 << 30
    """The sidecar's host tier (``mmcache up --host-capacity``, 2 GiB by default)."""
    encoder_wait_s: float = 0.005
    """How long a batch waits for company (the encoders' ``max_wait_ms``)."""
    elastic: ElasticPolicy | None = None
    ttft_slo_s: float = math.inf
    tpot_slo_s: float = math.inf


@dataclass
class RequestResult:
    index: int
    phase: int
    arrival_s: float
    images: int
    hits: int
    prompt_tokens: int
    output_tokens: int
    ttft_s: float | None = None
    e2e_s: float | None = None
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.e2e_s is None or self.output_tokens <= 1:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def met(self, ttft_slo_s: float, tpot_slo_s: float) -> bool:
        tpot = self.tpot_s
        return self.e2e_s is not None and self.ttft_s <= ttft_slo_s and (tpot is None or tpot <= tpot_slo_s)


@dataclass
class SimResult:
    allocation: Allocation
    requests: list[RequestResult]
    switches: list[dict] = field(default_factory=list)
    busy: dict[str, float] = field(default_factory=dict)
    """Per role: the share of the run its workers' forward threads were busy."""

    def summary(self, ttft_slo_s: float = math.inf, tpot_slo_s: float = math.inf,
                phase: int | None = None) -> dict:
        rows = [r for r in self.requests if phase is None or r.phase == phase]
        ok = [r for r in rows if r.e2e_s is not None]
        ttft = [r.ttft_s for r in ok]
        tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
        span = (max(r.arrival_s + r.e2e_s for r in ok) - min(r.arrival_s for r in rows)) if ok else math.nan
        refs = sum(r.images for r in rows)
        return {"requests": len(rows), "errors": len(rows) - len(ok),
                "ttft_median_s": _q(ttft, .5), "ttft_p90_s": _q(ttft, .9), "ttft_p99_s": _q(ttft, .99),
                "tpot_median_s": _q(tpot, .5), "e2e_median_s": _q([r.e2e_s for r in ok], .5),
                "throughput_rps": len(ok) / span if ok and span > 0 else (math.inf if ok else 0.0),
                "slo_attainment": sum(r.met(ttft_slo_s, tpot_slo_s) for r in rows) / len(rows) if rows else 0.0,
                "hit_ratio": sum(r.hits for r in rows) / refs if refs else 0.0}


def _q(values: list[float], q: float) -> float:
    return float(np.quantile(values, q)) if values else math.nan


def requests_of(workload, costs: StageCosts, phases: Sequence[int] | None = None) -> list[SimRequest]:
    """The requests of a ``llm_worker.planner.workload.Workload`` for the simulator (``phases``: each
    request's phase, for per-phase figures)."""
    out = []
    for i, r in enumerate(workload.requests):
        out.append(SimRequest(r.arrival_s, tuple(r.image_ids), tuple(workload.image_size_by_id[j] for j in r.image_ids),
                              len(r.prompt.split()), r.max_tokens, phases[i] if phases is not None else 0))
    return out

"""An allocation of the stack (``Allocation``): how many encoders, prefill and decode workers (or
aggregated ``both`` workers), their batch sizes, and which devices they share; what the planner
searches over and ``mmcache up`` flags express."""

from __future__ import annotations

from dataclasses import dataclass

from llm_worker.elastic.policy import STAGES

_SHORT = {"encode": "E", "prefill": "P", "decode": "D"}


@dataclass(frozen=True)
class Allocation:
    """How many workers of each role, their batch sizes, and which share a device."""

    encoders: int = 1
    prefill: int = 1
    decode: int = 1
    encoder_batch: int = 8
    decode_batch: int = 64
    aggregated: bool = False
    """``decode`` ``both`` workers (encode + prefill + decode each); the EPD counts are unused."""
    embedding_cache: bool = True
    """Aggregated: an in-process LRU of embeddings per worker (``--encoder-cache``)."""
    placement: str = "E|P|D"
    """Which stages share devices when there are fewer devices than workers: groups of stages
    split by ``|`` (``E|P|D``: each stage its own devices; ``EP|D``: encoders and prefill share
    theirs; ``EPD``: all share). Devices go to groups in proportion to their workers."""
    devices: int | None = None
    """Accelerators to place the workers on; None: one per worker."""
    device_capacity: float = 1.0
    """Forwards a device runs at once at full speed (a CPU whose cores a profile's one process
    did not fill has more than 1)."""

    def __post_init__(self) -> None:
        for name in ("encoders", "prefill", "decode", "encoder_batch", "decode_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.devices is not None and self.devices < 1:
            raise ValueError("devices must be >= 1")
        if self.device_capacity <= 0:
            raise ValueError("device_capacity must be > 0")
        groups = self.placement.split("|")
        if sorted("".join(groups)) != sorted("EPD") or any(not g for g in groups):
            raise ValueError(f"placement {self.placement!r}: want the letters E, P, D once each, in groups split by |")

    @property
    def workers(self) -> int:
        return self.decode if self.aggregated else self.encoders + self.prefill + self.decode

    @property
    def name(self) -> str:
        if self.aggregated:
            return f"aggregated x{self.decode}" + ("" if self.embedding_cache else " (no LRU)")
        shared = f" [{self.placement}]" if self.devices is not None and self.devices < self.workers else ""
        return f"E{self.encoders} P{self.prefill} D{self.decode} eb{self.encoder_batch} db{self.decode_batch}{shared}"

    def up_flags(self) -> list[str]:
        """The ``mmcache up`` flags that start this allocation."""
        if self.aggregated:
            return ["--aggregated", "--decode", str(self.decode), "--max-batch", str(self.decode_batch)]
        return ["--encoders", str(self.encoders), "--prefill", str(self.prefill), "--decode", str(self.decode),
                "--encoder-batch", str(self.encoder_batch), "--max-batch", str(self.decode_batch)]

    def device_of(self) -> list[tuple[str, int]]:
        """(role, device index) per worker, encoders first, then prefill, then decode."""
        roles = ["both"] * self.decode if self.aggregated else \
            ["encode"] * self.encoders + ["prefill"] * self.prefill + ["decode"] * self.decode
        if self.devices is None or self.devices >= len(roles):
            return [(r, i) for i, r in enumerate(roles)]
        if self.aggregated:
            return [(r, i % self.devices) for i, r in enumerate(roles)]
        groups = self.placement.split("|")
        sizes = [sum(roles.count(s) for s in STAGES if _SHORT[s] in g) for g in groups]
        if self.devices < len(groups):
            raise ValueError(f"placement {self.placement!r} needs at least {len(groups)} devices, not {self.devices}")
        share = apportion(self.devices, sizes)
        out, first = [], 0
        starts = {}
        for g, n in zip(groups, share):
            starts[g] = (first, n)
            first += n
        turn = {g: 0 for g in groups}
        for r in roles:
            g = next(g for g in groups if _SHORT[r] in g)
            start, n = starts[g]
            out.append((r, start + turn[g] % n))
            turn[g] += 1
        return out


def apportion(total: int, weights: list[int]) -> list[int]:
    """``total`` split in proportion to ``weights``, each at least 1 (largest remainders)."""
    if total < len(weights):
        raise ValueError(f"{total} devices cannot give each of {len(weights)} groups one")
    raw = [total * w / sum(weights) for w in weights]
    out = [max(1, int(r)) for r in raw]
    while sum(out) > total:  # NOTE: only from a group that keeps at least one
        out[max((i for i in range(len(out)) if out[i] > 1), key=lambda i: (out[i] - raw[i], out[i]))] -= 1
    while sum(out) < total:
        out[max(range(len(out)), key=lambda i: raw[i] - out[i])] += 1
    return out

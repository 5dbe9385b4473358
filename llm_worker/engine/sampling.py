"""Sampling: per-request parameters and one batched draw of the next token for many requests.

Reproducibility: the ``k``-th generated token of a request (``k = 0`` is the prefill's) is drawn
with a generator seeded from ``(seed, k)`` alone, never from a generator shared across requests
or steps. So a seed gives the same tokens whatever the batch around the request is, and on either
side of a prefill → decode hand-off, on the same kind of device (CUDA and CPU generators differ).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import xxhash

MAX_STOP_STRINGS = 16


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request picks its tokens and when it ends (OpenAI's meaning for each field)."""

    max_tokens: int = 16
    """Most tokens to generate, the prefill's first token included; >= 1."""
    temperature: float = 1.0
    """0 = greedy (argmax); else the logits are divided by it before the softmax; >= 0."""
    top_p: float = 1.0
    """Nucleus sampling: draw among the most likely tokens whose probabilities reach top_p; (0, 1]."""
    seed: int | None = None
    """Makes sampling reproducible (see the module docstring); None = a random seed per request."""
    stop: tuple[str, ...] = ()
    """Strings that end generation once they appear in the output text, which is cut before them."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} must be an int >= 1")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature={self.temperature!r} must be a finite number >= 0")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed={self.seed!r} must be an int in [0, 2**63)")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))  # NOTE: OpenAI takes one string or a list
        if not isinstance(self.stop, (list, tuple)):
            raise ValueError(f"stop={self.stop!r} must be a string or a list of strings")
        object.__setattr__(self, "stop", tuple(self.stop))
        if len(self.stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop={self.stop!r} must be at most {MAX_STOP_STRINGS} non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def resolved_seed(self) -> int:
        """``seed``, or a fresh random one: call once per request and keep the result."""
        return self.seed if self.seed is not None else secrets.randbits(63)


def step_seed(seed: int, step: int) -> int:
    """The generator seed for token ``step`` of a request seeded with ``seed``."""
    return xxhash.xxh3_64_intdigest(f"{seed}:{step}".encode())


@torch.inference_mode()
def sample(logits: torch.Tensor, params: Sequence[SamplingParams], seeds: Sequence[int],
           steps: Sequence[int]) -> list[int]:
    """The next token of each row of ``logits`` ``[num_requests, vocab]``.

    ``params[i]``, ``seeds[i]`` and ``steps[i]`` (the index of the token being drawn) belong to
    row ``i``. Greedy rows take the argmax; the others draw from softmax(logits / temperature)
    restricted to the top-p nucleus, by an exponential race (argmax of probs / Exp(1) noise),
    which draws exactly from those probabilities and batches over rows.
    """
    if not (len(params) == len(seeds) == len(steps) == logits.shape[0]):
        raise ValueError(f"{logits.shape[0]} rows, {len(params)} params, {len(seeds)} seeds, {len(steps)} steps")
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        index = torch.tensor(rows, device=logits.device)
        temperature = torch.tensor([params[i].temperature for i in rows], device=logits.device)
        probs = torch.softmax(logits.index_select(0, index) / temperature[:, None], dim=-1)
        top_p = torch.tensor([params[i].top_p for i in rows], device=logits.device)
        if bool((top_p < 1).any()):
            probs = _nucleus(probs, top_p)
        noise = torch.empty_like(probs)
        for r, i in enumerate(rows):
            generator = torch.Generator(device=logits.device).manual_seed(step_seed(seeds[i], steps[i]))
            noise[r].exponential_(generator=generator)
        tokens.index_copy_(0, index, (probs / noise).argmax(dim=-1))
    return tokens.tolist()


def _nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """``probs`` with every token outside each row's top-p nucleus set to 0 (not renormalized:
    the exponential race does not need it)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    # NOTE: a token stays while the mass before it is below top_p, so the most likely one always does.
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p[:, None], 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)

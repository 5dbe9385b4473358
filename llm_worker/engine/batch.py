"""``DecodeBatch``: continuous batching of decode steps over many requests.

Requests join (``add``) and leave (when finished) between steps; each ``step`` is one forward of
the language model over one token per request, then one batched draw. Greedy output is the same
token for token as decoding each request alone (``tests/test_llm_engine.py`` checks it).
"""

from __future__ import annotations

import torch

from llm_worker.engine.sampling import sample
from llm_worker.engine.sequence import DecodeState
from llm_worker.engine.slab import BatchKV, cache_kwarg


class DecodeBatch:
    """The requests an engine decodes together.

    Lifecycle: ``LLMEngine.new_batch()``; ``add`` states (each copies its prompt KV in, after
    which the caller may release the memory it came from); ``step`` until ``len(batch) == 0``.
    One thread drives a batch; ``step`` returns the states that finished in it, already removed.
    """

    def __init__(self, model: torch.nn.Module, kv: BatchKV) -> None:
        self._model = model
        self._cache_kwarg = cache_kwarg(model)
        self._kv = kv
        self.states: list[DecodeState] = []
        """Row ``r`` of the KV belongs to ``states[r]``."""

    def __len__(self) -> int:
        return len(self.states)

    @property
    def kv_bytes(self) -> int:
        """Bytes of KV slabs held (reserved, not just used)."""
        return self._kv.nbytes

    @torch.inference_mode()
    def add(self, state: DecodeState) -> None:
        """Join ``state`` (not finished, holding its prompt KV) to the batch before the next step."""
        if state.finished or state.kv is None:
            raise ValueError(f"{state!r} cannot join a batch: it has finished or holds no KV")
        remaining = state.sampling.max_tokens - len(state.token_ids)
        self._kv.add(state.kv, reserve_tokens=remaining)
        # NOTE: copied in (under inference mode, like every write to the slabs: step may
        # reallocate them as inference tensors); the entry or prefill buffer it viewed may now go.
        state.kv = None
        self.states.append(state)

    @torch.inference_mode()
    def remove(self, state: DecodeState) -> None:
        """Drop ``state`` (an abandoned request) before the next step; its KV row is freed."""
        row = next((r for r, s in enumerate(self.states) if s is state), None)
        if row is None:
            raise ValueError(f"{state!r} is not in this batch")
        self._kv.remove(row)
        self.states[row] = self.states[-1]
        self.states.pop()

    @torch.inference_mode()
    def step(self) -> list[DecodeState]:
        """Feed every state its last token, append the next one; return (and drop) the finished."""
        if not self.states:
            return []
        kv = self._kv
        kv.reserve_column()
        device = kv.device
        input_ids = torch.tensor([[s.token_ids[-1]] for s in self.states], device=device)
        # NOTE: a row's position is its index plus its delta (M-RoPE: Qwen2-VL's text model
        # expands [rows, 1] to the same position on its three axes, as generate does)
        position_ids = torch.tensor([[n + s.position_delta] for n, s in zip(kv.lens, self.states)], device=device)
        out = self._model(input_ids=input_ids, attention_mask=kv.attention_mask(), position_ids=position_ids,
                          use_cache=True, **{self._cache_kwarg: kv.cache()})
        kv.advance()
        tokens = sample(out.logits[:, -1], [s.sampling for s in self.states], [s.seed for s in self.states],
                        [len(s.token_ids) for s in self.states])
        for state, token in zip(self.states, tokens):
            state.append(token)
        finished = [s for s in self.states if s.finished]
        for row in range(len(self.states) - 1, -1, -1):  # NOTE: backwards, as remove moves the last row
            if self.states[row].finished:
                kv.remove(row)
                self.states[row] = self.states[-1]
                self.states.pop()
        return finished

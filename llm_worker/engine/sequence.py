"""``DecodeState``: one request's output side — its tokens, its text and whether it has ended.

Ends (``finish_reason``, OpenAI's words): ``"stop"`` on an end-of-sequence token or a stop string,
``"length"`` at ``max_tokens``. The EOS token stays in ``token_ids`` (as ``generate`` keeps it) but
never reaches ``text``; a stop string and everything after it are cut from ``text``.

Detokenization is incremental (TGI/vLLM's prefix-offset scheme): each token costs two decodes of
a few ids, not one of the whole output, and a token that ends inside a multi-byte character adds
no text until the character is complete.
"""

from __future__ import annotations

from collections.abc import Collection

from llm_worker.engine.kv import KVCache
from llm_worker.engine.sampling import SamplingParams

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


class DecodeState:
    """A request being generated.

    Lifecycle: ``LLMEngine.start`` builds it from a prefill (its first token already appended)
    with the prompt's KV in ``kv``; ``DecodeBatch.add`` copies that KV into the batch and drops
    it; each batch step ``append``s one token until ``finish_reason`` is set. Not thread-safe:
    one batch owns it at a time.
    """

    def __init__(self, request_id: str, sampling: SamplingParams, tokenizer, eos_token_ids: Collection[int],
                 kv: KVCache | None, position_delta: int = 0) -> None:
        self.request_id = request_id
        self.sampling = sampling
        self.seed = sampling.resolved_seed()
        self.kv = kv
        self.num_prompt_tokens = kv.num_tokens if kv is not None else 0
        """Prompt length: the KV holds these tokens; generated token ``k`` sits at position
        ``num_prompt_tokens + k + position_delta``."""
        self.position_delta = position_delta
        """Non-zero under M-RoPE (Qwen2-VL), where a vision run takes fewer positions than tokens."""
        self.token_ids: list[int] = []
        """Generated tokens, the prefill's first one included."""
        self.text = ""
        """Detokenized output so far (special tokens skipped), cut before a stop string."""
        self.finish_reason: str | None = None
        self._tokenizer = tokenizer
        self._eos_token_ids = frozenset(eos_token_ids)
        self._prefix_offset = 0
        self._read_offset = 0
        self._hold_chars = max((len(s) for s in sampling.stop), default=1) - 1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_kv_tokens(self) -> int:
        """Positions whose K/V exist once the last token is fed back: all but that last token."""
        return self.num_prompt_tokens + len(self.token_ids) - 1

    def readable_text(self) -> str:
        """``text`` less a tail that could still grow into a stop string (all of it once finished):
        stream ``readable_text()[already_sent:]`` and nothing is ever taken back."""
        if self.finished or self._hold_chars == 0:
            return self.text
        return self.text[: max(0, len(self.text) - self._hold_chars)]

    def append(self, token: int) -> None:
        """Add the next generated token and decide whether the request has ended."""
        if self.finished:
            raise ValueError(f"request {self.request_id!r} has finished ({self.finish_reason})")
        self.token_ids.append(int(token))
        if token in self._eos_token_ids:
            self._flush()
            self.finish_reason = FINISH_STOP
            return
        self._detokenize(final=len(self.token_ids) >= self.sampling.max_tokens)
        if self.finish_reason is None and len(self.token_ids) >= self.sampling.max_tokens:
            self.finish_reason = FINISH_LENGTH

    def _detokenize(self, final: bool) -> None:
        ids = self.token_ids
        prefix_text = self._decode(ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(ids[self._prefix_offset:])
        # NOTE: U+FFFD at the end means the last token stopped inside a UTF-8 character; wait
        # for the rest of it unless this is the last token.
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            return
        old_len = len(self.text)
        self.text += new_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        self._check_stop(old_len)

    def _flush(self) -> None:
        """Emit text held back for an incomplete character (the output ends here)."""
        ids = [t for t in self.token_ids[self._prefix_offset:] if t not in self._eos_token_ids]
        prefix_text = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(ids)
        if len(new_text) > len(prefix_text):
            old_len = len(self.text)
            self.text += new_text[len(prefix_text):]
            self._check_stop(old_len)

    def _check_stop(self, old_len: int) -> None:
        if not self.sampling.stop:
            return
        # NOTE: only a match that ends in the new text is new; start far enough back to see it.
        start = max(0, old_len - self._hold_chars)
        hits = [i for i in (self.text.find(s, start) for s in self.sampling.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish_reason = FINISH_STOP

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def __repr__(self) -> str:
        return (f"DecodeState({self.request_id!r}, prompt={self.num_prompt_tokens}, generated={len(self.token_ids)}, "
                f"finish_reason={self.finish_reason!r})")

"""Stage-cost profiles with round numbers, for tests whose answers are computed by hand."""

from __future__ import annotations

from llm_worker.planner.stage_costs import StageCosts

BIG = 1_000_000


def profile_doc(*, encode_ms: float = 100.0, prefill_ms: float = 50.0, step_ms: float = 10.0,
                step_ms_at_64: float | None = None, hop_ms: float = 0.0, put_ms: float = 0.0, get_ms: float = 0.0,
                read_ms: float = 0.0, media_ms: float | None = None, image_tokens: int = 576,
                max_model_len: int = BIG, device: str = "gpu") -> dict:
    """Encode ``encode_ms`` per image whatever the batch; prefill ``prefill_ms`` whatever the
    length; a decode step ``step_ms`` (at batch 1, rising linearly to ``step_ms_at_64``); fixed
    put/get/read times; ``media_ms`` to decode and hash an image (None: not measured); 1 token per
    word and no template tokens."""
    at_64 = step_ms if step_ms_at_64 is None else step_ms_at_64
    media = {} if media_ms is None else {"media": {"image_sizes": [[336, 336]], "ms": [media_ms]}}
    return {**media, "format": "mmcache-profile/1", "source": "synthetic", "model": "synthetic", "device": device,
            "model_facts": {"kv_bytes_per_token": 1000, "embedding_bytes_per_token": 100,
                            "max_model_len": max_model_len, "tokens_per_word": 1.0, "template_tokens": 0},
            "image_tokens": {"image_sizes": [[336, 336]], "tokens": [image_tokens]},
            "encode": {"batch_sizes": [1, 64], "image_sizes": [[336, 336]], "ms": [[encode_ms], [encode_ms * 64]]},
            "prefill": {"tokens": [1, BIG], "ms": [prefill_ms, prefill_ms]},
            "decode": {"batch_sizes": [1, 64], "contexts": [1, BIG], "ms": [[step_ms, step_ms], [at_64, at_64]]},
            "kv_put": {"bytes": [1], "ms": [put_ms]}, "kv_get": {"bytes": [1], "ms": [get_ms]},
            "cache_read": {"bytes": [1], "ms": [read_ms]}, "hop_ms": hop_ms}


def costs(**kwargs) -> StageCosts:
    return StageCosts.from_doc(profile_doc(**kwargs))

"""How a vLLM item becomes an mmcache key (no vLLM import here).

- The **namespace** names what makes vLLM's encoder output what it is: the model as passed, its
  revision, the dtype, the multimodal processor settings, config overrides and quantization.
  It reads as text (``vllm.<model>.<dtype>.<digest>``) and two models never share one.
- The **hash** is vLLM's ``mm_hash`` (the item's identifier) where it is a 64-hex digest (vLLM
  hashes media with BLAKE3 by default), else the BLAKE3 of the identifier (a LoRA-prefixed
  identifier, a user's ``multi_modal_uuids``, another hash algorithm).

NOTE: vLLM's ``mm_hash`` covers the model string as passed, so ``vllm serve ./m`` and ``vllm serve
/abs/m`` give the same image different hashes: producers and consumers must name the model the
same way (or pass ``multi_modal_uuids``), as the README says.
"""

from __future__ import annotations

import json
import re
from typing import Any

import blake3

_HEX64 = re.compile(r"[0-9a-f]{64}")
_NOT_NAME = re.compile(r"[^A-Za-z0-9._-]+")
SLUG_CHARS = 48


def hash_for(identifier: str) -> str:
    """The entry hash of a vLLM item identifier (see the module doc)."""
    if _HEX64.fullmatch(identifier):
        return identifier
    return blake3.blake3(identifier.encode("utf-8", "surrogatepass")).hexdigest()


def _slug(text: str, limit: int) -> str:
    return _NOT_NAME.sub("-", text).strip("-.")[:limit] or "model"


def _jsonable(value: Any) -> Any:
    """Settings as JSON, stably: dicts sorted, anything else by its text."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def encoder_identity(model_config: Any) -> dict[str, Any]:
    """What the namespace digests, from a vLLM ``ModelConfig`` (read by attribute)."""
    mm = getattr(model_config, "multimodal_config", None)
    hf_overrides = getattr(model_config, "hf_overrides", None)
    return _jsonable({
        "model": getattr(model_config, "model", None),
        "revision": getattr(model_config, "revision", None),
        "dtype": str(getattr(model_config, "dtype", "")).removeprefix("torch."),
        "mm_processor_kwargs": getattr(mm, "mm_processor_kwargs", None) if mm is not None else None,
        "hf_overrides": hf_overrides if not callable(hf_overrides) else getattr(hf_overrides, "__qualname__", "callable"),
        "quantization": getattr(model_config, "quantization", None),
        "inputs_embeds_size": _call(model_config, "get_inputs_embeds_size"),
    })


def _call(obj: Any, name: str) -> Any:
    fn = getattr(obj, name, None)
    return fn() if callable(fn) else None


def namespace_for(model_config: Any) -> str:
    """``vllm.<model>.<dtype>.<digest>`` (at most 128 of ``[A-Za-z0-9._-]``)."""
    identity = encoder_identity(model_config)
    digest = blake3.blake3(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    model = str(identity.get("model") or "model").rstrip("/").rsplit("/", 1)[-1]
    return f"vllm.{_slug(model, SLUG_CHARS)}.{_slug(identity['dtype'] or 'auto', 16)}.{digest}"

"""The namespace of an encoder: everything besides the image bytes that changes an embedding.

``llava.clip336.f32.0123456789abcdef``: a readable prefix (model type, vision tower, dtype) and
16 hex chars of xxh3-64 over a canonical JSON of the vision-side config, the image-processor
config, the dtype, the tenant salt and a digest of the vision tower + projector weights. Any
change in one of them gives another namespace, so stale embeddings are never served; what only
the language model reads (``text_config``) is left out, so a new LLM head over the same encoder
shares its cache. The salt stays in the digest only: the readable text never shows it.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from typing import Any

import torch
import xxhash

from mmcache_client.keys import validate_namespace

NAMESPACE_FORMAT = "mmcache-namespace-v2"
"""Mixed into every digest; bump it when what goes into a namespace, or the key scheme under it,
changes. v2: keys are BLAKE3-256 (v1's were xxh3-128), so no entry of the old scheme is ever
read under a new namespace."""

# NOTE: bookkeeping that never reaches a tensor. The dtype is dropped too because the effective
# dtype is passed in explicitly (the config's is only a loading default).
_METADATA_KEYS = frozenset({"transformers_version", "architectures", "_name_or_path", "_commit_hash",
                            "dtype", "torch_dtype", "_attn_implementation_autoset"})
_TEXT_ONLY_KEYS = frozenset({"text_config"})
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_DTYPE_TAGS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64"}


def weights_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """xxh3-64 (16 hex) over each tensor's name, dtype, shape and bytes, in name order."""
    h = xxhash.xxh3_64()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach()
        header = json.dumps([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape)]).encode()
        data = tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        # NOTE: length prefixes keep (name, bytes) boundaries unambiguous.
        h.update(len(header).to_bytes(8, "little"))
        h.update(header)
        h.update(data.nbytes.to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def compute_namespace(config_dict: Mapping[str, Any], vision_state_dict_digest: str,
                      processor_config_dict: Mapping[str, Any], dtype: torch.dtype | str,
                      salt: str | None = None) -> str:
    """The namespace for an encoder built from these inputs (see the module docstring)."""
    if not isinstance(vision_state_dict_digest, str) or not vision_state_dict_digest:
        raise ValueError(f"{vision_state_dict_digest=!r} must be a non-empty str")
    if salt is not None and not isinstance(salt, str):
        raise ValueError(f"salt must be a str or None, got {type(salt).__name__}")
    dtype_name = _dtype_name(dtype)
    payload = {
        "format": NAMESPACE_FORMAT,
        "config": _strip(config_dict, drop=_METADATA_KEYS | _TEXT_ONLY_KEYS),
        "weights": vision_state_dict_digest,
        "processor": _strip(processor_config_dict, drop=_METADATA_KEYS),
        "dtype": dtype_name,
        "salt": salt,
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_jsonable)
    digest = xxhash.xxh3_64_hexdigest(canonical.encode())
    prefix = ".".join(_UNSAFE_CHARS.sub("-", part).strip(".-") or "x" for part in (
        str(config_dict.get("model_type", "model")), _vision_tag(config_dict),
        _DTYPE_TAGS.get(getattr(torch, dtype_name, None), dtype_name)))
    return validate_namespace(f"{prefix[:100]}.{digest}")


def _vision_tag(config_dict: Mapping[str, Any]) -> str:
    """``clip336`` for a CLIP tower at 336 px, ``p14`` where the input size varies."""
    vision = config_dict.get("vision_config") or {}
    kind = str(vision.get("model_type", "")).removesuffix("_vision_model")
    if vision.get("image_size"):
        return f"{kind}{vision['image_size']}"
    return f"p{vision.get('patch_size', 'x')}"


def _dtype_name(dtype: torch.dtype | str) -> str:
    name = str(dtype).removeprefix("torch.")
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"{dtype=!r} is not a torch dtype")
    return name


def _strip(value: Any, drop: frozenset[str]) -> Any:
    """``value`` without the ``drop`` keys, at every depth."""
    if isinstance(value, Mapping):
        return {str(k): _strip(v, drop) for k, v in value.items() if k not in drop}
    if isinstance(value, (list, tuple)):
        return [_strip(v, drop) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    # NOTE: no repr() fallback: a repr with a memory address would make namespaces unstable.
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if hasattr(value, "tolist"):  # numpy arrays and scalars, tensors
        return value.tolist()
    raise TypeError(f"cannot put a {type(value).__name__} into a namespace digest: {value!r}")

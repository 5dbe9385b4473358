"""The prefill → decode hand-off: a request's prompt KV cache as one mmcache entry.

Entry layout (the ordinary mmcache safetensors format, so every tier and the wire carry it):

- ``embeddings`` F32 ``[1, 1]``: the first token's id. The format requires a 2-D ``embeddings``;
  the next-token logits (``[1, vocab]``, 128 KiB for a 32k vocabulary) used to ride here, but
  decode never reads them, so a hand-off does not carry them.
- ``k`` and ``v`` ``[num_layers, num_kv_heads, num_tokens, head_dim]`` in the model's dtype:
  all layers stacked, so the entry holds 3 tensors whatever the depth (the format allows 64;
  per-layer tensors would not fit a 32-layer model) and layer ``i`` is the view ``k[i]``.
- ``__metadata__``: ``kv_format``, ``model_namespace`` (the engine's: a KV only fits the weights
  that made it), ``num_tokens``, ``num_layers``, ``dtype``, ``first_token``; ``encode_ms`` is the
  prefill's wall time (what recomputing the entry costs, for cost-aware eviction).

Keys: ``kv.<model namespace>/<BLAKE3-256 of the request id>`` (``kv_key``). Reading is zero-copy:
``read_prefill`` returns views over the entry's buffer, valid while the entry is open.

Host-only: a hand-off lives for one request, so it is put with ``persist=False`` (in
``kv_entry_fields``) and never written to disk; the ``kv.`` prefix names it, nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mmcache_client.keys import Key, content_hash, validate_namespace

KV_FORMAT = "mmcache-kv/3"
KV_NAMESPACE_PREFIX = "kv."


@dataclass(frozen=True, slots=True)
class KVCache:
    """One request's prompt KV: ``keys``/``values`` ``[num_layers, num_kv_heads, num_tokens, head_dim]``."""

    keys: torch.Tensor
    values: torch.Tensor

    def __post_init__(self) -> None:
        if self.keys.dim() != 4 or self.keys.shape != self.values.shape or self.keys.dtype != self.values.dtype:
            raise ValueError(f"keys {tuple(self.keys.shape)} {self.keys.dtype} and values {tuple(self.values.shape)} "
                             f"{self.values.dtype} must be equal 4-D [layers, kv_heads, tokens, head_dim]")

    @property
    def num_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


@dataclass(frozen=True, slots=True)
class PrefillResult:
    """What a prefill hands to decode; ``kv`` and ``logits`` may view an entry's memory."""

    model_namespace: str
    """The engine's namespace: decode refuses a KV made by other weights."""
    first_token: int
    """The first generated token, drawn from ``logits``."""
    kv: KVCache
    logits: torch.Tensor | None
    """``[vocab]`` float32: next-token logits at the last prompt position (the prefill's own
    result); None once handed over (``read_prefill``): the KV entry does not carry them."""
    prefill_ms: float = 0.0
    """Wall time of the prefill forward and the first draw."""
    position_delta: int = 0
    """Position of generated token ``k`` minus its index ``num_prompt_tokens + k`` (M-RoPE
    compresses a vision run's positions; 0 for 1-D positions)."""

    @property
    def num_prompt_tokens(self) -> int:
        return self.kv.num_tokens


def kv_namespace(model_namespace: str) -> str:
    """The namespace of KV entries made by the model with ``model_namespace``."""
    return validate_namespace(KV_NAMESPACE_PREFIX + model_namespace)


def kv_key(model_namespace: str, request_id: str) -> Key:
    """Where a request's KV lives: ``kv.<model namespace>/<BLAKE3-256 of the request id>``."""
    if not isinstance(request_id, str) or not request_id:
        raise ValueError(f"{request_id=!r} must be a non-empty str")
    return Key(kv_namespace(model_namespace), content_hash(request_id.encode()))


def kv_entry_fields(result: PrefillResult) -> dict[str, Any]:
    """Keyword arguments for ``CacheClient.put`` / ``AsyncCacheClient.put`` after the key:
    ``client.put(key.namespace, key.hash, **kv_entry_fields(result))`` (host-only: ``persist=False``)."""
    metadata = {
        "kv_format": KV_FORMAT,
        "model_namespace": result.model_namespace,
        "num_tokens": str(result.kv.num_tokens),
        "num_layers": str(result.kv.num_layers),
        "dtype": str(result.kv.dtype).removeprefix("torch."),
        "first_token": str(result.first_token),
        "position_delta": str(result.position_delta),
    }
    # NOTE: contiguous() is free for the engine's own results (already contiguous); it copies
    # only for a caller's strided KV, which the entry writer could not copy from in one go.
    extras = {"k": result.kv.keys.contiguous(), "v": result.kv.values.contiguous()}
    first = torch.tensor([[float(result.first_token)]], dtype=torch.float32)
    return {"tensor": first, "metadata": metadata, "extras": extras,
            "encode_ms": result.prefill_ms, "persist": False}


def read_prefill(entry: Any) -> PrefillResult:
    """A ``PrefillResult`` viewing ``entry`` (an ``mmcache_client`` ``Entry`` or ``EntryView``) in
    place: no tensor bytes are copied, so keep the entry open while they are used.

    Raises ``ValueError`` if the entry is not a KV entry or its tensors disagree with its metadata.
    """
    meta = entry.metadata
    if meta.get("kv_format") != KV_FORMAT:
        raise ValueError(f"entry has kv_format={meta.get('kv_format')!r}, expected {KV_FORMAT!r}")
    tensor = entry.get_tensor if hasattr(entry, "get_tensor") else entry.tensor
    names = set(entry.names)
    if not {"embeddings", "k", "v"} <= names:
        raise ValueError(f"KV entry lacks tensors: has {sorted(names)}")
    try:
        kv = KVCache(tensor("k"), tensor("v"))
        num_tokens, num_layers = int(meta["num_tokens"]), int(meta["num_layers"])
        first_token = int(meta["first_token"])
        position_delta = int(meta["position_delta"])
        prefill_ms = float(meta.get("encode_ms", "0"))
        model_namespace = meta["model_namespace"]
    except (KeyError, ValueError) as e:
        raise ValueError(f"malformed KV entry: {e}") from None
    if (kv.num_tokens, kv.num_layers) != (num_tokens, num_layers) or str(kv.dtype) != f"torch.{meta.get('dtype')}":
        raise ValueError(f"KV tensors {tuple(kv.keys.shape)} {kv.dtype} contradict the metadata "
                         f"({num_layers=}, {num_tokens=}, dtype={meta.get('dtype')})")
    if tuple(tensor("embeddings").shape) != (1, 1):
        raise ValueError(f"KV entry embeddings must be [1, 1] (the first token), got {list(tensor('embeddings').shape)}")
    return PrefillResult(model_namespace, first_token, kv, None, prefill_ms, position_delta)

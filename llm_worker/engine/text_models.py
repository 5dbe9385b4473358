"""The language-model side of each supported checkpoint family, and Qwen2-VL's M-RoPE positions.

A *family* says how to build the text model (the ``*ForCausalLM`` a prefill and decode run), which
checkpoint tensors are its own (the vision side is never read), and which tokens stand for
images and videos:

- ``llava``: the text model is whatever ``text_config`` names (Llama, Mistral, ...), built by
  ``AutoModelForCausalLM``; an image is a run of ``image_token_index``; a video is its frames, each
  an image (LLaVA-1.5 has no video tokens).
- ``qwen2_vl``: ``Qwen2VLTextModel`` + ``lm_head`` (``Qwen2VLTextLM``); images and videos have tokens
  of their own (``<|image_pad|>``, ``<|video_pad|>``), and positions are 3-D (M-RoPE,
  ``rope_positions``): a vision run takes ``max(h, w) / merge`` positions, not one per token, so
  decode continues at ``num_tokens + position_delta``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from llm_worker.engine.slab import cache_kwarg


class Qwen2VLTextLM(nn.Module):
    """``Qwen2VLForConditionalGeneration`` without its vision tower: the same text model and
    ``lm_head`` (so the same outputs), with the forward a ``*ForCausalLM`` has."""

    def __init__(self, text_config) -> None:
        super().__init__()
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

        self.config = text_config
        self.model = Qwen2VLTextModel._from_config(text_config)
        self.lm_head = nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)
        self._cache_kwarg = cache_kwarg(self.model)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: Any = None, use_cache: bool | None = None, logits_to_keep: int = 0) -> CausalLMOutputWithPast:
        """``position_ids``: ``[3, batch, seq]`` (M-RoPE) or ``[batch, seq]`` (text only: the same
        position on all three axes, as the model expands it)."""
        out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=use_cache, **{self._cache_kwarg: cache})
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=self.lm_head(hidden))


@dataclass(frozen=True)
class Family:
    """How the engine treats one checkpoint family (see the module docstring)."""

    name: str
    build: Callable[[Any, torch.dtype], nn.Module]
    """``(text_config, dtype) → module``: the text model, uninitialised (weights are loaded after)."""
    language_key: Callable[[str], str | None]
    """Checkpoint tensor name → the module's, or None for a tensor that is not the text model's."""
    video_tokens: bool
    """Whether videos have a token of their own (else each frame is an image)."""
    mrope: bool
    """3-D positions (``rope_positions``) instead of ``0..n-1``."""

    def image_token_id(self, config) -> int:
        token = getattr(config, "image_token_index", None)
        return int(token if token is not None else config.image_token_id)

    def video_token_id(self, config) -> int | None:
        return int(config.video_token_id) if self.video_tokens else None

    def merge_size(self, config) -> int:
        return int(config.vision_config.spatial_merge_size) if self.mrope else 1


def _llava_key(key: str) -> str | None:
    # Saved by transformers 5 and on the hub (llava-hf): "language_model.model.layers...",
    # "language_model.lm_head.weight"; in-memory v5 names: "model.language_model.layers...",
    # "lm_head.weight".
    if key.startswith("language_model.model."):
        return "model." + key.removeprefix("language_model.model.")
    if key.startswith("model.language_model."):
        return "model." + key.removeprefix("model.language_model.")
    if key in ("language_model.lm_head.weight", "lm_head.weight"):
        return "lm_head.weight"
    return None


def _qwen2_vl_key(key: str) -> str | None:
    # Saved (and on the hub, Qwen/Qwen2-VL-*): "model.layers...", "model.embed_tokens...",
    # "lm_head.weight", "visual..."; in-memory v5 names: "model.language_model.layers...".
    if key.startswith("model.language_model."):
        return "model." + key.removeprefix("model.language_model.")
    if key.startswith("model.") and not key.startswith("model.visual."):
        return key
    return "lm_head.weight" if key == "lm_head.weight" else None


def _build_causal_lm(text_config, dtype: torch.dtype) -> nn.Module:
    return AutoModelForCausalLM.from_config(text_config, dtype=dtype)


FAMILIES: dict[str, Family] = {
    "llava": Family("llava", _build_causal_lm, _llava_key, video_tokens=False, mrope=False),
    "qwen2_vl": Family("qwen2_vl", lambda text_config, dtype: Qwen2VLTextLM(text_config), _qwen2_vl_key,
                       video_tokens=True, mrope=True),
}


def family_of(config) -> Family:
    """The family of a checkpoint's config; ``ValueError`` names the supported ones."""
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ValueError(f"model_type={config.model_type!r} is not supported ({', '.join(sorted(FAMILIES))})")
    return family


def rope_positions(input_ids: Sequence[int], image_token_id: int, video_token_id: int | None,
                   image_grids: Sequence[Sequence[int]], video_grids: Sequence[Sequence[int]],
                   merge_size: int) -> tuple[torch.Tensor, int]:
    """Qwen2-VL's M-RoPE positions of one prompt: ``([3, len(input_ids)] int64, position delta)``.

    Computed as ``Qwen2VLModel.get_rope_index`` does (``tests/test_llm_engine.py`` compares them):
    the prompt is cut into runs of text, image and video tokens; text positions count on from the
    last run's end on all three axes; the ``i``-th image run (``j``-th video run) takes the grid
    ``image_grids[i]`` (``video_grids[j]``) ``(t, h, w)`` in patches: its tokens sit at
    ``start + (t', h' / merge, w' / merge)``, and the next run starts at ``start + max(h, w) / merge``.
    The delta is what decode adds to a token's index to get its position.
    """
    kinds = {image_token_id: 1}
    if video_token_id is not None:
        kinds[video_token_id] = 2
    grids = {1: iter(image_grids), 2: iter(video_grids)}
    pieces: list[torch.Tensor] = []
    current = 0
    for kind, run in itertools.groupby(kinds.get(int(t), 0) for t in input_ids):
        length = sum(1 for _ in run)
        if kind == 0:
            pieces.append(torch.arange(current, current + length).expand(3, -1))
            current += length
            continue
        grid = next(grids[kind], None)
        if grid is None:
            raise ValueError(f"more {'image' if kind == 1 else 'video'} runs in the prompt than grids given")
        t, h, w = (int(x) for x in grid)
        gh, gw = h // merge_size, w // merge_size
        if t * gh * gw != length:
            raise ValueError(f"a run of {length} {'image' if kind == 1 else 'video'} tokens does not fit its grid "
                             f"{[t, h, w]} ({t * gh * gw} tokens after a {merge_size}x{merge_size} merge)")
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        pieces.append(torch.stack([tt, hh, ww]).reshape(3, -1) + current)
        current += max(h, w) // merge_size
    for kind, it in grids.items():
        if next(it, None) is not None:
            raise ValueError(f"more {'image' if kind == 1 else 'video'} grids given than runs in the prompt")
    positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
    delta = int(positions.max()) + 1 - len(input_ids) if len(input_ids) else 0
    return positions, delta

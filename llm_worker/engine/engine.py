"""``LLMEngine``: the language-model side of a LLaVA or Qwen2-VL checkpoint — prefill with spliced
image and video embeddings, and batched decode.

``LLMEngine.load(dir)`` reads only the language model's tensors (the vision tower and projector
are never loaded: embeddings come from the encoders through the cache) into the same
transformers module the full model holds, so its outputs are the full model's: greedy
``prefill`` + ``decode`` reproduce ``LlavaForConditionalGeneration.generate`` and
``Qwen2VLForConditionalGeneration.generate`` token for token. What differs per family (the text
model, the vision tokens, Qwen2-VL's 3-D positions) is in ``llm_worker.engine.text_models``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import xxhash
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, GenerationConfig
from transformers.initialization import no_init_weights
from transformers.modeling_utils import local_torch_dtype

from encoder_worker.namespace import weights_digest
from llm_worker.engine.batch import DecodeBatch
from llm_worker.engine.kv import KVCache, PrefillResult, kv_key
from llm_worker.engine.prompt import PromptTokens, check_max_tokens, prompt_ids
from llm_worker.engine.sampling import SamplingParams, sample
from llm_worker.engine.sequence import DecodeState
from llm_worker.engine.slab import BatchKV, cache_kwarg, slab_cache
from llm_worker.engine.text_models import Family, family_of, rope_positions
from mmcache_client.keys import Key, validate_namespace

logger = logging.getLogger(__name__)

_NAMESPACE_FORMAT = "mmcache-llm-namespace-v1"
"""Mixed into the namespace digest; bump it when what goes into it changes."""
_CONFIG_BOOKKEEPING = frozenset({"transformers_version", "architectures", "_name_or_path", "_commit_hash", "dtype",
                                 "torch_dtype", "_attn_implementation_autoset"})
_DTYPE_TAGS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


class LLMEngine:
    """A loaded language model with its tokenizer.

    Lifecycle: ``load`` once per process; then ``prefill`` per request and ``decode`` (or a
    ``new_batch`` driven step by step) for many at once. Weights never change after loading.
    Run one forward at a time per engine (``prefill`` and batch steps from one thread).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, config, namespace: str,
                 eos_token_ids: Sequence[int], family: Family | None = None) -> None:
        self.model = model
        self._cache_kwarg = cache_kwarg(model)
        self.tokenizer = tokenizer
        self.config = config
        """The checkpoint's config; ``config.text_config`` is the language model's."""
        self.family = family or family_of(config)
        self.namespace = validate_namespace(namespace)
        """Names the weights and dtype: ``llava.llama.f32.<16 hex>``; KV entries carry it."""
        self.eos_token_ids = tuple(eos_token_ids)
        text = config.text_config
        self.num_layers = text.num_hidden_layers
        self.num_kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.tokens = PromptTokens(self.family.image_token_id(config), self.family.video_token_id(config))
        """The image and video placeholder tokens (no video token: a video's frames are images)."""
        self.merge_size = self.family.merge_size(config)
        """Patches merged per side into one token (Qwen2-VL: 2); grids are in patches."""

    @classmethod
    def load(cls, model_dir: str | os.PathLike, device: str | torch.device = "cpu",
             dtype: torch.dtype | str | None = None) -> "LLMEngine":
        """Load the language model of the LLaVA or Qwen2-VL checkpoint in ``model_dir`` (local files only).

        ``dtype=None`` means float32 on the CPU, else the checkpoint's own dtype.
        """
        model_dir = Path(model_dir)
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        try:
            family = family_of(config)
        except ValueError as e:
            raise ValueError(f"{model_dir}: {e}") from None
        device = torch.device(device)
        if dtype is None:
            dtype = torch.float32 if device.type == "cpu" else _as_dtype(config.dtype or torch.float32)
        dtype = _as_dtype(dtype)
        t0 = time.perf_counter()
        text_config_json = _canonical_json(config.text_config.to_dict())  # NOTE: before from_config rewrites it
        # NOTE: built in the target dtype (as from_pretrained does) and with no random init:
        # every parameter is overwritten from the checkpoint below.
        with no_init_weights(), local_torch_dtype(dtype):
            model = family.build(config.text_config, dtype)
        missing, unexpected = model.load_state_dict(_read_language_tensors(model_dir, family), strict=False)
        tied = any(getattr(c, "tie_word_embeddings", False) for c in (config, config.text_config))
        if tied and set(missing) <= {"lm_head.weight"}:
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
        elif missing or unexpected:
            raise ValueError(f"{model_dir}: language-model tensors do not fit: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        model.eval()
        digest = xxhash.xxh3_64_hexdigest(
            f"{_NAMESPACE_FORMAT}|{text_config_json}|{weights_digest(model.state_dict())}".encode())
        model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        eos = _eos_token_ids(model_dir, config, tokenizer)
        text_type = config.text_config.model_type.replace("_", "-")
        dtype_tag = _DTYPE_TAGS.get(dtype, str(dtype).removeprefix("torch."))
        namespace = f"{config.model_type}.{text_type}.{dtype_tag}.{digest}"
        logger.info("loaded %s language model from %s in %.0f ms: namespace %s, %s on %s", text_type, model_dir,
                    (time.perf_counter() - t0) * 1e3, namespace, dtype, device)
        return cls(model, tokenizer, config, namespace, eos, family)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def image_token_id(self) -> int:
        return self.tokens.image

    @property
    def video_token_id(self) -> int | None:
        return self.tokens.video

    @property
    def max_model_len(self) -> int | None:
        """Positions the language model takes (prompt and output together); None: unbounded."""
        return getattr(self.config.text_config, "max_position_embeddings", None)

    def check_max_tokens(self, num_prompt_tokens: int, sampling: SamplingParams) -> None:
        """``ValueError`` unless ``sampling.max_tokens`` more tokens fit after the prompt."""
        check_max_tokens(sampling.max_tokens, num_prompt_tokens, self.max_model_len)

    def prompt_ids(self, messages, num_image_tokens: Sequence[int], num_video_tokens: Sequence[int] = (),
                   frames: Sequence[int] | None = None) -> list[int]:
        """Token ids for OpenAI-style ``messages``; see ``llm_worker.engine.prompt.prompt_ids``."""
        return prompt_ids(self.tokenizer, messages, self.tokens, num_image_tokens, num_video_tokens, frames)

    def kv_key(self, request_id: str) -> Key:
        """Where this model's KV for ``request_id`` is handed off."""
        return kv_key(self.namespace, request_id)

    @torch.inference_mode()
    def prefill(self, input_ids: Sequence[int], image_embeddings: Sequence[torch.Tensor],
                sampling: SamplingParams | None = None, seed: int | None = None, *,
                image_grids: Sequence[Sequence[int]] | None = None,
                video_embeddings: Sequence[Sequence[torch.Tensor]] = (),
                video_grids: Sequence[Sequence[int]] | None = None) -> PrefillResult:
        """Run the prompt, with ``image_embeddings[i]`` ``[num_tokens_i, hidden]`` spliced in, in
        order, at the image-token positions (as the model's own forward does); draw the first token.

        Videos (families with video tokens): ``video_embeddings[j]`` is the j-th video's pieces
        (temporal groups of frames, in order), spliced over its run of video tokens. With 3-D
        positions (Qwen2-VL) each image and video needs its grid ``(t, h, w)`` in patches
        (``image_grids``, ``video_grids``: the ``image_grid_thw`` / ``video_grid_thw`` the
        encoder stored), and the result carries the position delta decode continues with.

        ``seed`` overrides ``sampling.seed`` (a decode side that continues with the same seed
        reproduces the request). The embeddings may view cache memory: they are copied here.
        """
        sampling = sampling or SamplingParams()
        vocab_size = self.model.get_input_embeddings().num_embeddings
        if not input_ids or not all(0 <= int(t) < vocab_size for t in input_ids):
            raise ValueError(f"input_ids must be a non-empty list of ids in [0, {vocab_size})")
        max_positions = self.max_model_len
        if max_positions is not None and len(input_ids) > max_positions:
            raise ValueError(f"{len(input_ids)} prompt tokens exceed the model's {max_positions} positions")
        if video_embeddings and self.video_token_id is None:
            raise ValueError(f"{self.family.name} has no video tokens: pass a video's frames as images")
        t0 = time.perf_counter()
        device, dtype = self.device, self.dtype
        ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
        inputs_embeds = self.model.get_input_embeddings()(ids)
        hidden = inputs_embeds.shape[-1]
        videos = [piece for video in video_embeddings for piece in video]
        for what, token, pieces in (("image", self.image_token_id, image_embeddings),
                                    ("video", self.video_token_id, videos)):
            if any(e.dim() != 2 or e.shape[1] != hidden for e in pieces):
                raise ValueError(f"{what} embeddings must be [num_tokens, {hidden}], got "
                                 f"{[list(e.shape) for e in pieces]}")
            mask = ids[0] == token if token is not None else None
            num_tokens = int(mask.sum()) if mask is not None else 0
            if num_tokens != sum(e.shape[0] for e in pieces):
                raise ValueError(f"{num_tokens} {what} tokens in the prompt, "
                                 f"{sum(e.shape[0] for e in pieces)} embedding rows given")
            if pieces:
                _scatter_images(inputs_embeds[0], mask, pieces)
        position_ids, delta = None, 0
        if self.family.mrope:
            image_grids, video_grids = list(image_grids or ()), list(video_grids or ())
            if len(image_grids) != len(image_embeddings) or len(video_grids) != len(video_embeddings):
                raise ValueError(f"{self.family.name} needs a grid (t, h, w) per image and per video: "
                                 f"{len(image_grids)} for {len(image_embeddings)} images, "
                                 f"{len(video_grids)} for {len(video_embeddings)} videos")
            positions, delta = rope_positions(input_ids, self.image_token_id, self.video_token_id, image_grids,
                                              video_grids, self.merge_size)
            position_ids = positions[:, None, :].to(device)
        num_tokens = ids.shape[1]
        shape = (self.num_layers, 1, self.num_kv_heads, num_tokens, self.head_dim)
        keys = torch.empty(shape, dtype=dtype, device=device)
        values = torch.empty(shape, dtype=dtype, device=device)
        # NOTE: the forward writes each layer's K/V straight into one stacked buffer, which is
        # the hand-off entry's layout: no gathering copy afterwards.
        out = self.model(inputs_embeds=inputs_embeds, use_cache=True, logits_to_keep=1, position_ids=position_ids,
                         **{self._cache_kwarg: slab_cache(list(keys), list(values), 0)})
        logits = out.logits[0, -1].float()
        seed = seed if seed is not None else sampling.resolved_seed()
        first_token = sample(logits[None], [sampling], [seed], [0])[0]
        prefill_ms = (time.perf_counter() - t0) * 1e3
        return PrefillResult(self.namespace, first_token, KVCache(keys[:, 0], values[:, 0]), logits, prefill_ms,
                             position_delta=delta)

    def start(self, request_id: str, prefill: PrefillResult, sampling: SamplingParams | None = None,
              seed: int | None = None) -> DecodeState:
        """A decode state continuing ``prefill`` (its first token appended: it may be finished already).

        Pass the ``sampling`` and ``seed`` that the prefill used. ``prefill.kv`` may view cache
        memory until the state joins a batch. ``ValueError`` when ``sampling.max_tokens`` would run
        past the model's positions (a batch reserves room for all of them).
        """
        if prefill.model_namespace != self.namespace:
            raise ValueError(f"KV made by model {prefill.model_namespace!r}, this engine is {self.namespace!r}")
        if prefill.kv.dtype != self.dtype:
            raise ValueError(f"KV dtype {prefill.kv.dtype} differs from the engine's {self.dtype}")
        sampling = sampling or SamplingParams()
        self.check_max_tokens(prefill.num_prompt_tokens, sampling)
        if seed is not None:
            sampling = dataclasses.replace(sampling, seed=seed)
        state = DecodeState(request_id, sampling, self.tokenizer, self.eos_token_ids, prefill.kv,
                            prefill.position_delta)
        state.append(prefill.first_token)
        if state.finished:
            state.kv = None
        return state

    def first_output(self, first_token: int, sampling: SamplingParams) -> DecodeState:
        """The output after the prefill's token alone, without its KV: what a decode worker
        streams first (``readable_text()``, ``finish_reason``), known as soon as prefill ends."""
        state = DecodeState("first-token", sampling, self.tokenizer, self.eos_token_ids, None)
        state.append(first_token)
        return state

    def new_batch(self) -> DecodeBatch:
        """An empty batch for step-by-step (continuous) decoding on this engine."""
        kv = BatchKV(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype, self.device)
        return DecodeBatch(self.model, kv)


def _canonical_json(config_dict: dict) -> str:
    """The config without bookkeeping that never reaches a tensor (the dtype is tagged apart)."""
    kept = {k: v for k, v in config_dict.items() if k not in _CONFIG_BOOKKEEPING}
    return json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str)


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    resolved = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"{dtype=!r} must be a floating-point torch dtype")
    return resolved


def _read_language_tensors(model_dir: Path, family: Family) -> dict[str, torch.Tensor]:
    """The checkpoint's language-model tensors under ``*ForCausalLM`` names; the vision side is
    never read (safetensors maps files lazily, shards without LM tensors are not opened)."""
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
    elif (model_dir / "model.safetensors").is_file():
        with safe_open(model_dir / "model.safetensors", framework="pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    else:
        raise ValueError(f"{model_dir} has no model.safetensors[.index.json] (other formats are not supported)")
    key_to_file = {k: f for k, f in weight_map.items() if family.language_key(k) is not None}
    tensors: dict[str, torch.Tensor] = {}
    for filename in sorted(set(key_to_file.values())):
        with safe_open(model_dir / filename, framework="pt") as f:
            for key in (k for k, name in key_to_file.items() if name == filename):
                tensors[family.language_key(key)] = f.get_tensor(key)
    if not tensors:
        raise ValueError(f"{model_dir}: no language-model tensors in the checkpoint")
    return tensors


def _eos_token_ids(model_dir: Path, config, tokenizer) -> list[int]:
    """What ends generation, as ``generate`` decides it: generation_config.json first."""
    eos = None
    if (model_dir / "generation_config.json").is_file():
        eos = GenerationConfig.from_pretrained(model_dir, local_files_only=True).eos_token_id
    if eos is None:
        eos = getattr(config.text_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not ids:
        raise ValueError(f"{model_dir}: no end-of-sequence token id in the generation config, config or tokenizer")
    return ids


def _scatter_images(embeds: torch.Tensor, mask: torch.Tensor, images: Sequence[torch.Tensor]) -> None:
    """Write ``images[i]`` over the i-th run of image-token rows of ``embeds`` ([seq, hidden]),
    in place, in order (what ``masked_scatter`` of their concatenation does): one copy per image,
    straight from its view (cache memory) with the dtype and device conversion fused into the
    copy, and no concatenated temporary."""
    positions = mask.nonzero().flatten().tolist()
    at = 0
    for e in images:
        n = e.shape[0]
        start, end = positions[at], positions[at + n - 1]
        if end - start == n - 1:  # NOTE: a placeholder is one run of rows: a slice
            embeds[start:end + 1].copy_(e)
        else:
            embeds.index_copy_(0, torch.tensor(positions[at:at + n], device=embeds.device), e.to(embeds))
        at += n


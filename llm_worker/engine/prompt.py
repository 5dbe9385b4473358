"""Prompt preparation: OpenAI-style chat messages → token ids with image and video placeholders expanded.

``messages`` is a list of ``{"role", "content"}``; ``content`` is a string or a list of parts
``{"type": "text", "text": ...}`` / ``{"type": "image_url", "image_url": {"url": ...}}`` /
``{"type": "video_url", "video_url": {"url": ...}}`` (as vLLM takes them). Media parts reach the
checkpoint's own chat template in the Hugging Face form, ``{"type": "image"}`` / ``{"type":
"video"}``, which renders its placeholder in their place (``<image>`` for LLaVA;
``<|vision_start|><|image_pad|><|vision_end|>`` and ``...<|video_pad|>...`` for Qwen2-VL). A model
without video tokens (LLaVA) sees a video as its frames, each an image part (``frames``).

The ids equal what the model's processor produces for the same conversation: the processor
replaces each placeholder in the *text* by ``num_tokens`` copies and tokenizes; the placeholder
is a special token, so the text around it tokenizes the same either way and we expand at the id
level instead (``tests/test_llm_engine.py`` compares with the processor).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_ROLES = frozenset({"system", "user", "assistant"})
_MEDIA_KINDS = {"image_url": "image", "video_url": "video"}


@dataclass(frozen=True, slots=True)
class PromptTokens:
    """A model's placeholder tokens: ``image``, and ``video`` (None: a video's frames are images)."""

    image: int
    video: int | None = None


@dataclass(frozen=True, slots=True)
class MediaPart:
    """An image or video part of the messages, in prompt order."""

    kind: str
    """``"image"`` or ``"video"``."""
    url: str


def media_parts(messages: Sequence[Mapping[str, Any]]) -> list[MediaPart]:
    """Every image and video part, in prompt order (what the encoders get); validates ``messages``."""
    return [MediaPart(_MEDIA_KINDS[p["type"]], p[p["type"]]["url"]) for p in _normalize(messages)[1]
            if p["type"] in _MEDIA_KINDS]


def image_urls(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """The ``image_url.url`` of every image part, in prompt order."""
    return [p.url for p in media_parts(messages) if p.kind == "image"]


def render_prompt(tokenizer, messages: Sequence[Mapping[str, Any]], tokens: PromptTokens | None = None,
                  frames: Sequence[int] | None = None) -> str:
    """The chat template's text for ``messages``, ending with the assistant's generation prompt."""
    return _render(tokenizer, _template_messages(_normalize(messages)[0], tokens, frames))


def _render(tokenizer, template_messages: list[dict]) -> str:
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template")
    return tokenizer.apply_chat_template(template_messages, tokenize=False, add_generation_prompt=True)


def _as_tokens(tokens: PromptTokens | int) -> PromptTokens:
    return tokens if isinstance(tokens, PromptTokens) else PromptTokens(int(tokens))


def prompt_ids(tokenizer, messages: Sequence[Mapping[str, Any]], tokens: PromptTokens | int,
               num_image_tokens: Sequence[int], num_video_tokens: Sequence[int] = (),
               frames: Sequence[int] | None = None) -> list[int]:
    """Token ids of ``messages`` with the ``i``-th image placeholder repeated ``num_image_tokens[i]``
    times and the ``j``-th video placeholder ``num_video_tokens[j]`` times (``frames``: see
    ``template_ids``; then the frames count among the images).

    Raises ``ValueError`` for malformed messages, a count that does not match the media parts,
    or text that itself contains a placeholder (it would take an image's place).
    """
    tokens = _as_tokens(tokens)
    ids = template_ids(tokenizer, messages, tokens, frames)
    ids = expand_tokens(ids, tokens.image, num_image_tokens, "image")
    return expand_tokens(ids, tokens.video, num_video_tokens, "video") if tokens.video is not None else ids


def template_ids(tokenizer, messages: Sequence[Mapping[str, Any]], tokens: PromptTokens | int,
                 frames: Sequence[int] | None = None) -> list[int]:
    """Token ids of the chat template for ``messages``, one placeholder per image part and per
    video part (what the router sends to prefill, which expands each to its token count).

    For a model without video tokens, video ``k`` renders as ``frames[k]`` image parts (its
    frames); without ``frames``, as one (a bound before the videos are decoded).
    """
    tokens = _as_tokens(tokens)
    template_messages, parts = _normalize(messages)
    text = _render(tokenizer, _template_messages(template_messages, tokens, frames))
    # NOTE: as ProcessorMixin.apply_chat_template does: no second BOS when the template has one.
    bos = tokenizer.bos_token
    ids = tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
    num_images = sum(p["type"] == "image_url" for p in parts)
    num_videos = sum(p["type"] == "video_url" for p in parts)
    expected = {tokens.image: num_images}
    if tokens.video is not None:
        expected[tokens.video] = num_videos
    else:
        expected[tokens.image] += sum(frames) if frames is not None else num_videos
    for token, count in expected.items():
        if ids.count(token) != count:
            raise ValueError(f"the prompt holds {ids.count(token)} {'image' if token == tokens.image else 'video'} "
                             f"placeholders for {count} (does a text part contain the placeholder token?)")
    return ids


def _template_messages(template_messages: list[dict], tokens: PromptTokens | None,
                       frames: Sequence[int] | None) -> list[dict]:
    """``template_messages`` with each video part as the model takes it: ``{"type": "video"}``, or
    (no video token) its frames as image parts."""
    if tokens is None or tokens.video is not None:
        return template_messages
    frames = list(frames) if frames is not None else None
    out, k = [], 0
    for message in template_messages:
        if isinstance(message["content"], str):
            out.append(message)
            continue
        parts = []
        for part in message["content"]:
            if part["type"] != "video":
                parts.append(part)
                continue
            if frames is not None and k >= len(frames):
                raise ValueError(f"frame counts given for {len(frames)} videos; the messages hold more")
            parts.extend([{"type": "image"}] * (frames[k] if frames is not None else 1))
            k += 1
        out.append({"role": message["role"], "content": parts})
    if frames is not None and k != len(frames):
        raise ValueError(f"frame counts given for {len(frames)} videos; the messages hold {k}")
    return out


def check_max_tokens(max_tokens: int, num_prompt_tokens: int, max_model_len: int | None,
                     param: str = "max_tokens") -> None:
    """Raise ``ValueError`` (a 400) unless the prompt and ``max_tokens`` fit the model's positions:
    ``num_prompt_tokens + max_tokens <= max_model_len``, vLLM's rule. ``param`` names the request field."""
    if max_model_len is not None and num_prompt_tokens + max_tokens > max_model_len:
        raise ValueError(f"{param}={max_tokens} exceeds the model's context of {max_model_len} minus the "
                         f"prompt's {num_prompt_tokens} tokens (at most {max(max_model_len - num_prompt_tokens, 0)})")


def expand_tokens(ids: Sequence[int], token_id: int, counts: Sequence[int], what: str = "image") -> list[int]:
    """``ids`` with its ``i``-th ``token_id`` repeated ``counts[i]`` times."""
    positions = [i for i, t in enumerate(ids) if t == token_id]
    if len(counts) != len(positions):
        raise ValueError(f"{len(counts)} {what} token counts given for {len(positions)} {what} placeholders "
                         "in the prompt")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts):
        raise ValueError(f"{what} token counts {list(counts)} must be ints >= 1")
    out: list[int] = []
    start = 0
    for pos, count in zip(positions, counts):
        out.extend(ids[start:pos])
        out.extend([token_id] * count)
        start = pos + 1
    out.extend(ids[start:])
    return out


def _normalize(messages: Sequence[Mapping[str, Any]]) -> tuple[list[dict], list[dict]]:
    """(messages as chat templates expect them, the original parts in order); validates."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError("messages must be a non-empty list")
    template_messages: list[dict] = []
    parts_in_order: list[dict] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") not in _ROLES:
            raise ValueError(f"messages[{i}] must be an object with role in {sorted(_ROLES)}")
        content = message.get("content")
        if isinstance(content, str):
            template_messages.append({"role": message["role"], "content": content})
            continue
        if not isinstance(content, Sequence) or isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of parts")
        parts: list[dict] = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind in _MEDIA_KINDS and isinstance(part.get(kind), Mapping) \
                    and isinstance(part[kind].get("url"), str):
                parts.append({"type": _MEDIA_KINDS[kind]})
            else:
                raise ValueError(f"messages[{i}].content[{j}] must be a text part, or an image_url or video_url "
                                 "part with a url")
            parts_in_order.append(dict(part))
        template_messages.append({"role": message["role"], "content": parts})
    return template_messages, parts_in_order

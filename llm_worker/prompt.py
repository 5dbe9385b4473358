"""Prompt preparation: OpenAI-style chat messages → token ids with image placeholders expanded.

``messages`` is a list of ``{"role", "content"}``; ``content`` is a string or a list of parts
``{"type": "text", "text": ...}`` / ``{"type": "image_url", "image_url": {"url": ...}}``. Image
parts reach the checkpoint's own chat template as ``{"type": "image"}`` (the Hugging Face form),
which renders its image placeholder (``<image>`` for LLaVA) in their place.

The ids equal what the model's processor produces for the same conversation: the processor
replaces each ``<image>`` in the *text* by ``num_tokens`` copies and tokenizes; the image token is
a special token, so the text around it tokenizes the same either way and we expand at the id
level instead (``tests/test_llm_engine.py`` compares with ``AutoProcessor``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

_ROLES = frozenset({"system", "user", "assistant"})


def image_urls(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """The ``image_url.url`` of every image part, in prompt order (what the encoders get)."""
    return [part["image_url"]["url"] for part in _image_parts(_normalize(messages)[1])]


def render_prompt(tokenizer, messages: Sequence[Mapping[str, Any]]) -> str:
    """The chat template's text for ``messages``, ending with the assistant's generation prompt."""
    return _render(tokenizer, _normalize(messages)[0])


def _render(tokenizer, template_messages: list[dict]) -> str:
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template")
    return tokenizer.apply_chat_template(template_messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer, messages: Sequence[Mapping[str, Any]], image_token_id: int,
               num_image_tokens: Sequence[int]) -> list[int]:
    """Token ids of ``messages`` with the ``i``-th image placeholder repeated ``num_image_tokens[i]`` times.

    Raises ``ValueError`` for malformed messages, a count that does not match the image parts,
    or text that itself contains the image placeholder (it would take an image's place).
    """
    return expand_image_tokens(template_ids(tokenizer, messages, image_token_id), image_token_id, num_image_tokens)


def template_ids(tokenizer, messages: Sequence[Mapping[str, Any]], image_token_id: int) -> list[int]:
    """Token ids of the chat template for ``messages``, one ``image_token_id`` per image part (what
    the router sends to prefill, which expands each to the image's token count)."""
    template_messages, parts = _normalize(messages)
    text = _render(tokenizer, template_messages)
    # NOTE: as ProcessorMixin.apply_chat_template does: no second BOS when the template has one.
    bos = tokenizer.bos_token
    ids = tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
    num_images, num_placeholders = len(_image_parts(parts)), ids.count(image_token_id)
    if num_placeholders != num_images:
        raise ValueError(f"the prompt holds {num_placeholders} image placeholders for {num_images} images "
                         "(does a text part contain the image token?)")
    return ids


def check_max_tokens(max_tokens: int, num_prompt_tokens: int, max_model_len: int | None,
                     param: str = "max_tokens") -> None:
    """Raise ``ValueError`` (a 400) unless the prompt and ``max_tokens`` fit the model's positions:
    ``num_prompt_tokens + max_tokens <= max_model_len``, vLLM's rule. ``param`` names the request field."""
    if max_model_len is not None and num_prompt_tokens + max_tokens > max_model_len:
        raise ValueError(f"{param}={max_tokens} exceeds the model's context of {max_model_len} minus the "
                         f"prompt's {num_prompt_tokens} tokens (at most {max(max_model_len - num_prompt_tokens, 0)})")


def expand_image_tokens(ids: Sequence[int], image_token_id: int, num_image_tokens: Sequence[int]) -> list[int]:
    """``ids`` with its ``i``-th ``image_token_id`` repeated ``num_image_tokens[i]`` times."""
    positions = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(num_image_tokens) != len(positions):
        raise ValueError(f"{len(num_image_tokens)} image token counts given for {len(positions)} image placeholders "
                         "in the prompt")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in num_image_tokens):
        raise ValueError(f"{list(num_image_tokens)=} must be ints >= 1")
    out: list[int] = []
    start = 0
    for pos, count in zip(positions, num_image_tokens):
        out.extend(ids[start:pos])
        out.extend([image_token_id] * count)
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
            elif kind == "image_url" and isinstance(part.get("image_url"), Mapping) \
                    and isinstance(part["image_url"].get("url"), str):
                parts.append({"type": "image"})
            else:
                raise ValueError(f"messages[{i}].content[{j}] must be a text part or an image_url part with a url")
            parts_in_order.append(dict(part))
        template_messages.append({"role": message["role"], "content": parts})
    return template_messages, parts_in_order


def _image_parts(parts: list[dict]) -> list[dict]:
    return [p for p in parts if p["type"] == "image_url"]

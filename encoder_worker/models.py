"""Built-in tiny checkpoints, generated locally: no network, ever.

``tiny-llava`` is a LLaVA-1.5-architecture checkpoint in the llava-hf layout (CLIP ViT at
336 px / patch 14 → 576 image tokens, a 2-layer MLP projector, a small Llama) with seeded random
weights; ``tiny-qwen2-vl`` is a Qwen2-VL checkpoint (variable token counts per image). Both come
with a tokenizer trained here with the ``tokenizers`` library, a chat template and an image
processor config, so ``from_pretrained(dir)`` of the model, tokenizer and processor all work.

Same seed → bit-identical files. ``ensure_model`` builds a built-in model once into the data dir
(built in a temp dir, then renamed: a crash never leaves a half-written model behind), showing its
steps on standard error (``mmcache.common.progress``: a bar on a terminal, plain lines in a
worker's log), as it shows a wait on another process's build.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.utils import logging as hf_logging

from mmcache.common.progress import Progress, human_bytes

Steps = Callable[[int, int, str], None]
"""``progress(done, total, what)`` after each step of a build; ``what`` says what was done."""

TOKENIZER_VOCAB_SIZE = 512
"""Target vocabulary size of the built-in BPE tokenizers (256 byte symbols + specials + merges)."""

# NOTE: a fixed built-in text makes the trained tokenizer reproducible; its content only decides
# which merges exist, not whether any text can be encoded (byte-level BPE covers every string).
_CORPUS = """\
USER: What is shown in this image? ASSISTANT: The image shows a small cat sitting on a red mat
next to a window. USER: Describe the picture in detail. ASSISTANT: There is a dog, a tree and a
blue car on the street. The sky is clear and the light is warm in the afternoon.
Please describe what you see. What color is the object on the left? How many people are there?
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
Images are encoded once and their tokens are cached for the language model to read.
The encoder turns pixels into embeddings; the prefill worker splices them into the prompt and
the decode worker writes the answer one token at a time. Hello, world! Thank you. Yes, no, maybe.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Colors: red green blue yellow black white orange.
"""

_LLAVA_CHAT_TEMPLATE = r"""
{%- for message in messages -%}
{{- message['role'].upper() + ': ' -}}
{%- if message['content'] is string -%}{{- message['content'] -}}
{%- else -%}{%- for part in message['content'] -%}
{%- if part['type'] in ['image', 'image_url'] -%}{{- '<image>\n' -}}
{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}
{%- endfor -%}{%- endif -%}
{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}
{{- '\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}
""".strip()

_QWEN_CHAT_TEMPLATE = r"""
{%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\n' -}}
{%- if message['content'] is string -%}{{- message['content'] -}}
{%- else -%}{%- for part in message['content'] -%}
{%- if part['type'] in ['image', 'image_url'] -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
{%- elif part['type'] in ['video', 'video_url'] -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}
{%- endfor -%}{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
""".strip()


def _train_bpe(special_tokens: list[str], bos_token: str | None) -> Tokenizer:
    """A byte-level BPE trained on ``_CORPUS``; special tokens first, so their ids are 0, 1, ..."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB_SIZE, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS], trainer=trainer)
    if bos_token is not None:  # Llama-style: every encoded text starts with <s>
        bos_id = tok.token_to_id(bos_token)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, bos_id)])
    return tok


TINY_STEPS = 4
"""Steps of ``build_tiny_llava`` and ``build_tiny_qwen2_vl``: the tokenizer trained, the weights
made, the weights saved, the processor and tokenizer saved."""


def _no_steps(done: int, total: int, what: str) -> None:
    pass


def build_tiny_llava(out_dir: str | os.PathLike, seed: int = 0, progress: Steps | None = None) -> str:
    """Write a tiny LLaVA-1.5 checkpoint (model, tokenizer, processor) into ``out_dir``; return it.
    ``progress``: called after each of its ``TINY_STEPS`` steps."""
    from transformers import CLIPImageProcessorPil

    step = progress or _no_steps
    out = Path(out_dir)
    tok = _train_bpe(["<unk>", "<s>", "</s>", "<pad>", "<image>"], bos_token="<s>")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, chat_template=_LLAVA_CHAT_TEMPLATE)
    ids = {t: tok.token_to_id(t) for t in ("<s>", "</s>", "<pad>", "<image>")}
    vision_config = CLIPVisionConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        image_size=336, patch_size=14, projection_dim=64, hidden_act="quick_gelu")
    text_config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=ids["<image>"],
        image_seq_length=576, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    step(1, TINY_STEPS, f"tokenizer trained ({tok.get_vocab_size()} tokens)")
    _save_seeded(LlavaForConditionalGeneration, config, seed, out, step, 2)

    # NOTE: the PIL backend is named explicitly: it exists without torchvision, and saves as
    # "CLIPImageProcessor", so loaders pick whichever backend their machine has.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True,
        do_convert_rgb=True, resample=3, image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=_LLAVA_CHAT_TEMPLATE)
    processor.save_pretrained(out)  # processor_config.json, tokenizer files, chat_template.jinja
    image_processor.save_pretrained(out)  # preprocessor_config.json too, as llava-hf checkpoints have
    step(4, TINY_STEPS, "processor and tokenizer saved")
    return str(out)


def build_llava_clip_l336_small(out_dir: str | os.PathLike, seed: int = 0, progress: Steps | None = None) -> str:
    """CLIP ViT-L/14-336 (random, bf16) in front of a small Llama (~0.13B: hidden 1024, 12 layers,
    GQA 16/4 heads, MLP 2816): the EPD benchmark's ``realistic`` profile, where an image costs
    about what the prompt's prefill costs, as in the small LLaVA-style models (a 0.3-0.4B vision
    tower before a 0.5B language model)."""
    return build_llava_clip_l336(out_dir, seed, text_hidden=1024, text_layers=12, text_heads=16, text_kv_heads=4,
                                 text_intermediate=2816, text_positions=8192, progress=progress)


def build_llava_clip_l336(out_dir: str | os.PathLike, seed: int = 0, text_hidden: int = 4096, text_layers: int = 1,
                          text_heads: int = 1, text_kv_heads: int = 1, text_intermediate: int = 256,
                          text_positions: int = 4096, progress: Steps | None = None) -> str:
    """Write a LLaVA-1.5-7B-shaped vision side with seeded random weights into ``out_dir``; return it.

    The vision tower is CLIP ViT-L/14 at 336 px (hidden 1024, 24 layers, 16 heads, MLP 4096, 577
    positions → 576 image tokens) and the projector is the 2-layer gelu MLP into ``text_hidden``,
    as in llava-1.5-7b; saved in bf16 (~0.65 GB). For sizing and benchmarks: the encode cost and
    the entry size are a real 7B LLaVA's, the embeddings are noise. ``progress``: after each of
    ``TINY_STEPS`` + 2 steps.
    """
    step = progress or _no_steps
    total = TINY_STEPS + 2
    out = Path(build_tiny_llava(out_dir, seed, lambda done, _, what: step(done, total, f"tiny-llava base: {what}")))
    # NOTE: tiny-llava's tokenizer, chat template and image processor are kept as written above; its
    # model files are overwritten below. The text model is one layer with a single 64-wide attention
    # head and a 256-wide MLP: the projector needs its hidden size, nothing needs its quality, and a
    # full 7B Llama would add 13 GB to a checkpoint whose language model the encoder never reads.
    tiny = LlavaConfig.from_pretrained(out)
    vision_config = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text_config = LlamaConfig(
        vocab_size=tiny.text_config.vocab_size, hidden_size=text_hidden, intermediate_size=text_intermediate,
        num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=text_kv_heads,
        head_dim=text_hidden // text_heads if text_heads > 1 else 64, max_position_embeddings=text_positions,
        bos_token_id=tiny.text_config.bos_token_id, eos_token_id=tiny.text_config.eos_token_id,
        pad_token_id=tiny.text_config.pad_token_id)
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=tiny.image_token_id,
        image_seq_length=576, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    step(TINY_STEPS + 1, total, f"CLIP ViT-L/14-336 weights made ({_parameters(model)}, seed {seed})")
    # NOTE: initialised in float32 (same values as a float32 build), then rounded once to bf16.
    with _no_hf_bars():
        model.to(torch.bfloat16).save_pretrained(out)
    _vision_tower_in_vllm_layout(out)
    step(total, total, f"weights saved in bfloat16 ({_weights_size(out)})")
    return str(out)


def build_tiny_qwen2_vl(out_dir: str | os.PathLike, seed: int = 0, progress: Steps | None = None) -> str:
    """Write a tiny Qwen2-VL checkpoint (model, tokenizer, image processor) into ``out_dir``.

    Images are resized to at most 28*28*64 pixels, so at most 64 image tokens each. ``progress``:
    called after each of its ``TINY_STEPS`` steps.
    """
    from transformers import Qwen2VLImageProcessorPil

    step = progress or _no_steps
    out = Path(out_dir)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tok = _train_bpe(specials, bos_token=None)
    ids = {t: tok.token_to_id(t) for t in specials}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
        chat_template=_QWEN_CHAT_TEMPLATE)
    config = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=64, hidden_size=128, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        # NOTE: mrope_section splits head_dim/2 = 16 rotary frequencies over (t, h, w).
        text_config=dict(vocab_size=tok.get_vocab_size(), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [4, 6, 6]}),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    step(1, TINY_STEPS, f"tokenizer trained ({tok.get_vocab_size()} tokens)")
    _save_seeded(Qwen2VLForConditionalGeneration, config, seed, out, step, 2)
    # NOTE: no Qwen2VLProcessor: in transformers 5 it requires a video processor, which needs
    # torchvision. The image processor and tokenizer are saved on their own.
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 64).save_pretrained(out)
    tokenizer.save_pretrained(out)
    step(4, TINY_STEPS, "image processor and tokenizer saved")
    return str(out)


def _save_seeded(model_class: type, config, seed: int, out: Path, step: Steps, first_step: int) -> None:
    """Steps ``first_step`` (the weights made) and ``first_step + 1`` (saved) of ``TINY_STEPS``."""
    # NOTE: fork_rng keeps the caller's global RNG untouched by the seeding.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    step(first_step, TINY_STEPS, f"weights made ({model_class.__name__}, {_parameters(model)}, seed {seed})")
    with _no_hf_bars():
        model.save_pretrained(out)
    _vision_tower_in_vllm_layout(out)
    step(first_step + 1, TINY_STEPS, f"weights saved ({_weights_size(out)})")


def _vision_tower_in_vllm_layout(out: Path) -> None:
    """Rename a LLaVA checkpoint's CLIP tower keys ``vision_tower.*`` (as transformers 5.x saves
    them) to ``vision_tower.vision_model.*`` (the llava-hf layout), in place.

    NOTE: vLLM loads the tower only under the llava-hf names, and transformers reads both (its
    conversion mapping strips ``vision_model``), so one checkpoint serves mmcache's own workers
    and ``vllm serve``. A checkpoint with no such keys (Qwen2-VL) is left as is."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    def renamed(key: str) -> str:
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            return "vision_tower.vision_model." + key[len("vision_tower."):]
        return key

    for path in sorted(out.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            metadata, keys = f.metadata(), list(f.keys())
        if all(renamed(k) == k for k in keys):
            continue
        tensors = load_file(path)
        save_file({renamed(k): v for k, v in tensors.items()}, path, metadata=metadata)
    index = out / "model.safetensors.index.json"
    if index.exists():
        doc = json.loads(index.read_text())
        doc["weight_map"] = {renamed(k): v for k, v in doc.get("weight_map", {}).items()}
        index.write_text(json.dumps(doc, indent=2))


def _parameters(model: torch.nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e9:.2f}B parameters" if n >= 1e9 else f"{n / 1e6:.1f}M parameters"


def _weights_size(out: Path) -> str:
    return human_bytes(sum(f.stat().st_size for f in out.glob("*.safetensors")))


@contextlib.contextmanager
def _no_hf_bars() -> Iterator[None]:
    """transformers' own "Writing model shards" bar off while a build saves: the build's steps
    are its progress. NOTE: the switch is process-wide; a build is a start-up step, nothing else
    saves meanwhile."""
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


BUILTIN_MODELS: dict[str, Callable[[str | os.PathLike, int, Steps | None], str]] = {
    "tiny-llava": build_tiny_llava,
    "tiny-qwen2-vl": build_tiny_qwen2_vl,
    "llava-clip-l336-random": build_llava_clip_l336,
    "llava-clip-l336-small": build_llava_clip_l336_small,
}


def ensure_model(name_or_dir: str | os.PathLike, data_dir: str | os.PathLike) -> str:
    """A local model directory for ``name_or_dir``.

    A built-in name is built into ``<data_dir>/models/<name>`` on first use and reused after; an
    existing directory is returned as is. Built-in names win over same-named relative paths
    (pass ``./tiny-llava`` for the directory). A build shows its steps on standard error, and a
    process that waits for another one's build says so when it starts and ends waiting.
    """
    name = os.fspath(name_or_dir)
    builder = BUILTIN_MODELS.get(name)
    if builder is None:
        if Path(name).expanduser().is_dir():
            return str(Path(name).expanduser())
        raise ValueError(f"model={name!r} is neither an existing directory nor a built-in model "
                         f"({', '.join(sorted(BUILTIN_MODELS))})")
    target = Path(data_dir) / "models" / name
    if target.is_dir():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # NOTE: the workers of one stack start together; one builds while the others wait on the
    # lock and then find the directory (the rename keeps a killed build from leaving half a model).
    with open(target.parent / f".{name}.lock", "a") as lock:
        _lock(lock, name, target)
        if target.is_dir():
            return str(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
        try:
            with Progress(f"model {name}", unit="steps") as progress:
                progress.note(f"building into {target} (first use: seeded random weights, built once)")
                builder(tmp, 0, progress=_timed(progress.callback()))
            tmp.chmod(0o755)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _lock(lock, name: str, target: Path) -> None:
    """``lock`` held exclusively; a wait for another process's build is said, once at its start
    and once at its end (``mmcache up``'s workers log a line each, not a line a second)."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    # NOTE: two notes only, no count: a Progress without a bar, never closed (its last line would
    # count nothing).
    waiting = Progress(f"model {name}", bar=False)
    waiting.note(f"waiting for another process building it into {target}")
    fcntl.flock(lock, fcntl.LOCK_EX)
    waited = f"{waiting.elapsed_s():.1f} s"
    waiting.note(f"built by the other process; waited {waited}" if target.is_dir() else
                 f"the other process left no model after {waited} (it failed or was killed); building it here")


def _timed(report: Steps) -> Steps:
    """``report`` with each step's seconds appended to its ``what``."""
    last = [time.monotonic()]

    def step(done: int, total: int, what: str) -> None:
        now = time.monotonic()
        report(done, total, f"{what}, {now - last[0]:.1f} s")
        last[0] = now
    return step

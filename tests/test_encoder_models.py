"""Built-in tiny checkpoints, the vision-only Encoder and namespaces, on the CPU and offline."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    LlamaConfig,
    LlavaForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)

from encoder_worker.encoder import Encoder
from encoder_worker.models import build_tiny_llava, build_tiny_qwen2_vl, ensure_model
from encoder_worker.namespace import compute_namespace, weights_digest
from mmcache_client.keys import validate_namespace


def _image(seed: int, height: int = 300, width: int = 400) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Any attempt to reach the hub fails loudly instead of hanging or downloading.
    # NOTE: patched, not set in the environment: huggingface_hub reads HF_HUB_OFFLINE at import.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture(scope="session")
def llava_encoder(llava_dir: str) -> Encoder:
    return Encoder.load(llava_dir)


@pytest.fixture(scope="session")
def llava_model(llava_dir: str) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()


def _copy_model(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- the built-in checkpoints ---

def test_tiny_llava_loads_with_transformers(llava_dir: str, llava_model) -> None:
    config = llava_model.config
    assert config.vision_config.image_size == 336 and config.vision_config.patch_size == 14
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    tokenizer = AutoTokenizer.from_pretrained(llava_dir)
    assert tokenizer.convert_tokens_to_ids("<image>") == config.image_token_id
    assert tokenizer("a <image> b").input_ids.count(config.image_token_id) == 1
    assert {"<s>", "</s>", "<unk>", "<pad>"} <= set(tokenizer.get_vocab())
    assert len(tokenizer) <= config.text_config.vocab_size
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        tokenize=False, add_generation_prompt=True)
    assert prompt == "USER: <image>\nWhat is this?\nASSISTANT:"
    processor = AutoProcessor.from_pretrained(llava_dir)
    inputs = processor(text=prompt, images=[_image(0)], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 336, 336)
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == 576


def test_tiny_builds_are_deterministic(tmp_path: Path, llava_dir: str, qwen_dir: str) -> None:
    for build, first in ((build_tiny_llava, llava_dir), (build_tiny_qwen2_vl, qwen_dir)):
        again = build(tmp_path / build.__name__)
        for name in ("model.safetensors", "tokenizer.json", "config.json"):
            assert (Path(again) / name).read_bytes() == (Path(first) / name).read_bytes(), name
    other_seed = build_tiny_llava(tmp_path / "seed1", seed=1)
    assert (Path(other_seed) / "model.safetensors").read_bytes() != (Path(llava_dir) / "model.safetensors").read_bytes()


# --- LLaVA encoding ---

def test_llava_encoder_loads_only_the_vision_side(llava_encoder: Encoder, llava_model) -> None:
    names = list(llava_encoder.vision.state_dict())
    assert names and all(n.startswith(("vision_tower.", "multi_modal_projector.")) for n in names)
    num_params = sum(p.numel() for p in llava_encoder.vision.parameters())
    assert num_params < sum(p.numel() for p in llava_model.parameters())
    assert llava_encoder.model_type == "llava" and llava_encoder.dtype == torch.float32
    assert llava_encoder.hidden_size == llava_model.config.text_config.hidden_size


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llava_embeddings_are_bit_exact(llava_dir: str, dtype: torch.dtype) -> None:
    encoder = Encoder.load(llava_dir, dtype=dtype)
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype=dtype).eval()
    image = _image(0)
    encoded = encoder.encode([image])[0]
    pixel_values = AutoImageProcessor.from_pretrained(llava_dir)(images=[image], return_tensors="pt")["pixel_values"]
    config = model.config
    with torch.inference_mode():
        reference = model.get_image_features(
            pixel_values=pixel_values.to(dtype), vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy).pooler_output[0]
    assert encoded.embeddings.shape == (576, config.text_config.hidden_size)
    assert encoded.embeddings.dtype == dtype == encoder.dtype
    assert torch.equal(encoded.embeddings, reference)
    assert encoded.extras == {} and encoded.encode_ms > 0
    assert encoder.num_image_tokens(image) == 576


def test_llava_embeddings_are_what_the_llm_consumes(llava_dir: str, llava_encoder: Encoder, llava_model) -> None:
    """Splicing our embeddings into inputs_embeds gives the logits of the model fed the pixels."""
    image = _image(1)
    processor = AutoProcessor.from_pretrained(llava_dir)
    inputs = processor(text="USER: <image>\nWhat is this?\nASSISTANT:", images=[image], return_tensors="pt")
    embeddings = llava_encoder.encode([image])[0].embeddings
    with torch.inference_mode():
        expected = llava_model(**inputs).logits
        inputs_embeds = llava_model.get_input_embeddings()(inputs["input_ids"]).clone()
        inputs_embeds[inputs["input_ids"] == llava_model.config.image_token_id] = embeddings
        actual = llava_model(inputs_embeds=inputs_embeds, attention_mask=inputs["attention_mask"]).logits
    assert torch.equal(actual, expected)


def test_llava_batch_matches_single(llava_encoder: Encoder) -> None:
    images = [_image(10), _image(11, 200, 500), _image(12, 336, 336).convert("L")]
    batched = llava_encoder.encode(images)
    assert llava_encoder.encode([]) == []
    for image, encoded in zip(images, batched):
        alone = llava_encoder.encode([image])[0].embeddings
        torch.testing.assert_close(encoded.embeddings, alone, rtol=1e-5, atol=1e-6)


def test_llava_hub_layout_and_shards_load_the_same(tmp_path: Path, llava_dir: str, llava_encoder: Encoder) -> None:
    """The CLIP tower's tensors are named vision_tower.vision_model.* in llava-hf hub checkpoints (and
    the built-in models, for vLLM) and vision_tower.* where transformers 5.x saved them; either
    way, in shards or not, they load the same."""
    assert any(k.startswith("vision_tower.vision_model.") for k in load_file(Path(llava_dir) / "model.safetensors"))
    hub_dir = _copy_model(llava_dir, tmp_path / "hub")
    tensors = load_file(hub_dir / "model.safetensors")
    (hub_dir / "model.safetensors").unlink()
    renamed = {k.replace("vision_tower.vision_model.", "vision_tower.", 1): v for k, v in tensors.items()}
    names = sorted(renamed)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        filename = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: renamed[k] for k in part}, hub_dir / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, filename))
    (hub_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    encoder = Encoder.load(hub_dir)
    image = _image(2)
    assert torch.equal(encoder.encode([image])[0].embeddings, llava_encoder.encode([image])[0].embeddings)
    assert encoder.namespace == llava_encoder.namespace


# --- Qwen2-VL encoding ---

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwen2_vl_variable_token_counts_match_the_model(qwen_dir: str, dtype: torch.dtype) -> None:
    encoder = Encoder.load(qwen_dir, dtype=dtype)
    model = Qwen2VLForConditionalGeneration.from_pretrained(qwen_dir, dtype=dtype).eval()
    images = [_image(3, 300, 400), _image(4, 100, 120)]
    encoded = encoder.encode(images)
    batch = AutoImageProcessor.from_pretrained(qwen_dir)(images=images, return_tensors="pt")
    with torch.inference_mode():
        reference = model.get_image_features(
            pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"]).pooler_output
    counts = [e.embeddings.shape[0] for e in encoded]
    assert counts[0] != counts[1]
    assert counts == [encoder.num_image_tokens(image) for image in images]
    for i, (e, ref) in enumerate(zip(encoded, reference)):
        assert torch.equal(e.embeddings, ref)
        grid = e.extras["image_grid_thw"]
        assert grid.dtype == torch.int64 and grid.shape == (1, 3)
        assert torch.equal(grid[0], batch["image_grid_thw"][i])
        assert int(grid.prod()) // 4 == counts[i]
    assert encoder.model_type == "qwen2_vl" and encoder.namespace.startswith("qwen2_vl.")
    tokenizer = AutoTokenizer.from_pretrained(qwen_dir)
    for token in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"):
        assert len(tokenizer(token).input_ids) == 1
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id


def test_encoder_rejects_what_it_cannot_load(tmp_path: Path, llava_dir: str) -> None:
    LlamaConfig(num_hidden_layers=1).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="llava"):
        Encoder.load(tmp_path / "llama")
    with pytest.raises(ValueError, match="floating-point"):
        Encoder.load(llava_dir, dtype="int8")


# --- namespaces ---

def test_namespace_is_stable_and_readable(llava_dir: str, llava_encoder: Encoder) -> None:
    assert Encoder.load(llava_dir).namespace == llava_encoder.namespace
    assert validate_namespace(llava_encoder.namespace) == llava_encoder.namespace
    assert llava_encoder.namespace.startswith("llava.clip336.f32.")


def test_namespace_follows_vision_weights_only(tmp_path: Path, llava_dir: str, llava_encoder: Encoder) -> None:
    def perturbed(name: str, key_part: str) -> str:
        model_dir = _copy_model(llava_dir, tmp_path / name)
        tensors = load_file(model_dir / "model.safetensors")
        key = next(k for k in sorted(tensors) if key_part in k)
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] += 1.0
        save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
        return Encoder.load(model_dir).namespace

    assert perturbed("vision", "vision_tower.") != llava_encoder.namespace
    assert perturbed("projector", "multi_modal_projector.") != llava_encoder.namespace
    assert perturbed("llm", "language_model.") == llava_encoder.namespace  # the LLM does not change embeddings


def test_namespace_follows_processor_dtype_and_salt(tmp_path: Path, llava_dir: str, llava_encoder: Encoder) -> None:
    model_dir = _copy_model(llava_dir, tmp_path / "processor")
    for name in ("processor_config.json", "preprocessor_config.json"):
        config = json.loads((model_dir / name).read_text())
        (config.get("image_processor") or config)["image_mean"] = [0.5, 0.5, 0.5]
        (model_dir / name).write_text(json.dumps(config))
    bf16 = Encoder.load(llava_dir, dtype=torch.bfloat16).namespace
    assert Encoder.load(llava_dir, dtype="bfloat16").namespace == bf16
    namespaces = {
        llava_encoder.namespace,
        Encoder.load(model_dir).namespace,
        bf16,
        Encoder.load(llava_dir, salt="tenant-a").namespace,
        Encoder.load(llava_dir, salt="tenant-b").namespace,
    }
    assert len(namespaces) == 5
    assert all(validate_namespace(ns) for ns in namespaces)
    assert "tenant" not in "".join(namespaces)  # the salt is mixed in, never shown


def test_compute_namespace_inputs() -> None:
    config = {"model_type": "llava", "vision_config": {"model_type": "clip_vision_model", "image_size": 336},
              "text_config": {"hidden_size": 4096}, "_name_or_path": "/some/dir", "transformers_version": "5.23.0"}
    processor = {"image_mean": [0.5, 0.5, 0.5], "resample": 3}
    digest = weights_digest({"w": torch.ones(2, 3)})
    base = compute_namespace(config, digest, processor, torch.float16)
    assert base.startswith("llava.clip336.f16.") and len(base.rsplit(".", 1)[1]) == 16
    assert compute_namespace(config, digest, processor, "float16") == base
    moved = {**config, "_name_or_path": "/elsewhere", "transformers_version": "5.24.0",
             "text_config": {"hidden_size": 8}}
    assert compute_namespace(moved, digest, processor, torch.float16) == base  # metadata and LLM-only fields
    assert compute_namespace({**config, "vision_feature_layer": -1}, digest, processor, torch.float16) != base
    assert compute_namespace(config, digest, {**processor, "resample": 2}, torch.float16) != base
    assert compute_namespace(config, digest, processor, torch.float16, salt="s") != base
    assert weights_digest({"w": torch.ones(2, 3, dtype=torch.bfloat16)}) != digest
    assert weights_digest({"w": torch.ones(3, 2)}) != digest
    assert weights_digest({"v": torch.ones(2, 3)}) != digest
    with pytest.raises(ValueError):
        compute_namespace(config, digest, processor, "not-a-dtype")


# --- ensure_model ---

def test_ensure_model_builds_once(tmp_path: Path, llava_dir: str) -> None:
    model_dir = ensure_model("tiny-llava", tmp_path)
    assert Path(model_dir) == tmp_path / "models" / "tiny-llava"
    weights = Path(model_dir) / "model.safetensors"
    assert weights.read_bytes() == (Path(llava_dir) / "model.safetensors").read_bytes()
    mtime_ns = weights.stat().st_mtime_ns
    assert ensure_model("tiny-llava", tmp_path) == model_dir
    assert weights.stat().st_mtime_ns == mtime_ns
    assert sorted(os.listdir(tmp_path / "models")) == [".tiny-llava.lock", "tiny-llava"]  # no temp dirs left behind
    assert ensure_model(llava_dir, tmp_path) == llava_dir
    with pytest.raises(ValueError, match="tiny-llava"):
        ensure_model("llava-hf/llava-1.5-7b-hf", tmp_path)


@pytest.mark.gpu
def test_encoder_on_cuda(llava_dir: str, llava_encoder: Encoder) -> None:
    encoder = Encoder.load(llava_dir, device="cuda")
    image = _image(5)
    encoded = encoder.encode([image])[0]
    assert encoded.embeddings.device.type == "cuda"
    assert encoder.namespace == llava_encoder.namespace  # same weights, dtype and processor
    # NOTE: loose: cuDNN convolutions may use TF32.
    torch.testing.assert_close(encoded.embeddings.cpu(), llava_encoder.encode([image])[0].embeddings,
                               rtol=1e-2, atol=1e-2)



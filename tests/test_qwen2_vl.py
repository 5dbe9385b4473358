"""Qwen2-VL in process: M-RoPE positions equal ``get_rope_index``'s; the engine's prefill + batched
decode equal ``Qwen2VLForConditionalGeneration.generate`` for images of different sizes and for a
video; a clip encoded group by group (the cache's unit) equals the model's own video features."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from encoder_worker.encoder import Encoder
from encoder_worker.models import build_tiny_qwen2_vl
from encoder_worker.video import VideoLimits, VideoSampling, decode_video
from llm_worker.engine.engine import LLMEngine
from llm_worker.engine.sampling import SamplingParams
from llm_worker.engine.text_models import rope_positions

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from clips import feed, make_clip  # noqa: E402

GREEDY = SamplingParams(max_tokens=12, temperature=0)
SIZES = [(60, 90), (120, 80), (200, 200), (56, 300), (150, 64)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen") / "tiny-qwen2-vl")


@pytest.fixture(scope="module")
def hf(model_dir):
    return Qwen2VLForConditionalGeneration.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def engine(model_dir):
    return LLMEngine.load(model_dir)


@pytest.fixture(scope="module")
def encoder(model_dir):
    return Encoder.load(model_dir)


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*SIZES[i % len(SIZES)], 3), dtype=np.uint8)) for i in range(n)]


def conversation(num_images: int, video: bool = False) -> list[dict]:
    parts: list[dict] = [{"type": "text", "text": "Look:"}]
    for i in range(num_images):
        parts += [{"type": "image_url", "image_url": {"url": f"https://example.com/{i}.png"}},
                  {"type": "text", "text": f"and {i}"}]
    if video:
        parts.append({"type": "video_url", "video_url": {"url": "https://example.com/clip.mkv"}})
    parts.append({"type": "text", "text": "What is shown?"})
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts}]


def type_ids(engine: LLMEngine, ids: list[int]) -> torch.Tensor:
    t = torch.tensor([ids])
    return (t == engine.image_token_id).int() + 2 * (t == engine.video_token_id).int()


def run_engine(engine: LLMEngine, ids, image_embeddings, image_grids, videos=(), video_grids=()) -> list[int]:
    prefill = engine.prefill(ids, image_embeddings, GREEDY, image_grids=image_grids, video_embeddings=videos,
                             video_grids=video_grids)
    state = engine.start("r", prefill, GREEDY)
    batch = engine.new_batch()
    batch.add(state)
    while len(batch):
        batch.step()
    return state.token_ids


@pytest.mark.parametrize("grids", [
    ([[1, 4, 6]], []),
    ([[1, 4, 6], [1, 8, 4], [1, 14, 14]], []),
    ([[1, 2, 20]], [[3, 4, 6]]),
    ([], [[5, 6, 4]]),
    ([[1, 4, 4]], [[8, 4, 4]]),  # NOTE: more temporal steps than max(h, w) / merge
])
def test_mrope_positions_equal_get_rope_index(hf, engine, grids):
    image_grids, video_grids = grids
    merge = engine.merge_size
    ids: list[int] = [7, 8, 9]
    for g in image_grids:
        ids += [3] + [engine.image_token_id] * (g[0] * g[1] * g[2] // merge**2) + [4, 10, 11]
    for g in video_grids:
        ids += [3] + [engine.video_token_id] * (g[0] * g[1] * g[2] // merge**2) + [4, 12]
    ids += [13, 14]
    want, want_delta = hf.model.get_rope_index(
        torch.tensor([ids]), type_ids(engine, ids),
        image_grid_thw=torch.tensor(image_grids) if image_grids else None,
        video_grid_thw=torch.tensor(video_grids) if video_grids else None)
    got, delta = rope_positions(ids, engine.image_token_id, engine.video_token_id, image_grids, video_grids, merge)
    assert torch.equal(got, want[:, 0]) and delta == int(want_delta)


def test_mrope_refuses_grids_that_do_not_fit(engine):
    ids = [1, engine.image_token_id, engine.image_token_id, 2]
    with pytest.raises(ValueError, match="does not fit its grid"):
        rope_positions(ids, engine.image_token_id, engine.video_token_id, [[1, 4, 4]], [], 2)
    with pytest.raises(ValueError, match="more image grids"):
        rope_positions([1, 2], engine.image_token_id, engine.video_token_id, [[1, 2, 2]], [], 2)
    with pytest.raises(ValueError, match="more image runs"):
        rope_positions(ids, engine.image_token_id, engine.video_token_id, [], [], 2)


@pytest.mark.parametrize("num_images", [1, 3, 5])
def test_prefill_and_decode_equal_generate(hf, engine, encoder, num_images):
    ims = images(num_images, seed=num_images)
    encoded = encoder.encode(ims)
    grids = [e.extras["image_grid_thw"][0].tolist() for e in encoded]
    assert len({tuple(g) for g in grids}) == num_images  # NOTE: every image its own size: its own token count
    ids = engine.prompt_ids(conversation(num_images), [e.embeddings.shape[0] for e in encoded])
    got = run_engine(engine, ids, [e.embeddings for e in encoded], grids)
    pixels = encoder.image_processor(images=ims, return_tensors="pt")
    inp = torch.tensor([ids])
    out = hf.generate(input_ids=inp, attention_mask=torch.ones_like(inp), pixel_values=pixels["pixel_values"],
                      image_grid_thw=pixels["image_grid_thw"], mm_token_type_ids=type_ids(engine, ids),
                      max_new_tokens=GREEDY.max_tokens, do_sample=False)
    assert got == out[0, len(ids):].tolist()


def reference_video_pixels(frames: list[np.ndarray], processor) -> tuple[torch.Tensor, torch.Tensor]:
    """``pixel_values_videos`` and ``video_grid_thw`` for ``frames`` as Qwen2-VL's video processor
    lays them out (its view/permute of the whole clip), from the image processor's resize and
    normalization: independent of the encoder's group-by-group patching."""
    h, w = frames[0].shape[:2]
    rh, rw = smart_resize(h, w, factor=28, min_pixels=processor.size["shortest_edge"],
                          max_pixels=processor.size["longest_edge"])
    arrays = []
    for f in frames:
        x = np.asarray(Image.fromarray(f).resize((rw, rh), resample=Image.BICUBIC), dtype=np.float32)
        x = processor.normalize(processor.rescale(x.transpose(2, 0, 1), processor.rescale_factor),
                                processor.image_mean, processor.image_std)
        arrays.append(x)
    if len(arrays) % 2:
        arrays.append(arrays[-1])
    v = torch.tensor(np.stack(arrays))[None]
    _, t, c, hh, ww = v.shape
    p, m, tp = 14, 2, 2
    patches = v.view(1, t // tp, tp, c, hh // p // m, m, p, ww // p // m, m, p).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return patches.reshape(t // tp * (hh // p) * (ww // p), c * tp * p * p), torch.tensor([[t // tp, hh // p, ww // p]])


def test_a_clip_encoded_by_groups_equals_the_models_video_features(hf, encoder):
    frames = feed(14, size=(70, 100))
    clip = decode_video(make_clip(frames), VideoSampling(fps=2, max_frames=16), VideoLimits(), encoder.group_size)
    assert clip.num_frames == 7 and len(clip.groups) == 4 and clip.groups[-1].num_frames == 1
    sampled = [frames[i] for i in range(0, 14, 2)]
    assert all(np.array_equal(np.asarray(g.frames[k]), sampled[min(2 * j + k, 6)])
               for j, g in enumerate(clip.groups) for k in range(2))
    encoded = encoder.encode(list(clip.groups))
    pixels, grid = reference_video_pixels(sampled, encoder.image_processor)
    with torch.no_grad():
        want = hf.model.get_video_features(pixels, grid).pooler_output[0]
    assert torch.allclose(torch.cat([e.embeddings for e in encoded]), want, atol=1e-5)
    assert [e.extras["video_grid_thw"].tolist() for e in encoded] == [[[1, grid[0, 1].item(), grid[0, 2].item()]]] * 4


def test_a_video_answer_equals_generate(hf, engine, encoder):
    frames = feed(12, size=(90, 60), seed=3)
    clip = decode_video(make_clip(frames), VideoSampling(fps=2, max_frames=16), VideoLimits(), encoder.group_size)
    stills = images(2, seed=9)
    enc_images, enc_groups = encoder.encode(stills), encoder.encode(list(clip.groups))
    image_grids = [e.extras["image_grid_thw"][0].tolist() for e in enc_images]
    steps = [e.extras["video_grid_thw"][0].tolist() for e in enc_groups]
    video_grid = [sum(s[0] for s in steps), *steps[0][1:]]
    ids = engine.prompt_ids(conversation(2, video=True), [e.embeddings.shape[0] for e in enc_images],
                            [sum(e.embeddings.shape[0] for e in enc_groups)])
    got = run_engine(engine, ids, [e.embeddings for e in enc_images], image_grids,
                     [[e.embeddings for e in enc_groups]], [video_grid])
    pixels = encoder.image_processor(images=stills, return_tensors="pt")
    video_pixels, video_grid_thw = reference_video_pixels([frames[i] for i in range(0, 12, 2)],
                                                          encoder.image_processor)
    assert video_grid_thw[0].tolist() == video_grid
    inp = torch.tensor([ids])
    out = hf.generate(input_ids=inp, attention_mask=torch.ones_like(inp), pixel_values=pixels["pixel_values"],
                      image_grid_thw=pixels["image_grid_thw"], pixel_values_videos=video_pixels,
                      video_grid_thw=video_grid_thw, mm_token_type_ids=type_ids(engine, ids),
                      max_new_tokens=GREEDY.max_tokens, do_sample=False)
    assert got == out[0, len(ids):].tolist()


def test_prefill_refuses_missing_grids_and_llava_style_videos(engine, encoder):
    encoded = encoder.encode(images(1))
    ids = engine.prompt_ids(conversation(1), [encoded[0].embeddings.shape[0]])
    with pytest.raises(ValueError, match="needs a grid"):
        engine.prefill(ids, [encoded[0].embeddings], GREEDY)
    with pytest.raises(ValueError, match="0 video tokens in the prompt"):
        engine.prefill(ids, [encoded[0].embeddings], GREEDY, image_grids=[[1, 2, 2]],
                       video_embeddings=[[encoded[0].embeddings]], video_grids=[[1, 2, 2]])

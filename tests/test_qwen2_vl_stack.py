"""Qwen2-VL and video through the whole stack as a user runs it: ``mmcache up --model
tiny-qwen2-vl`` (EPD) and ``--aggregated``, driven by the official ``openai`` client. Greedy EPD ==
aggregated == ``Qwen2VLForConditionalGeneration.generate`` for 1, 3 and 5 images of different
sizes and for a video; a clip sent twice encodes nothing the second time, and one overlapping it
by half encodes half its frames; bad videos are 400s naming the part, and the stack keeps serving.
A LLaVA stack takes a video's frames as images (``tests/test_stack.py`` covers its images)."""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import openai
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

from encoder_worker.models import ensure_model
from stack_process import StackProcess, up_for_tests
from test_qwen2_vl import reference_video_pixels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from clips import data_uri, feed, make_clip  # noqa: E402

pytestmark = pytest.mark.slow  # NOTE: whole stacks as child processes

MAX_TOKENS = 10
SIZES = [(60, 90), (120, 80), (200, 200), (56, 300), (150, 64)]
VIDEO = {"fps": 2, "max_frames": 16}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        return ensure_model("tiny-qwen2-vl", tmp_path_factory.mktemp("models"))


def _up(model_dir: str, *flags: str) -> StackProcess:
    return up_for_tests(model_dir, *flags, prefix="mmc-qwen-")


@pytest.fixture(scope="module")
def epd(model_dir):
    with _up(model_dir, "--encoders", "1") as up:  # NOTE: one encoder: its stats count every frame
        yield up
    assert up.proc.returncode == 0, "\n".join(up.output[-30:])


@pytest.fixture(scope="module")
def aggregated(model_dir):
    with _up(model_dir, "--aggregated") as up:
        yield up
    assert up.proc.returncode == 0, "\n".join(up.output[-30:])


@pytest.fixture(scope="module")
def hf(model_dir):
    return (Qwen2VLForConditionalGeneration.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir),
            AutoImageProcessor.from_pretrained(model_dir))


def png(seed: int, size: tuple[int, int]) -> tuple[str, Image.Image]:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), Image.open(buf).convert("RGB")


def chat(up: StackProcess, images: list[str], videos: list[str] = (), **kwargs):
    parts = [{"type": "text", "text": "Describe:"}, *({"type": "image_url", "image_url": {"url": u}} for u in images),
             *({"type": "video_url", "video_url": {"url": u}} for u in videos)]
    body = {"return_token_ids": True, **({"mm_processor_kwargs": VIDEO} if videos else {})}
    return openai.OpenAI(base_url=up.url + "/v1", api_key="unused", max_retries=0, timeout=120).chat.completions.create(
        model="tiny-qwen2-vl", messages=[{"role": "user", "content": parts}], max_tokens=MAX_TOKENS, temperature=0,
        extra_body=body, **kwargs)


def token_ids(completion) -> list[int]:
    return completion.choices[0].to_dict()["token_ids"]


def reference(hf, images: list[Image.Image], videos: list[list[np.ndarray]] = ()) -> list[int]:
    """``generate`` on the prompt as Qwen2VLProcessor builds it: the template, each placeholder
    repeated by its grid's token count, the pixels from the image processor."""
    model, tokenizer, processor = hf
    parts = [{"type": "text", "text": "Describe:"}, *({"type": "image"} for _ in images),
             *({"type": "video"} for _ in videos)]
    text = tokenizer.apply_chat_template([{"role": "user", "content": parts}], tokenize=False,
                                         add_generation_prompt=True)
    kwargs = {}
    if images:
        pixels = processor(images=images, return_tensors="pt")
        kwargs.update(pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"])
        for grid in pixels["image_grid_thw"]:
            text = text.replace("<|image_pad|>", "<|placeholder|>" * (int(grid.prod()) // 4), 1)
    if videos:
        made = [reference_video_pixels(v, processor) for v in videos]
        kwargs.update(pixel_values_videos=torch.cat([m[0] for m in made]), video_grid_thw=torch.cat([m[1] for m in made]))
        for _, grid in made:
            text = text.replace("<|video_pad|>", "<|vplaceholder|>" * (int(grid.prod()) // 4), 1)
    text = text.replace("<|placeholder|>", "<|image_pad|>").replace("<|vplaceholder|>", "<|video_pad|>")
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    types = (ids == model.config.image_token_id).int() + 2 * (ids == model.config.video_token_id).int()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types,
                         max_new_tokens=MAX_TOKENS, do_sample=False, **kwargs)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("num_images", [1, 3, 5])
def test_greedy_epd_equals_aggregated_equals_generate(epd, aggregated, hf, num_images):
    pairs = [png(500 + 10 * num_images + i, SIZES[i]) for i in range(num_images)]
    uris = [u for u, _ in pairs]
    disagg, agg = chat(epd, uris), chat(aggregated, uris)
    assert token_ids(disagg) == token_ids(agg) == reference(hf, [im for _, im in pairs])
    assert disagg.usage.model_dump() == agg.usage.model_dump()
    streamed = [i for c in chat(epd, uris, stream=True) if c.choices for i in c.choices[0].to_dict().get("token_ids", [])]
    assert streamed == token_ids(disagg)


def frames_of(stats: dict) -> tuple[int, int]:
    totals = stats["totals"]
    return totals["frames_encoded"], totals["frames_reused"]


def test_a_clip_twice_encodes_nothing_and_an_overlapping_one_half(epd, aggregated, hf):
    source = feed(32, size=(70, 100), seed=7)  # NOTE: 8 s at 4 fps; sampled at 2 fps
    first, overlapping = make_clip(source[:16]), make_clip(source[8:24])
    encoded0, reused0 = frames_of(epd.stats())
    answer = chat(epd, [], [data_uri(first)])
    encoded1, reused1 = frames_of(epd.stats())
    assert (encoded1 - encoded0, reused1 - reused0) == (8, 0)
    assert token_ids(answer) == token_ids(chat(aggregated, [], [data_uri(first)])) == \
        reference(hf, [], [source[0:16:2]])

    again = chat(epd, [], [data_uri(first)])
    encoded2, reused2 = frames_of(epd.stats())
    assert (encoded2 - encoded1, reused2 - reused1) == (0, 8) and token_ids(again) == token_ids(answer)

    still, image = png(77, (80, 120))
    mixed = chat(epd, [still], [data_uri(overlapping)])
    encoded3, reused3 = frames_of(epd.stats())
    assert (encoded3 - encoded2, reused3 - reused2) == (4, 4)  # NOTE: half its 8 frames were the first clip's
    assert token_ids(mixed) == token_ids(chat(aggregated, [still], [data_uri(overlapping)])) == \
        reference(hf, [image], [source[8:24:2]])
    encoders = epd.stats()["encoders"][0]["stats"]
    assert encoders["videos"] >= 3 and encoders["encoded"] >= encoders["frames_encoded"] + 1


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("stack", ["epd", "aggregated"])
def test_bad_videos_are_400s_naming_the_part_and_the_stack_keeps_serving(request, stack):
    up = request.getfixturevalue(stack)
    good = make_clip(feed(8, size=(56, 56), seed=3))
    long_clip = make_clip(feed(601, size=(16, 16), seed=4), fps=1)  # NOTE: 601 s, over the default 600
    cases = [
        (data_uri(good[:200]), None, "video 0: not a decodable video"),
        ("data:video/x-matroska;base64," + base64.b64encode(_png_bytes()).decode(), None, "video 0: not a"),
        (data_uri(long_clip), None, "over max_video_seconds=600"),
        (data_uri(good), {"max_frames": 65}, "max_frames=65 exceeds"),
        (data_uri(good), {"fps": -1}, "fps=-1 must be"),
        (data_uri(good), {"frames": 2}, "unknown option"),
    ]
    client = openai.OpenAI(base_url=up.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    for url, options, message in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model="tiny-qwen2-vl", max_tokens=4,
                messages=[{"role": "user", "content": [{"type": "text", "text": "x"},
                                                       {"type": "video_url", "video_url": {"url": url}}]}],
                extra_body={"mm_processor_kwargs": options} if options else None)
        assert message in str(err.value), (message, str(err.value))
    assert chat(up, [], [data_uri(good)]).choices[0].finish_reason in ("length", "stop")

"""The EPD benchmark's workload generator: determinism, Poisson arrivals, image counts, reuse and
its Zipf skew, rendered images and the OpenAI message shape."""

from __future__ import annotations

import base64
import io
import math
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# NOTE: benchmarks/ is a folder of scripts, not a package; its scripts import each other this way.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from workload import (  # noqa: E402
    RequestSpec,
    WorkloadSpec,
    generate,
    render_image,
    truncated_power_law,
)

TINY_SIZES = ((32, 24), (40, 40))


def test_same_seed_same_workload_and_different_seed_differs() -> None:
    spec = WorkloadSpec(num_requests=200, reuse=0.5, seed=7)
    first, again = generate(spec), generate(spec)
    assert first.requests == again.requests
    assert first.image_size_by_id == again.image_size_by_id
    other = generate(replace(spec, seed=8))
    assert [r.arrival_s for r in other.requests] != [r.arrival_s for r in first.requests]
    assert [r.prompt for r in other.requests] != [r.prompt for r in first.requests]
    assert [r.image_ids for r in other.requests] != [r.image_ids for r in first.requests]


def test_changing_reuse_keeps_arrivals_prompts_and_counts() -> None:
    spec = WorkloadSpec(num_requests=100, reuse=0.0, seed=3)
    plain, reused = generate(spec), generate(replace(spec, reuse=0.8))
    for a, b in zip(plain.requests, reused.requests):
        assert (a.arrival_s, a.prompt, a.max_tokens, len(a.image_ids)) == (
            b.arrival_s, b.prompt, b.max_tokens, len(b.image_ids))


def test_arrivals_are_poisson_at_the_rate() -> None:
    rate = 5.0
    workload = generate(WorkloadSpec(rate=rate, num_requests=2000, seed=1))
    arrivals_s = np.array([r.arrival_s for r in workload.requests])
    gaps_s = np.diff(np.concatenate([[0.0], arrivals_s]))
    assert np.all(gaps_s > 0)
    assert gaps_s.mean() == pytest.approx(1 / rate, rel=0.1)
    # NOTE: exponential gaps have a coefficient of variation of 1; a fixed-rate clock has 0.
    assert gaps_s.std() / gaps_s.mean() == pytest.approx(1.0, abs=0.1)
    # NOTE: and half of them fall below the exponential median ln(2) / rate.
    assert np.mean(gaps_s < math.log(2) / rate) == pytest.approx(0.5, abs=0.05)
    assert workload.summary()["rate_realised"] == pytest.approx(rate, rel=0.1)


def test_infinite_rate_sends_everything_at_once() -> None:
    workload = generate(WorkloadSpec(rate=math.inf, num_requests=10))
    assert all(r.arrival_s == 0.0 for r in workload.requests)


def test_reuse_zero_never_repeats_an_image() -> None:
    workload = generate(WorkloadSpec(num_requests=1000, reuse=0.0, seed=2))
    image_ids = [i for r in workload.requests for i in r.image_ids]
    assert len(image_ids) == len(set(image_ids)) == len(workload.image_size_by_id)
    assert workload.repeat_share() == 0.0


@pytest.mark.parametrize("reuse", [0.2, 0.5, 0.9])
def test_realised_repeat_share_is_close_to_reuse(reuse: float) -> None:
    workload = generate(WorkloadSpec(num_requests=1000, reuse=reuse, seed=4))
    assert workload.num_image_refs() > 1500
    image_ids = [i for r in workload.requests for i in r.image_ids]
    measured = 1 - len(set(image_ids)) / len(image_ids)
    assert workload.repeat_share() == pytest.approx(measured)
    assert workload.repeat_share() == pytest.approx(reuse, abs=0.05)


def test_no_image_twice_in_one_request() -> None:
    workload = generate(WorkloadSpec(num_requests=500, reuse=0.95, zipf_s=3.0, seed=5))
    assert all(len(set(r.image_ids)) == len(r.image_ids) for r in workload.requests)


def test_zipf_makes_the_top_image_far_more_popular_than_the_median() -> None:
    workload = generate(WorkloadSpec(num_requests=1000, reuse=0.9, pool_size=200, seed=6))
    counts = sorted(Counter(i for r in workload.requests for i in r.image_ids).values(), reverse=True)
    assert counts[0] >= 20 * float(np.median(counts))
    uniform = generate(WorkloadSpec(num_requests=1000, reuse=0.9, pool_size=200, zipf_s=0.0, seed=6))
    uniform_counts = Counter(i for r in uniform.requests for i in r.image_ids).values()
    assert counts[0] > 3 * max(uniform_counts)


def test_images_per_request_within_bounds_and_reaching_max() -> None:
    spec = WorkloadSpec(num_requests=2000, images_min=1, images_max=10, images_mean=2.0, seed=8)
    counts = np.array([len(r.image_ids) for r in generate(spec).requests])
    assert counts.min() == 1 and counts.max() == 10
    assert np.sum(counts == 10) >= 3
    assert counts.mean() == pytest.approx(2.0, abs=0.15)
    assert np.mean(counts <= 3) > 0.8


@pytest.mark.parametrize(("low", "high", "mean"), [(1, 10, 2.0), (0, 4, 1.0), (1, 10, 8.0), (2, 2, 2.0)])
def test_truncated_power_law_hits_the_mean(low: int, high: int, mean: float) -> None:
    probabilities = truncated_power_law(low, high, mean)
    assert probabilities.sum() == pytest.approx(1.0)
    assert float(probabilities @ np.arange(low, high + 1)) == pytest.approx(mean, abs=1e-6)


def test_prompts_and_output_lengths() -> None:
    spec = WorkloadSpec(num_requests=2000, prompt_words_mean=20, output_tokens_min=4,
                        output_tokens_max=256, output_tokens_mean=64, seed=9)
    workload = generate(spec)
    words = np.array([len(r.prompt.split()) for r in workload.requests])
    max_tokens = np.array([r.max_tokens for r in workload.requests])
    assert words.min() >= 1 and words.mean() == pytest.approx(20, rel=0.1)
    assert max_tokens.min() >= 4 and max_tokens.max() <= 256
    assert max_tokens.mean() == pytest.approx(64, rel=0.1)
    assert len({r.prompt for r in workload.requests}) > 1900


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_render_image_decodes_to_size_and_format(fmt: str) -> None:
    data = render_image(3, (64, 48), fmt, seed=0)
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (64, 48)
        assert image.format == fmt.upper()
    assert render_image(3, (64, 48), fmt, seed=0) == data
    assert render_image(4, (64, 48), fmt, seed=0) != data
    assert render_image(3, (64, 48), fmt, seed=1) != data


def test_rendered_jpeg_has_a_photo_like_size() -> None:
    num_bytes = len(render_image(0, (1024, 768), "jpeg", seed=0))
    assert 50_000 < num_bytes < 400_000


def test_workload_images_are_distinct_cached_and_written(tmp_path: Path) -> None:
    workload = generate(WorkloadSpec(num_requests=20, image_sizes=TINY_SIZES, seed=10))
    datas = {image_id: workload.image_bytes(image_id) for image_id in workload.image_size_by_id}
    assert len(set(datas.values())) == len(datas)
    assert workload.image_bytes(0) is datas[0]
    for image_id, data in datas.items():
        with Image.open(io.BytesIO(data)) as image:
            assert image.size == workload.image_size_by_id[image_id]
    uri = workload.data_uri(0)
    assert uri.startswith("data:image/jpeg;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]) == datas[0]
    paths = workload.write_images(tmp_path / "images")
    assert set(paths) == set(datas)
    assert all(paths[i].read_bytes() == datas[i] for i in paths)


def test_image_cache_stays_within_capacity() -> None:
    workload = generate(WorkloadSpec(num_requests=20, image_sizes=TINY_SIZES, image_format="png"))
    workload.cache_capacity_bytes = 2 * len(workload.image_bytes(0))
    for image_id in workload.image_size_by_id:
        workload.image_bytes(image_id)
    assert workload._cached_bytes <= workload.cache_capacity_bytes


def test_openai_messages_carry_text_then_one_part_per_image(tmp_path: Path) -> None:
    workload = generate(WorkloadSpec(num_requests=30, reuse=0.5, image_sizes=TINY_SIZES, seed=11))
    request = max(workload.requests, key=lambda r: len(r.image_ids))
    assert isinstance(request, RequestSpec) and len(request.image_ids) >= 2
    [message] = request.to_openai_messages(workload)
    assert message["role"] == "user"
    text, *images = message["content"]
    assert text == {"type": "text", "text": request.prompt}
    assert len(images) == len(request.image_ids)
    for part, image_id in zip(images, request.image_ids):
        assert part["type"] == "image_url"
        assert part["image_url"]["url"] == workload.data_uri(image_id)
    urls = {i: p.as_uri() for i, p in workload.write_images(tmp_path).items()}
    [message] = request.to_openai_messages(workload, image_urls=urls)
    assert [p["image_url"]["url"] for p in message["content"][1:]] == [urls[i] for i in request.image_ids]


@pytest.mark.parametrize(
    "field_values",
    [{"rate": 0}, {"num_requests": 0}, {"images_min": 3, "images_max": 2}, {"images_mean": 11.0},
     {"reuse": 1.5}, {"reuse": -0.1}, {"zipf_s": -1.0}, {"pool_size": 0}, {"output_tokens_mean": 0},
     {"output_tokens_min": 10, "output_tokens_max": 5}, {"image_sizes": ()}, {"image_sizes": ((4, 4),)},
     {"image_format": "gif"}, {"seed": -1}],
)
def test_spec_rejects_bad_values(field_values: dict) -> None:
    with pytest.raises(ValueError):
        WorkloadSpec(**field_values)


def test_spec_accepts_lists_of_sizes_and_stays_hashable() -> None:
    spec = WorkloadSpec(image_sizes=[[640, 480], [336, 336]])
    assert spec.image_sizes == ((640, 480), (336, 336))
    assert hash(spec) == hash(replace(spec))

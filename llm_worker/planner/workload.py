"""Seeded synthetic workloads: who asks what, when, with which images. The EPD benchmark drives
the stack with them and the planner (``llm_worker.planner.planner``) simulates them: one description of a
request stream for both.

    python benchmarks/workload.py [--rate 2] [--requests 100] [--reuse 0.5] [--zipf 1.0]
        [--pool-size 1000] [--images-min 1] [--images-max 10] [--images-mean 2.0]
        [--prompt-words 32] [--output-min 8] [--output-max 512] [--output-mean 128]
        [--format jpeg] [--seed 0] [--sample-images 8]

prints the summary of a spec (and the byte sizes of a few rendered images) for inspection.

Model of a request stream:
- Arrivals: a Poisson process of ``rate`` requests/s (exponential gaps; ``inf`` sends all at 0).
- Images per request: a power law truncated to [images_min, images_max] whose exponent is fitted
  to images_mean, so most requests carry 1-3 images and a few carry the maximum.
- Image reuse: each image reference repeats an earlier image with probability ``reuse``; the
  repeated image follows a Zipf law over the first ``pool_size`` distinct images (see _ImagePicker).
- Prompt words and output tokens: lognormal, the latter clipped to [output_min, output_max].
- Images: rendered locally (gradient, shapes, sensor-like noise), distinct per image id, encoded
  as JPEG (~25-300 KB) or PNG (~0.2-2 MB) at camera/screen sizes; no data set download.
"""

from __future__ import annotations

import argparse
import base64
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from llm_worker.planner.images import IMAGE_FORMATS, render_image  # noqa: F401 - a workload's pictures
from llm_worker.planner.workload_spec import (DEFAULT_IMAGE_SIZES, MAX_IMAGES, MAX_REQUESTS, MAX_TOKENS,  # noqa: F401
                                              PRESETS, WorkloadSpec, load_phases, parse_spec, spec_of)

VOCABULARY: tuple[str, ...] = tuple(
    "what is shown in the image picture photo describe explain compare these two scene objects "
    "people color left right top bottom background foreground count how many where does it look "
    "like detail text written sign animal car building tree sky person holding wearing small large "
    "near far between behind front please briefly and or of a on with any difference same".split()
)


@dataclass(frozen=True)
class RequestSpec:
    """One request: when it arrives (s after the start), its prompt, its images, its max_tokens."""

    index: int
    arrival_s: float
    prompt: str
    image_ids: tuple[int, ...]
    """Identity of each image's content; equal ids mean byte-identical images."""
    max_tokens: int

    def to_openai_messages(
        self, workload: Workload, image_urls: Mapping[int, str] | None = None
    ) -> list[dict]:
        """One user message: the text part, then one image_url part per image, in order. URLs come
        from image_urls (e.g. file:// URLs from Workload.write_images) or else are data URIs."""
        parts: list[dict] = [{"type": "text", "text": self.prompt}]
        for image_id in self.image_ids:
            url = image_urls[image_id] if image_urls is not None else workload.data_uri(image_id)
            parts.append({"type": "image_url", "image_url": {"url": url}})
        return [{"role": "user", "content": parts}]


@dataclass
class Workload:
    """The generated requests (by arrival) and the size of every image; renders image bytes on
    demand and keeps the most recent in an LRU bounded by cache_capacity_bytes (thread-safe)."""

    spec: WorkloadSpec
    requests: list[RequestSpec]
    image_size_by_id: dict[int, tuple[int, int]]
    cache_capacity_bytes: int = 256 << 20
    _id_to_bytes: OrderedDict[int, bytes] = field(
        default_factory=OrderedDict, init=False, repr=False, compare=False)
    _cached_bytes: int = field(default=0, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def num_image_refs(self) -> int:
        return sum(len(request.image_ids) for request in self.requests)

    def repeat_share(self) -> float:
        """Share of image references whose image appeared in an earlier reference (0 if none)."""
        num_refs = self.num_image_refs()
        return (num_refs - len(self.image_size_by_id)) / num_refs if num_refs else 0.0

    sources: dict[int, tuple["Workload", int]] = field(default_factory=dict, repr=False, compare=False)
    """For phases joined by ``concatenate``: image id -> (the phase's workload, its id there)."""

    def image_bytes(self, image_id: int) -> bytes:
        """The encoded image of image_id (KeyError for an id not in this workload)."""
        if image_id in self.sources:
            phase, local = self.sources[image_id]
            return phase.image_bytes(local)
        with self._lock:
            data = self._id_to_bytes.get(image_id)
            if data is not None:
                self._id_to_bytes.move_to_end(image_id)
                return data
        # NOTE: render outside the lock so that threads render different images in parallel.
        data = render_image(image_id, self.image_size_by_id[image_id], self.spec.image_format,
                            self.spec.seed, self.spec.jpeg_quality)
        with self._lock:
            if image_id not in self._id_to_bytes:
                self._id_to_bytes[image_id] = data
                self._cached_bytes += len(data)
            while self._cached_bytes > self.cache_capacity_bytes and len(self._id_to_bytes) > 1:
                self._cached_bytes -= len(self._id_to_bytes.popitem(last=False)[1])
        return data

    def data_uri(self, image_id: int) -> str:
        if image_id in self.sources:
            phase, local = self.sources[image_id]
            return phase.data_uri(local)
        mime = IMAGE_FORMATS[self.spec.image_format][1]
        return f"data:{mime};base64,{base64.b64encode(self.image_bytes(image_id)).decode('ascii')}"

    def write_images(self, directory: str | Path) -> dict[int, Path]:
        """Writes every image as a file under directory (created if missing); returns id -> path.
        Use {i: p.as_uri() for i, p in paths.items()} as image_urls for file:// URLs."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return {image_id: self._write(directory, image_id) for image_id in self.image_size_by_id}

    def _write(self, directory: Path, image_id: int) -> Path:
        if image_id in self.sources:  # NOTE: a phase's image, as that phase renders it
            phase, local = self.sources[image_id]
            return phase._write(directory, local)
        extension = IMAGE_FORMATS[self.spec.image_format][2]
        path = directory / f"img-s{self.spec.seed}-{image_id:06d}.{extension}"
        # NOTE: render_image directly rather than image_bytes: a bulk write would flush the LRU.
        path.write_bytes(render_image(image_id, self.image_size_by_id[image_id], self.spec.image_format,
                                      self.spec.seed, self.spec.jpeg_quality))
        return path

    def summary(self) -> dict[str, float | int]:
        duration_s = self.requests[-1].arrival_s
        images_per_request = [len(request.image_ids) for request in self.requests]
        return {
            "num_requests": len(self.requests),
            "duration_s": duration_s,
            "rate_realised": len(self.requests) / duration_s if duration_s > 0 else math.inf,
            "images_per_request_mean": float(np.mean(images_per_request)),
            "images_per_request_max": max(images_per_request),
            "image_refs": self.num_image_refs(),
            "distinct_images": len(self.image_size_by_id),
            "repeat_share": self.repeat_share(),
            "prompt_words_mean": float(np.mean([len(r.prompt.split()) for r in self.requests])),
            "output_tokens_mean": float(np.mean([r.max_tokens for r in self.requests])),
        }


def truncated_power_law(low: int, high: int, mean: float) -> np.ndarray:
    """Probabilities of low..high, proportional to (k - low + 1) ** -a with a fitted (bisection)
    so that the mean is `mean`. Decays slower than a geometric law: with 1..10 and mean 2, about
    87% of requests carry 1-3 images and ~0.8% carry 10, where a geometric law gives 0.1%."""
    log_rank = np.log(np.arange(1, high - low + 2, dtype=np.float64))
    values = np.arange(low, high + 1, dtype=np.float64)

    def probabilities(exponent: float) -> np.ndarray:
        logits = -exponent * log_rank
        weights = np.exp(logits - logits.max())
        return weights / weights.sum()

    # NOTE: the mean falls monotonically in the exponent; +-60 reaches within 1e-9 of either end.
    lo_exponent, hi_exponent = -60.0, 60.0
    for _ in range(100):
        middle = (lo_exponent + hi_exponent) / 2
        if float(probabilities(middle) @ values) > mean:
            lo_exponent = middle
        else:
            hi_exponent = middle
    return probabilities((lo_exponent + hi_exponent) / 2)


class _ImagePicker:
    """Assigns image ids to references. Ids are 0, 1, 2... in order of first appearance, so the
    popularity rank of an image is its id + 1. A reference repeats with probability `reuse`
    (a Bernoulli draw); a repeat takes rank r among the first min(seen, pool_size) images with
    probability proportional to r ** -zipf_s. Every repeat hits an image seen before, so the
    realised repeat share is `reuse` up to binomial noise, and exactly 0 for reuse=0.
    NOTE: an image appears at most once per request; a repeat that draws one already in the
    request redraws, and becomes a new image if every candidate is taken (only while fewer than
    images_max images exist, so the shortfall is a handful of references at the start)."""

    def __init__(self, spec: WorkloadSpec, rng: np.random.Generator) -> None:
        self._spec = spec
        self._rng = rng
        ranks = np.arange(1, spec.pool_size + 1, dtype=np.float64)
        self._cumulative_weights = np.cumsum(ranks**-spec.zipf_s)
        self.image_size_by_id: dict[int, tuple[int, int]] = {}

    def pick(self, num_images: int) -> tuple[int, ...]:
        image_ids: list[int] = []
        for _ in range(num_images):
            repeat = len(self.image_size_by_id) > 0 and self._rng.random() < self._spec.reuse
            image_id = self._draw_repeat(image_ids) if repeat else None
            image_ids.append(self._new_image() if image_id is None else image_id)
        return tuple(image_ids)

    def _draw_repeat(self, taken: list[int]) -> int | None:
        num_candidates = min(len(self.image_size_by_id), self._spec.pool_size)
        if num_candidates <= len(taken):
            return None
        cumulative = self._cumulative_weights[:num_candidates]
        for _ in range(16):
            rank = int(np.searchsorted(cumulative, self._rng.random() * cumulative[-1], side="right"))
            image_id = min(rank, num_candidates - 1)
            if image_id not in taken:
                return image_id
        # NOTE: with a steep law the taken ids can hold nearly all the weight; sample exactly then.
        weights = np.diff(cumulative, prepend=0.0)
        weights[taken] = 0.0
        if weights.sum() <= 0.0:
            return next(i for i in range(num_candidates) if i not in taken)
        return int(self._rng.choice(num_candidates, p=weights / weights.sum()))

    def _new_image(self) -> int:
        image_id = len(self.image_size_by_id)
        sizes = self._spec.image_sizes
        self.image_size_by_id[image_id] = sizes[int(self._rng.integers(len(sizes)))]
        return image_id


def generate(spec: WorkloadSpec) -> Workload:
    """The workload of spec: the same spec gives the same workload, on any machine."""
    # NOTE: one independent stream per aspect, so that changing e.g. reuse leaves the arrival
    # times, image counts, prompts and output lengths of the same seed unchanged.
    arrival_rng, count_rng, image_rng, prompt_rng, output_rng = (
        np.random.default_rng(child) for child in np.random.SeedSequence(spec.seed).spawn(5)
    )
    n = spec.num_requests
    if math.isinf(spec.rate):
        arrivals_s = np.zeros(n)
    else:
        arrivals_s = np.cumsum(arrival_rng.exponential(1.0 / spec.rate, size=n))
    counts = count_rng.choice(
        np.arange(spec.images_min, spec.images_max + 1), size=n,
        p=truncated_power_law(spec.images_min, spec.images_max, spec.images_mean),
    )
    prompt_words = _lognormal(prompt_rng, spec.prompt_words_mean, spec.prompt_words_sigma, n)
    prompt_words = np.maximum(1, np.rint(prompt_words))
    max_tokens = _lognormal(output_rng, spec.output_tokens_mean, spec.output_tokens_sigma, n)
    max_tokens = np.clip(np.rint(max_tokens), spec.output_tokens_min, spec.output_tokens_max)
    picker = _ImagePicker(spec, image_rng)
    requests = [
        RequestSpec(
            index=i,
            arrival_s=float(arrivals_s[i]),
            prompt=_prompt(prompt_rng, int(prompt_words[i])),
            image_ids=picker.pick(int(counts[i])),
            max_tokens=int(max_tokens[i]),
        )
        for i in range(n)
    ]
    return Workload(spec=spec, requests=requests, image_size_by_id=picker.image_size_by_id)


def concatenate(specs: list[WorkloadSpec]) -> Workload:
    """The workloads of ``specs`` one after the other: each phase starts one mean gap after the
    previous one's last arrival; image ids stay distinct across phases (nothing is shared)."""
    if len(specs) == 1:
        return generate(specs[0])
    requests, sizes, sources, start, index = [], {}, {}, 0.0, 0
    for phase, spec in enumerate(specs):
        w = generate(spec)
        offset = 10_000_000 * phase
        for r in w.requests:
            requests.append(replace(r, index=index, arrival_s=start + r.arrival_s,
                                    image_ids=tuple(offset + i for i in r.image_ids)))
            index += 1
        for i, size in w.image_size_by_id.items():
            sizes[offset + i] = size
            sources[offset + i] = (w, i)
        gap = 0.0 if math.isinf(spec.rate) else 1.0 / spec.rate
        start = requests[-1].arrival_s + gap
    return Workload(spec=specs[0], requests=requests, image_size_by_id=sizes, sources=sources)


def _lognormal(rng: np.random.Generator, mean: float, sigma: float, size: int) -> np.ndarray:
    # NOTE: mu = ln(mean) - sigma^2 / 2 makes `mean` the mean of the draws, not their median.
    return rng.lognormal(math.log(mean) - sigma**2 / 2, sigma, size=size)


def _prompt(rng: np.random.Generator, num_words: int) -> str:
    words = [VOCABULARY[i] for i in rng.integers(len(VOCABULARY), size=num_words)]
    return " ".join(words).capitalize() + "?"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print the summary of a synthetic EPD workload.")
    parser.add_argument("--rate", type=float, default=2.0, help="requests/s (inf: all at once)")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--images-min", type=int, default=1)
    parser.add_argument("--images-max", type=int, default=10)
    parser.add_argument("--images-mean", type=float, default=2.0)
    parser.add_argument("--reuse", type=float, default=0.0, help="target share of repeated image references")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent over the reused pool")
    parser.add_argument("--pool-size", type=int, default=1000)
    parser.add_argument("--prompt-words", type=float, default=32.0)
    parser.add_argument("--output-min", type=int, default=8)
    parser.add_argument("--output-max", type=int, default=512)
    parser.add_argument("--output-mean", type=float, default=128.0)
    parser.add_argument("--format", choices=sorted(IMAGE_FORMATS), default="jpeg")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-images", type=int, default=8, help="images to render for their byte sizes")
    args = parser.parse_args(argv)
    try:
        spec = WorkloadSpec(
            rate=args.rate, num_requests=args.requests, images_min=args.images_min,
            images_max=args.images_max, images_mean=args.images_mean, reuse=args.reuse,
            zipf_s=args.zipf, pool_size=args.pool_size, prompt_words_mean=args.prompt_words,
            output_tokens_min=args.output_min, output_tokens_max=args.output_max,
            output_tokens_mean=args.output_mean, image_format=args.format, seed=args.seed,
        )
    except ValueError as error:
        parser.error(str(error))
    workload = generate(spec)
    for key, value in workload.summary().items():
        print(f"{key:<26}{value:.3f}" if isinstance(value, float) else f"{key:<26}{value}")
    counts = np.bincount([len(r.image_ids) for r in workload.requests], minlength=spec.images_max + 1)
    histogram = " ".join(f"{k}:{int(counts[k])}" for k in range(spec.images_min, spec.images_max + 1))
    print(f"{'images_per_request_hist':<26}{histogram}")
    for image_id in list(workload.image_size_by_id)[: args.sample_images]:
        width, height = workload.image_size_by_id[image_id]
        print(f"image {image_id:<4} {width}x{height} {spec.image_format}: "
              f"{len(workload.image_bytes(image_id)) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()

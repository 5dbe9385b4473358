"""A workload's description (``WorkloadSpec``): its fields and bounds, the named presets, and
how it is written on a command line or in a file (``parse_spec``, ``load_phases``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from llm_worker.planner.images import IMAGE_FORMATS

DEFAULT_IMAGE_SIZES: tuple[tuple[int, int], ...] = (
    (336, 336), (640, 480), (800, 600), (1024, 768), (1280, 720),
)
MAX_REQUESTS = 10_000_000
MAX_IMAGES = 1024
MAX_TOKENS = 1_000_000
"""Bounds of a spec: far past any real workload, short of what exhausts memory."""


@dataclass(frozen=True)
class WorkloadSpec:
    """Parameters of one synthetic request stream; generate(spec) is a pure function of it."""

    rate: float = 2.0
    """Mean arrival rate in requests/s (Poisson); math.inf sends every request at t=0."""
    num_requests: int = 100
    """Requests in the workload."""
    images_min: int = 1
    """Fewest images in a request (0 allows text-only requests)."""
    images_max: int = 10
    """Most images in a request."""
    images_mean: float = 2.0
    """Mean images per request; fits the exponent of the truncated power law."""
    reuse: float = 0.0
    """Target share of image references that repeat an earlier image, 0..1; 0: every image new."""
    zipf_s: float = 1.0
    """Zipf exponent of popularity over the reused pool (0: uniform; larger: more skewed)."""
    pool_size: int = 1000
    """Distinct images (the first seen) that repeats draw from."""
    prompt_words_mean: float = 32.0
    """Mean words per prompt (lognormal, at least 1)."""
    prompt_words_sigma: float = 0.5
    """Sigma of log(prompt words)."""
    output_tokens_min: int = 8
    """Fewest max_tokens of a request."""
    output_tokens_max: int = 512
    """Most max_tokens of a request."""
    output_tokens_mean: float = 128.0
    """Mean max_tokens before clipping to [min, max] (lognormal)."""
    output_tokens_sigma: float = 0.7
    """Sigma of log(max_tokens)."""
    image_sizes: tuple[tuple[int, int], ...] = DEFAULT_IMAGE_SIZES
    """(width, height) pixels each new image draws from uniformly."""
    image_format: str = "jpeg"
    """Encoding of rendered images: jpeg or png."""
    jpeg_quality: int = 90
    """JPEG quality 1..95."""
    seed: int = 0
    """Seed of everything: arrivals, images per request, reuse, prompts, lengths, pixels."""

    def __post_init__(self) -> None:
        # NOTE: accept lists of lists too; stored as tuples so that the spec stays hashable.
        object.__setattr__(self, "image_sizes", tuple((int(w), int(h)) for w, h in self.image_sizes))
        for name, f in self.__dataclass_fields__.items():
            value = getattr(self, name)
            if f.type in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))
                                                or (f.type == "int" and not isinstance(value, int))):
                raise ValueError(f"{name}={value!r} must be {'an int' if f.type == 'int' else 'a number'}")
        _check(self.rate > 0, f"{self.rate=} must be > 0 (math.inf allowed)")
        _check(1 <= self.num_requests <= MAX_REQUESTS, f"{self.num_requests=} must be in [1, {MAX_REQUESTS}]")
        _check(0 <= self.images_min <= self.images_max <= MAX_IMAGES,
               f"{self.images_min=} must be in [0, {self.images_max=}], images_max at most {MAX_IMAGES}")
        _check(self.images_min <= self.images_mean <= self.images_max,
               f"{self.images_mean=} must be in [{self.images_min}, {self.images_max}]")
        _check(0.0 <= self.reuse <= 1.0, f"{self.reuse=} must be in [0, 1]")
        _check(self.zipf_s >= 0.0, f"{self.zipf_s=} must be >= 0")
        _check(1 <= self.pool_size <= MAX_REQUESTS, f"{self.pool_size=} must be in [1, {MAX_REQUESTS}]")
        _check(1 <= self.prompt_words_mean <= MAX_TOKENS, f"{self.prompt_words_mean=} must be in [1, {MAX_TOKENS}]")
        _check(0 <= self.prompt_words_sigma <= 4, f"{self.prompt_words_sigma=} must be in [0, 4]")
        _check(1 <= self.output_tokens_min <= self.output_tokens_max <= MAX_TOKENS,
               f"{self.output_tokens_min=} must be in [1, {self.output_tokens_max=}], at most {MAX_TOKENS}")
        _check(0 < self.output_tokens_mean <= MAX_TOKENS, f"{self.output_tokens_mean=} must be in (0, {MAX_TOKENS}]")
        _check(0 <= self.output_tokens_sigma <= 4, f"{self.output_tokens_sigma=} must be in [0, 4]")
        _check(len(self.image_sizes) > 0, f"{self.image_sizes=} must not be empty")
        for width, height in self.image_sizes:
            _check(width >= 8 and height >= 8, f"image size {(width, height)} must be >= 8x8")
        _check(self.image_format in IMAGE_FORMATS,
               f"{self.image_format=} must be one of {sorted(IMAGE_FORMATS)}")
        _check(1 <= self.jpeg_quality <= 95, f"{self.jpeg_quality=} must be in [1, 95]")
        _check(self.seed >= 0, f"{self.seed=} must be >= 0")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


PRESETS: dict[str, dict] = {
    "default": {},
    "image-heavy": {"images_min": 2, "images_max": 6, "images_mean": 3.0, "output_tokens_mean": 32.0,
                    "output_tokens_max": 128},
    "text-heavy": {"images_min": 0, "images_max": 0, "images_mean": 0.0, "prompt_words_mean": 96.0,
                   "output_tokens_mean": 128.0},
    "long-output": {"images_min": 1, "images_max": 2, "images_mean": 1.2, "output_tokens_min": 128,
                    "output_tokens_mean": 384.0, "output_tokens_max": 512},
}
"""Named starting points for ``parse_spec`` (``mmcache plan --workload image-heavy,rate=4``)."""

_FIELDS = {f.name: f for f in WorkloadSpec.__dataclass_fields__.values()}
_ALIASES = {"requests": "num_requests", "zipf": "zipf_s", "output_mean": "output_tokens_mean",
            "output_min": "output_tokens_min", "output_max": "output_tokens_max", "prompt_words": "prompt_words_mean"}


def spec_of(fields: Mapping, base: WorkloadSpec | None = None) -> WorkloadSpec:
    """A ``WorkloadSpec`` from ``fields`` (field names or the CLI's short names, e.g. ``requests``),
    over ``base``; ``preset`` names a starting point of ``PRESETS``. A clear ``ValueError`` names
    an unknown field or a value of the wrong type."""
    fields = dict(fields)
    out = dict(PRESETS[_preset(fields.pop("preset"))]) if "preset" in fields else {}
    for name, value in fields.items():
        name = _ALIASES.get(name, name)
        if name not in _FIELDS:
            raise ValueError(f"workload: unknown field {name!r}; known: preset, {', '.join(sorted(_FIELDS))}")
        out[name] = value
    base = base or WorkloadSpec()
    try:
        return replace(base, **{k: _typed(k, v) for k, v in out.items()})
    except TypeError as e:
        raise ValueError(f"workload: {e}") from None


def parse_spec(text: str) -> WorkloadSpec:
    """``PRESET[,FIELD=VALUE...]`` or ``FIELD=VALUE,...``: e.g. ``image-heavy,rate=4,requests=200``."""
    fields: dict = {}
    for i, item in enumerate(p.strip() for p in text.split(",")):
        if not item:
            continue
        if "=" not in item:
            if i:
                raise ValueError(f"workload {text!r}: {item!r} is not FIELD=VALUE (a preset comes first)")
            fields["preset"] = item
            continue
        name, value = (x.strip() for x in item.split("=", 1))
        fields[name] = value
    return spec_of(fields)


def load_phases(text: str) -> list[WorkloadSpec]:
    """The phases of a workload, back to back: a JSON file (one object of ``WorkloadSpec`` fields,
    or a list of them, or ``{"phases": [...]}``) or ``parse_spec`` texts joined by ``+``."""
    path = Path(text)
    if text.endswith(".json") or path.is_file():
        try:
            if path.stat().st_size > 1 << 20:
                raise ValueError("larger than 1 MiB: not a workload description")
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"workload file {text}: {e}") from None
        if isinstance(doc, dict) and "phases" in doc:
            doc = doc["phases"]
        docs = doc if isinstance(doc, list) else [doc]
        if not docs or not all(isinstance(d, dict) for d in docs):
            raise ValueError(f"workload file {text}: want an object of workload fields or a list of them")
        return [spec_of(d) for d in docs]
    parts = text.split("+")
    if any(not part.strip() for part in parts):
        raise ValueError(f"workload {text!r}: an empty phase (phases are joined by +)")
    return [parse_spec(part) for part in parts]


def _preset(name: str) -> str:
    if name not in PRESETS:
        raise ValueError(f"workload: unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return name


def _typed(name: str, value):
    """``value`` (maybe a string from a command line) as the field's type."""
    kind = _FIELDS[name].type
    if not isinstance(value, str):
        if name == "image_sizes":
            return tuple(tuple(s) for s in value)
        return value
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if name == "image_sizes":
            return tuple(tuple(int(x) for x in s.split("x")) for s in value.split(";"))
        return value
    except ValueError:
        raise ValueError(f"workload: {name}={value!r} is not a {kind}") from None

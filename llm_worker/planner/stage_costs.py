"""What each stage of the pipeline costs on a machine (``StageCosts``): the profile that
``mmcache plan --profile`` measures (``llm_worker.planner.profile``), read back and interpolated for
the simulator (``llm_worker.planner.simulator``).

A profile is a JSON document (``format: mmcache-profile/1``): grids of measured times (encode ms
per forward by batch size and image size, prefill ms by prompt tokens, decode step ms by batch
size and context, put/get ms by bytes, one HTTP hop) and the model's facts (KV bytes per token,
image tokens by image size, tokens per word). Between grid points times are interpolated
linearly; past the last point the last segment's slope goes on (never downwards); before the
first the first value holds (fixed costs dominate small work). ``source`` says whether it was
measured (``measured``) or set down by hand from published figures (anything else), and every
result the planner prints carries it.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

FORMAT = "mmcache-profile/1"
MAX_PROFILE_BYTES = 16 << 20
MAX_GRID = 4096
"""Most points on one axis of a grid (a measured grid has tens)."""


def interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """``ys`` at ``x``, piecewise linear over the ascending ``xs``; flat before the first point,
    the last segment's (non-negative) slope after the last."""
    if len(xs) == 1 or x <= xs[0] or xs[-1] == xs[0]:
        return float(ys[0])
    if x >= xs[-1]:
        i = max(j for j in range(len(xs)) if xs[j] < xs[-1])  # NOTE: equal points (sizes of one area) have no slope
        slope = max(0.0, (ys[-1] - ys[i]) / (xs[-1] - xs[i]))
        return float(ys[-1] + slope * (x - xs[-1]))
    i = bisect.bisect_right(xs, x)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return float(y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0))


class ProfileError(ValueError):
    """A profile file that is missing, unreadable or not of this format: names what is wrong."""


@dataclass(frozen=True)
class StageCosts:
    """A profile, as seconds. Build with ``load`` (a file) or ``from_doc`` (a parsed document)."""

    doc: dict

    # -- reading -----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> "StageCosts":
        try:
            if Path(path).stat().st_size > MAX_PROFILE_BYTES:
                raise ProfileError(f"profile {path}: larger than {MAX_PROFILE_BYTES >> 20} MiB: not a profile")
            doc = json.loads(Path(path).read_text())
        except OSError as e:
            raise ProfileError(f"profile {path}: {e.strerror or e}") from None
        except ValueError as e:
            raise ProfileError(f"profile {path}: not JSON ({e})") from None
        try:
            return cls.from_doc(doc)
        except ProfileError as e:
            raise ProfileError(f"profile {path}: {e}") from None

    @classmethod
    def from_doc(cls, doc: Any) -> "StageCosts":
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ProfileError(f'not a profile: want "format": "{FORMAT}"')
        facts = doc.get("model_facts")
        if not isinstance(facts, dict):
            raise ProfileError('"model_facts" missing')
        for name in ("kv_bytes_per_token", "embedding_bytes_per_token", "max_model_len", "tokens_per_word",
                     "template_tokens"):
            # NOTE: max_model_len 0: the model names no limit
            _number(facts.get(name), f"model_facts.{name}", positive=name not in ("template_tokens", "max_model_len"))
        _grid(doc, "prefill", "tokens")
        _grid(doc, "kv_put", "bytes")
        _grid(doc, "kv_get", "bytes")
        _grid(doc, "cache_read", "bytes")
        _grid2(doc, "encode", "batch_sizes", "image_sizes")
        _grid2(doc, "decode", "batch_sizes", "contexts")
        media = doc.get("media")
        if media is not None and (not isinstance(media, dict) or not _sizes(media.get("image_sizes"))
                                  or not isinstance(media.get("ms"), list)
                                  or len(media["ms"]) != len(media["image_sizes"])):
            raise ProfileError('"media" must hold "image_sizes" [[w, h], ...] and as many "ms"')
        for v in (media or {}).get("ms", ()):
            _number(v, "media.ms")
        tokens = doc.get("image_tokens")
        if not isinstance(tokens, dict) or not _sizes(tokens.get("image_sizes")) \
                or not isinstance(tokens.get("tokens"), list) or len(tokens["tokens"]) != len(tokens["image_sizes"]):
            raise ProfileError('"image_tokens" must hold "image_sizes" [[w, h], ...] and as many "tokens"')
        for t in tokens["tokens"]:
            _number(t, "image_tokens.tokens", positive=True)
        _number(doc.get("hop_ms"), "hop_ms")
        return cls(doc)

    # -- labels ------------------------------------------------------------------------------

    @property
    def source(self) -> str:
        return str(self.doc.get("source", "unknown"))

    @property
    def measured(self) -> bool:
        return self.source == "measured"

    @property
    def label(self) -> str:
        """``tiny-llava on cpu (measured: <machine>)``: what every prediction is labelled with."""
        where = self.doc.get("machine") or "unknown machine"
        return f"{self.doc.get('model', '?')} on {self.doc.get('device', '?')} ({self.source}: {where})"

    # -- facts -------------------------------------------------------------------------------

    def fact(self, name: str) -> float:
        return float(self.doc["model_facts"][name])

    @property
    def max_model_len(self) -> int | float:
        """The model's positions; inf when it names no limit (0 in the profile)."""
        return int(self.fact("max_model_len")) or math.inf

    def text_tokens(self, words: int) -> int:
        """Prompt tokens of a user message of ``words`` words, chat template included."""
        return int(self.fact("template_tokens") + math.ceil(words * self.fact("tokens_per_word")))

    def image_tokens(self, size: tuple[int, int]) -> int:
        """Tokens of an image of ``size`` (w, h): by pixel count between the measured sizes."""
        t = self.doc["image_tokens"]
        points = sorted(zip((w * h for w, h in t["image_sizes"]), t["tokens"]))
        return max(1, round(interp([p for p, _ in points], [n for _, n in points], size[0] * size[1])))

    def embedding_bytes(self, tokens: int) -> int:
        return int(tokens * self.fact("embedding_bytes_per_token"))

    def kv_bytes(self, tokens: int) -> int:
        return int(tokens * self.fact("kv_bytes_per_token"))

    # -- times (seconds) ---------------------------------------------------------------------

    def encode_s(self, sizes: Sequence[tuple[int, int]]) -> float:
        """One encoder forward over images of ``sizes`` (a batch): each image's share of a batch
        of that many images of its size, summed."""
        if not sizes:
            return 0.0
        e = self.doc["encode"]
        k = len(sizes)
        pixels = [w * h for w, h in e["image_sizes"]]
        order = sorted(range(len(pixels)), key=pixels.__getitem__)
        per_size = [interp(e["batch_sizes"], [row[j] for row in e["ms"]], k) for j in order]
        xs = [pixels[j] for j in order]
        return sum(interp(xs, per_size, w * h) / k for w, h in sizes) / 1e3

    def media_s(self, size: tuple[int, int]) -> float:
        """Decoding and hashing one image of ``size`` (a worker's work before the encoder's);
        0 for a profile that did not measure it."""
        m = self.doc.get("media")
        if m is None:
            return 0.0
        points = sorted(zip((w * h for w, h in m["image_sizes"]), m["ms"]))
        return interp([p for p, _ in points], [t for _, t in points], size[0] * size[1]) / 1e3

    def prefill_s(self, tokens: int) -> float:
        g = self.doc["prefill"]
        return interp(g["tokens"], g["ms"], tokens) / 1e3

    def decode_step_s(self, batch: int, context: float) -> float:
        """One decode step of ``batch`` requests whose mean context is ``context`` tokens."""
        if batch <= 0:
            return 0.0
        g = self.doc["decode"]
        by_batch = [interp(g["contexts"], row, context) for row in g["ms"]]
        return interp(g["batch_sizes"], by_batch, batch) / 1e3

    def kv_put_s(self, nbytes: int) -> float:
        return self._bytes("kv_put", nbytes)

    def kv_get_s(self, nbytes: int) -> float:
        return self._bytes("kv_get", nbytes)

    def cache_read_s(self, nbytes: int) -> float:
        return self._bytes("cache_read", nbytes) if nbytes else 0.0

    @property
    def hop_s(self) -> float:
        return float(self.doc["hop_ms"]) / 1e3

    def _bytes(self, name: str, nbytes: int) -> float:
        g = self.doc[name]
        return interp(g["bytes"], g["ms"], nbytes) / 1e3


def _number(value: Any, where: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1e15 < value < 1e15 \
            or not math.isfinite(value) or value < 0 or (positive and value <= 0):
        raise ProfileError(f"{where} must be a {'positive' if positive else 'non-negative'} number, not {value!r}")
    return float(value)


def _axis(values: Any, where: str) -> list:
    if not isinstance(values, list) or not values or len(values) > MAX_GRID:
        raise ProfileError(f"{where} must be a non-empty list of at most {MAX_GRID}")
    for v in values:
        _number(v, where, positive=True)
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ProfileError(f"{where} must be strictly ascending: {values}")
    return values


def _sizes(values: Any) -> bool:
    return isinstance(values, list) and 0 < len(values) <= MAX_GRID and all(
        isinstance(s, list) and len(s) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                      and 0 < x < 1 << 20 for x in s) for s in values)


def _grid(doc: dict, name: str, axis: str) -> None:
    g = doc.get(name)
    if not isinstance(g, dict):
        raise ProfileError(f'"{name}" missing')
    xs = _axis(g.get(axis), f"{name}.{axis}")
    ms = g.get("ms")
    if not isinstance(ms, list) or len(ms) != len(xs):
        raise ProfileError(f"{name}.ms must hold one time per {axis} entry")
    for v in ms:
        _number(v, f"{name}.ms")


def _grid2(doc: dict, name: str, rows: str, cols: str) -> None:
    g = doc.get(name)
    if not isinstance(g, dict):
        raise ProfileError(f'"{name}" missing')
    nrows = len(_axis(g.get(rows), f"{name}.{rows}"))
    if cols == "image_sizes":
        if not _sizes(g.get(cols)):
            raise ProfileError(f"{name}.{cols} must be [[w, h], ...]")
        ncols = len(g[cols])
    else:
        ncols = len(_axis(g.get(cols), f"{name}.{cols}"))
    ms = g.get("ms")
    if not isinstance(ms, list) or len(ms) != nrows or not all(isinstance(r, list) and len(r) == ncols for r in ms):
        raise ProfileError(f"{name}.ms must be {nrows} rows ({rows}) of {ncols} times ({cols})")
    for row in ms:
        for v in row:
            _number(v, f"{name}.ms")

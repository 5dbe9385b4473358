"""The stage costs of a model on this machine, measured on the workers' own code paths, for the
planner's simulator (``mmcache plan``):

    python -m llm_worker.planner.profile --model tiny-llava --data-dir DIR --out profile.json [--quick]

- encode: ``Encoder.encode`` of a batch of images (preprocessing included) by batch size × image size;
- prefill: ``LLMEngine.prefill`` by prompt length (text ids: an image's tokens are embedding rows too);
- decode: one ``DecodeBatch.step`` by batch size × context length;
- the KV hand-off (put, then the decode side's get) and the prefill's read of image embeddings
  (``get_many``) against a real sidecar over its Unix socket, by bytes; and one HTTP round trip
  (``hop_ms``: a router → worker hop).

Each figure is the median of ``repeats`` runs after untimed warm-up runs. The document's format is
``FORMAT`` (see ``measure``); every list is sorted ascending and every time is in ms.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
from PIL import Image

from encoder_worker.encoder import Encoder
from encoder_worker.media import MediaLimits, decode_image
from encoder_worker.models import ensure_model
from llm_worker.engine.engine import LLMEngine
from llm_worker.engine.kv import kv_entry_fields, kv_key, read_prefill
from llm_worker.engine.prompt import template_ids
from llm_worker.engine.sampling import SamplingParams
from llm_worker.engine.sequence import DecodeState
from llm_worker.planner.stage_costs import FORMAT
from llm_worker.planner.workload import VOCABULARY, render_image
from mmcache.common.hostinfo import describe
from mmcache_client import CacheClient, content_hash

CACHE_REPEATS = 20
"""Timed runs of a cache read or an HTTP hop at least: a fraction of a ms each, noisy in threes."""
PUT_REPEATS = 5
"""Timed puts of each KV entry at least (each a new key; the sidecar's arena is sized for them)."""
FIRST_WARMUPS = 3
"""Untimed runs before the first point of a stage (one before every other point)."""

ProgressFn = Callable[[int, int, str], None]
"""``progress(done, total, what)``: once with ``done`` 0 when measuring starts (the model built and
loaded), then after each measured point; ``what`` says which and its figure."""

Size = tuple[int, int]


@dataclass(frozen=True)
class Grid:
    """Where each stage is measured. Lengths beyond the model's positions are left out."""

    encode_batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    image_sizes: tuple[Size, ...] = ((336, 336), (640, 480), (1280, 720))
    """(width, height) in pixels; sorted by area."""
    prefill_tokens: tuple[int, ...] = (32, 64, 128, 256, 512, 1024)
    """Prompt lengths; each prefill's KV is also the entry the hand-off puts and gets."""
    decode_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    decode_contexts: tuple[int, ...] = (64, 256, 1024)
    """Tokens in each request's KV when the timed steps run."""
    cache_images: tuple[int, ...] = (1, 2, 4, 8)
    """Embedding entries per ``get_many`` (each one image of the largest ``image_sizes``)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            values = getattr(self, f.name)
            flat = [v for size in values for v in size] if f.name == "image_sizes" else list(values)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in flat):
                raise ValueError(f"{f.name}={values!r} must be a non-empty list of ints >= 1")
            if f.name == "image_sizes":
                if any(len(size) != 2 for size in values):
                    raise ValueError(f"image_sizes={values!r} must be (width, height) pairs")
                values = sorted({tuple(s) for s in values}, key=lambda s: (s[0] * s[1], s))
                object.__setattr__(self, f.name, tuple(values))
            else:
                object.__setattr__(self, f.name, tuple(sorted(set(values))))


QUICK = Grid(encode_batch_sizes=(1, 2, 4), image_sizes=((336, 336), (1280, 720)), prefill_tokens=(32, 128, 512),
             decode_batch_sizes=(1, 4, 16), decode_contexts=(64, 512), cache_images=(1, 4))
"""A grid small enough for a CLIP-L/336 model on a laptop CPU (a few minutes)."""


def measure(model: str = "tiny-llava", data_dir: str = "./mmcache-data", *, device: str | None = None,
            dtype: str | None = None, quick: bool = False, repeats: int = 3, progress: ProgressFn | None = None,
            **grid: Any) -> dict:
    """Profile ``model`` (a built-in name, built into ``data_dir`` on first use, or a directory).

    ``device`` None: ``cuda`` when a GPU is visible, else ``cpu``; ``dtype`` None: the workers'
    default (float32 on the CPU). ``quick``: ``QUICK`` instead of the default ``Grid``; ``grid``
    keywords (``Grid``'s fields) replace parts of either. Starts a sidecar in a temp dir and
    stops it before returning. Raises ``ValueError`` for bad input.

    The document: ``format``, ``source`` (``"measured"``), ``model``, ``family``, ``device``,
    ``dtype``, ``threads``, ``machine``, ``created_at``, ``elapsed_s``; ``model_facts``
    (``kv_bytes_per_token``: the hand-off's K and V per prompt token, ``embedding_bytes_per_token``,
    ``max_model_len`` (0: unbounded), ``tokens_per_word`` of the workload's prompts,
    ``template_tokens`` around an empty user message); ``image_tokens`` (``image_sizes``,
    ``tokens``); ``encode`` (``batch_sizes``, ``image_sizes``, ``ms[batch][size]``); ``media``
    (``image_sizes``, ``ms``: decoding and hashing one JPEG of that size, as workers do); ``prefill``
    (``tokens``, ``ms``); ``decode`` (``batch_sizes``, ``contexts``, ``ms[batch][context]``: one
    step); ``kv_put``, ``kv_get``, ``cache_read`` (``bytes``: whole entries, header included, and
    ``ms``); ``hop_ms``.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"{repeats=} must be an int >= 1")
    plan = dataclasses.replace(QUICK if quick else Grid(), **grid)
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ValueError(f"{device=}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}: no CUDA device is visible to this process")
    t_start = time.perf_counter()
    model_dir = ensure_model(model, data_dir)
    engine = LLMEngine.load(model_dir, device, dtype)
    encoder = Encoder.load(model_dir, device, engine.dtype)
    limit = engine.max_model_len or float("inf")
    # NOTE: a decode row takes the warm-up steps and the timed ones, and must not finish in them (a
    # finished row leaves the batch within the step's time): room for two tokens more.
    sampling = SamplingParams(max_tokens=FIRST_WARMUPS + repeats + 2, seed=0)
    prefill_tokens = [n for n in plan.prefill_tokens if n < limit]
    contexts = [n for n in plan.decode_contexts if n + sampling.max_tokens <= limit]
    if not prefill_tokens or not contexts:
        raise ValueError(f"no prefill length or no decode context of the grid fits the model's {limit} positions")
    timer = _Timer(repeats, engine.device, progress, total=(
        (len(plan.encode_batch_sizes) + 1) * len(plan.image_sizes) + 3 * len(prefill_tokens)
        + len(plan.decode_batch_sizes) * len(contexts) + len(plan.cache_images) + 1))

    images = {size: _image(size) for size in plan.image_sizes}
    encode_ms = [[timer.ms("encode", f"batch {b} {w}x{h}", lambda: encoder.encode([images[(w, h)]] * b))
                  for w, h in plan.image_sizes] for b in plan.encode_batch_sizes]
    embedded = encoder.encode([images[plan.image_sizes[-1]]])[0]
    # NOTE: what a worker does to an image's bytes before the encoder sees it (decode and hash),
    # on JPEGs as the workload renders them
    jpegs = {size: render_image(1, size, "jpeg", 0) for size in plan.image_sizes}
    media_ms = [timer.ms("media", f"decode + hash {w}x{h} jpeg",
                         lambda: (decode_image(jpegs[(w, h)], MediaLimits()), content_hash(jpegs[(w, h)])))
                for w, h in plan.image_sizes]

    prompts = _prompts()
    prompt_ids = [engine.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    tokens_per_word = sum(map(len, prompt_ids)) / sum(len(p.split()) for p in prompts)
    filler = [t for ids in prompt_ids for t in ids]
    filler *= 1 + max(prefill_tokens + contexts) // len(filler)
    prefills = {}
    prefill_ms = []
    for n in prefill_tokens:
        prefill_ms.append(timer.ms("prefill", f"{n} tokens", lambda: engine.prefill(filler[:n], [], sampling)))
        prefills[n] = timer.last
    decode_ms = _decode_ms(engine, plan.decode_batch_sizes, contexts, filler, sampling, timer)

    arena_bytes = max(p.kv.nbytes for p in prefills.values()) * (FIRST_WARMUPS + max(repeats, PUT_REPEATS) + 1)
    with _sidecar(arena_bytes) as (unix_url, http_port), CacheClient(unix_url) as client:
        kv_bytes, put_ms, get_ms = _kv_handoff(client, engine, prefills, timer)
        read_bytes, read_ms = _cache_read(client, encoder, embedded, plan.cache_images, engine.device, timer)
        hop_ms = _hop_ms(http_port, timer)

    return {
        "format": FORMAT, "source": "measured", "model": str(model), "family": engine.family.name,
        "device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "machine": describe(torch=True),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(time.perf_counter() - t_start, 1),
        "model_facts": {
            "kv_bytes_per_token": prefills[prefill_tokens[0]].kv.nbytes // prefill_tokens[0],
            "embedding_bytes_per_token": embedded.embeddings.shape[1] * embedded.embeddings.element_size(),
            "max_model_len": engine.max_model_len or 0,
            "tokens_per_word": round(tokens_per_word, 4),
            "template_tokens": len(template_ids(engine.tokenizer, [{"role": "user", "content": ""}], engine.tokens)),
        },
        "image_tokens": {"image_sizes": [list(s) for s in plan.image_sizes],
                         "tokens": [encoder.num_image_tokens(images[s]) for s in plan.image_sizes]},
        "encode": {"batch_sizes": list(plan.encode_batch_sizes), "image_sizes": [list(s) for s in plan.image_sizes],
                   "ms": encode_ms},
        "media": {"image_sizes": [list(s) for s in plan.image_sizes], "ms": media_ms},
        "prefill": {"tokens": prefill_tokens, "ms": prefill_ms},
        "decode": {"batch_sizes": list(plan.decode_batch_sizes), "contexts": contexts, "ms": decode_ms},
        "kv_put": {"bytes": kv_bytes, "ms": put_ms}, "kv_get": {"bytes": kv_bytes, "ms": get_ms},
        "cache_read": {"bytes": read_bytes, "ms": read_ms},
        "hop_ms": hop_ms,
    }


def _decode_ms(engine: LLMEngine, batch_sizes: tuple[int, ...], contexts: list[int], filler: list[int],
               sampling: SamplingParams, timer: "_Timer") -> list[list[float]]:
    """Step ms ``[batch size][context]``: rows joined to a batch as ``DecodeLoop`` joins them, all
    continuing one prefill of ``context`` tokens."""
    out = [[0.0] * len(contexts) for _ in batch_sizes]
    for j, context in enumerate(contexts):
        start = engine.prefill(filler[:context], [], sampling)
        for i, size in enumerate(batch_sizes):
            batch = engine.new_batch()
            for r in range(size):
                # NOTE: as LLMEngine.start builds it, less the EOS tokens: no row may leave early.
                state = DecodeState(f"profile-{r}", sampling, engine.tokenizer, (), start.kv, start.position_delta)
                state.append(start.first_token)
                batch.add(state)
            out[i][j] = timer.ms("decode", f"batch {size} context {context}", batch.step)
            if len(batch) != size:
                raise RuntimeError(f"a row left the decode batch of {size} while it was timed")
    return out


class _Timer:
    """Medians of timed calls, with the progress report after each (one measured point)."""

    def __init__(self, repeats: int, device: torch.device, progress: ProgressFn | None, total: int) -> None:
        self.repeats, self.progress, self.total, self.done = repeats, progress, total, 0
        # NOTE: CUDA calls return once queued; without a sync we would time the launch, not the work.
        self._sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        self.last: Any = None
        """What the last timed call returned."""
        self._stages: set[str] = set()
        if progress is not None:
            progress(0, total, f"measuring {total} points")

    def ms(self, stage: str, point: str, fn: Callable[[], Any], repeats: int | None = None) -> float:
        """The median ms of ``fn`` after its warm-up: first-call allocations, lazy inits, cold pages
        (the first point of a ``stage`` warms up longer: a model's first calls run slow for a few)."""
        for _ in range(1 if stage in self._stages else FIRST_WARMUPS):
            self.last = fn()
        self._stages.add(stage)
        times = []
        for _ in range(repeats or self.repeats):
            self._sync()
            t0 = time.perf_counter()
            self.last = fn()
            self._sync()
            times.append((time.perf_counter() - t0) * 1e3)
        median = float(f"{statistics.median(times):.4g}")
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total, f"{stage} {point}: {median:g} ms")
        return median


def _kv_handoff(client: CacheClient, engine: LLMEngine, prefills: dict, timer: _Timer):
    """(entry bytes, put ms, get ms) per prefill: the prefill's ``put`` of its KV, and the decode
    side's ``get`` + ``read_prefill`` (views in place) + release."""
    sizes, put_ms, get_ms = [], [], []
    for n, result in prefills.items():
        fields = kv_entry_fields(result)
        repeats = max(timer.repeats, PUT_REPEATS)
        keys = (kv_key(engine.namespace, f"profile-{n}-{i}") for i in range(FIRST_WARMUPS + repeats))
        put = []

        def put_one() -> None:
            key = next(keys)
            client.put(key.namespace, key.hash, **fields)
            put.append(key)
        put_ms.append(timer.ms("kv put", f"{n} tokens", put_one, repeats))

        def get_one() -> int:
            with client.get(put[0].namespace, put[0].hash) as entry:
                read_prefill(entry)
                return entry.nbytes
        get_ms.append(timer.ms("kv get", f"{n} tokens", get_one, max(timer.repeats, CACHE_REPEATS)))
        sizes.append(timer.last)
        for key in put:  # NOTE: as the decode side does once the KV is in its batch
            client.delete(key.namespace, key.hash)
    return sizes, put_ms, get_ms


def _cache_read(client: CacheClient, encoder: Encoder, embedded, counts: tuple[int, ...], device: torch.device,
                timer: _Timer):
    """(entry bytes, ms) of the prefill's one ``get_many`` of ``n`` images' embedding entries, put
    as the encoder puts them; on a GPU onto it, as the prefill worker reads them."""
    keys = []
    for i in range(max(counts)):
        key = content_hash(f"profile-image-{i}".encode())
        client.put(encoder.namespace, key, embedded.embeddings, extras=embedded.extras or None,
                   encode_ms=embedded.encode_ms)
        keys.append(f"{encoder.namespace}/{key}")
    onto = device if device.type == "cuda" else None
    sizes, read_ms = [], []
    for n in counts:
        with client.get_many(keys[:n]) as batch:
            sizes.append(sum(entry.nbytes for entry in batch))

        def read() -> None:
            with client.get_many(keys[:n], device=onto) as batch:
                [entry.tensor for entry in batch]  # NOTE: what the prefill splices in (CPU: views, no copy)
        read_ms.append(timer.ms("cache read", f"{n} images", read, max(timer.repeats, CACHE_REPEATS)))
    return sizes, read_ms


def _hop_ms(port: int, timer: _Timer) -> float:
    """A kept-alive HTTP GET /healthz round trip (the router's sessions keep theirs alive)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def hop() -> None:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"the sidecar's /healthz answered {response.status}")
    try:
        return timer.ms("hop", "GET /healthz", hop, max(timer.repeats, CACHE_REPEATS))
    finally:
        conn.close()


@contextlib.contextmanager
def _sidecar(needed_bytes: int) -> Iterator[tuple[str, int]]:
    """``mmcache serve`` in a temp dir, as ``mmcache up`` runs it: (its unix:// URL, its HTTP port).
    Stopped and its dir removed on exit."""
    capacity = max(1 << 30, needed_bytes)
    tmp = tempfile.mkdtemp(prefix="mmcache-profile-")
    sock = os.path.join(tmp, "s.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmcache.cli", "serve", "--data-dir", os.path.join(tmp, "data"), "--host", "127.0.0.1",
         "--port", "0", "--socket", sock, "--host-capacity", str(capacity), "--max-entry-size", str(capacity),
         "--disk-capacity", str(capacity), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output = []
        for line in proc.stdout:  # NOTE: the ready line comes once both sockets listen
            output.append(line)
            if line.startswith("mmcache ready: "):
                break
        else:
            raise RuntimeError(f"the sidecar exited with {proc.wait()} before it was ready:\n{''.join(output)}")
        # NOTE: drained, so that a chatty sidecar never blocks on a full pipe
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        yield f"unix://{sock}", int(line.split()[2].rsplit(":", 1)[1])
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def _image(size: Size) -> Image.Image:
    """Seeded noise of ``size``: the preprocessing's cost depends on the pixel count, not the picture."""
    width, height = size
    pixels = np.random.default_rng(width * 100_003 + height).integers(0, 256, (height, width, 3), np.uint8)
    return Image.fromarray(pixels)


def _prompts(num_prompts: int = 16, num_words: int = 32) -> list[str]:
    """Seeded prompts as ``llm_worker.planner.workload`` writes them: words of its vocabulary, capitalized,
    with a question mark."""
    rng = random.Random(0)
    return [" ".join(rng.choice(VOCABULARY) for _ in range(num_words)).capitalize() + "?"
            for _ in range(num_prompts)]

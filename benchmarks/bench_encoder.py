"""Encoder cost by batch size, and the encode service's hit path against its miss path, in one run.

    python benchmarks/bench_encoder.py [--models tiny-llava,llava-clip-l336-random]
        [--batch-sizes 1,2,4,8,16] [--repeats 3] [--service-images N] [--quick]

A model may name its dtype: ``llava-clip-l336-random:float32`` (bf16 has no native support on
AVX2-only CPUs, where fp32 is the faster choice).

Models (built-in, seeded random weights, built once into --data-dir):
- tiny-llava:             the test model (CLIP-style ViT, hidden 64, 2 layers), float32 on the CPU
- llava-clip-l336-random: LLaVA-1.5-7B's vision side (CLIP ViT-L/14-336, 24 layers, 576 tokens,
                          projector to hidden 4096), bfloat16 as its checkpoint
Tables:
1. Encoder.encode (preprocess + forward) per batch of distinct PNG-decoded 512x384 images: median
   wall time per batch, images/s, ms/image; the image processor alone on the same batch (its share
   of the batch); the model's FLOPs per image from its config and the achieved GFLOP/s, next to
   F.linear of the ViT-L MLP's shape in the same dtype, alone (the physical reference: what this
   GEMM-bound model could at best reach on this machine).
2. POST /v1/encode through the real stack (sidecar with its Unix socket, encode service with the
   model preloaded, both served from one background event loop; the client is a keep-alive
   http.client in the main thread): one new image (miss: decode + hash + lookup + encode + put)
   and the same image again (hit: decode + hash + lookup + get), medians over N images, next to
   Encoder.encode alone (batch 1) and the PNG decode alone.
Defaults keep the whole run under ~10 minutes on a 2-core CPU: CLIP-L-sized batches in bf16 take
tens of seconds each there, so that model gets fewer batch sizes and one repeat unless told.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # NOTE: built-in models only; never reach the hub

import numpy as np
import torch
from aiohttp import web
from PIL import Image
from transformers import AutoConfig
from transformers.utils import logging as hf_logging

# NOTE: benchmarks/ is a folder of scripts; they share hostinfo.py from it.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from hostinfo import describe

from encoder_worker.encoder import Encoder
from encoder_worker.models import ensure_model
from encoder_worker.config import EncoderServeConfig
from encoder_worker.app import create_app as create_encoder_app
from mmcache.sidecar.config import ServeConfig
from mmcache.sidecar.server import create_app as create_sidecar_app
from mmcache.common.progress import Progress


@dataclass(frozen=True)
class Plan:
    dtype: torch.dtype
    batch_sizes: tuple[int, ...]
    repeats: int
    service_images: int
    """Images timed through the service (each once as a miss, then once as a hit)."""


PLANS = {
    "tiny-llava": Plan(torch.float32, (1, 2, 4, 8, 16), 5, 20),
    "llava-clip-l336-random": Plan(torch.bfloat16, (1, 2, 4, 8), 1, 3),
}
QUICK = {"tiny-llava": Plan(torch.float32, (1, 4, 16), 3, 10),
         "llava-clip-l336-random": Plan(torch.bfloat16, (1, 2), 1, 2)}
IMAGE_SIZE = (512, 384)


def png_bytes(seed: int) -> bytes:
    """A photo-like PNG: smooth colour field plus mild noise (pure noise would not compress at all)."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize(IMAGE_SIZE, Image.BICUBIC)
    pixels = np.asarray(base).astype(np.int16) + rng.integers(-8, 9, (IMAGE_SIZE[1], IMAGE_SIZE[0], 3))
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def decode(raw: bytes) -> Image.Image:
    with Image.open(io.BytesIO(raw)) as im:
        return im.convert("RGB")


def timed_ms(fn) -> float:
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / 1e6


def llava_gflop_per_image(config) -> float:
    """Multiply-adds x 2 of the ViT (every layer runs, even past vision_feature_layer) and projector.

    Per layer: QKV + output projections 8*T*d^2, MLP 4*T*d*ff, attention scores and values 4*T^2*d;
    plus the patch convolution and the 2-layer projector. Norms and activations are left out (<1%).
    """
    v, hidden = config.vision_config, config.text_config.hidden_size
    patches = (v.image_size // v.patch_size) ** 2
    tokens, d = patches + 1, v.hidden_size
    layer = 8 * tokens * d * d + 4 * tokens * d * v.intermediate_size + 4 * tokens * tokens * d
    conv = 2 * patches * 3 * v.patch_size**2 * d
    projector = 2 * patches * (d * hidden + hidden * hidden)
    return (v.num_hidden_layers * layer + conv + projector) / 1e9


def linear_gflops(dtype: torch.dtype, num_tokens: int = 2 * 577, d_in: int = 1024, d_out: int = 4096,
                  repeats: int = 5) -> float:
    """F.linear of the ViT-L MLP's shape (two images' tokens), alone: the op that dominates the model.

    Best of ``repeats``, not the median: it stands for what this machine can do, and a neighbour
    taking a core for a moment would otherwise halve it. NOTE: linear, not a square torch.mm: on
    CPUs without native bf16, PyTorch's bf16 mm of untransposed operands is ~40x slower.
    """
    x, w, b = (torch.randn(*shape, dtype=dtype) for shape in ((num_tokens, d_in), (d_out, d_in), (d_out,)))
    torch.nn.functional.linear(x, w, b)
    ms = min(timed_ms(lambda: torch.nn.functional.linear(x, w, b)) for _ in range(repeats))
    return 2 * num_tokens * d_in * d_out / (ms / 1e3) / 1e9


class ForeignLoad:
    """The share of this machine's CPU time spent outside this process since ``__init__``.

    Benchmarks on a shared machine are only as good as their quiet; this says how quiet it was
    (from /proc/stat's busy ticks minus this process's own CPU time, over all cores).
    """

    def __init__(self) -> None:
        self._t0, self._busy0, self._own0 = time.monotonic(), self._busy_s(), self._own_s()

    @staticmethod
    def _busy_s() -> float:
        try:
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return float("nan")
        return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait

    @staticmethod
    def _own_s() -> float:
        t = os.times()
        return t.user + t.system

    def share(self) -> float:
        elapsed = (time.monotonic() - self._t0) * (os.cpu_count() or 1)
        return max(0.0, (self._busy_s() - self._busy0) - (self._own_s() - self._own0)) / elapsed


def bench_encode(encoder: Encoder, images: list[Image.Image], batch_sizes, repeats: int,
                 name: str = "encode") -> list[dict]:
    """Median per batch size; the sizes take turns within each repeat, so that a burst of load
    from elsewhere lands on all of them rather than on one. Progress on stderr as ``name``: batches
    timed, and each batch over a second (the slow model) on a line of its own."""
    pool = iter(range(10**9))

    def next_batch(size: int) -> list[Image.Image]:  # consecutive calls see different images
        return [images[next(pool) % len(images)] for _ in range(size)]
    encoder.encode(next_batch(1))  # warm-up: first-call allocations and kernel selection, untimed
    encode_ms = {size: [] for size in batch_sizes}
    pre_ms = {size: [] for size in batch_sizes}
    with Progress(name, total=repeats * len(batch_sizes), unit="batches", counters=("images",)) as progress:
        for rep in range(repeats):
            for size in batch_sizes:
                batch = next_batch(size)
                encode_ms[size].append(timed_ms(lambda: encoder.encode(batch)))
                pre_ms[size].append(timed_ms(lambda: encoder.image_processor(images=batch, return_tensors="pt")))
                if encode_ms[size][-1] > 1000:
                    progress.note(f"repeat {rep + 1}/{repeats}, batch {size:>2}: {encode_ms[size][-1]:,.0f} ms")
                progress.update(1, images=size)
    return [{"batch": size, "encode_ms": statistics.median(encode_ms[size]), "pre_ms": statistics.median(pre_ms[size]),
             "n": repeats} for size in batch_sizes]


class ServiceStack:
    """The sidecar (HTTP + Unix socket) and the encode service on one background event loop.

    Lifecycle: ``start()`` returns once both listen (or raises their startup error); ``stop()``
    shuts the encode service down first, then the sidecar.
    """

    def __init__(self, tmp: str, encoder: Encoder, entry_bytes: int):
        sock = os.path.join(tmp, "cache.sock")
        host_bytes = max(64 << 20, 64 * entry_bytes)
        self.cache_config = ServeConfig(data_dir=os.path.join(tmp, "cache"), port=0, socket=sock, log_level="warning",
                                        host_capacity_bytes=host_bytes, disk_capacity_bytes=4 * host_bytes)
        self.config = EncoderServeConfig(cache_url=f"unix://{sock}", port=0)
        self.encoder = encoder
        self.port: int | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as e:  # surfaced by start()
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        sidecar = web.AppRunner(create_sidecar_app(self.cache_config), access_log=None)
        await sidecar.setup()  # NOTE: its startup opens the Unix socket the encode service puts through
        await web.TCPSite(sidecar, "127.0.0.1", 0).start()
        service = web.AppRunner(create_encoder_app(self.config, encoder=self.encoder), access_log=None)
        await service.setup()
        try:
            await web.TCPSite(service, "127.0.0.1", 0).start()
            self.port = service.addresses[0][1]
            self._ready.set()
            await self._stop.wait()
        finally:
            await service.cleanup()
            await sidecar.cleanup()

    def start(self) -> "ServiceStack":
        self._thread.start()
        self._ready.wait(120)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(120)
        self._loop.close()


def bench_service(encoder: Encoder, raws: list[bytes], name: str = "service") -> dict:
    """Each image of ``raws`` POSTed twice (a miss, then a hit); medians. Progress on stderr as
    ``name``: images done, and each miss over a second on a line of its own."""
    entry_bytes = encoder.num_image_tokens(decode(raws[0])) * encoder.hidden_size * encoder.dtype.itemsize
    with tempfile.TemporaryDirectory(prefix="mmc-bench-", dir="/tmp") as tmp:
        stack = ServiceStack(tmp, encoder, entry_bytes).start()
        conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=600)
        try:
            def post(uri: str) -> dict:
                conn.request("POST", "/v1/encode", body=json.dumps({"images": [uri]}),
                             headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    raise RuntimeError(f"POST /v1/encode: {response.status} {body[:200]!r}")
                return json.loads(body)["items"][0]
            conn.request("GET", "/healthz")  # opens the keep-alive connection, untimed
            conn.getresponse().read()
            miss_ms, hit_ms = [], []
            with Progress(name, total=len(raws), unit="images") as progress:
                for raw in raws:
                    uri = "data:image/png;base64," + base64.b64encode(raw).decode()
                    box = {}
                    miss_ms.append(timed_ms(lambda: box.update(miss=post(uri))))
                    hit_ms.append(timed_ms(lambda: box.update(hit=post(uri))))
                    if box["miss"]["cached"] or not box["hit"]["cached"]:
                        raise RuntimeError(f"expected a miss then a hit, got {box}")
                    if miss_ms[-1] > 1000:
                        progress.note(f"image {len(miss_ms)}: miss {miss_ms[-1]:,.0f} ms, hit {hit_ms[-1]:,.2f} ms")
                    progress.update(1)
        finally:
            conn.close()
            stack.stop()
    return {"miss_ms": statistics.median(miss_ms), "hit_ms": statistics.median(hit_ms), "n": len(raws),
            "entry_bytes": entry_bytes, "decode_ms": statistics.median(timed_ms(lambda: decode(r)) for r in raws)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(PLANS), help=f"comma-separated, of: {', '.join(PLANS)}")
    ap.add_argument("--batch-sizes", help="comma-separated; default per model (see PLANS)")
    ap.add_argument("--repeats", type=int, help="timed batches per batch size; default per model")
    ap.add_argument("--service-images", type=int, help="images timed through the service; default per model")
    ap.add_argument("--quick", action="store_true", help="fewer batch sizes, repeats and service images")
    ap.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "mmcache-bench"),
                    help="where the built-in models are built (once) and reused")
    args = ap.parse_args()
    plans = QUICK if args.quick else PLANS
    specs = [spec.partition(":")[::2] for spec in args.models.split(",")]
    if unknown := [n for n, _ in specs if n not in plans]:
        ap.error(f"unknown models {unknown}; known: {', '.join(plans)}")
    if bad := [d for _, d in specs if d and not isinstance(getattr(torch, d, None), torch.dtype)]:
        ap.error(f"unknown dtypes {bad}; e.g. float32, bfloat16, float16")
    hf_logging.disable_progress_bar()

    print(f"machine: {describe(torch=True)}")
    print(f"load average before the run: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    whole_run = ForeignLoad()
    reference = {dtype: linear_gflops(dtype) for dtype in (torch.float32, torch.bfloat16)}
    print("reference: F.linear [1154 x 1024] -> 4096 (the ViT-L MLP's GEMM), best of 5: "
          + ", ".join(f"{str(d).removeprefix('torch.')} {g:,.1f} GFLOP/s" for d, g in reference.items()))
    raws = [png_bytes(seed) for seed in range(32)]
    images = [decode(r) for r in raws]
    print(f"images: {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} PNG, ~{statistics.median(map(len, raws)) / 1e3:.0f} KB each, "
          "decoded before timing (table 1) or by the service (table 2)\n")

    results = []
    for i, (name, dtype_name) in enumerate(specs):
        plan = replace(plans[name], dtype=getattr(torch, dtype_name)) if dtype_name else plans[name]
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else plan.batch_sizes
        repeats = args.repeats or plan.repeats
        t0, load = time.perf_counter(), ForeignLoad()
        model_dir = ensure_model(name, args.data_dir)
        encoder = Encoder.load(model_dir, dtype=plan.dtype)
        gflop = llava_gflop_per_image(AutoConfig.from_pretrained(model_dir, local_files_only=True))
        print(f"{name}: {str(plan.dtype).removeprefix('torch.')}, {gflop:,.1f} GFLOP/image, "
              f"ready in {time.perf_counter() - t0:.1f} s (build on first use + load)", flush=True)
        rows = bench_encode(encoder, images, batch_sizes, repeats, f"{name} encode")
        num_service = args.service_images or plan.service_images
        service_raws = [png_bytes(10_000 * (i + 1) + seed) for seed in range(num_service)]  # new to the cache
        service = bench_service(encoder, service_raws, f"{name} service")
        results.append({"name": name, "dtype": plan.dtype, "gflop": gflop, "rows": rows, "service": service,
                        "foreign": load.share()})
        print(f"  other processes used {100 * results[-1]['foreign']:.0f}% of the CPUs meanwhile\n")
    print_tables(results, reference)
    foreign = whole_run.share()
    print(f"\nother processes used {100 * foreign:.0f}% of the {os.cpu_count()} CPUs during the whole run"
          + (" (not quiet: timings are inflated, rerun on an idle machine)" if foreign > 0.1 else ""))
    return 0


def print_tables(results: list[dict], reference: dict) -> None:
    print("1. Encoder.encode on the CPU (median wall time per batch; pre = image processor alone)")
    print(f"{'model':>22} {'dtype':>8} {'batch':>5} {'n':>3} | {'ms/batch':>9} {'img/s':>7} {'ms/img':>8} | "
          f"{'pre ms':>7} {'pre %':>6} | {'GFLOP/img':>9} {'GFLOP/s':>8} {'% of ref':>8}")
    for r in results:
        mm = reference[r["dtype"]]
        for row in r["rows"]:
            ms, b = row["encode_ms"], row["batch"]
            gflops = r["gflop"] * b / (ms / 1e3)
            print(f"{r['name']:>22} {str(r['dtype']).removeprefix('torch.'):>8} {b:>5} {row['n']:>3} | {ms:>9,.1f} "
                  f"{b / (ms / 1e3):>7.2f} {ms / b:>8,.1f} | {row['pre_ms']:>7.1f} {100 * row['pre_ms'] / ms:>5.1f}% | "
                  f"{r['gflop']:>9.2f} {gflops:>8.1f} {100 * gflops / mm:>7.1f}%")
    print("\n2. POST /v1/encode, one image per request (miss: decode+hash+lookup+encode+put; "
          "hit: decode+hash+lookup+get)")
    print(f"{'model':>22} {'dtype':>8} {'n':>3} {'entry MiB':>9} | {'miss ms':>9} {'hit ms':>8} {'miss/hit':>9} | "
          f"{'encode b=1 ms':>13} {'png decode ms':>13}")
    for r in results:
        s = r["service"]
        print(f"{r['name']:>22} {str(r['dtype']).removeprefix('torch.'):>8} {s['n']:>3} {s['entry_bytes'] / 2**20:>9.2f} | {s['miss_ms']:>9,.1f} "
              f"{s['hit_ms']:>8.2f} {s['miss_ms'] / s['hit_ms']:>8.0f}x | "
              f"{next((row['encode_ms'] for row in r['rows'] if row['batch'] == 1), float('nan')):>13,.1f} "
              f"{s['decode_ms']:>13.2f}")
    print("\nother processes' share of the CPUs while each model ran: "
          + ", ".join(f"{r['name']} {str(r['dtype']).removeprefix('torch.')} {100 * r['foreign']:.0f}%" for r in results))


if __name__ == "__main__":
    sys.exit(main())

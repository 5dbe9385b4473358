"""The EPD benchmark's video workload (``python benchmarks/epd.py --workload video``): a sliding-window
captioner over one camera feed, as a surveillance or live-captioning client sends it.

The feed (``clips.feed``, lossless FFV1: a frame decodes to the same pixels in every window that
holds it, as segments cut at keyframes do) is cut into windows of ``window_s`` seconds that start
``stride_s`` apart, so consecutive windows share ``1 - stride_s / window_s`` of their frames. Each
window is one chat request (``video_url`` with ``mm_processor_kwargs`` fps / max_frames), sent one
after the other (closed loop: TTFT is latency, not queueing), to each system started fresh with
``mmcache up``:

- ``epd``: the cache: a window's frames (temporal groups) that an earlier window had are read,
  not encoded;
- ``aggregated``: no cache: every frame of every window is encoded;
- ``aggregated-lru``: an in-process embedding LRU (vLLM's encoder cache) in the one worker.

Per system: frames sampled and encoded per request (measured: the encoders' ``frames_encoded``
counters, the aggregated worker's own), TTFT median and p99, end-to-end median. Writes
``video.json`` into the results folder and prints the table.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clips import data_uri, feed, make_clip
from hostinfo import describe
from stack_process import StackProcess

from mmcache.common.progress import Progress


@dataclass(frozen=True)
class VideoShape:
    """One profile's video workload."""

    frame_size: tuple[int, int]
    """(height, width) of the feed's frames."""
    source_fps: int
    window_s: float
    stride_s: float
    windows: int
    fps: float
    """Sampling rate asked for (``mm_processor_kwargs.fps``)."""
    max_tokens: int = 16


SHAPES = {
    # NOTE: tiny-qwen2-vl: a frame group of 2 costs <= 64 tokens; 8 s windows sampled at 2 fps = 16 frames
    "tiny-qwen2-vl": VideoShape(frame_size=(224, 320), source_fps=4, window_s=8.0, stride_s=4.0, windows=10, fps=2.0),
    # NOTE: LLaVA takes each frame as an image of 576 tokens: short windows (4 frames at 1 fps)
    "tiny": VideoShape(frame_size=(224, 320), source_fps=4, window_s=4.0, stride_s=2.0, windows=8, fps=1.0),
    "realistic": VideoShape(frame_size=(336, 448), source_fps=4, window_s=4.0, stride_s=2.0, windows=6, fps=1.0),
}
SYSTEMS = {"epd": (), "aggregated": ("--aggregated",), "aggregated-lru": ("--aggregated",)}


def windows(shape: VideoShape, seed: int) -> list[bytes]:
    per_window, stride = int(shape.window_s * shape.source_fps), int(shape.stride_s * shape.source_fps)
    frames = feed(stride * (shape.windows - 1) + per_window, size=shape.frame_size, seed=seed)
    return [make_clip(frames[i * stride:i * stride + per_window], fps=shape.source_fps) for i in range(shape.windows)]


def _frames(system: str, stats: dict) -> tuple[int, int]:
    """(frames sampled, frames encoded) so far, from the router's /v1/stats."""
    if system == "epd":
        return stats["totals"]["frames"], stats["totals"]["frames_encoded"]
    worker = stats["generate"][0]["stats"]
    return worker["frames"], worker["frames_encoded"]


def run_system(system: str, model_dir: str, shape: VideoShape, clips: list[bytes], flags: list[str],
               workdir: Path, cache_capacity: str, run: str = "") -> list[dict]:
    """``system`` started fresh, warmed up on another feed, then asked each clip in turn; a row per
    clip. Progress on stderr: windows answered (``run``, e.g. ``run 1/2``, names the run)."""
    import openai

    args = [*SYSTEMS[system], "--model", model_dir, "--data-dir", tempfile.mkdtemp(prefix=f"video-{system}-", dir=workdir),
            "--port", "0", "--host-capacity", cache_capacity, "--log-level", "warning", *flags]
    if system == "aggregated-lru":
        args += ["--encoder-cache", cache_capacity]
    rows = []
    with StackProcess(*args) as up:
        client = openai.OpenAI(base_url=up.url + "/v1", api_key="unused", max_retries=0, timeout=3600)
        model = Path(model_dir).name
        options = {"fps": shape.fps, "max_frames": int(shape.window_s * shape.fps) + 1}

        def ask(clip: bytes) -> tuple[float, float]:
            sent = time.perf_counter()
            first = None
            stream = client.chat.completions.create(
                model=model, max_tokens=shape.max_tokens, temperature=0, stream=True,
                messages=[{"role": "user", "content": [{"type": "text", "text": "What happens in this clip?"},
                                                       {"type": "video_url", "video_url": {"url": data_uri(clip)}}]}],
                extra_body={"mm_processor_kwargs": options})
            for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content is not None:
                    first = time.perf_counter()
            return (first or time.perf_counter()) - sent, time.perf_counter() - sent
        # NOTE: warm-up on another feed (its frames share nothing with the measured windows)
        ask(make_clip(feed(int(shape.window_s * shape.source_fps), size=shape.frame_size, seed=12345),
                      fps=shape.source_fps))
        with Progress(f"{system} ({run})" if run else system, total=len(clips), unit="windows",
                      counters=("frames encoded",)) as progress:
            for i, clip in enumerate(clips):
                before = _frames(system, up.stats())
                ttft, e2e = ask(clip)
                after = _frames(system, up.stats())
                rows.append({"system": system, "window": i, "ttft_s": ttft, "e2e_s": e2e,
                             "frames": after[0] - before[0], "frames_encoded": after[1] - before[1]})
                progress.update(1, **{"frames encoded": rows[-1]["frames_encoded"]})
                print(f"  {system:15s} window {i}: {rows[-1]['frames_encoded']}/{rows[-1]['frames']} frames encoded, "
                      f"TTFT {ttft:.3f} s", flush=True)
    return rows


def summarise(rows: list[dict]) -> dict:
    out = {}
    for system in dict.fromkeys(r["system"] for r in rows):
        mine = [r for r in rows if r["system"] == system]
        later = mine[1:]  # NOTE: the first window has nothing to reuse anywhere
        ttft = np.array([r["ttft_s"] for r in mine])
        out[system] = {
            "requests": len(mine),
            "frames_per_request": float(np.mean([r["frames"] for r in mine])),
            "encoded_per_request": float(np.mean([r["frames_encoded"] for r in mine])),
            "encoded_per_later_request": float(np.mean([r["frames_encoded"] for r in later])) if later else None,
            "ttft_median_s": float(np.median(ttft)), "ttft_p99_s": float(np.quantile(ttft, 0.99)),
            "ttft_later_median_s": float(np.median([r["ttft_s"] for r in later])) if later else None,
            "e2e_median_s": float(np.median([r["e2e_s"] for r in mine])),
        }
    return out


def print_table(summary: dict, shape: VideoShape) -> None:
    overlap = 1 - shape.stride_s / shape.window_s
    print(f"\nvideo: {len(summary)} systems; windows of {shape.window_s:g} s "
          f"every {shape.stride_s:g} s ({overlap:.0%} overlap), sampled at {shape.fps:g} fps, "
          f"{shape.frame_size[1]}x{shape.frame_size[0]}")
    print(f"{'system':16s} {'frames/req':>10s} {'encoded/req':>11s} {'encoded/req 2+':>14s} {'TTFT p50':>9s} "
          f"{'TTFT p99':>9s} {'TTFT p50 2+':>11s} {'e2e p50':>8s}")
    for system, s in summary.items():
        print(f"{system:16s} {s['frames_per_request']:10.1f} {s['encoded_per_request']:11.1f} "
              f"{s['encoded_per_later_request'] or 0:14.1f} {s['ttft_median_s']:9.3f} {s['ttft_p99_s']:9.3f} "
              f"{s['ttft_later_median_s'] or 0:11.3f} {s['e2e_median_s']:8.3f}")
    print("(2+: the windows after the first, each sharing frames with the one before)")


def run(profile: str, model_dir: str, systems: list[str], flags_for, cache_capacity: str, out: Path,
        seed: int) -> int:
    """Run the video workload of ``profile`` on ``systems``; ``flags_for(system)``: the stack's flags."""
    shape = SHAPES[profile]
    clips = windows(shape, seed)
    print(f"machine: {describe()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="mmc-video-", dir="/tmp") as workdir:
        for k, system in enumerate(systems, 1):
            rows += run_system(system, model_dir, shape, clips, flags_for(system), Path(workdir), cache_capacity,
                               f"run {k}/{len(systems)}")
    summary = summarise(rows)
    print_table(summary, shape)
    out.mkdir(parents=True, exist_ok=True)
    (out / "video.json").write_text(json.dumps({"profile": profile, "shape": shape.__dict__, "machine": describe(),
                                                "summary": summary, "rows": rows}, indent=1, default=str))
    print(f"wrote {out / 'video.json'}")
    return 0

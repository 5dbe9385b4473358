"""Videos: decode a clip with PyAV, sample its frames, and cut them into the model's temporal groups.

A video part (``{"type": "video_url", "video_url": {"url": ...}}``) is fetched like an image
(``media.fetch_bytes``, with ``VideoLimits.max_bytes``) and decoded here, in a worker thread:

- **Sampling** (``VideoSampling``, vLLM's ``mm_processor_kwargs``): one frame every ``1 / fps``
  seconds from the clip's first frame, at most ``max_frames``; a clip whose container states a
  duration too long for both gets its interval stretched to cover it in ``max_frames`` (as
  vLLM's uniform sampling does). A frame is the first decoded one at or after its time.
- **Groups**: the model encodes ``group_size`` consecutive sampled frames together (Qwen2-VL's
  temporal patch of 2; LLaVA: 1, each frame an image). The last group is padded with copies of
  the last frame, as the model's processor pads.
- **Keys**: each group is keyed by the BLAKE3 of its frames' decoded RGB pixels (and sizes) plus
  the sampling that chose them (``group_hash``): two clips that share frames, sampled alike, share
  entries, whatever file they came in.

Every input is untrusted: the byte size is bounded before decoding; the stream's dimensions
before any frame is decoded; the stated and the decoded duration, the frames decoded and the
decode's wall time while decoding. Every failure is a ``MediaError`` naming it; PyAV's and
FFmpeg's errors on hostile files included.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import math
import struct
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from blake3 import blake3
from PIL import Image

from encoder_worker.media import MediaError, MediaLimits, fetch_bytes, uniform_fetch_error

_GROUP_HASH_FORMAT = b"mmcache-video-group/1"
_TIME_SLACK_S = 1e-3
"""A frame this close before its sampling time counts as at it (timestamps are rounded)."""


@dataclass(frozen=True)
class VideoSampling:
    """How frames are taken from a clip (a request's ``mm_processor_kwargs``, or the defaults)."""

    fps: float = 2.0
    """Frames sampled per second of video."""
    max_frames: int = 16
    """Most frames sampled from one clip."""

    def __post_init__(self) -> None:
        if isinstance(self.fps, bool) or not isinstance(self.fps, (int, float)) or not 0 < self.fps <= 120 \
                or not math.isfinite(self.fps):
            raise ValueError(f"fps={self.fps!r} must be a number in (0, 120]")
        if isinstance(self.max_frames, bool) or not isinstance(self.max_frames, int) or self.max_frames < 1:
            raise ValueError(f"max_frames={self.max_frames!r} must be an int >= 1")

    @classmethod
    def from_options(cls, options: object, default: "VideoSampling", max_frames_cap: int) -> "VideoSampling":
        """``options`` (``{"fps": 2, "max_frames": 8}``, absent keys from ``default``) checked, with
        ``max_frames`` at most ``max_frames_cap``; ``ValueError`` names what is wrong."""
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise ValueError('"mm_processor_kwargs" must be an object such as {"fps": 2, "max_frames": 8}')
        unknown = sorted(set(options) - {"fps", "max_frames"})
        if unknown:
            raise ValueError(f"mm_processor_kwargs: unknown option(s) {unknown}; known: fps, max_frames")
        sampling = cls(fps=options.get("fps", default.fps), max_frames=options.get("max_frames", default.max_frames))
        if sampling.max_frames > max_frames_cap:
            raise ValueError(f"max_frames={sampling.max_frames} exceeds this server's limit of {max_frames_cap}")
        return sampling

    def to_json(self) -> dict:
        return {"fps": self.fps, "max_frames": self.max_frames}


@dataclass(frozen=True)
class VideoLimits:
    """Bounds applied to every video a request names."""

    max_bytes: int = 256 << 20
    """Largest encoded video accepted, in bytes."""
    max_seconds: float = 600.0
    """Longest clip accepted (stated or decoded), in seconds."""
    max_frames: int = 64
    """Most frames sampled from one clip (a request's ``max_frames`` may not exceed it)."""
    max_decoded_frames: int = 36_000
    """Most frames decoded from one clip (sampled or not)."""
    max_pixels: int = 1920 * 1088
    """Largest ``width * height`` of a frame (enforced by the decoder itself, before a frame is
    allocated, as well as on each frame)."""
    max_sampled_pixels: int = 64 * 1920 * 1088
    """Most pixels of all frames sampled from one clip (the RGB frames held until encoded)."""
    max_videos_per_request: int = 8
    """Most video parts one request may hold."""
    fetch_timeout_s: float = 60.0
    """Whole http(s) fetch of a video, in seconds."""
    max_decode_s: float = 30.0
    """Longest wall time decoding one clip may take."""
    codecs: tuple[str, ...] = ("h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mpeg2video", "mpeg1video", "mjpeg",
                               "ffv1", "gif", "theora", "png", "rawvideo")
    """FFmpeg video decoders a clip may need; others (rarely used, rarely fuzzed) are refused."""
    formats: tuple[str, ...] = ("matroska", "webm", "mov", "mp4", "m4a", "3gp", "3g2", "mj2", "avi", "mpegts",
                                "mpeg", "ogg", "flv", "gif")
    """FFmpeg demuxers tried (its ``format_whitelist``); others are refused before they parse a
    byte past the probe. NOTE: not playlists (``hls``, ``concat``), which open other files and
    URLs, nor the image demuxers, which take a picture for a one-frame video."""

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_seconds", "max_frames", "max_decoded_frames", "max_pixels", "max_decode_s",
                     "max_sampled_pixels", "max_videos_per_request", "fetch_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"video limit {name}={getattr(self, name)!r} must be > 0")


@dataclass(frozen=True)
class FrameGroup:
    """Consecutive sampled frames the model encodes together (an item the encoder takes, as an image is)."""

    frames: tuple[Image.Image, ...]
    """RGB frames, ``group_size`` of them (the last group padded with its last frame)."""
    num_frames: int
    """Real frames in it (the rest are padding)."""
    hash: str
    """``group_hash`` of the frames and the sampling."""


@dataclass(frozen=True)
class Clip:
    """A decoded clip: its sampled frames cut into groups."""

    groups: list[FrameGroup]
    num_frames: int
    """Frames sampled."""
    interval_s: float
    """Seconds between sampled frames."""


def group_hash(frames: list[np.ndarray], interval_s: float, group_size: int) -> str:
    """BLAKE3-256 (hex) of a group's frames (``[h, w, 3]`` uint8 each) and the sampling that took
    them: the interval between frames and the group size."""
    h = blake3(_GROUP_HASH_FORMAT)
    h.update(struct.pack("<dII", float(interval_s), group_size, len(frames)))
    for frame in frames:
        h.update(struct.pack("<III", *frame.shape))
        h.update(np.ascontiguousarray(frame).data)
    return h.hexdigest()


def decode_video(data: bytes, sampling: VideoSampling, limits: VideoLimits, group_size: int = 1) -> Clip:
    """``data`` decoded and sampled (see the module docstring); ``MediaError`` says why not."""
    import av  # NOTE: here, not at import: a worker that never sees a video never loads FFmpeg

    if len(data) > limits.max_bytes:
        raise MediaError(f"video holds {len(data)} bytes, over max_video_bytes={limits.max_bytes}")
    if sampling.max_frames > limits.max_frames:
        raise MediaError(f"max_frames={sampling.max_frames} exceeds this server's limit of {limits.max_frames}")
    t0 = time.monotonic()
    try:
        # NOTE: the protocol whitelist is empty: no demuxer may open another file or URL
        # NOTE: timeout: FFmpeg's interrupt callback bounds a probe that stalls
        container = av.open(io.BytesIO(data), mode="r", timeout=limits.max_decode_s,
                            options={"format_whitelist": ",".join(limits.formats), "protocol_whitelist": "none"})
    except Exception as exc:  # NOTE: av.error.* (InvalidDataError, ...), on any non-video bytes
        raise MediaError(f"not a decodable video in an accepted format ({', '.join(limits.formats)}): "
                         f"{_reason(exc)}") from exc
    try:
        if not container.streams.video:
            raise MediaError("not a video: the file has no video stream")
        stream = container.streams.video[0]
        codec = stream.codec_context.name
        if codec not in limits.codecs:
            raise MediaError(f"video codec {codec!r} is not accepted ({', '.join(limits.codecs)})")
        # NOTE: the decoder refuses a larger frame before allocating it (a stream may change size
        # mid-way); one thread: a clip's decode takes one core, not all of them
        stream.codec_context.options = {"max_pixels": str(limits.max_pixels)}
        stream.codec_context.thread_count = 1
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > limits.max_pixels:
            raise MediaError(f"video frames are {width}x{height} = {width * height} pixels, "
                             f"over max_video_pixels={limits.max_pixels}")
        stated = _stated_seconds(container, stream)
        if stated is not None and stated > limits.max_seconds:
            raise MediaError(f"video lasts {stated:.1f} s, over max_video_seconds={limits.max_seconds:g}")
        interval = 1.0 / sampling.fps
        if stated is not None and math.ceil(stated * sampling.fps - 1e-6) > sampling.max_frames:
            interval = stated / sampling.max_frames  # NOTE: only when fps would take too many
        frames = _sample(container, stream, interval, sampling.max_frames, limits, t0)
    except MediaError:
        raise
    except Exception as exc:  # NOTE: FFmpeg errors mid-stream: a corrupt or truncated file
        raise MediaError(f"not a decodable video: {_reason(exc)}") from exc
    finally:
        container.close()
    if not frames:
        raise MediaError("not a decodable video: no frame could be decoded")
    groups = []
    for i in range(0, len(frames), group_size):
        real = frames[i:i + group_size]
        padded = real + [real[-1]] * (group_size - len(real))
        groups.append(FrameGroup(tuple(Image.fromarray(f) for f in padded), len(real),
                                 group_hash(padded, interval, group_size)))
    return Clip(groups, len(frames), interval)


def _sample(container, stream, interval: float, max_frames: int, limits: VideoLimits, t0: float) -> list[np.ndarray]:
    """The sampled RGB frames, every bound checked on the way."""
    frames: list[np.ndarray] = []
    decoded = pixels = 0
    start = None
    due = 0.0
    """Time (from the first frame) of the next frame to sample."""
    rate = float(stream.average_rate) if stream.average_rate else 25.0
    for packet in container.demux(stream):
        # NOTE: checked per packet, not only per frame: packets that give no frame count too
        if time.monotonic() - t0 > limits.max_decode_s:
            raise MediaError(f"decoding the video took over max_video_decode_s={limits.max_decode_s:g} s")
        for frame in packet.decode():
            decoded += 1
            if decoded > limits.max_decoded_frames:
                raise MediaError(f"video has more than max_video_decoded_frames={limits.max_decoded_frames} frames")
            t = frame.time if frame.time is not None else (decoded - 1) / rate
            if start is None:
                start = t
            if t - start > limits.max_seconds:
                raise MediaError(f"video lasts over max_video_seconds={limits.max_seconds:g}")
            if frame.width * frame.height > limits.max_pixels:
                raise MediaError(f"a video frame is {frame.width}x{frame.height}, over max_video_pixels="
                                 f"{limits.max_pixels}")
            if frames and (frame.height, frame.width) != frames[0].shape[:2]:
                raise MediaError(f"the video's frames change size ({frames[0].shape[1]}x{frames[0].shape[0]} "
                                 f"to {frame.width}x{frame.height})")
            if t - start < due - _TIME_SLACK_S:
                continue
            pixels += frame.width * frame.height
            if pixels > limits.max_sampled_pixels:
                raise MediaError(f"the sampled frames hold over max_video_sampled_pixels={limits.max_sampled_pixels}")
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == max_frames:
                return frames
            # NOTE: the next due time after this frame's, not after the last due one: after a gap
            # in the timestamps, sampling goes on from here instead of catching up frame by frame
            due = (math.floor((t - start) / interval + _TIME_SLACK_S) + 1) * interval
    return frames


def _stated_seconds(container, stream) -> float | None:
    """The duration the container or stream states, if any (a hostile file may lie: decoding checks too)."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return None


def _reason(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__)[:200]


async def load_video(url: str, sampling: VideoSampling, media: MediaLimits, limits: VideoLimits, encoder: Any,
                     session: Any, gate: asyncio.Semaphore) -> Clip:
    """The clip ``url`` names, for ``encoder``: fetched under ``media``'s address policy with
    ``limits``' byte bound and timeout, decoded and sampled off the event loop while holding
    ``gate`` (the worker's bound on decodes at once), in ``encoder.group_size`` groups.

    A frame the processor refuses (an aspect ratio past its bound) is a ``MediaError`` here, so
    it fails this request, not the encoder batch it would share with others; for an http(s)
    URL a decode failure is the uniform fetch error (``media.uniform_fetch_error``)."""
    fetch = dataclasses.replace(media, max_bytes=limits.max_bytes, fetch_timeout_s=limits.fetch_timeout_s)
    data = await fetch_bytes(url, fetch, session)
    async with gate:
        try:
            clip = await asyncio.to_thread(decode_video, data, sampling, limits, encoder.group_size)
            encoder.num_image_tokens(clip.groups[0])
        except MediaError as e:
            raise uniform_fetch_error(url, e) from e
        except ValueError as e:
            raise MediaError(f"the video's frames cannot be encoded: {e}") from e
    return clip

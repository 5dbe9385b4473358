"""Video clips for tests and the EPD benchmark's video workload: frames written with PyAV into a
lossless file (FFV1 in Matroska), so that a frame decodes to the same pixels in every clip that
holds it, as the frames of a feed cut into segments at keyframes (``-c copy``) do."""

from __future__ import annotations

import base64
import io

import numpy as np


def make_clip(frames: list[np.ndarray], fps: float = 4.0) -> bytes:
    """``frames`` (``[h, w, 3]`` uint8 RGB, one size) as an FFV1/Matroska file at ``fps``."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "bgr0"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def feed(num_frames: int, size: tuple[int, int] = (64, 96), seed: int = 0) -> list[np.ndarray]:
    """A synthetic camera feed: a moving gradient with noise, ``size`` (h, w), reproducible."""
    rng = np.random.default_rng(seed)
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    frames = []
    for t in range(num_frames):
        base = ((x + 3 * t) % w * 255 // max(w - 1, 1)).astype(np.uint8)
        noise = rng.integers(0, 32, (h, w), dtype=np.uint8)
        frames.append(np.stack([base, (y * 255 // max(h - 1, 1)).astype(np.uint8), noise], axis=-1))
    return frames


def data_uri(clip: bytes) -> str:
    return "data:video/x-matroska;base64," + base64.b64encode(clip).decode()

"""The synthetic pictures of a workload (``render_image``): deterministic per (seed, image id),
photo-like in their encoded size, rendered locally (no data set download)."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

IMAGE_FORMATS = {"jpeg": ("JPEG", "image/jpeg", "jpg"), "png": ("PNG", "image/png", "png")}


def render_image(image_id: int, size: tuple[int, int], fmt: str, seed: int, jpeg_quality: int = 90) -> bytes:
    """A deterministic picture for (seed, image_id) at size (width, height), encoded as fmt (jpeg,
    png): a linear gradient, 24 random ellipses/rectangles/lines, a slight blur and Gaussian noise
    (sigma 6) so that the encoded size resembles a photo's (1024x768 JPEG q90 ~ 170 KB)."""
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"{fmt=} must be one of {sorted(IMAGE_FORMATS)}")
    width, height = size
    rng = np.random.default_rng([seed, image_id])
    image = Image.fromarray(_gradient(rng, width, height), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(24):
        x0, x1 = sorted(rng.uniform(-0.1, 1.1, 2) * width)
        y0, y1 = sorted(rng.uniform(-0.1, 1.1, 2) * height)
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=color)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=color)
        else:
            draw.line((x0, y0, x1, y1), fill=color, width=int(rng.integers(2, 12)))
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float32)
    pixels += 6.0 * rng.standard_normal(pixels.shape, dtype=np.float32)
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB").save(
        buffer, format=IMAGE_FORMATS[fmt][0], quality=jpeg_quality)
    return buffer.getvalue()


def _gradient(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    angle = rng.uniform(0.0, 2 * math.pi)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    t = math.cos(angle) * x / width + math.sin(angle) * y / height
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    start, end = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    return (start + t[..., None] * (end - start)).clip(0, 255).astype(np.uint8)

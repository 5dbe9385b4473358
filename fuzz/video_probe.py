"""Fuzz target: the video container probe and decoder (``decode_video``: PyAV/FFmpeg under our
bounds: demuxers and codecs allowed, bytes, dimensions, duration, frames, wall time).

Bad input may raise ``MediaError`` only (a 400 naming the fault), never an FFmpeg or PyAV error,
nor anything else. A clip that decodes has between 1 and ``max_frames`` sampled frames, in full
groups, each frame RGB within the pixel bound."""

from __future__ import annotations

import logging

from harness import instrumented, main

with instrumented():
    from encoder_worker.media import MediaError
    from encoder_worker.video import VideoLimits, VideoSampling, decode_video

logging.disable(logging.WARNING)
SAMPLING = VideoSampling(fps=2.0, max_frames=4)
LIMITS = VideoLimits(max_bytes=1 << 20, max_pixels=256 * 256, max_decode_s=2.0, max_decoded_frames=64)


def test_one_input(data: bytes) -> None:
    group_size = 1 + len(data) % 2  # LLaVA's frames one by one, Qwen2-VL's in pairs
    try:
        clip = decode_video(data, SAMPLING, LIMITS, group_size)
    except MediaError:
        return
    assert 1 <= clip.num_frames <= SAMPLING.max_frames, clip.num_frames
    assert len(clip.groups) == -(-clip.num_frames // group_size)
    for group in clip.groups:
        assert len(group.frames) == group_size and 1 <= group.num_frames <= group_size
        for frame in group.frames:
            assert frame.mode == "RGB" and frame.width * frame.height <= LIMITS.max_pixels, frame


if __name__ == "__main__":
    main(test_one_input)

"""Video decoding and sampling (``encoder_worker.video``): frames at ``fps`` from the clip's start,
at most ``max_frames``; temporal groups keyed by pixels and sampling, so overlapping clips share
groups; every bound (bytes, pixels, seconds, frames decoded, decode time) and hostile input is a
``MediaError`` naming it."""

from __future__ import annotations

import io
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from encoder_worker.media import MediaError
from encoder_worker.video import VideoLimits, VideoSampling, decode_video

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from clips import feed, make_clip  # noqa: E402

FRAMES = feed(40, size=(48, 64), seed=1)
"""A 10 s feed at 4 fps."""


def hashes(clip) -> list[str]:
    return [g.hash for g in clip.groups]


def test_frames_are_sampled_at_fps_from_the_start():
    clip = decode_video(make_clip(FRAMES[:16]), VideoSampling(fps=2, max_frames=16), VideoLimits(), group_size=1)
    assert clip.num_frames == 8 and clip.interval_s == 0.5
    assert [np.asarray(g.frames[0]).tolist() for g in clip.groups] == [FRAMES[i].tolist() for i in range(0, 16, 2)]
    every = decode_video(make_clip(FRAMES[:16]), VideoSampling(fps=4, max_frames=16), VideoLimits(), group_size=1)
    assert every.num_frames == 16


def test_a_long_clip_is_spread_over_max_frames():
    clip = decode_video(make_clip(FRAMES), VideoSampling(fps=2, max_frames=5), VideoLimits(), group_size=1)
    assert clip.num_frames == 5 and clip.interval_s == pytest.approx(2.0)
    assert [np.asarray(g.frames[0]).tolist() for g in clip.groups] == [FRAMES[i].tolist() for i in range(0, 40, 8)]


def test_groups_pad_the_last_with_its_last_frame():
    clip = decode_video(make_clip(FRAMES[:10]), VideoSampling(fps=2, max_frames=16), VideoLimits(), group_size=2)
    assert clip.num_frames == 5 and [g.num_frames for g in clip.groups] == [2, 2, 1]
    last = clip.groups[-1]
    assert np.array_equal(np.asarray(last.frames[0]), np.asarray(last.frames[1]))


@pytest.mark.parametrize("group_size", [1, 2])
def test_overlapping_clips_share_the_groups_of_their_shared_frames(group_size):
    sampling = VideoSampling(fps=2, max_frames=16)
    a = decode_video(make_clip(FRAMES[:16]), sampling, VideoLimits(), group_size)
    b = decode_video(make_clip(FRAMES[8:24]), sampling, VideoLimits(), group_size)
    again = decode_video(make_clip(FRAMES[:16]), sampling, VideoLimits(), group_size)
    assert hashes(again) == hashes(a)
    shared = set(hashes(a)) & set(hashes(b))
    assert len(shared) == len(hashes(a)) // 2 and hashes(b)[:len(shared)] == hashes(a)[-len(shared):]
    other = decode_video(make_clip(FRAMES[:16]), VideoSampling(fps=4, max_frames=16), VideoLimits(), group_size)
    assert not set(hashes(other)) & set(hashes(a))  # NOTE: another sampling: other keys


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(FRAMES[0]).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("data, limits, sampling, message", [
    (b"", VideoLimits(), VideoSampling(), "not a decodable video"),
    (make_clip(FRAMES[:8]), VideoLimits(formats=("avi",)), VideoSampling(), "accepted format \\(avi\\)"),
    (b"\x1aE\xdf\xa3" + b"\x00" * 200, VideoLimits(), VideoSampling(), "not a decodable video"),
    (make_clip(FRAMES[:8])[:300], VideoLimits(), VideoSampling(), "not a decodable video"),
    (make_clip(FRAMES[:8]), VideoLimits(max_bytes=1000), VideoSampling(), "over max_video_bytes=1000"),
    (make_clip(FRAMES[:8]), VideoLimits(max_pixels=1000), VideoSampling(), "over max_video_pixels=1000"),
    (make_clip(FRAMES), VideoLimits(max_seconds=5), VideoSampling(), "over max_video_seconds=5"),
    (make_clip(FRAMES), VideoLimits(max_decoded_frames=10), VideoSampling(fps=0.1, max_frames=2),
     "more than max_video_decoded_frames=10"),
    (make_clip(FRAMES), VideoLimits(max_decode_s=1e-9), VideoSampling(), "over max_video_decode_s"),
    (make_clip(FRAMES), VideoLimits(max_frames=4), VideoSampling(max_frames=8), "exceeds this server's limit of 4"),
    (make_clip(FRAMES), VideoLimits(codecs=("h264",)), VideoSampling(), "codec 'ffv1' is not accepted"),
    (make_clip(FRAMES), VideoLimits(max_sampled_pixels=5 * 48 * 64), VideoSampling(fps=4, max_frames=16),
     "over max_video_sampled_pixels"),
])
def test_bounds_and_hostile_files_are_media_errors(data, limits, sampling, message):
    with pytest.raises(MediaError, match=message):
        decode_video(data, sampling, limits, group_size=2)


@pytest.mark.parametrize("data", [
    _png(),  # NOTE: FFmpeg's png_pipe demuxer would take it for a one-frame video
    b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/hostname\n#EXT-X-ENDLIST\n",
    b"ffconcat version 1.0\nfile /etc/hostname\n",
])
def test_pictures_and_playlists_are_not_videos(data):
    with pytest.raises(MediaError, match="not a decodable video in an accepted format"):
        decode_video(data, VideoSampling(), VideoLimits(), group_size=1)


def test_mp4_and_avi_decode_too():
    import av

    for fmt, codec in (("mp4", "mpeg4"), ("avi", "mjpeg")):
        buf = io.BytesIO()
        with av.open(buf, "w", format=fmt) as container:
            stream = container.add_stream(codec, rate=4)
            stream.width, stream.height = 64, 48
            stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
            for frame in FRAMES[:8]:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        clip = decode_video(buf.getvalue(), VideoSampling(fps=2, max_frames=16), VideoLimits(), group_size=2)
        assert clip.num_frames == 4 and len(clip.groups) == 2


def test_a_truncated_clip_gives_its_frames_or_a_clear_error():
    data = make_clip(FRAMES[:16])
    for cut in (len(data) // 3, len(data) // 2, len(data) - 10):
        try:
            clip = decode_video(data[:cut], VideoSampling(fps=4, max_frames=16), VideoLimits(), group_size=1)
        except MediaError as e:
            assert "video" in str(e)
        else:  # NOTE: what decoded is served; each frame is one the file holds
            assert all(any(np.array_equal(np.asarray(g.frames[0]), f) for f in FRAMES[:16]) for g in clip.groups)


@pytest.mark.parametrize("options, message", [
    ({"fps": 0}, "fps=0 must be"),
    ({"fps": "2"}, "fps='2' must be"),
    ({"fps": float("nan")}, "must be a number"),
    ({"max_frames": 0}, "max_frames=0 must be"),
    ({"max_frames": True}, "max_frames=True must be"),
    ({"max_frames": 65}, "exceeds this server's limit of 64"),
    ({"min_pixels": 4}, "unknown option"),
    ([2], "must be an object"),
])
def test_sampling_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        VideoSampling.from_options(options, VideoSampling(), 64)


def test_sampling_options_fill_in_the_defaults():
    assert VideoSampling.from_options({"fps": 1}, VideoSampling(fps=2, max_frames=8), 64) == VideoSampling(1, 8)
    assert VideoSampling.from_options(None, VideoSampling(fps=3, max_frames=4), 64) == VideoSampling(3, 4)


def test_a_stream_that_changes_size_is_refused_before_its_large_frame_is_decoded():
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mpegts") as container:
        stream = container.add_stream("mpeg2video", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for frame in FRAMES[:4]:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    small = buf.getvalue()
    buf = io.BytesIO()
    with av.open(buf, "w", format="mpegts") as container:
        stream = container.add_stream("mpeg2video", rate=4)
        stream.width, stream.height, stream.pix_fmt = 640, 480, "yuv420p"
        big = np.zeros((480, 640, 3), dtype=np.uint8)
        for _ in range(4):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(big, format="rgb24")))
        container.mux(stream.encode())
    joined = small + buf.getvalue()  # NOTE: MPEG-TS concatenates: the stream grows mid-way
    with pytest.raises(MediaError, match="change size|not a decodable video"):
        decode_video(joined, VideoSampling(fps=4, max_frames=16), VideoLimits(), group_size=1)
    with pytest.raises(MediaError, match="not a decodable video|over max_video_pixels"):
        decode_video(joined, VideoSampling(fps=4, max_frames=16), VideoLimits(max_pixels=64 * 48), group_size=1)


def test_sampling_goes_on_after_a_gap_instead_of_catching_up():
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "bgr0"
        for pts in [0, 1, 2, 3, 12, 13, 14, 15]:  # NOTE: 0-0.75 s, then a 2.25 s gap, then 3-3.75 s
            frame = av.VideoFrame.from_ndarray(FRAMES[pts], format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 4)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    clip = decode_video(buf.getvalue(), VideoSampling(fps=2, max_frames=16), VideoLimits(), group_size=1)
    got = [next(i for i, f in enumerate(FRAMES) if np.array_equal(f, np.asarray(g.frames[0]))) for g in clip.groups]
    assert got == [0, 2, 12, 14]

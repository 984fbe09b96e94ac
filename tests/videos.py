"""Small videos for the tests, encoded with PyAV: synthetic street scenes, B-frames, variable rates."""

from __future__ import annotations

import fractions
import os
import tempfile

import av
import numpy as np

from segray.synthetic import render_scene


def scenes(n: int, height: int = 32, width: int = 48, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` (frame, label) pairs: synthetic street scenes that drift a little from frame to frame."""
    rng = np.random.default_rng(seed)
    return [render_scene(rng, height, width) for _ in range(n)]


def encode(frames: list[np.ndarray], fmt: str, codec: str = "libx264", rate: int = 25, options: dict | None = None,
           durations_ms: list[int] | None = None, pix_fmt: str = "yuv420p", gop: int | None = None,
           container_options: dict | None = None) -> bytes:
    """``frames`` (RGB uint8, one size) as a video file's bytes (``fmt``: mp4, matroska, avi, mov...).

    ``durations_ms``: a variable frame rate, each frame shown that long (cycled)."""
    tmp = tempfile.NamedTemporaryFile(suffix=".video", delete=False)  # faststart rewrites the file: not a BytesIO
    tmp.close()
    height, width = frames[0].shape[:2]
    with av.open(tmp.name, "w", format=fmt, options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=rate, options=options or {})
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if gop:
            stream.gop_size = gop
        if durations_ms:
            stream.codec_context.time_base = fractions.Fraction(1, 1000)
            stream.time_base = fractions.Fraction(1, 1000)
        t = 0
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            if durations_ms:
                frame.pts, frame.time_base = t, fractions.Fraction(1, 1000)
                t += durations_ms[i % len(durations_ms)]
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    try:
        with open(tmp.name, "rb") as f:
            return f.read()
    finally:
        os.unlink(tmp.name)


def h264_bframes(frames: list[np.ndarray], gop: int = 12) -> bytes:
    """MP4, H.264 with up to 3 B-frames and a keyframe at least every ``gop`` frames."""
    return encode(frames, "mp4", options={"bf": "3", "g": str(gop), "preset": "veryfast"}, gop=gop)


def vfr_mkv(frames: list[np.ndarray], gop: int = 10) -> bytes:
    """Matroska, H.264 with B-frames, frames shown 40, 20, 80, 33 ms in turn (a variable rate)."""
    return encode(frames, "matroska", options={"bf": "2", "g": str(gop), "preset": "veryfast"},
                  durations_ms=[40, 20, 80, 33], gop=gop)


def lossless_mkv(frames: list[np.ndarray]) -> bytes:
    """Matroska, FFV1 in RGB: every decoded frame equals its source exactly."""
    return encode(frames, "matroska", codec="ffv1", pix_fmt="bgr0")


def decode_all(path: str) -> list[tuple[int, np.ndarray]]:
    """(pts, RGB frame) of every frame, decoded straight through: what ranges must reproduce."""
    with av.open(path) as container:
        return [(f.pts, f.to_ndarray(format="rgb24")) for f in container.decode(container.streams.video[0])]

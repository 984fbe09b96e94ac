"""Overlay videos (``--write-video``): a video's predicted frames with their colour masks blended in.

After every frame of the infer job is predicted, one Ray task per input video runs
:func:`write_overlay`, which writes ``<output>/overlays/<video path below --images>.mp4``
(``a/clip.mkv`` -> ``overlays/a/clip.mkv.mp4``): the frames that have a prediction row (all of
them, or those ``--every``/``--fps`` kept), each shown at its own presentation time relative to
the first, so that a sampled or variable-rate video plays at its real speed. H.264 (yuv420p,
MP4 with the index at the front: playable by any player, streamable), or MPEG-4 part 2 where
this FFmpeg build has no libx264; an odd width or height gets one more column or row (a copy of
the edge), which yuv420p needs.

Memory stays flat in the video's length: the rows are scanned in small batches and each mask
PNG goes to a local temporary folder; the video is then decoded once from its start
(segray/video.py) and each frame is blended with its mask, encoded to a local temporary file and
uploaded (storage.write_file). The container's comment records ``segray-frames=<N>``; a rerun
finds an overlay that holds as many frames as the video has rows now and leaves it alone.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from fractions import Fraction

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
from PIL import Image

from segray import names, storage, video
from segray.classes import ClassTable
from segray.errors import SegrayError, describe
from segray.predictions import (
    COL_HEIGHT,
    COL_MASK,
    COL_TIMESTAMP,
    COL_URI,
    COL_WIDTH,
    OVERLAYS_DIR,
    PREDICTIONS_DIR,
    parquet_files,
)
from segray.preprocess import resize_label
from segray.visualize import overlay

OVERLAY_SUFFIX = ".mp4"
ENCODERS = ("libx264", "mpeg4")  # the first this FFmpeg build has
# Frame times are kept in 1/60000 s: exact for 24, 25, 30, 50, 60 and 30000/1001 fps, and within
# the 65535 that MPEG-4 part 2 allows as a time base denominator.
TIME_BASE = Fraction(1, 60000)
COMMENT_PREFIX = "segray-frames="
ROWS_PER_BATCH = 64  # prediction rows (their mask PNGs) in memory at a time


class OverlayError(SegrayError, RuntimeError):
    """The overlay video of an input video could not be written; the message names the video."""


def overlay_uri(output: str, images_root: str, video_uri: str) -> str:
    """``<images>/a/clip.mkv`` -> ``<output>/overlays/a/clip.mkv.mp4``. Raises ValueError for a
    video outside ``images_root`` or a path that would not lie below ``<output>/overlays/``."""
    rel = names.input_rel(images_root, video_uri)
    problem = names.name_problem(rel)
    if problem:
        raise ValueError(f"{video_uri}: no overlay path for {rel!r}: {problem}")
    overlays = storage.join(output, OVERLAYS_DIR)
    target = storage.join(overlays, *(rel + OVERLAY_SUFFIX).split("/"))
    if not names.lies_below(target, overlays):
        raise ValueError(f"{video_uri}: its overlay path {target} would leave {overlays}")
    return target


def _scan(output: str, video_uri: str, columns: list[str]):
    """Batches (lists of row dicts with ``k``, the frame index) of the prediction rows of
    ``video_uri``'s frames, a few at a time."""
    files = parquet_files(storage.join(output, PREDICTIONS_DIR))
    if not files:
        return
    fs = storage.resolve(files[0])[0]
    dataset = pads.dataset([storage.resolve(f)[1] for f in files], format="parquet", filesystem=fs)
    prefix = video_uri + video.FRAME_MARK
    scanner = dataset.scanner(columns=[COL_URI, *columns], filter=pc.starts_with(pads.field(COL_URI), pattern=prefix),
                              batch_size=ROWS_PER_BATCH, batch_readahead=1, fragment_readahead=1)
    for batch in scanner.to_batches():
        rows = []
        for row in batch.to_pylist():
            frame = video.split_frame_uri(row[COL_URI])
            if frame is not None and frame[0] == video_uri:  # not "<video_uri>#frame=1.mp4#frame=0"
                rows.append({**row, "k": frame[1]})
        yield rows


def _recorded_frames(uri: str) -> int | None:
    """The frame count an existing overlay's comment records; None when there is none (or no
    readable overlay: it is written again)."""
    if not storage.exists(uri):
        return None
    try:
        with video.open_video(uri) as (container, _):
            comment = str(container.metadata.get("comment", ""))
    except Exception:  # noqa: BLE001 - a broken or foreign file at that name is replaced
        return None
    tail = comment[len(COMMENT_PREFIX):] if comment.startswith(COMMENT_PREFIX) else ""
    return int(tail) if tail.isascii() and tail.isdigit() else None


def _open_encoder(path: str, width: int, height: int, rate: Fraction, frames: int):
    """(container, stream) of an MP4 at ``path`` encoding with the first of ENCODERS available."""
    import av

    for name in ENCODERS:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # noqa: BLE001 - UnknownCodecError: not in this FFmpeg build
            continue
        container = av.open(path, mode="w", format="mp4", options={"movflags": "+faststart"})
        try:
            container.metadata["comment"] = f"{COMMENT_PREFIX}{frames}"
            stream = container.add_stream(name, rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.time_base = stream.time_base = TIME_BASE
            stream.codec_context.thread_count = 1  # a Ray task holds one CPU
            if name == "libx264":
                stream.codec_context.options = {"crf": "23", "preset": "fast"}
            else:
                stream.codec_context.bit_rate = max(400_000, int(width * height * float(rate) * 0.3))
        except BaseException:
            with contextlib.suppress(Exception):
                container.close()
            raise
        return container, stream
    raise RuntimeError(f"none of the encoders {', '.join(ENCODERS)} is in this FFmpeg build")


def _timing(times: dict[int, float | None]) -> dict[int, tuple[int, int]]:
    """Frame index -> (pts, duration) in TIME_BASE, the pts from the frame's time relative to the
    first, strictly increasing (a frame without a time, or one not after the previous, follows it
    by the median interval, which is also the last frame's duration)."""
    order = sorted(times)
    known = [times[k] for k in order if times[k] is not None]
    steps = sorted(b - a for a, b in zip(known, known[1:]) if b > a)
    step = max(1, round(Fraction(steps[len(steps) // 2] if steps else 0.04) / TIME_BASE))
    start = known[0] if known else 0.0
    pts: list[int] = []
    for k in order:
        t = times[k]
        p = round(Fraction(t - start) / TIME_BASE) if t is not None else None
        if pts and (p is None or p <= pts[-1]):
            p = pts[-1] + step
        pts.append(p if p is not None else 0)
    ends = pts[1:] + [pts[-1] + step]
    return {k: (p, e - p) for k, p, e in zip(order, pts, ends)}


def write_overlay(video_uri: str, output: str, images_root: str, classes: ClassTable, alpha: float = 0.5) -> int:
    """Write the overlay video of ``video_uri`` (module doc); return the number of frames it holds,
    0 (nothing written) when the video has no prediction rows.

    Raises VideoError, VideoDamage, StorageError (naming the video or the object) when the video
    cannot be decoded now, OverlayError when a frame that has a row is not in the video or the
    overlay cannot be encoded."""
    target = overlay_uri(output, images_root, video_uri)
    times: dict[int, float | None] = {}
    first = (-1, 0, 0)  # (frame index, height, width) of the first frame: the video's size
    for rows in _scan(output, video_uri, [COL_TIMESTAMP, COL_HEIGHT, COL_WIDTH]):
        for row in rows:
            times[row["k"]] = row[COL_TIMESTAMP]
            if first[0] < 0 or row["k"] < first[0]:
                first = (row["k"], row[COL_HEIGHT], row[COL_WIDTH])
    n = len(times)
    if not n or _recorded_frames(target) == n:
        return n
    index = video.index_video(video_uri)
    rng = video.plan_ranges(index, index.frames + 1)[0]  # one range: every frame, from the start
    timing = _timing(times)
    span = (timing[max(times)][0] - timing[min(times)][0]) * TIME_BASE
    rate = max(Fraction(1, 1000), (Fraction(n - 1) / span if n > 1 and span else Fraction(25)).limit_denominator(1001))
    h, w = first[1], first[2]
    with tempfile.TemporaryDirectory(prefix="segray-overlay-") as tmp:
        for rows in _scan(output, video_uri, [COL_MASK]):
            for row in rows:
                with open(os.path.join(tmp, f"{row['k']}.png"), "wb") as f:
                    f.write(row[COL_MASK])
        local = os.path.join(tmp, "overlay.mp4")
        written = 0
        try:
            container, stream = _open_encoder(local, w + w % 2, h + h % 2, rate, n)
            with container:
                try:
                    for fr in video.decode_range(video_uri, rng, (h, w), keep=set(times), time_base=index.time_base):
                        mask = os.path.join(tmp, f"{fr.index}.png")
                        _encode(container, stream, fr, mask, classes, alpha, timing[fr.index], (h + h % 2, w + w % 2))
                        written += 1
                except video.VideoDamage:
                    if written < n:  # a frame that has a row never came out of the decoder
                        raise
                for packet in stream.encode(None):
                    container.mux(packet)
        except (video.VideoError, video.VideoDamage, storage.StorageError):
            raise
        except Exception as e:  # noqa: BLE001 - FFmpeg, PIL, the file system: one line naming the video
            raise OverlayError(f"{video_uri}: cannot write its overlay video ({describe(e)})") from None
        if written != n:
            raise OverlayError(f"{video_uri}: {n} frames have predictions, {written} of them are in the video now "
                               f"({index.frames} frames); was the file replaced?")
        storage.write_file(target, local)
    return n


def _encode(container, stream, fr: video.DecodedFrame, mask_path: str, classes: ClassTable, alpha: float,
            timing: tuple[int, int], out_size: tuple[int, int]) -> None:
    """Blend one decoded frame with its mask (void keeps the frame), pad it to ``out_size`` with
    copies of its last row and column, and encode it at ``timing`` (pts, duration)."""
    import av

    with Image.open(mask_path) as im:
        mask = np.asarray(im if im.mode == "L" else im.convert("L"))
    if mask.shape != fr.image.shape[:2]:
        mask = resize_label(mask, fr.image.shape[:2])
    rgb = overlay(fr.image, mask, alpha, palette=classes)
    pad = ((0, out_size[0] - rgb.shape[0]), (0, out_size[1] - rgb.shape[1]), (0, 0))
    if pad[0][1] or pad[1][1]:
        rgb = np.pad(rgb, pad, mode="edge")
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format="yuv420p")
    frame.pts, frame.duration, frame.time_base = timing[0], timing[1], TIME_BASE
    for packet in stream.encode(frame):
        container.mux(packet)

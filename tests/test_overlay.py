"""Overlay videos (segray/overlay.py) and storage.write_file: fast, no Ray.

Each test makes a small video with PyAV, writes the prediction part files infer would have
written for it (masks chosen here), runs write_overlay and reads the overlay back with PyAV."""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pytest

from segray import overlay, predictions, storage, video
from segray.classes import ClassTable
from segray.preprocess import encode_png

CLASSES = ClassTable(names=("red", "green", "blue"), colors=((255, 0, 0), (0, 255, 0), (0, 0, 255)), void_index=255)
# Milliseconds between consecutive frames of the variable-rate video.
INTERVALS_MS = [40, 40, 80, 40, 120, 40, 40, 60, 40, 40, 100, 40, 40, 40, 80, 40, 40, 40, 40]


def frame_color(k: int) -> tuple[int, int, int]:
    return (30 + 9 * k, 120, 220 - 7 * k)


def make_video(path: str, width: int, height: int, n: int, codec: str) -> None:
    """Frame k a flat frame_color(k). ffv1 (.mkv): exact pixels at the INTERVALS_MS times;
    libx264 (.mp4): 25 fps with B-frames."""
    import av

    with av.open(path, "w") as out:
        if codec == "ffv1":
            stream = out.add_stream("ffv1", rate=25)
            stream.pix_fmt = "bgr0"
            tb = Fraction(1, 1000)
            times = np.concatenate([[0], np.cumsum(INTERVALS_MS[: n - 1])]).astype(int)
        else:
            stream = out.add_stream("libx264", rate=25)
            stream.pix_fmt = "yuv420p"
            stream.codec_context.options = {"bf": "2", "g": "8"}
            tb = Fraction(1, 25)
            times = np.arange(n)
        stream.width, stream.height = width, height
        stream.codec_context.time_base = tb
        for k in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), frame_color(k), np.uint8), format="rgb24")
            frame.pts, frame.time_base = int(times[k]), tb
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def mask_of(k: int, height: int, width: int) -> np.ndarray:
    """Left half class k % 3, right half void."""
    mask = np.full((height, width), CLASSES.void_index, np.uint8)
    mask[:, : width // 2] = k % len(CLASSES.names)
    return mask


def write_rows(output: str, video_uri: str, frames: list[int], extra_uris: tuple[str, ...] = ()) -> None:
    """One part file with the prediction rows of ``frames`` of ``video_uri`` (times from its
    index, as infer has them) and rows of ``extra_uris`` (other inputs) with a full mask of class 0."""
    index = video.index_video(video_uri)
    rows = []
    with video.open_video(video_uri) as (_, stream):
        h, w = stream.height, stream.width
    for k in frames:
        m = mask_of(k, h, w)
        rows.append({"uri": video.frame_uri(video_uri, k), "height": h, "width": w, "mask_png": encode_png(m),
                     "class_pixel_counts": np.bincount(m.ravel(), minlength=3)[:3].tolist(), "label_uri": None,
                     "confusion": None, "pixel_accuracy": None, "frame_index": k,
                     "timestamp_s": index.seconds(index.pts[k])})
    for uri in extra_uris:
        rows.append({"uri": uri, "height": h, "width": w, "mask_png": encode_png(np.zeros((h, w), np.uint8)),
                     "class_pixel_counts": [h * w, 0, 0], "label_uri": None, "confusion": None,
                     "pixel_accuracy": None, "frame_index": 0, "timestamp_s": 0.0})
    table = pa.Table.from_pylist(rows, schema=predictions.PREDICTIONS_SCHEMA)
    uris = table.column("uri").to_pylist()
    predictions.write_parquet(storage.join(output, predictions.PREDICTIONS_DIR, predictions.part_name(uris)), table)


def read_overlay(path: str) -> tuple[dict, list[tuple[float, np.ndarray]], str, tuple[int, int]]:
    """(metadata, [(time, rgb)], codec name, (height, width)) of an overlay file."""
    import av

    with av.open(path) as c:
        s = c.streams.video[0]
        frames = [(float(f.time), f.to_ndarray(format="rgb24")) for f in c.decode(s)]
        return dict(c.metadata), frames, s.codec_context.name, (s.height, s.width)


def expected_times(video_uri: str, frames: list[int]) -> list[float]:
    index = video.index_video(video_uri)
    t = [index.seconds(index.pts[k]) for k in frames]
    return [x - t[0] for x in t]


def check_colors(rgb: np.ndarray, k: int, height: int, width: int, tol: float) -> None:
    """The left half is the frame blended half and half with class k % 3's colour, the right half the frame."""
    color = np.asarray(frame_color(k), float)
    cls = np.asarray(CLASSES.colors[k % 3], float)
    left = rgb[4 : height - 4, 4 : width // 2 - 4].reshape(-1, 3).mean(axis=0)
    right = rgb[4 : height - 4, width // 2 + 4 : width - 4].reshape(-1, 3).mean(axis=0)
    assert np.abs(left - (0.5 * color + 0.5 * cls)).max() <= tol, (k, left, color, cls)
    assert np.abs(right - color).max() <= tol, (k, right, color)


@pytest.fixture
def mkv(tmp_path):
    """A 63x47 ffv1 video of 20 variable-rate frames at <images>/a/b/clip.mkv, rows for every 2nd frame."""
    images, output = str(tmp_path / "images"), str(tmp_path / "out")
    os.makedirs(os.path.join(images, "a", "b"))
    uri = os.path.join(images, "a", "b", "clip.mkv")
    make_video(uri, 63, 47, 20, "ffv1")
    write_rows(output, uri, list(range(0, 20, 2)), extra_uris=(f"{uri}#frame=3.mkv#frame=0", os.path.join(images, "x.png")))
    return images, output, uri


def test_overlay_of_a_sampled_variable_rate_odd_sized_video(mkv, monkeypatch):
    images, output, uri = mkv
    monkeypatch.setattr(overlay, "ROWS_PER_BATCH", 3)  # several batches
    assert overlay.write_overlay(uri, output, images, CLASSES) == 10
    path = os.path.join(output, "overlays", "a", "b", "clip.mkv.mp4")
    assert overlay.overlay_uri(output, images, uri) == path
    meta, frames, codec, (h, w) = read_overlay(path)
    assert codec == "h264" and meta["comment"] == "segray-frames=10"
    assert (h, w) == (48, 64)  # padded to even sizes
    assert len(frames) == 10
    times = [t for t, _ in frames]
    assert np.abs(np.asarray(times) - expected_times(uri, list(range(0, 20, 2)))).max() <= 0.001
    assert times[1] - times[0] == pytest.approx(0.080, abs=0.001)  # frames 0 and 2: 40 + 40 ms
    for (_, rgb), k in zip(frames, range(0, 20, 2)):
        check_colors(rgb[:47, :63], k, 47, 63, tol=6)
        assert np.abs(rgb[:, 63].astype(int) - rgb[:, 62]).max() <= 8  # the padding copies the edge
    with open(path, "rb") as f:
        head = f.read()
    assert head.index(b"moov") < head.index(b"mdat")  # +faststart
    assert os.listdir(os.path.dirname(path)) == ["clip.mkv.mp4"]  # no temporary files left

    # A rerun with the same rows leaves it alone.
    before = os.stat(path).st_mtime_ns
    assert overlay.write_overlay(uri, output, images, CLASSES) == 10
    assert os.stat(path).st_mtime_ns == before

    # Rows added (frames 1 and 3): written again with them.
    write_rows(output, uri, [1, 3])
    assert overlay.write_overlay(uri, output, images, CLASSES) == 12
    meta, frames, _, _ = read_overlay(path)
    assert meta["comment"] == "segray-frames=12" and len(frames) == 12
    kept = [0, 1, 2, 3, *range(4, 20, 2)]
    assert np.abs(np.asarray([t for t, _ in frames]) - expected_times(uri, kept)).max() <= 0.001
    for (_, rgb), k in zip(frames, kept):
        check_colors(rgb[:47, :63], k, 47, 63, tol=6)


def test_overlay_of_an_h264_video_with_b_frames(tmp_path):
    images, output = str(tmp_path / "images"), str(tmp_path / "out")
    os.makedirs(images)
    uri = os.path.join(images, "clip.mp4")
    make_video(uri, 64, 48, 20, "libx264")
    kept = list(range(1, 20, 3))
    write_rows(output, uri, kept)
    assert overlay.write_overlay(uri, output, images, CLASSES, alpha=0.5) == len(kept)
    meta, frames, _, (h, w) = read_overlay(overlay.overlay_uri(output, images, uri))
    assert (h, w) == (48, 64) and meta["comment"] == f"segray-frames={len(kept)}" and len(frames) == len(kept)
    assert np.abs(np.asarray([t for t, _ in frames]) - expected_times(uri, kept)).max() <= 0.001
    assert frames[1][0] == pytest.approx(0.12, abs=0.001)
    for (_, rgb), k in zip(frames, kept):
        check_colors(rgb, k, 48, 64, tol=8)


def test_mpeg4_when_libx264_is_missing(mkv, monkeypatch):
    images, output, uri = mkv
    monkeypatch.setattr(overlay, "ENCODERS", ("no-such-encoder", "mpeg4"))
    assert overlay.write_overlay(uri, output, images, CLASSES) == 10
    meta, frames, codec, _ = read_overlay(overlay.overlay_uri(output, images, uri))
    assert codec == "mpeg4" and meta["comment"] == "segray-frames=10" and len(frames) == 10
    assert np.abs(np.asarray([t for t, _ in frames]) - expected_times(uri, list(range(0, 20, 2)))).max() <= 0.001
    check_colors(frames[3][1][:47, :63], 6, 47, 63, tol=10)


def test_a_video_without_rows_writes_nothing(mkv, tmp_path):
    images, output, _ = mkv
    other = os.path.join(images, "other.mkv")
    make_video(other, 32, 24, 3, "ffv1")
    assert overlay.write_overlay(other, output, images, CLASSES) == 0
    assert not os.path.exists(os.path.join(output, "overlays"))
    empty = str(tmp_path / "empty-output")  # no predictions/ at all
    assert overlay.write_overlay(other, empty, images, CLASSES) == 0
    assert not os.path.exists(empty)


def test_a_video_that_cannot_be_decoded_raises_naming_it(mkv):
    images, output, uri = mkv
    with open(uri, "wb") as f:
        f.write(b"not a video at all" * 100)
    with pytest.raises(video.VideoError, match="clip.mkv"):
        overlay.write_overlay(uri, output, images, CLASSES)
    assert not os.path.exists(os.path.join(output, "overlays", "a", "b", "clip.mkv.mp4"))


def test_rows_for_frames_the_video_no_longer_has(mkv):
    images, output, uri = mkv
    make_video(uri, 63, 47, 8, "ffv1")  # replaced by a shorter one: rows for frames 8..18 are orphans
    with pytest.raises(overlay.OverlayError, match=r"clip\.mkv: 10 frames have predictions, 4 of them"):
        overlay.write_overlay(uri, output, images, CLASSES)
    assert not os.path.exists(os.path.join(output, "overlays", "a", "b", "clip.mkv.mp4"))


def test_overlay_uri():
    assert overlay.overlay_uri("/out", "/in", "/in/a/b/clip.mkv") == "/out/overlays/a/b/clip.mkv.mp4"
    assert overlay.overlay_uri("s3://b/out", "s3://b/in", "s3://b/in/x y/c.MP4") == "s3://b/out/overlays/x y/c.MP4.mp4"
    assert overlay.overlay_uri("/out", "/in/clip.avi", "/in/clip.avi") == "/out/overlays/clip.avi.mp4"
    for bad in ("s3://b/in/a/../../../x.mp4", "s3://b/in/./x.mp4", "s3://b/in//x.mp4", "s3://b/other/x.mp4"):
        with pytest.raises(ValueError):
            overlay.overlay_uri("s3://b/out", "s3://b/in", bad)
    with pytest.raises(ValueError):
        overlay.overlay_uri("/out", "/in", "/in/../x.mp4")


def test_write_file_local(tmp_path):
    src = tmp_path / "src.bin"
    data = os.urandom(3 * 2**20 + 17)
    src.write_bytes(data)
    dest = str(tmp_path / "d" / "e" / "f.mp4")
    storage.write_file(dest, str(src))
    assert open(dest, "rb").read() == data
    src.write_bytes(b"second")
    storage.write_file(dest, str(src))  # replaces
    assert open(dest, "rb").read() == b"second"
    assert os.listdir(tmp_path / "d" / "e") == ["f.mp4"]
    with pytest.raises(FileNotFoundError):
        storage.write_file(dest, str(tmp_path / "missing"))
    assert open(dest, "rb").read() == b"second" and os.listdir(tmp_path / "d" / "e") == ["f.mp4"]


def test_write_file_and_an_overlay_on_s3(s3_prefix, tmp_path):
    src = tmp_path / "src.bin"
    data = os.urandom(9 * 2**20 + 5)  # two chunks
    src.write_bytes(data)
    storage.write_file(f"{s3_prefix}/big/f.bin", str(src))
    assert storage.read_bytes(f"{s3_prefix}/big/f.bin") == data

    local = str(tmp_path / "clip.mkv")
    make_video(local, 63, 47, 6, "ffv1")
    images, output = f"{s3_prefix}/images", f"{s3_prefix}/out"
    uri = f"{images}/v/clip.mkv"
    storage.write_file(uri, local)
    write_rows(output, uri, [0, 2, 5])
    assert overlay.write_overlay(uri, output, images, CLASSES) == 3
    target = overlay.overlay_uri(output, images, uri)
    assert target == f"{output}/overlays/v/clip.mkv.mp4"
    copy = tmp_path / "overlay.mp4"
    copy.write_bytes(storage.read_bytes(target))
    meta, frames, _, _ = read_overlay(str(copy))
    assert meta["comment"] == "segray-frames=3" and len(frames) == 3
    assert np.abs(np.asarray([t for t, _ in frames]) - expected_times(uri, [0, 2, 5])).max() <= 0.001
    assert overlay.write_overlay(uri, output, images, CLASSES) == 3  # its recorded count matches

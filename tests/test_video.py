"""segray/video.py and the video paths of the listing and the load tasks, without Ray.

The promise checked here: cutting a video into ranges at keyframes and decoding each range on
its own gives exactly the frames of a straight decode, each once, numbered 0..n-1, whatever the
codec, the container, B-frames, a variable frame rate or a demuxer that seeks badly (AVI); and
damage is rows, never a crash.
"""

from __future__ import annotations

import bisect
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pytest
from videos import decode_all, encode, h264_bframes, lossless_mkv, scenes, vfr_mkv

from segray import frames as load_stage
from segray import sources, video
from segray.frames import LISTING_SCHEMA

SIZE = (32, 48)
FRAMES = [s[0] for s in scenes(30, *SIZE)]

KINDS = {
    "h264-bframes.mp4": lambda: h264_bframes(FRAMES, gop=6),
    "vfr.mkv": lambda: vfr_mkv(FRAMES, gop=5),
    "vp9.webm": lambda: encode(FRAMES, "webm", codec="libvpx-vp9", gop=8),
    "mpeg4-bframes.avi": lambda: encode(FRAMES, "avi", codec="mpeg4", options={"bf": "2"}, gop=4),  # seeks land late
    "mjpeg.mov": lambda: encode(FRAMES, "mov", codec="mjpeg", pix_fmt="yuvj420p"),
    "ffv1.mkv": lambda: lossless_mkv(FRAMES),
}


def write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_ranges_decode_exactly_the_frames_of_a_straight_decode(tmp_path, name):
    uri = write(tmp_path, name, KINDS[name]())
    reference = decode_all(uri)
    index = video.index_video(uri)
    assert index.exact and index.frames == len(reference) == 30 and not index.ending
    for frames_per_task in (1, 4, 7, 1000):
        ranges = video.plan_ranges(index, frames_per_task)
        assert [r.start for r in ranges] == sorted(r.start for r in ranges) and ranges[-1].last
        assert sum(r.count for r in ranges) == 30
        if frames_per_task == 1000:
            assert len(ranges) == 1
        got = [f for r in ranges for f in video.decode_range(uri, r, SIZE, time_base=index.time_base)]
        assert [f.index for f in got] == list(range(30)), (name, frames_per_task)
        for f in got:
            pts, expected = reference[f.index]
            assert np.array_equal(f.image, expected), (name, frames_per_task, f.index)
            assert f.timestamp_s == pytest.approx(float(pts * index.time_base))
    assert len(video.plan_ranges(index, 4)) > 2 or name in ("ffv1.mkv",), "the test video must have keyframes to cut at"


def test_a_variable_frame_rate_keeps_its_timestamps_and_fps_picks_the_nearest_frames(tmp_path):
    uri = write(tmp_path, "vfr.mkv", vfr_mkv(FRAMES[:12]))
    index = video.index_video(uri)
    durations = [40, 20, 80, 33] * 3
    times = [sum(durations[:k]) / 1000 for k in range(12)]
    assert [index.seconds(p) for p in index.pts] == pytest.approx(times)
    got = [f.timestamp_s for r in video.plan_ranges(index, 3) for f in video.decode_range(uri, r, SIZE, None,
                                                                                            index.time_base)]
    assert got == pytest.approx(times)
    # --fps 10: instants 0, 0.1, 0.2, ...; each picks the frame nearest to it (the earlier on a tie).
    expected = []
    for j in range(int(times[-1] * 10 + 0.5) + 1):
        t = j / 10
        k = min(range(12), key=lambda i: (abs(times[i] - t), i))
        if k not in expected:
            expected.append(k)
    assert video.select_frames(index, fps=10) == sorted(expected)
    assert video.select_frames(index, every=5) == [0, 5, 10]
    assert video.select_frames(index) is None
    assert video.select_frames(index, fps=1000) == list(range(12)), "a rate above the video's keeps every frame once"


def test_a_truncated_video_keeps_the_frames_before_the_damage_and_names_where_it_stopped(tmp_path):
    whole = vfr_mkv(FRAMES)
    uri = write(tmp_path, "cut.mkv", whole[: len(whole) * 6 // 10])
    index = video.index_video(uri)
    assert 0 < index.frames < 30 and "truncated" in index.ending
    got, damage = [], None
    for r in video.plan_ranges(index, 5):
        try:
            for f in video.decode_range(uri, r, SIZE, None, index.time_base, index.ending):
                got.append(f.index)
        except video.VideoDamage as e:
            assert damage is None, "one damage row for one cut"
            damage = e
    assert got == list(range(index.frames))
    assert damage.index == index.frames and "cut.mkv: decoding stopped at frame" in str(damage)

    # MP4 with its index first (faststart): the cut is found by the decoder, mid-packet.
    data = encode(FRAMES, "mp4", options={"bf": "2", "g": "6"}, container_options={"movflags": "faststart"})
    uri = write(tmp_path, "cut.mp4", data[: len(data) * 6 // 10])
    index = video.index_video(uri)
    assert "announces 30 frames" in index.ending
    indices, stopped = [], []
    for r in video.plan_ranges(index, 5):
        try:
            for f in video.decode_range(uri, r, SIZE, None, index.time_base, index.ending):
                indices.append(f.index)
        except video.VideoDamage as e:
            stopped.append(e.index)
    assert len(stopped) == 1 and indices == list(range(stopped[0]))


NOT_VIDEOS = [
    ("text.mp4", b"not a video at all", "not a readable mp4 file"),
    ("empty.mkv", b"", "not a readable matroska file"),
    ("moov-at-end-cut.mp4", h264_bframes(FRAMES)[:3000], "cut short loses its index"),
    # An HLS playlist named .mp4 is never followed to the file it names: the demuxer is chosen by
    # the extension, and an MP4 demuxer does not read playlists.
    ("playlist.mp4", b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n",
     "not a readable mp4 file"),
    # The demuxer is the extension's, never probed from the bytes: a Matroska file named .mp4 is
    # refused as not being an MP4 (probing would also open playlists and concat lists).
    ("matroska.mp4", lossless_mkv(FRAMES[:3]), "not a readable mp4 file"),
]


@pytest.mark.parametrize("name, data, match", NOT_VIDEOS, ids=[n for n, _, _ in NOT_VIDEOS])
def test_what_is_not_a_video_is_a_video_error_naming_the_file(tmp_path, name, data, match):
    uri = write(tmp_path, name, data)
    with pytest.raises(video.VideoError, match=match) as e:
        video.index_video(uri)
    assert str(e.value).startswith(uri)


def test_an_audio_only_file_has_no_video_stream(tmp_path):
    import av

    path = tmp_path / "sound.mkv"
    with av.open(str(path), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    with pytest.raises(video.VideoError, match="no video stream"):
        video.index_video(str(path))


@pytest.mark.parametrize("uri", ["s3://b/a/clip.mp4", "/x/a#frame=2.mp4", "/x/clip.MKV", "/x/y.webm"])
def test_frame_uris_round_trip_and_nothing_else_parses_as_one(uri):
    for k in (0, 7, 123456):
        assert video.split_frame_uri(video.frame_uri(uri, k)) == (uri, k)
    for other in (uri, f"{uri}#frame=", f"{uri}#frame=-1", f"{uri}#frame=1a", f"{uri}#frame=٣",
                  "/x/a.png#frame=3", f"{uri}/x.png"):
        assert video.split_frame_uri(other) is None, other
    assert video.frame_mask_rel("a/clip.mp4", 7) == "a/clip.mp4/7.png"


def test_the_listing_names_videos_and_refuses_objects_below_their_names(tmp_path):
    root = tmp_path / "images"
    write(root, "a/clip.mp4", b"x")
    write(root, "a/clip.mp4.png", np.zeros(1).tobytes())  # a frame named like it: fine, its mask differs
    listing = sources.list_inputs(str(root))
    kinds = {sources.input_rel(str(root), i.uri): i.kind for i in listing.inputs}
    assert kinds == {"a/clip.mp4": sources.KIND_VIDEO, "a/clip.mp4.png": sources.KIND_IMAGE}
    assert listing.videos == 1
    clip = f"{root}/a/clip.mp4"
    done = {video.frame_uri(clip, 3), video.frame_uri(clip, 10), clip, f"{clip}x", f"{root}/a/clip.mp4.png"}
    again = sources.list_inputs(str(root), done=done)
    (v,) = [i for i in again.inputs if i.kind == sources.KIND_VIDEO]
    assert sorted(v.done) == sorted([video.frame_uri(clip, 3), video.frame_uri(clip, 10), clip])


def test_video_labels_pair_frame_numbers_with_or_without_padding_and_refuse_two_for_one_frame():
    labels = {k: sources.Label(f"L/{k}.png", sources.LABEL_INDEX) for k in
              ("a/clip/0", "a/clip/0007", "a/clip/12", "a/clip/012", "a/clip/x", "a/clip/3/4", "a/clipper/5", "a/clip")}
    found, clash = sources.video_labels("a/clip.mp4", labels)
    assert {k: lab.uri for k, lab in found.items()} == {0: "L/a/clip/0.png", 7: "L/a/clip/0007.png"}
    assert list(clash) == [12] and "two labels for frame 12" in clash[12]


def _listing(tmp_path, files: dict[str, bytes], labels: dict[str, bytes] | None = None):
    root = tmp_path / "images"
    for name, data in files.items():
        write(root, name, data)
    label_root = None
    if labels:
        label_root = tmp_path / "labels"
        for name, data in labels.items():
            write(label_root, name, data)
    listing = sources.list_inputs(str(root), str(label_root) if label_root else None)
    rows = [{"uri": i.uri, "kind": i.kind, "label_uri": i.label.uri if i.label else None,
             "label_kind": i.label.kind if i.label else None, "done": list(i.done), "list_error": i.error or None,
             "taken": list(i.taken)} for i in listing.inputs]
    return pa.Table.from_pylist(rows, schema=LISTING_SCHEMA), str(root), listing.labels


def _rows(table, root, labels, frames_per_task, **select):
    units = pa.concat_tables([load_stage.UNITS_SCHEMA.empty_table(),
                              *load_stage.plan_units(table, frames_per_task, root, labels, **select)])
    out = [r for k in range(units.num_rows) for t in load_stage.load_units(units.slice(k, 1), SIZE, root, labels)
           for r in t.to_pylist()]
    return units.num_rows, sorted(out, key=lambda r: r["uri"])


def test_plan_and_load_give_the_same_rows_in_one_range_or_many_with_labels_and_every(tmp_path):
    from test_infer_e2e import encode as encode_png

    files = {"drive/clip.mp4": h264_bframes(FRAMES, gop=5), "notes.txt": b"x", "fake.mp4": b"text"}
    label = encode_png(scenes(1, *SIZE)[0][1])
    labels = {"drive/clip/0004.png": label, "drive/clip/7.png": label, "drive/clip/9.png": label, "drive/clip/09.png": label}
    table, root, index = _listing(tmp_path, files, labels)
    one_units, one = _rows(table, root, index, 1000)
    many_units, many = _rows(table, root, index, 4)
    assert many_units > one_units
    assert many == one
    clip = f"{root}/drive/clip.mp4"
    frames = [r for r in one if r["uri"].startswith(clip)]
    assert [r["uri"] for r in frames] == sorted(video.frame_uri(clip, k) for k in range(30))
    assert sorted(r["frame_index"] for r in frames if not r["stage"]) == [k for k in range(30) if k != 9]
    assert {r["frame_index"] for r in frames if r["label_uri"]} == {4, 7}
    (clash,) = [r for r in frames if r["stage"]]  # two labels for frame 9: neither is used
    assert clash["uri"] == video.frame_uri(clip, 9) and clash["stage"] == "label" and "two labels for frame 9" in clash["message"]
    others = {r["uri"].rsplit("/", 1)[-1]: r["stage"] for r in one if not r["uri"].startswith(clip)}
    assert others == {"notes.txt": "list", "fake.mp4": "decode"}
    _, every = _rows(table, root, index, 4, every=4)
    assert sorted(r["frame_index"] for r in every if r["uri"].startswith(clip)) == list(range(0, 30, 4))


def test_a_rerun_plans_only_the_frames_not_done_and_does_not_repeat_a_damage_row(tmp_path):
    whole = vfr_mkv(FRAMES)
    table, root, _ = _listing(tmp_path, {"cut.mkv": whole[: len(whole) * 6 // 10]})
    _, first = _rows(table, root, None, 4)
    clip = f"{root}/cut.mkv"
    errors = [r for r in first if r["stage"]]
    assert len(errors) == 1 and errors[0]["uri"].startswith(clip + "#frame=")
    done = {r["uri"] for r in first}
    assert len(done) == len(first)
    keep = {u for u in done if (s := video.split_frame_uri(u)) and s[1] < 6}  # "killed" after 6 frames
    rows = table.to_pylist()
    rows[0]["done"] = sorted(keep)
    units, second = _rows(pa.Table.from_pylist(rows, schema=LISTING_SCHEMA), root, None, 4)
    assert {r["uri"] for r in second} == done - keep, "exactly the missing frames and the damage row"
    rows[0]["done"] = sorted(done)
    units, third = _rows(pa.Table.from_pylist(rows, schema=LISTING_SCHEMA), root, None, 4)
    assert (units, third) == (0, []), "a complete video plans no range"

    # A range decoded again (one of its frames was lost) stops at the same damage: no second row.
    data = encode(FRAMES, "mp4", options={"bf": "2", "g": "6"}, container_options={"movflags": "faststart"})
    table, root, _ = _listing(tmp_path / "again", {"cut.mp4": data[: len(data) * 6 // 10]})
    _, first = _rows(table, root, None, 4)
    (damage,) = [r for r in first if r["stage"]]
    last = max(r["frame_index"] for r in first if not r["stage"])
    rows = table.to_pylist()
    rows[0]["done"] = sorted({r["uri"] for r in first} - {video.frame_uri(f"{root}/cut.mp4", last)})
    _, again = _rows(pa.Table.from_pylist(rows, schema=LISTING_SCHEMA), root, None, 4)
    assert [r["frame_index"] for r in again] == [last], "only the lost frame, and the damage row is not repeated"


def test_bisect_ownership_holds_for_pts_between_cuts():
    index = video.VideoIndex(tuple(range(0, 300, 10)), (0, 50, 120, 200), Fraction(1, 100), True, 10.0)
    ranges = video.plan_ranges(index, 5)
    assert [(r.start, r.count, r.seek) for r in ranges] == [(0, 5, None), (5, 7, 50), (12, 8, 120), (20, 10, 200)]
    owners = [next(r for r in ranges if bisect.bisect_left(r.pts, p) < len(r.pts) and p in r.pts).start
              for p in index.pts]
    assert owners == [0] * 5 + [5] * 7 + [12] * 8 + [20] * 10


def test_read_frame_gives_any_single_frame_as_a_straight_decode_does(tmp_path):
    uri = write(tmp_path, "clip.mp4", h264_bframes(FRAMES, gop=6))
    reference = decode_all(uri)
    for k in (0, 5, 6, 17, 29):
        assert np.array_equal(video.read_frame(uri, k), reference[k][1]), k
    with pytest.raises(IndexError, match="no frame 30"):
        video.read_frame(uri, 30)


def test_a_file_named_like_a_frame_of_a_video_beside_it_never_takes_that_frames_uri(tmp_path):
    files = {"clip.mp4": h264_bframes(FRAMES[:8], gop=4), "clip.mp4#frame=3": b"x", "clip.mp4#frame=3 (duplicate 2)": b"y",
             "other.mp4#frame=1": b"z"}
    table, root, _ = _listing(tmp_path, files)
    _, rows = _rows(table, root, None, 3)
    uris = [r["uri"] for r in rows]
    assert len(uris) == len(set(uris)), "two rows share a URI"
    clip = f"{root}/clip.mp4"
    assert sorted(r["frame_index"] for r in rows if r["uri"].startswith(clip + "#frame=") and not r["stage"]) == list(range(8))
    odd = [r["message"] for r in rows if r["stage"]]
    assert len(odd) == 3 and sum(f"named like frame 3 of the video {clip}," in m for m in odd) == 1
    assert video.frame_uri(clip, 3) in uris and f"{root}/other.mp4#frame=1" in uris  # not beside a listed video

"""jobs/infer.py over videos and a big archive: the session's Ray cluster, the moto S3 server.

The inputs: an H.264 MP4 with B-frames, a variable-rate MKV, a lossless FFV1 MKV whose frames
are also there as PNG files, a truncated MKV, a text file named .mp4, a 30-member tar, labels
for some video frames (zero-padded and not). Checked: every frame exactly once with its index
and time, the rows of many ranges equal to the rows of one range, the lossless video scored
exactly like its PNGs, --every, masks and overlay videos, and a rerun after lost part files.
"""

from __future__ import annotations

import io
import uuid

import av
import pyarrow.parquet as pq
import pytest
from conftest import BUCKET, tar_bytes
from test_infer_e2e import MODEL_SIZE, encode, train_tiny_model
from videos import h264_bframes, lossless_mkv, scenes, vfr_mkv

from segray import storage, video

H, W = MODEL_SIZE
N_CLIP, N_VFR, N_LOSSLESS, N_TAR = 40, 24, 12, 30


@pytest.fixture(scope="module")
def collection(s3_server):
    root = f"s3://{BUCKET}/video-{uuid.uuid4().hex[:8]}"
    train_tiny_model(f"{root}/model/model")
    images, labels = f"{root}/images", f"{root}/labels"
    pairs = scenes(N_CLIP + N_VFR + N_LOSSLESS + N_TAR, H, W, seed=1)
    frames = [p[0] for p in pairs]
    clip, vfr = frames[:N_CLIP], frames[N_CLIP:N_CLIP + N_VFR]
    lossless = frames[N_CLIP + N_VFR:N_CLIP + N_VFR + N_LOSSLESS]
    storage.write_bytes(f"{images}/drive/clip.mp4", h264_bframes(clip, gop=6))
    storage.write_bytes(f"{images}/drive/vfr.mkv", vfr_mkv(vfr))
    storage.write_bytes(f"{images}/lossless.mkv", lossless_mkv(lossless))
    cut = vfr_mkv(vfr)
    storage.write_bytes(f"{images}/cut.mkv", cut[: len(cut) * 6 // 10])
    storage.write_bytes(f"{images}/fake.mp4", b"this is not a video\n")
    tar = {f"t/{k:03d}.png": encode(f) for k, f in enumerate(frames[-N_TAR:])}
    storage.write_bytes(f"{images}/big.tar", tar_bytes(tar))
    for k in range(N_LOSSLESS):
        storage.write_bytes(f"{images}/png/lossless/{k}.png", encode(lossless[k]))
        label = encode(pairs[N_CLIP + N_VFR + k][1])
        storage.write_bytes(f"{labels}/lossless/{k:02d}.png", label)  # zero padding allowed
        storage.write_bytes(f"{labels}/png/lossless/{k}.png", label)
    for k in (0, 5, 17, N_CLIP - 1):
        storage.write_bytes(f"{labels}/drive/clip/{k:04d}.png", encode(pairs[k][1]))
    return root, images, labels


def read_metrics(out: str):
    fs, path = storage.resolve(f"{out}/metrics.parquet")
    return pq.read_table(path, filesystem=fs)


def read(uri: str):
    fs, _ = storage.resolve(uri)
    files = [storage.resolve(f)[1] for f in storage.list_files(uri) if f.endswith(".parquet")]
    return pq.ParquetDataset(files, filesystem=fs).read().sort_by("uri")


def frames_of(table, uri: str) -> list[int]:
    return [video.split_frame_uri(u)[1] for u in table.column("uri").to_pylist() if u.startswith(uri + "#frame=")]


def infer(run_job, root, images, labels, out, *extra):
    args = ("--model", f"{root}/model", "--images", images, "--labels", labels, "--output", f"{root}/{out}",
            "--batch-size", "8", "--rows-per-file", "16", *extra)
    run_job("infer", *args, check=True)
    return f"{root}/{out}", args


def test_videos_and_a_big_archive_cut_into_ranges_give_every_frame_once_as_one_range_does(collection, run_job):
    root, images, labels = collection
    many, _ = infer(run_job, root, images, labels, "many", "--frames-per-task", "5", "--write-masks", "--write-video")
    one, _ = infer(run_job, root, images, labels, "one", "--frames-per-task", "100000")
    p_many, p_one = read(f"{many}/predictions"), read(f"{one}/predictions")
    e_many, e_one = read(f"{many}/errors"), read(f"{one}/errors")
    cols = ["uri", "frame_index", "timestamp_s", "height", "width", "mask_png", "label_uri", "confusion"]
    assert p_many.select(cols).equals(p_one.select(cols)), "ranges changed a row"
    assert e_many.select(["uri", "stage"]).equals(e_one.select(["uri", "stage"]))

    uris = p_many.column("uri").to_pylist()
    assert len(uris) == len(set(uris))
    assert frames_of(p_many, f"{images}/drive/clip.mp4") == sorted(range(N_CLIP), key=str)  # sorted as text
    assert sorted(frames_of(p_many, f"{images}/drive/vfr.mkv")) == list(range(N_VFR))
    assert sorted(frames_of(p_many, f"{images}/lossless.mkv")) == list(range(N_LOSSLESS))
    cut = sorted(frames_of(p_many, f"{images}/cut.mkv"))
    assert 0 < len(cut) < N_VFR and cut == list(range(len(cut)))
    assert sum(u.startswith(f"{images}/big.tar/") for u in uris) == N_TAR
    errors = dict(zip(e_many.column("uri").to_pylist(), e_many.column("stage").to_pylist()))
    assert errors == {f"{images}/fake.mp4": "decode", video.frame_uri(f"{images}/cut.mkv", len(cut)): "decode"}
    assert len(uris) == N_CLIP + N_VFR + N_LOSSLESS * 2 + N_TAR + len(cut)

    rows = {r["uri"]: r for r in p_many.to_pylist()}
    clip = f"{images}/drive/clip.mp4"
    for k in range(N_CLIP):
        r = rows[video.frame_uri(clip, k)]
        assert (r["frame_index"], r["height"], r["width"]) == (k, H, W)
        assert r["timestamp_s"] == pytest.approx(k / 25)
        assert (r["label_uri"] is not None) == (k in (0, 5, 17, N_CLIP - 1))
    vfr = [rows[video.frame_uri(f"{images}/drive/vfr.mkv", k)]["timestamp_s"] for k in range(N_VFR)]
    assert vfr == pytest.approx([sum(([40, 20, 80, 33] * 6)[:k]) / 1000 for k in range(N_VFR)])
    assert all(rows[u]["frame_index"] is None and rows[u]["timestamp_s"] is None for u in uris if "#frame=" not in u)

    # The lossless video's frames are predicted and scored exactly like the same frames as PNGs.
    for k in range(N_LOSSLESS):
        v, p = rows[video.frame_uri(f"{images}/lossless.mkv", k)], rows[f"{images}/png/lossless/{k}.png"]
        assert v["mask_png"] == p["mask_png"] and v["confusion"] == p["confusion"] and v["confusion"] is not None

    assert storage.exists(f"{many}/masks/drive/clip.mp4/17.png") and storage.exists(f"{many}/masks/big.tar/t/007.png.png")
    with av.open(io.BytesIO(storage.read_bytes(f"{many}/overlays/drive/clip.mp4.mp4"))) as c:
        assert sum(1 for _ in c.decode(c.streams.video[0])) == N_CLIP
    assert not storage.exists(f"{many}/overlays/fake.mp4.mp4")

    # The report pictures video frames too (decoded from the video by their index).
    run_job("evaluate", "--predictions", one, "--dest", f"{root}/report", "--examples", "60", check=True)
    page = storage.read_bytes(f"{root}/report/index.html").decode()
    assert "clip.mp4#frame=17" in page and "lossless.mkv#frame=3" in page and "3.png" in page


# slow (~40 s): --every is checked frame by frame in tests/test_video.py and a rerun's completion by
# tests/test_reliability_kill.py in the default run; this is their union through video jobs.
@pytest.mark.slow
def test_every_selects_video_frames_and_a_rerun_completes_lost_parts_exactly(collection, run_job):
    root, images, labels = collection
    out, args = infer(run_job, root, images, labels, "every", "--every", "3", "--frames-per-task", "4")
    before_p, before_e = read(f"{out}/predictions"), read(f"{out}/errors")
    assert frames_of(before_p, f"{images}/drive/clip.mp4") == sorted(range(0, N_CLIP, 3), key=str)
    assert sum(u.startswith(f"{images}/big.tar/") for u in before_p.column("uri").to_pylist()) == N_TAR  # not videos
    metrics = read_metrics(out)

    # An interrupted run: part files lost, metrics never written. The rerun fills exactly the gap.
    parts = [f for f in storage.list_files(f"{out}/predictions") if f.endswith(".parquet")]
    assert len(parts) > 2
    for f in parts[:2] + [f for f in storage.list_files(f"{out}/errors") if f.endswith(".parquet")]:
        storage.delete(f)
    storage.delete(f"{out}/metrics.parquet")
    run_job("infer", *args, check=True)
    assert read(f"{out}/predictions").select(["uri", "mask_png", "frame_index"]).equals(
        before_p.select(["uri", "mask_png", "frame_index"]))
    assert read(f"{out}/errors").select(["uri", "stage"]).equals(before_e.select(["uri", "stage"]))
    assert read_metrics(out).equals(metrics)

    refused = run_job("infer", *args[:-4], "--every", "2")
    assert refused.returncode == 1
    assert "was made with --every 3, this run has --every 2" in refused.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_killed_run_over_a_long_video_and_a_big_archive_is_completed_exactly_by_the_same_command(
        s3_server, run_job, ray_cluster, tmp_path):
    import time

    from test_reliability_kill import Job

    root = f"s3://{BUCKET}/video-kill-{uuid.uuid4().hex[:8]}"
    train_tiny_model(f"{root}/model/model")
    frames = [p[0] for p in scenes(400, H, W, seed=2)]
    storage.write_bytes(f"{root}/images/long.mp4", h264_bframes(frames, gop=12))
    storage.write_bytes(f"{root}/images/big.tar", tar_bytes({f"{k:03d}.png": encode(f) for k, f in enumerate(frames[:200])}))
    out = f"{root}/out"
    args = ("--model", f"{root}/model", "--images", f"{root}/images", "--output", out, "--frames-per-task", "25",
            "--batch-size", "4", "--rows-per-file", "10")
    job = Job(ray_cluster, "infer", *args, log_path=tmp_path / "infer.log")
    parts = lambda: [f for f in storage.list_files(f"{out}/predictions") if f.endswith(".parquet")]  # noqa: E731
    job.wait_for(lambda: len(parts()) >= 3, timeout=600, what="three prediction part files")
    job.kill()
    time.sleep(3)
    assert not storage.exists(f"{out}/metrics.parquet"), "the first run finished: nothing was interrupted"
    written = read(f"{out}/predictions").num_rows
    assert 0 < written < 600
    run_job("infer", *args, check=True)
    uris = read(f"{out}/predictions").column("uri").to_pylist()
    assert len(uris) == len(set(uris)), "a frame was written twice"
    expected = {video.frame_uri(f"{root}/images/long.mp4", k) for k in range(400)}
    expected |= {f"{root}/images/big.tar/{k:03d}.png" for k in range(200)}
    assert set(uris) == expected, "a frame is missing"

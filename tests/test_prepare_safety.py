"""jobs/prepare.py never deletes what it did not write (issue "Trust on real-world inputs").

Every test runs the job's command line as a subprocess against the session's Ray cluster (and
the moto S3 server for the S3 cases), on tiny synthetic SegNet-layout sources; nothing is mocked.
"""

from __future__ import annotations

import hashlib
import json

import pyarrow.parquet as pq
import pytest

from segray import storage
from segray.dataset import load_info, split_files
from segray.prepare import PrepareError, check_dest_outside_source
from segray.synthetic import write_dataset

SIZE = "16x24"


def source(uri: str, seed: int, **counts: int) -> str:
    write_dataset(uri, layout="segnet", counts=counts or {"train": 3, "val": 1}, size=(24, 32), seed=seed)
    return uri


def tree(uri: str) -> dict[str, str]:
    """Relative path -> sha256 of every file below ``uri`` (local or S3)."""
    return {storage.relative(uri, u): hashlib.sha256(storage.read_bytes(u)).hexdigest() for u in storage.list_files(uri)}


def last_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def listed(dest: str) -> dict[str, list[str]]:
    return json.loads(storage.read_bytes(storage.join(dest, "dataset.json")))["files"]


def rows_of(dest: str, rels: list[str]) -> int:
    fs, _ = storage.resolve(dest)
    return sum(pq.read_table(storage.resolve(storage.join(dest, r))[1], filesystem=fs).num_rows for r in rels)


# -------------------------------------------------------------------- 1. dest overlapping source


@pytest.mark.parametrize("skip_bad", [False, True])
def test_dest_that_is_in_or_around_the_source_is_refused_and_the_source_untouched(run_job, tmp_path, skip_bad):
    src = source(str(tmp_path / "data" / "camvid"), seed=1)
    before = tree(str(tmp_path))
    extra = ["--skip-bad"] if skip_bad else []
    cases = [
        (src, src, "is the --source"),
        (src + "/", f"file://{src}", "is the --source"),  # other spellings of the same folder
        (src, f"{src}/prepared", "lies inside --source"),
        (src, f"{src}/train", "lies inside --source"),  # the folder the old job deleted first
        (src, str(tmp_path / "data"), "lies inside --dest"),
    ]
    for s, d, says in cases:
        proc = run_job("prepare", "--source", s, "--dest", d, "--size", SIZE, *extra, timeout=120)
        last = last_line(proc)
        assert proc.returncode == 1, (s, d, proc.stdout[-1000:], proc.stderr[-2000:])
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert last.startswith("prepare: error: PrepareError: ") and says in last, last
        assert storage.normalize(s) in last and storage.normalize(d) in last and "--dest outside" in last, last
        assert tree(str(tmp_path)) == before, f"--source {s} --dest {d} changed files"


def test_dest_inside_the_source_on_s3_is_refused(run_job, s3_prefix):
    src = source(f"{s3_prefix}/camvid", seed=2)
    before = tree(s3_prefix)
    for dest in (src, f"{src}/train"):
        proc = run_job("prepare", "--source", src, "--dest", dest, "--skip-bad", timeout=120)
        assert proc.returncode == 1 and "--source" in last_line(proc) and dest in last_line(proc), proc.stderr
        assert tree(s3_prefix) == before


def test_overlap_is_decided_by_path_segments():
    check_dest_outside_source("/data/cam", "/data/camvid")  # a string prefix, not a folder inside
    check_dest_outside_source("/data/camvid", "/data/cam")
    check_dest_outside_source("s3://bucket/data/camvid", "/data/camvid/out")  # S3 and local never overlap
    check_dest_outside_source("s3://bucket/cam", "s3://bucket/camvid")
    check_dest_outside_source("s3://bucket/camvid", "s3://other/camvid")
    for src, dest in [("s3://b/camvid", "s3://b/camvid/out"), ("s3://b/camvid/x", "s3://b"), ("/a/b", "/a/b")]:
        with pytest.raises(PrepareError, match="prepare never writes where it reads"):
            check_dest_outside_source(src, dest)


# -------------------------------------------------------------------- 2. dest with foreign files


def test_non_empty_dest_that_is_no_segray_dataset_is_refused(run_job, tmp_path):
    src = source(str(tmp_path / "camvid"), seed=3)
    dest = tmp_path / "work"
    (dest / "train").mkdir(parents=True)
    (dest / "test").mkdir()
    (dest / "train" / "notes.txt").write_text("my notes")
    (dest / "test" / "x.parquet").write_bytes(b"someone else's parquet")
    before = tree(str(tmp_path))
    proc = run_job("prepare", "--source", src, "--dest", str(dest), "--size", SIZE, timeout=120)
    last = last_line(proc)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "is not empty and not a segray dataset" in last and str(dest) in last and "pass an empty or new --dest" in last
    assert tree(str(tmp_path)) == before

    # A dataset.json that segray did not write does not make the folder segray's.
    (dest / "dataset.json").write_text(json.dumps({"format": "someone-else/1", "files": {}}))
    before = tree(str(tmp_path))
    proc = run_job("prepare", "--source", src, "--dest", str(dest), "--size", SIZE, timeout=120)
    assert proc.returncode == 1 and "not a segray dataset" in last_line(proc), proc.stderr
    assert tree(str(tmp_path)) == before


def test_non_empty_dest_on_s3_is_refused(run_job, s3_prefix):
    src = source(f"{s3_prefix}/camvid", seed=4)
    dest = f"{s3_prefix}/work"
    storage.write_bytes(f"{dest}/train/notes.txt", b"my notes")
    storage.write_bytes(f"{dest}/test/x.parquet", b"someone else's parquet")
    before = tree(s3_prefix)
    proc = run_job("prepare", "--source", src, "--dest", dest, "--size", SIZE, timeout=120)
    assert proc.returncode == 1 and "is not empty and not a segray dataset" in last_line(proc), proc.stderr
    assert dest in last_line(proc)
    assert tree(s3_prefix) == before


# ----------------------------------------------------------------- 3. rerun over an earlier dataset


def test_rerun_deletes_only_the_earlier_datasets_files(run_job, tmp_path):
    """Foreign files in an earlier dataset are kept; leftovers of a killed run are recognised."""
    dest = str(tmp_path / "prepared")
    proc = run_job("prepare", "--source", source(str(tmp_path / "a"), 5, train=3, val=1, test=1), "--dest", dest,
                   "--size", SIZE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = listed(dest)
    first_files = [r for rels in first.values() for r in rels]
    assert set(first) == {"train", "val", "test"} and rows_of(dest, first_files) == 5
    assert set(tree(dest)) == {"dataset.json", *first_files}  # no manifest left behind
    # The user's files, and what a prepare killed before its dataset.json leaves: a manifest + a shard.
    (tmp_path / "prepared" / "README.txt").write_text("prepared from a/ on Monday")
    (tmp_path / "prepared" / "train" / "notes.txt").write_text("mine")
    killed = "20250101T000000-0123456789ab"
    storage.write_bytes(storage.join(dest, f".segray-prepare-{killed}.json"), json.dumps(
        {"format": "segray-prepare-run/1", "run": killed, "replaces": []}).encode())
    storage.write_bytes(storage.join(dest, "val", f"{killed}_w_000000-0.parquet"),
                        storage.read_bytes(storage.join(dest, first_files[0])))
    mine = {k: v for k, v in tree(dest).items() if k in ("README.txt", "train/notes.txt")}

    proc = run_job("prepare", "--source", source(str(tmp_path / "b"), 6, train=2, val=2), "--dest", dest,
                   "--size", SIZE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kept 2 files" in proc.stdout
    second = listed(dest)
    second_files = [r for rels in second.values() for r in rels]
    assert set(second) == {"train", "val"} and rows_of(dest, second_files) == 4
    assert not set(first_files) & set(second_files)
    assert set(tree(dest)) == {"dataset.json", *second_files, *mine}  # old shards, leftovers, manifest: gone
    assert {k: tree(dest)[k] for k in mine} == mine
    assert not (tmp_path / "prepared" / "test").exists()  # emptied by prepare, so removed

    # An older dataset.json without "files": only its <split>/*.parquet are its files.
    info = json.loads(storage.read_bytes(storage.join(dest, "dataset.json")))
    del info["files"]
    storage.write_bytes(storage.join(dest, "dataset.json"), json.dumps(info).encode())
    proc = run_job("prepare", "--source", str(tmp_path / "a"), "--dest", dest, "--size", SIZE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    third_files = [r for rels in listed(dest).values() for r in rels]
    assert set(tree(dest)) == {"dataset.json", *third_files, *mine} and rows_of(dest, third_files) == 5
    assert {k: tree(dest)[k] for k in mine} == mine


# --------------------------------------------------------------- 4. a failed rerun keeps the old one


def test_failed_rerun_leaves_the_earlier_dataset_whole(run_job, tmp_path):
    dest = str(tmp_path / "prepared")
    proc = run_job("prepare", "--source", source(str(tmp_path / "a"), 7, train=3, val=1), "--dest", dest,
                   "--size", SIZE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # A file named "test" (not a folder) in the dataset: kept as a foreign file, and the rerun's
    # write of its test split fails after its train and val shards are written.
    (tmp_path / "prepared" / "test").write_text("not a folder")
    before = tree(dest)
    old_files = [r for rels in listed(dest).values() for r in rels]

    proc = run_job("prepare", "--source", source(str(tmp_path / "b"), 8, train=2, val=1, test=1), "--dest", dest,
                   "--size", SIZE)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert last_line(proc).startswith("prepare: error:"), proc.stderr[-2000:]
    # It failed writing the test split, i.e. after it had written its train and val shards.
    assert f"{dest}/test" in last_line(proc) and "wrote" not in proc.stdout
    assert tree(dest) == before  # same dataset.json and files; no new shard, no manifest
    assert rows_of(dest, old_files) == 4

    # An older dataset.json (no "files": readers take every <split>/*.parquet) is pinned to its
    # own files before a rerun writes beside it, so that shards a killed rerun leaves behind
    # never join it.
    old_info = json.loads(storage.read_bytes(storage.join(dest, "dataset.json")))
    del old_info["files"]
    storage.write_bytes(storage.join(dest, "dataset.json"), json.dumps(old_info).encode())
    before = tree(dest)
    proc = run_job("prepare", "--source", str(tmp_path / "b"), "--dest", dest, "--size", SIZE)
    assert proc.returncode == 1 and f"{dest}/test" in last_line(proc), proc.stderr[-2000:]
    assert {k: v for k, v in tree(dest).items() if k != "dataset.json"} == {
        k: v for k, v in before.items() if k != "dataset.json"}
    storage.write_bytes(storage.join(dest, "train", "20250101T000000-0123456789ab_w_000000-0.parquet"),
                        storage.read_bytes(storage.join(dest, old_files[0])))  # as a killed rerun leaves it
    pinned = json.loads(storage.read_bytes(storage.join(dest, "dataset.json")))
    assert {k: v for k, v in pinned.items() if k != "files"} == old_info  # the same dataset, now with its list
    info = load_info(dest)
    read = sorted(storage.relative(dest, u) for split in info.splits for u in split_files(dest, info, split))
    assert read == sorted(old_files)


# -------------------------------------------------------------------- 5. --skip-bad with nothing left


def test_skip_bad_with_every_pair_bad_fails(run_job, tmp_path):
    src = source(str(tmp_path / "camvid"), seed=9, train=2, val=1)
    for uri in storage.list_files(storage.join(src, "train")) + storage.list_files(storage.join(src, "val")):
        storage.write_bytes(uri, b"not an image")
    dest = str(tmp_path / "prepared")
    proc = run_job("prepare", "--source", src, "--dest", dest, "--size", SIZE, "--skip-bad")
    last = last_line(proc)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "nothing left to prepare: all 3 pairs are bad" in last and "not a readable image" in last, last
    assert tree(dest) == {}


def test_skip_bad_that_would_drop_a_whole_split_fails(run_job, tmp_path):
    src = source(str(tmp_path / "camvid"), seed=10, train=2, val=1)
    storage.write_bytes(storage.list_files(storage.join(src, "valannot"))[0], b"not an image")
    proc = run_job("prepare", "--source", src, "--dest", str(tmp_path / "out"), "--size", SIZE, "--skip-bad")
    assert proc.returncode == 1 and "nothing left of split 'val'" in last_line(proc), proc.stderr[-2000:]
    assert tree(str(tmp_path / "out")) == {}



def test_a_pair_that_raises_anything_is_that_pairs_error_not_the_jobs(tmp_path):
    """A label PIL cannot convert (LAB TIFF bytes named .png) raised ValueError, which is no
    BadInputError: it must become the pair's error (named, skippable), never end the job."""
    import io as _io

    import numpy as _np
    from PIL import Image as _Image

    from segray.prepare import _process_batch

    image, label = tmp_path / "f.png", tmp_path / "f_label.png"
    _Image.fromarray(_np.zeros((8, 8, 3), _np.uint8)).save(image)
    buf = _io.BytesIO()
    _Image.new("LAB", (8, 8)).save(buf, format="TIFF")
    label.write_bytes(buf.getvalue())
    out = _process_batch({"split": ["train"], "name": ["f"], "image": [str(image)], "label": [str(label)]},
                         size=(8, 8), colors=None).to_pylist()
    assert len(out) == 1 and str(label) in out[0]["error"] and "ValueError" in out[0]["error"]


def test_a_pair_with_a_dot_segment_key_is_a_bad_pair_never_read(s3_server, s3_prefix):
    """``train/x/../f.png`` would be served as another key's bytes: the pair is bad (named, skippable)."""
    import boto3

    from segray import storage as _storage
    from segray.layout import detect
    from segray.prepare import _name_problem

    s3 = boto3.client("s3")
    bucket, prefix = s3_prefix[len("s3://"):].split("/", 1)
    for key in ("train/f.png", "trainannot/f.png", "train/x/../g.png", "trainannot/x/../g.png"):
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=b"png")
    layout = detect(s3_prefix)
    verdict = {p.image[len(s3_prefix) + 1:]: _name_problem(s3_prefix, p) for p in layout.pairs}
    assert verdict["train/f.png"] == ""
    assert "rename the object" in verdict["train/x/../g.png"] and f"{s3_prefix}/train/x/../g.png" in verdict[
        "train/x/../g.png"]
    assert _storage.relative(s3_prefix, f"{s3_prefix}/train/x/../g.png") == "train/x/../g.png"

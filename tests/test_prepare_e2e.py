"""jobs/prepare.py end to end: moto S3 server, local Ray cluster, synthetic data in both layouts."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from segray import storage
from segray.camvid import ORIGINAL_COLORS, ORIGINAL_TO_11
from segray.synthetic import write_dataset

SIZE = "32x48"


def read_split(dest: str, split: str):
    fs, path = storage.resolve(storage.join(dest, split))
    return pq.read_table(path, filesystem=fs)  # plain pyarrow, no segray reader


def read_info(dest: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(dest, "dataset.json")))


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def expected_label(label_uri: str, colour_coded: bool) -> np.ndarray:
    img = Image.open(io.BytesIO(storage.read_bytes(label_uri)))
    if colour_coded:
        table = {rgb: ORIGINAL_TO_11[name] for rgb, name in ORIGINAL_COLORS}
        rgb = np.asarray(img.convert("RGB"))
        idx = np.full(rgb.shape[:2], 11, np.uint8)
        for colour, cls in table.items():
            idx[(rgb == colour).all(axis=2)] = cls
        img = Image.fromarray(idx)
    return np.asarray(img.resize((48, 32), Image.Resampling.NEAREST))


def test_segnet_layout_from_s3(run_job, s3_prefix):
    src, dest = f"{s3_prefix}/camvid", f"{s3_prefix}/prepared"
    write_dataset(src, layout="segnet", counts={"train": 10, "val": 4, "test": 3}, size=(60, 80), seed=1)
    proc = run_job("prepare", "--source", src, "--dest", dest, "--size", SIZE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote 17 pairs" in proc.stdout

    info = read_info(dest)
    assert info["splits"] == {"train": 10, "val": 4, "test": 3}
    assert (info["height"], info["width"], info["layout"], info["void_index"]) == (32, 48, "segnet", 11)
    assert len(info["classes"]) == 11 and len(info["palette"]) == 12

    train = read_split(dest, "train")
    assert train.schema.names == ["name", "image", "label", "height", "width", "source"]
    assert train.num_rows == 10
    counts = np.zeros(12, np.int64)
    for row in train.to_pylist():
        image = np.frombuffer(row["image"], np.uint8).reshape(32, 48, 3)
        label = np.frombuffer(row["label"], np.uint8).reshape(32, 48)
        assert (row["height"], row["width"]) == (32, 48) and image.std() > 0
        label_uri = storage.join(src, "trainannot", row["name"] + ".png")
        assert row["source"] == storage.join(src, "train", row["name"] + ".png")
        assert np.array_equal(label, expected_label(label_uri, colour_coded=False))
        counts += np.bincount(label.ravel(), minlength=12)
    assert info["class_pixel_counts"] == counts[:11].tolist()
    assert info["void_pixel_count"] == int(counts[11])


def test_original_layout_from_s3_and_rerun_replaces(run_job, s3_prefix):
    src, dest = f"{s3_prefix}/orig", f"{s3_prefix}/prepared"
    written = write_dataset(src, layout="original", counts={"train": 9, "val": 3, "test": 3}, size=(48, 64), seed=2)
    for _attempt in range(2):  # the rerun must replace, not append to, the shards
        proc = run_job("prepare", "--source", src, "--dest", dest, "--size", SIZE)
        assert proc.returncode == 0, proc.stderr[-3000:]
    info = read_info(dest)
    assert info["layout"] == "original" and sum(info["splits"].values()) == sum(written.values())
    rows = sum(read_split(dest, s).num_rows for s in info["splits"])
    assert rows == sum(written.values())
    some_split = next(iter(info["splits"]))
    row = read_split(dest, some_split).to_pylist()[0]
    label = np.frombuffer(row["label"], np.uint8).reshape(32, 48)
    label_uri = [f for f in storage.list_files(src) if f.endswith(row["name"].split("/")[-1] + "_L.png")][0]
    assert np.array_equal(label, expected_label(label_uri, colour_coded=True))


def _bad_source(prefix: str, case: str) -> tuple[str, str]:
    """A small valid SegNet source with one defect; returns (source, the file the error must name)."""
    src = f"{prefix}/{case}"
    write_dataset(src, layout="segnet", counts={"train": 3, "val": 1}, size=(24, 32), seed=3)
    if case == "image_without_label":
        bad = storage.join(src, "train", "extra.png")
        storage.write_bytes(bad, png_bytes(np.zeros((24, 32, 3), np.uint8)))
    elif case == "label_without_image":
        bad = storage.join(src, "valannot", "orphan.png")
        storage.write_bytes(bad, png_bytes(np.zeros((24, 32), np.uint8)))
    elif case == "size_mismatch":
        name = storage.list_files(storage.join(src, "trainannot"))[0]
        bad = name
        storage.write_bytes(bad, png_bytes(np.zeros((10, 10), np.uint8)))
    elif case == "label_out_of_range":
        bad = storage.list_files(storage.join(src, "trainannot"))[1]
        storage.write_bytes(bad, png_bytes(np.full((24, 32), 40, np.uint8)))
    elif case == "not_an_image":
        bad = storage.list_files(storage.join(src, "train"))[0]
        storage.write_bytes(bad, b"just some text, not a PNG")
    else:
        raise ValueError(case)
    return src, bad


@pytest.mark.parametrize(
    "case, message",
    [
        ("image_without_label", "has no label"),
        ("label_without_image", "has no image"),
        ("size_mismatch", "must be the same size"),
        ("label_out_of_range", "label values outside 0..11: 40"),
        ("not_an_image", "not a readable image"),
    ],
)
def test_bad_input_fails_naming_the_file(run_job, s3_prefix, case, message):
    src, bad = _bad_source(s3_prefix, case)
    dest = f"{s3_prefix}/out"
    proc = run_job("prepare", "--source", src, "--dest", dest, "--size", SIZE)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("prepare: error:") and message in last and bad in last, last
    assert not storage.exists(storage.join(dest, "dataset.json"))


def test_skip_bad_lists_what_it_left_out(run_job, s3_prefix):
    src, bad = _bad_source(s3_prefix, "not_an_image")
    dest = f"{s3_prefix}/out"
    proc = run_job("prepare", "--source", src, "--dest", dest, "--size", SIZE, "--skip-bad")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = read_info(dest)
    assert info["splits"] == {"train": 2, "val": 1}
    assert len(info["skipped"]) == 1 and bad in info["skipped"][0]


def test_empty_or_foreign_source(run_job, s3_prefix, tmp_path):
    proc = run_job("prepare", "--source", f"{s3_prefix}/nothing", "--dest", f"{s3_prefix}/out")
    assert proc.returncode == 1 and "no files found" in proc.stderr.strip().splitlines()[-1]
    (tmp_path / "src" / "photos").mkdir(parents=True)
    (tmp_path / "src" / "photos" / "cat.png").write_bytes(png_bytes(np.zeros((4, 4, 3), np.uint8)))
    proc = run_job("prepare", "--source", str(tmp_path / "src"), "--dest", str(tmp_path / "out"))
    assert proc.returncode == 1 and "neither CamVid layout" in proc.stderr.strip().splitlines()[-1]


def test_holdout_list_from_s3_and_train_on_val(run_job, s3_prefix):
    """--holdout @FILE (on S3): exactly the listed frames are val; the old val frames train too;
    --train-on-val puts every val frame in train as well; dataset.json records both."""
    src, dest = f"{s3_prefix}/camvid", f"{s3_prefix}/prepared"
    write_dataset(src, layout="segnet", counts={"train": 6, "val": 2}, size=(32, 48), seed=3)
    names = sorted(storage.relative(f"{src}/train", u)[:-4] for u in storage.list_files(f"{src}/train"))
    old_val = sorted(storage.relative(f"{src}/val", u)[:-4] for u in storage.list_files(f"{src}/val"))
    held = names[1:3]
    storage.write_bytes(f"{s3_prefix}/holdout.txt", ("# unseen\n" + "\n".join(held) + "\n").encode())
    proc = run_job("prepare", "--source", src, "--dest", dest, "--holdout", f"@{s3_prefix}/holdout.txt",
                   "--train-on-val")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = read_info(dest)
    assert info["splits"] == {"train": 8, "val": 2} and info["holdout"] == held and info["val_in_train"] is True
    val = read_split(dest, "val").to_pydict()
    assert sorted(val["name"]) == held
    assert all(s.startswith(f"{src}/train/") for s in val["source"])  # held-out frames come from train/
    train = read_split(dest, "train").to_pydict()
    assert sorted(train["name"]) == sorted(set(names) - set(held) | set(old_val) | set(held))
    counts = np.zeros(12, np.int64)
    for label in train["label"]:
        counts += np.bincount(np.frombuffer(label, np.uint8), minlength=12)
    assert info["class_pixel_counts"] == counts[:11].tolist()  # the class weights see what train holds

    bad = run_job("prepare", "--source", src, "--dest", f"{s3_prefix}/other", "--holdout", "Seq99")
    assert bad.returncode == 1 and "--holdout 'Seq99' matches no train or val frame" in bad.stderr
    assert not storage.list_files(f"{s3_prefix}/other")

"""Broken inputs for prepare and infer (issue #7): every kind named in the issue, for real.

Truncated PNG and JPEG, zero-byte files, text files named ``.png``, a decompression bomb,
wrong-size labels, label values out of range and a file name that is not UTF-8 are bad; RGBA,
16-bit, palette and grayscale images are odd but valid (converted, used). Prepare stops with a
line naming a bad file, or with ``--skip-bad`` leaves the bad pairs out and lists them in
dataset.json; infer writes an error row for each bad input and predicts the rest, so that
rows(predictions) + rows(errors) = inputs.

The sources are local folders: S3 keys are UTF-8 by definition, a local name need not be.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from segray import storage
from segray.frames import load_frame
from segray.prepare import process_pair
from segray.preprocess import MAX_PIXELS, BadInputError
from segray.synthetic import render_scene, write_dataset

H, W = 24, 32
NON_UTF8 = b"caf\xe9-latin1"  # 'café' in Latin-1: not UTF-8


def encode(img, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, format=fmt)
    return buf.getvalue()


def scene(seed: int, h: int = H, w: int = W) -> tuple[np.ndarray, np.ndarray]:
    return render_scene(np.random.default_rng(seed), h, w)


def bomb() -> bytes:
    """A ~10 kB PNG that claims 9000x8000 pixels (72 Mpx, over MAX_PIXELS): a decompression bomb."""
    assert 9000 * 8000 > MAX_PIXELS
    return encode(Image.new("1", (9000, 8000)))


def bad_images() -> dict[str, bytes]:
    """name -> bytes of every bad image kind (a valid label goes with each in prepare)."""
    png, jpg = encode(scene(1)[0]), encode(scene(2)[0], "JPEG")
    return {
        "truncated_png.png": png[: len(png) // 2],
        "truncated_jpeg.jpg": jpg[: len(jpg) // 2],
        "zero_bytes.png": b"",
        "text.png": b"this is a text file, not a PNG\n" * 10,
        "bomb.png": bomb(),
    }


def odd_images(seed: int) -> dict[str, Image.Image]:
    """name -> valid images in modes that must be converted, not refused."""
    image = scene(seed)[0]
    return {
        "rgba.png": Image.fromarray(np.dstack([image, np.full((H, W), 128, np.uint8)])),
        "gray16.png": Image.fromarray((image.mean(axis=2) * 257).astype(np.uint16)),
        "palette.png": Image.fromarray(image).quantize(colors=16),
        "gray.png": Image.fromarray(image[..., 0]),
    }


def write_raw(path: bytes | str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


# ----------------------------------------------------------------------------- no Ray


@pytest.mark.parametrize("name", sorted(bad_images()))
def test_each_bad_image_is_refused_naming_the_file(name):
    data = bad_images()[name]
    label = encode(scene(3)[1])
    with pytest.raises(BadInputError) as e:
        process_pair(data, label, f"s3://b/src/train/{name}", "s3://b/src/trainannot/x.png", (H, W), None)
    assert str(e.value).startswith(f"s3://b/src/train/{name}: ")
    with pytest.raises(BadInputError) as e:
        load_frame(data, f"s3://b/frames/{name}", (H, W))
    assert str(e.value).startswith(f"s3://b/frames/{name}: ")


def test_bad_labels_are_refused_naming_the_file():
    image = encode(scene(4)[0])
    small = encode(np.zeros((H // 2, W // 2), np.uint8))
    with pytest.raises(BadInputError, match=r"^s3://b/l\.png: label is 16x12 but its image s3://b/i\.png is 32x24"):
        process_pair(image, small, "s3://b/i.png", "s3://b/l.png", (H, W), None)
    out_of_range = encode(np.full((H, W), 200, np.uint8))
    with pytest.raises(BadInputError, match=r"^s3://b/l\.png: label values outside 0\.\.11: 200"):
        process_pair(image, out_of_range, "s3://b/i.png", "s3://b/l.png", (H, W), None)


@pytest.mark.parametrize("name", sorted(odd_images(0)))
def test_odd_but_valid_images_are_converted(name):
    label = scene(5)[1]
    img, lab, _ = process_pair(encode(odd_images(5)[name]), encode(Image.fromarray(label).convert("P")),
                               "i.png", "l.png", (H, W), None)
    assert img.shape == (H, W, 3) and img.dtype == np.uint8 and np.array_equal(lab, label)
    frame, h, w = load_frame(encode(odd_images(5)[name]), "f.png", (12, 16))
    assert frame.shape == (12, 16, 3) and (h, w) == (H, W)


def test_a_name_that_is_not_utf8_is_listed_and_refused_alone(tmp_path):
    root = os.fsencode(tmp_path)
    write_raw(root + b"/ok.png", encode(scene(6)[0]))
    write_raw(root + b"/" + NON_UTF8 + b".png", encode(scene(7)[0]))
    files = storage.list_files(str(tmp_path))  # pyarrow's own listing raises UnicodeDecodeError here
    shown = str(tmp_path / "caf\\xe9-latin1.png")
    assert files == sorted([str(tmp_path / "ok.png"), shown])
    assert storage.read_bytes(str(tmp_path / "ok.png"))
    with pytest.raises(storage.StorageError, match=r"the file name is not valid UTF-8"):
        storage.read_bytes(shown)


# ----------------------------------------------------------------------------- prepare, end to end


def broken_source(root: Path) -> tuple[str, set[str], int]:
    """A SegNet source: 6 good pairs, 4 odd-but-valid pairs, and one bad pair per bad kind.

    Returns (source, the bad files' URIs as jobs name them, number of usable pairs)."""
    src = str(root / "camvid")
    write_dataset(src, layout="segnet", counts={"train": 4, "val": 2}, size=(H, W), seed=1)
    bad: set[str] = set()
    for i, (name, data) in enumerate(bad_images().items()):
        write_raw(f"{src}/train/{name}", data)
        write_raw(f"{src}/trainannot/{name.rsplit('.', 1)[0]}.png", encode(scene(10 + i)[1]))
        bad.add(f"{src}/train/{name}")
    image, label = scene(20)
    write_raw(f"{src}/train/wrong_size.png", encode(image))
    write_raw(f"{src}/trainannot/wrong_size.png", encode(np.zeros((H // 2, W // 2), np.uint8)))
    bad.add(f"{src}/trainannot/wrong_size.png")
    write_raw(f"{src}/train/out_of_range.png", encode(image))
    write_raw(f"{src}/trainannot/out_of_range.png", encode(np.full((H, W), 99, np.uint8)))
    bad.add(f"{src}/trainannot/out_of_range.png")
    write_raw(os.fsencode(src) + b"/train/" + NON_UTF8 + b".png", encode(image))
    write_raw(os.fsencode(src) + b"/trainannot/" + NON_UTF8 + b".png", encode(label))
    bad.add(f"{src}/train/caf\\xe9-latin1.png")
    for k, (name, img) in enumerate(odd_images(30).items()):
        write_raw(f"{src}/train/{name}", encode(img))
        write_raw(f"{src}/trainannot/{name}", encode(Image.fromarray(scene(30 + k)[1]).convert("P")))
    return src, bad, 6 + 4


def test_prepare_names_a_bad_file_or_skips_and_lists_them_all(run_job, tmp_path):
    src, bad, usable = broken_source(tmp_path)
    dest = str(tmp_path / "prepared")
    proc = run_job("prepare", "--source", src, "--dest", dest, "--size", f"{H}x{W}")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("prepare: error: PrepareError: ") and any(f"{b}: " in last for b in bad), last
    assert f"(and {len(bad) - 1} more bad pairs)" in last and "--skip-bad" in last
    assert not os.path.exists(f"{dest}/dataset.json")

    proc = run_job("prepare", "--source", src, "--dest", dest, "--size", f"{H}x{W}", "--skip-bad")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(Path(dest, "dataset.json").read_text())
    assert sum(info["splits"].values()) == usable
    named = {next(b for b in bad if message.startswith(f"{b}: ")) for message in info["skipped"]}
    assert named == bad and len(info["skipped"]) == len(bad), info["skipped"]
    assert all(f"prepare: skipped: {b}: " in proc.stdout for b in bad)
    train = pq.read_table(f"{dest}/train")
    assert train.num_rows == info["splits"]["train"] and not set(train.column("name").to_pylist()) & {
        "bomb", "text", "zero_bytes", "wrong_size", "out_of_range", "truncated_png", "truncated_jpeg"}
    assert {"rgba", "gray16", "palette", "gray"} <= set(train.column("name").to_pylist())


# ----------------------------------------------------------------------------- infer, end to end


def test_infer_writes_an_error_row_per_bad_input_and_predicts_the_rest(run_job, tmp_path):
    from test_infer_e2e import MODEL_SIZE, train_tiny_model

    model = str(tmp_path / "run" / "model")
    train_tiny_model(model)
    images, labels = tmp_path / "frames", tmp_path / "labels"
    expected_ok: dict[str, tuple[int, int]] = {}
    expected_err: dict[str, str] = {}
    for i in range(3):
        image, label = scene(40 + i, *MODEL_SIZE)
        write_raw(str(images / f"good/{i}.png"), encode(image))
        write_raw(str(labels / f"good/{i}.png"), encode(label))
        expected_ok[str(images / f"good/{i}.png")] = MODEL_SIZE
    for name, img in odd_images(50).items():
        write_raw(str(images / f"odd/{name}"), encode(img))
        expected_ok[str(images / f"odd/{name}")] = (H, W)
    for name, data in bad_images().items():
        write_raw(str(images / f"bad/{name}"), data)
        expected_err[str(images / f"bad/{name}")] = "decode"
    write_raw(os.fsencode(images) + b"/bad/" + NON_UTF8 + b".png", encode(scene(60)[0]))
    expected_err[str(images / "bad/caf\\xe9-latin1.png")] = "list"  # refused by name, never read
    image, label = scene(61)
    write_raw(str(images / "labels/wrong_size.png"), encode(image))
    write_raw(str(labels / "labels/wrong_size.png"), encode(label[: H // 2]))
    write_raw(str(images / "labels/out_of_range.png"), encode(image))
    write_raw(str(labels / "labels/out_of_range.png"), encode(np.full((H, W), 77, np.uint8)))
    expected_err[str(images / "labels/wrong_size.png")] = "label"
    expected_err[str(images / "labels/out_of_range.png")] = "label"

    out = str(tmp_path / "out")
    run_job("infer", "--model", model, "--images", str(images), "--labels", str(labels), "--output", out,
            "--batch-size", "4", check=True)
    predictions, errors = pq.read_table(f"{out}/predictions"), pq.read_table(f"{out}/errors")
    assert predictions.num_rows + errors.num_rows == len(expected_ok) + len(expected_err)
    assert sorted(predictions.column("uri").to_pylist()) == sorted(expected_ok)
    got = dict(zip(errors.column("uri").to_pylist(), errors.column("stage").to_pylist()))
    assert got == expected_err
    messages = dict(zip(errors.column("uri").to_pylist(), errors.column("message").to_pylist()))
    for uri, message in messages.items():  # every message names its file (the label file for labels)
        named = uri.replace(str(images), str(labels)) if got[uri] == "label" else uri
        assert named in message, (uri, message)
    assert "decompression bomb" in messages[str(images / "bad/bomb.png")]
    assert "not valid UTF-8" in messages[str(images / "bad/caf\\xe9-latin1.png")]
    for row in predictions.to_pylist():
        mask = np.asarray(Image.open(io.BytesIO(row["mask_png"])))
        assert mask.shape == expected_ok[row["uri"]]
    overall = pq.read_table(f"{out}/metrics.parquet").to_pylist()[-1]
    assert (overall["images"], overall["error_images"]) == (len(expected_ok), len(expected_err))

"""jobs/infer.py end to end: the session's Ray cluster, a moto S3 server, a briefly trained tiny model.

The inputs cover every kind sources.py knows: nested image files (PNG, JPEG), odd but valid
images (grayscale, RGBA, 16-bit, palette), bad files (zero bytes, text named .png, truncated,
a .txt), tar archives paired by either rule, a broken archive; labels as index and colour PNGs.
"""

from __future__ import annotations

import io
import re
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from segray import storage
from segray.camvid import NUM_CLASSES, ORIGINAL_COLORS, ORIGINAL_TO_11, VOID_INDEX
from segray.model import UNetConfig, build_model
from segray.modelio import ModelSpec, save_model
from segray.synthetic import render_scene

from conftest import BUCKET, tar_bytes

MODEL_SIZE = (32, 48)


def encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    (arr if isinstance(arr, Image.Image) else Image.fromarray(arr)).save(buf, format=fmt)
    return buf.getvalue()


def train_tiny_model(dest: str) -> None:
    """A few dozen Adam steps on synthetic scenes: enough for masks that are not noise."""
    rng = np.random.default_rng(0)
    scenes = [render_scene(rng, *MODEL_SIZE) for _ in range(16)]
    images = torch.as_tensor(np.stack([s[0] for s in scenes])).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x, y = (images - mean) / std, torch.as_tensor(np.stack([s[1] for s in scenes])).long()
    torch.manual_seed(0)
    cfg = UNetConfig(base_channels=4, depth=2)
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(x), y, ignore_index=VOID_INDEX)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_model(dest, model.state_dict(), ModelSpec(model=cfg.to_dict(), input_height=MODEL_SIZE[0], input_width=MODEL_SIZE[1]))


class Collection:
    """The inputs written to S3, and what the job must make of them."""

    def __init__(self, root: str) -> None:
        self.images, self.labels = f"{root}/images", f"{root}/labels"
        self.predicted: dict[str, tuple[int, int]] = {}  # input URI -> (height, width)
        self.label_of: dict[str, tuple[str, np.ndarray]] = {}  # input URI -> (label URI, class indices)
        self.errors: dict[str, str] = {}  # input URI -> stage
        self.rng = np.random.default_rng(1)

    def scene(self, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        return render_scene(self.rng, h, w)

    def label(self, uri: str, rel: str, label: np.ndarray, colour: bool = False) -> None:
        label_uri = f"{self.labels}/{rel}"
        if colour:  # an original-release colour per class
            table = np.array([next(c for c, n in ORIGINAL_COLORS if ORIGINAL_TO_11[n] == k) for k in range(12)], np.uint8)
            storage.write_bytes(label_uri, encode(table[label]))
        else:
            storage.write_bytes(label_uri, encode(label))
        self.label_of[uri] = (label_uri, label)

    def frame(self, rel: str, size=MODEL_SIZE, label_rel: str | None = "", colour=False, convert=None) -> None:
        image, label = self.scene(*size)
        fmt = "JPEG" if rel.lower().endswith(".jpg") else "PNG"
        uri = f"{self.images}/{rel}"
        storage.write_bytes(uri, encode(convert(image) if convert else image, fmt))
        self.predicted[uri] = size
        if label_rel is not None:
            self.label(uri, label_rel or rel.rsplit(".", 1)[0] + ".png", label, colour)

    def bad(self, rel: str, data: bytes, stage: str) -> None:
        storage.write_bytes(f"{self.images}/{rel}", data)
        self.errors[f"{self.images}/{rel}"] = stage

    def archive(self, rel: str, frames: dict[str, tuple[int, int]], label_dir: str | None, extra=None, cut=None):
        members, uri = {}, f"{self.images}/{rel}"
        for name, size in frames.items():
            image, label = self.scene(*size)
            members[name] = encode(image)
            if cut is None:
                self.predicted[f"{uri}/{name}"] = size
                if label_dir is not None:
                    self.label(f"{uri}/{name}", f"{label_dir}{name.rsplit('.', 1)[0]}.png", label)
        for name, (data, stage) in (extra or {}).items():
            members[name] = data
            self.errors[f"{uri}/{name}"] = stage
        data = tar_bytes(members)
        if cut is not None:  # keep the first member whole, cut inside the second
            first = next(iter(frames))
            self.predicted[f"{uri}/{first}"] = frames[first]
            self.errors[uri] = "archive"
            data = data[: 512 + -(-len(members[first]) // 512) * 512 + 700]
        storage.write_bytes(uri, data)


def gray16(image: np.ndarray) -> Image.Image:
    return Image.fromarray((image.mean(axis=2) * 257).astype(np.uint16))


@pytest.fixture(scope="module")
def collection(s3_server) -> tuple[Collection, str]:
    root = f"s3://{BUCKET}/infer-{uuid.uuid4().hex[:8]}"
    model = f"{root}/runs/tiny"
    train_tiny_model(f"{model}/model")
    c = Collection(root)
    c.frame("street/a/f0.png")
    c.frame("street/a/f1.jpg", size=(40, 60))
    c.frame("street/b/f2.PNG", size=(24, 36), label_rel="street/b/f2.png")
    c.frame("street/f3.png", size=(45, 50), label_rel=None)  # no label: predicted, not scored
    c.frame("color/f4.png", label_rel="color/f4_L.png", colour=True)
    c.frame("odd/gray.png", convert=lambda im: im[..., 1])
    c.frame("odd/rgba.png", convert=lambda im: np.dstack([im, np.full(im.shape[:2], 200, np.uint8)]))
    c.frame("odd/gray16.png", convert=gray16)
    c.frame("odd/palette.png", convert=lambda im: Image.fromarray(im).quantize(colors=16))
    good = encode(c.scene(*MODEL_SIZE)[0])
    c.bad("bad/zero.png", b"", "decode")
    c.bad("bad/text.png", b"not a png at all\n" * 20, "decode")
    c.bad("bad/truncated.png", good[: len(good) // 2], "decode")
    c.bad("bad/notes.txt", b"frames from camera 2", "list")
    # Labels below <labels>/archives/seq1/: the archive read as a folder.
    c.archive("archives/seq1.tar", {"f5.png": MODEL_SIZE, "f6.png": (40, 60), "sub/f7.png": MODEL_SIZE},
              label_dir="archives/seq1/", extra={"readme.txt": (b"#", "list"), "broken.png": (b"oops", "decode")})
    # Labels by the member path alone (shards of one collection).
    c.archive("archives/shard2.tar", {"street/c/f8.png": MODEL_SIZE, "street/c/f9.png": (24, 36)}, label_dir="")
    c.archive("archives/cut.tar", {"g0.png": MODEL_SIZE, "g1.png": MODEL_SIZE}, label_dir=None, cut=True)
    return c, model


def read_folder(uri: str):
    fs, _ = storage.resolve(uri)
    files = [storage.resolve(f)[1] for f in storage.list_files(uri) if f.endswith(".parquet")]
    return pq.ParquetDataset(files, filesystem=fs).read() if files else None


def metrics_from(predictions, collection: Collection) -> tuple[np.ndarray, int]:
    """The confusion matrix of every scored row, from its stored mask PNG and the label written."""
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    scored = 0
    for row in predictions.to_pylist():
        if row["uri"] not in collection.label_of:
            assert row["label_uri"] is None and row["confusion"] is None
            continue
        label_uri, label = collection.label_of[row["uri"]]
        assert row["label_uri"] == label_uri
        mask = np.asarray(Image.open(io.BytesIO(row["mask_png"])))
        keep = label != VOID_INDEX
        cm += np.bincount(label[keep].astype(np.int64) * NUM_CLASSES + mask[keep], minlength=NUM_CLASSES**2).reshape(
            NUM_CLASSES, NUM_CLASSES
        )
        scored += 1
    return cm, scored


def check_output(out: str, c: Collection) -> None:
    predictions, errors = read_folder(f"{out}/predictions"), read_folder(f"{out}/errors")
    uris = predictions.column("uri").to_pylist()
    assert len(uris) == len(set(uris)), "a frame was written twice"
    assert sorted(uris) == sorted(c.predicted)
    assert errors.num_rows == len(set(errors.column("uri").to_pylist())), "an error was written twice"
    assert dict(zip(errors.column("uri").to_pylist(), errors.column("stage").to_pylist())) == c.errors
    assert predictions.num_rows + errors.num_rows == len(c.predicted) + len(c.errors)
    for row in predictions.to_pylist():
        mask = np.asarray(Image.open(io.BytesIO(row["mask_png"])))
        assert mask.shape == c.predicted[row["uri"]] == (row["height"], row["width"]), row["uri"]
        assert mask.dtype == np.uint8 and mask.max() < NUM_CLASSES
        assert row["class_pixel_counts"] == np.bincount(mask.ravel(), minlength=NUM_CLASSES).tolist()

    cm, scored = metrics_from(predictions, c)
    metrics = read_folder(f"{out}/metrics.parquet").to_pylist()
    overall = metrics[-1]
    assert overall["class_name"] == "overall"
    assert (overall["images"], overall["labelled_images"], overall["error_images"]) == (
        len(c.predicted), scored, len(c.errors))
    inter, union = np.diag(cm), cm.sum(0) + cm.sum(1) - np.diag(cm)
    iou = [inter[k] / union[k] if union[k] else None for k in range(NUM_CLASSES)]
    for k, row in enumerate(metrics[:NUM_CLASSES]):
        assert row["class_index"] == k and row["intersection"] == inter[k] and row["label_pixels"] == cm[k].sum()
        assert row["iou"] == (None if iou[k] is None else pytest.approx(iou[k]))
    assert overall["miou"] == pytest.approx(np.mean([v for v in iou if v is not None]))
    assert overall["pixel_accuracy"] == pytest.approx(np.trace(cm) / cm.sum())


def test_infer_predicts_every_frame_and_scores_it(collection, run_job):
    c, model = collection
    out = f"{c.images.rsplit('/', 1)[0]}/out"
    args = ("--model", model, "--images", c.images, "--labels", c.labels, "--output", out,
            "--batch-size", "4", "--rows-per-file", "4", "--write-masks")  # fmt: skip
    proc = run_job("infer", *args, check=True)
    assert "frames/s" in proc.stdout and "mIoU" in proc.stdout
    check_output(out, c)
    # The console (segray/console.py): no Ray log line, and a progress line with the exact total:
    # every input's row, a prediction or an error.
    shown = proc.stdout + proc.stderr
    assert not re.search(r"^\d{4}-\d\d-\d\d [\d:,]+\s+(INFO|WARNING) ", shown, re.M), shown
    assert re.findall(r"^infer: frames: +100% (\d+)/(\d+) \[", proc.stdout, re.M)[-1] == (
        str(len(c.predicted) + len(c.errors)),) * 2
    assert storage.exists(f"{out}/masks/street/a/f1.jpg.png")  # the JPEG's colour mask
    mask = Image.open(io.BytesIO(storage.read_bytes(f"{out}/masks/archives/seq1.tar/sub/f7.png.png")))
    assert mask.mode == "RGB" and mask.size == (MODEL_SIZE[1], MODEL_SIZE[0])

    # An interrupted run: part files lost, metrics never written. The rerun fills exactly the gap.
    parts = [f for f in storage.list_files(f"{out}/predictions") if f.endswith(".parquet")]
    assert len(parts) > 1
    before = read_folder(f"{out}/metrics.parquet")
    storage.delete(parts[0])
    storage.delete(storage.list_files(f"{out}/errors")[0])
    storage.delete(f"{out}/metrics.parquet")
    proc = run_job("infer", *args, "--verbose", check=True)
    check_output(out, c)
    assert read_folder(f"{out}/metrics.parquet").equals(before)
    assert re.search(r"^\d{4}-\d\d-\d\d [\d:,]+\s+INFO .*Dataset", proc.stdout + proc.stderr, re.M)  # --verbose: Ray's lines


def test_infer_fails_with_one_line_naming_the_model(collection, run_job, s3_prefix):
    c, _ = collection
    proc = run_job("infer", "--model", f"{s3_prefix}/nothing", "--images", c.images, "--output", f"{s3_prefix}/o")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"infer: error: ModelError: {s3_prefix}/nothing: no exported model")
    assert "Traceback" not in proc.stdout + proc.stderr
    proc = run_job("infer", "--model", f"{s3_prefix}/nothing", "--images", c.images, "--output", f"{s3_prefix}/o",
                   "--verbose")
    assert proc.returncode == 1
    line, traceback = proc.stderr.split("infer: error: ModelError: ", 1)[1].split("\n", 1)
    assert line.startswith(f"{s3_prefix}/nothing: no exported model")
    assert traceback.startswith("Traceback (most recent call last):") and "ModelError" in traceback.splitlines()[-1]


def test_help():
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "infer.py"), "--help"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0
    for flag in ("--model", "--images", "--output", "--labels", "--use-gpu", "--batch-size", "--num-replicas",
                 "--write-masks"):
        assert flag in proc.stdout

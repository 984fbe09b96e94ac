"""The HTML report (segray.report, segray.visualize, segray.evaluate) without Ray: its sections,
the run's facts instead of local paths, matplotlib charts with full legends, labelled best and
worst frames, and the error map. The infer output and training run are written by hand here."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import segray
from segray import modelio
from segray.classes import ClassTable
from segray.evaluate import build_report, shown
from segray.metrics import confusion_matrix_np, pixel_accuracy
from segray.predictions import (
    PREDICTIONS_DIR,
    PREDICTIONS_SCHEMA,
    RUN_FORMAT,
    Totals,
    metrics_table,
    write_parquet,
)
from segray.preprocess import encode_png
from segray.report import Example, write_report
from segray.visualize import (
    ERROR_COLOR,
    UNSCORED_COLOR,
    confusion_figure,
    error_map,
    error_mask,
    figure_bytes,
    training_figure,
)

REPO = Path(__file__).resolve().parents[1]
TABLE = ClassTable(("road", "car", "tree"), ((128, 64, 128), (0, 0, 142), (107, 142, 35)), 255)
H, W = 24, 32
HISTORY = [
    {"epoch": e, "train_loss": 1.5 / e, "val_loss": 1.6 / e, "val_miou": 0.2 + 0.1 * e,
     "val_pixel_accuracy": 0.5 + 0.08 * e, "lr": 0.001 * (0.3 ** (e - 1))}
    for e in range(1, 6)
]


def png_ok(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(io.BytesIO(data)) as im:
        im.verify()
    return Image.open(io.BytesIO(data)).size


def svg_texts(path: Path) -> list[str]:
    root = ET.fromstring(path.read_bytes())  # well-formed XML
    assert root.tag.endswith("svg")
    return ["".join(t.itertext()).strip() for t in root.iter() if t.tag.endswith("text")]


def section(page: str, sid: str) -> str:
    match = re.search(rf"<section id='{sid}'>(.*?)</section>", page, re.S)
    assert match, sid
    return match.group(1)


# ----------------------------------------------------------------------------- the error map


def test_error_mask_marks_exactly_the_wrong_labelled_pixels():
    label = np.array([[0, 1, 255], [2, 2, 7]], np.uint8)  # 255 void; 7 is neither a class nor void
    pred = np.array([[0, 2, 1], [2, 0, 1]], np.uint8)
    expected = np.array([[False, True, False], [False, True, False]])
    np.testing.assert_array_equal(error_mask(pred, label, 255, num_classes=3), expected)
    # without num_classes only void is left out: 7 != 1 counts as wrong
    np.testing.assert_array_equal(error_mask(pred, label, 255), expected | np.array([[0, 0, 0], [0, 0, 1]], bool))
    with pytest.raises(ValueError, match="shape"):
        error_mask(pred[:1], label, 255)

    image = np.full((2, 3, 3), 200, np.uint8)
    out = error_map(image, pred, label, TABLE)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    red = np.all(out == ERROR_COLOR, axis=2)
    np.testing.assert_array_equal(red, expected)
    unscored = np.all(out == UNSCORED_COLOR, axis=2)
    np.testing.assert_array_equal(unscored, np.array([[0, 0, 1], [0, 0, 1]], bool))
    right = ~red & ~unscored
    grey = out[right]
    assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all() and (grey > 150).all()


# ----------------------------------------------------------------------------- charts


def test_training_curves_have_labelled_axes_and_full_legends(tmp_path):
    fig = training_figure(HISTORY, best_epoch=5)
    axes = fig.get_axes()
    assert [a.get_title() for a in axes] == ["Loss", "Validation", "Learning rate"]
    legends = [[t.get_text() for t in a.get_legend().get_texts()] for a in axes]
    assert legends == [["train loss", "validation loss"],
                       ["validation mIoU", "validation pixel accuracy", "best epoch (5)"],
                       ["learning rate"]]
    for a in axes:
        assert a.get_xlabel() == "epoch" and a.get_ylabel()
        assert len([t for t in a.get_xticks() if 1 <= t <= 5]) == 5  # every epoch, not just 0 and the maximum
    assert axes[2].get_yscale() == "log"  # the LR spans over 20x: a log axis
    (tmp_path / "t.svg").write_bytes(figure_bytes(fig, "svg"))
    texts = svg_texts(tmp_path / "t.svg")
    for label in ("train loss", "validation loss", "validation mIoU", "validation pixel accuracy", "learning rate",
                  "epoch", "cross-entropy loss"):
        assert label in texts, (label, texts)
    assert training_figure([{"epoch": 1}]) is None
    only_loss = training_figure([{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.5}])
    assert len(only_loss.get_axes()) == 1


@pytest.mark.parametrize("k", [3, 11, 32])
def test_confusion_matrix_names_every_class_on_both_axes(tmp_path, k):
    names = [f"class_{i}_name" for i in range(k)]
    cm = np.diag(np.arange(1, k + 1)).astype(np.int64) * 10
    cm[0, k - 1] = 30  # row 0: 10 right, 30 wrong: 25% / 75%
    cm[k - 1] = 0  # an absent class: a grey row, not a division by zero
    fig = confusion_figure(cm, names)
    ax = fig.get_axes()[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"
    cells = {t.get_text() for t in ax.texts}
    assert ({"25", "75"} <= cells) if k <= 16 else not cells  # numbers in the cells only when few classes
    (tmp_path / "c.png").write_bytes(figure_bytes(fig))
    width, height = png_ok(tmp_path / "c.png")
    assert 300 <= height <= 1300 and width >= height


def test_matplotlib_is_imported_only_when_a_report_is_written():
    code = ("import sys, segray.report, segray.visualize, segray.evaluate; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'ray') or m == 'segray.train'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# ----------------------------------------------------------------------------- the whole report


def make_run(root: Path) -> Path:
    """A finished training run as train leaves it: model/, metrics.json, run.json."""
    run = root / "runs" / "unet-small"
    spec = modelio.ModelSpec(model={"in_channels": 3, "num_classes": 3, "base_channels": 8, "depth": 2},
                             input_height=H, input_width=W, classes=list(TABLE.names),
                             palette=[list(c) for c in TABLE.colors] + [[0, 0, 0]], void_index=255, arch="unet")
    modelio.save_model(str(run / "model"), {"w": torch.zeros(2)}, spec)
    recipe = {"data": str(root / "prepared" / "streets"), "dataset_sha256": "ab" * 32, "input_size": [H, W],
              "classes": list(TABLE.names), "arch": "unet", "model": spec.model, "lr": 0.002, "weight_decay": 0.0001,
              "lr_schedule": "cosine", "batch_size": 4, "class_weighting": "sqrt_median_freq", "seed": 7,
              "augment": True, "crop": None, "scale_range": [0.75, 1.5], "flip_prob": 0.5, "jitter": 0.25}
    metrics = {"run": str(run), "data": recipe["data"], "model": str(run / "model"), "epochs": 5, "best_epoch": 5,
               "best": HISTORY[-1], "final": HISTORY[-1], "history": HISTORY, "recipe": recipe,
               "config": {"num_workers": 2, "use_gpu": False},
               "dataset": {"height": H, "width": W, "splits": {"train": 40, "val": 8}}, "elapsed_s": 150.0}
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "run.json").write_text(json.dumps({"format": "segray-train-run/1", "run": str(run), "recipe": recipe}))
    return run


def make_output(root: Path, run: Path, frames: int = 6) -> Path:
    """An infer output with labels, as infer writes it: frames i = 0.. get i * 7 wrong pixels."""
    out, images, labels = root / "pred", root / "frames" / "val", root / "frames" / "valannot"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, cm = [], np.zeros((3, 3), np.int64)
    for i in range(frames):
        label = np.zeros((H, W), np.uint8)
        label[H // 2:] = 1
        label[:, W - 6:] = 2
        label[0, :] = 255  # a void row
        pred = label.copy()
        pred[0, :] = 0
        flat = pred.reshape(-1)
        wrong = rng.choice(np.arange(W, H * W), size=i * 7, replace=False)
        flat[wrong] = (flat[wrong] + 1) % 3
        name = f"seq_{i:03d}.png"
        (images / name).write_bytes(encode_png(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)))
        (labels / name).write_bytes(encode_png(label))
        frame_cm = confusion_matrix_np(label, pred, 3, 255)
        cm += frame_cm
        rows.append({"uri": str(images / name), "height": H, "width": W, "mask_png": encode_png(pred),
                     "class_pixel_counts": np.bincount(pred.ravel(), minlength=3).tolist(),
                     "label_uri": str(labels / name), "confusion": frame_cm.ravel().tolist(),
                     "pixel_accuracy": pixel_accuracy(frame_cm), "frame_index": None, "timestamp_s": None})
    (out / PREDICTIONS_DIR).mkdir(parents=True)
    write_parquet(str(out / PREDICTIONS_DIR / "part-0.parquet"), pa.Table.from_pylist(rows, schema=PREDICTIONS_SCHEMA))
    totals = Totals(3, frames=frames, labelled=frames, cm=cm, class_pixels=cm.sum(axis=0))
    write_parquet(str(out / "metrics.parquet"), metrics_table(totals, list(TABLE.names)))
    record = {"format": RUN_FORMAT, "model": str(run), "model_sha256": modelio.fingerprint(str(run)),
              "images": str(images), "labels": str(labels), "write_masks": False, "every": None, "fps": None,
              "classes": TABLE.to_fields()}
    (out / "infer.json").write_text(json.dumps(record))
    return out


def test_report_has_every_section_the_runs_facts_and_no_local_paths(tmp_path):
    run = make_run(tmp_path)
    out = make_output(tmp_path, run)
    dest = tmp_path / "report"
    page_uri = build_report(str(out), str(dest), title="streets", examples=4)  # no --run: infer.json's model
    page = Path(page_uri).read_text()
    for sid, heading in (("summary", "Summary"), ("iou", "Per-class IoU"), ("confusion", "Confusion matrix"),
                         ("training", "Training curves"), ("frames", "Best and worst frames")):
        assert f"<section id='{sid}'><h2>{heading}</h2>" in page
    assert "<h2>Small objects by size</h2>" in page
    assert page.index("id='summary'") < page.index("id='iou'") < page.index("id='confusion'") \
        < page.index("id='training'") < page.index("id='frames'") < page.index("<h2>Small objects")

    facts = section(page, "summary")
    for fact in ("unet (base_channels=8, depth=2)", f"{H} × {W} pixels", "3: road, car, tree", "unet-small",
                 "…/prepared/streets", "40 train, 8 val", "learning rate 0.002, cosine schedule",
                 "4 a worker × 2 CPU workers", "flip 0.5", "best epoch 5", "2.5 min",
                 f"segray {segray.__version__}", "ray ", "torch ", "python "):
        assert fact in facts, fact
    assert "mIoU <b>" in facts and "pixel accuracy <b>" in facts
    # The figures beside them: metrics.parquet's, and the matrix's recomputed here. Every class
    # is labelled in every frame of make_output, so each mean is over all three.
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    overall = rows[-1]
    cm = np.array([r["confusion"] for r in rows[:-1]], np.float64)
    tp, labelled, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    assert labelled.all() and predicted.all() and 0 < tp.sum() < cm.sum()
    accuracy, dice, iou = tp / labelled, 2 * tp / (labelled + predicted), tp / (labelled + predicted - tp)
    for name, key, value in (("mean class accuracy", "mean_class_accuracy", accuracy.mean()),
                             ("mean Dice", "mean_dice", dice.mean()),
                             ("fwIoU", "fwiou", (labelled / labelled.sum() * iou).sum())):
        shown = re.search(rf"· {name} <b>([0-9.]+)</b>", facts).group(1)
        assert shown == f"{value:.3f}" == f"{overall[key]:.3f}", (name, shown, value, overall[key])
    per_class = section(page, "iou")
    assert "class accuracy</th>" in per_class and ">Dice</th>" in per_class
    for c, r in enumerate(rows[:-1]):
        cells = re.search(rf"{r['class_name']}</td><td>([^<]*)</td><td class='barcell'>.*?</td>"
                          r"<td class='num'>([^<]*)</td><td class='num'>[^<]*</td><td class='num'>([^<]*)</td>",
                          per_class).groups()
        assert cells == (f"{iou[c]:.3f}", f"{accuracy[c]:.3f}", f"{dice[c]:.3f}")
        assert cells[1:] == (f"{r['class_accuracy']:.3f}", f"{r['dice']:.3f}")
    total = re.search(r"<tr class='total'><td>mean</td><td>([^<]*)</td><td></td><td class='num'>([^<]*)</td>"
                      r"<td></td><td class='num'>([^<]*)</td>", per_class).groups()
    assert total == (f"{iou.mean():.3f}", f"{accuracy.mean():.3f}", f"{dice.mean():.3f}")
    for local in (str(run), str(tmp_path), str(out)):
        assert local not in page, local  # the facts name things; this machine's paths mean nothing elsewhere

    png_ok(dest / "confusion.png")
    texts = svg_texts(dest / "training.svg")
    assert {"train loss", "validation loss", "validation mIoU", "validation pixel accuracy", "learning rate"} <= set(texts)

    frames = section(page, "frames")
    assert "<h3>Best frames (highest pixel accuracy)</h3>" in frames and "<h3>Worst frames (lowest pixel accuracy)</h3>" in frames
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", frames)
    assert len(captions) == 4 and len(list(dest.glob("frame_*.png"))) == 4
    best, worst = captions[0], captions[2]
    # frame 0 has no wrong pixel, frame 5 the most (35 of the 736 labelled)
    assert best.startswith("<b>Best #1</b> · seq_000.png · pixel accuracy 1.000 · mIoU 1.000"), best
    assert worst.startswith("<b>Worst #1</b> · seq_005.png · pixel accuracy 0.952 · mIoU"), worst
    for i in range(4):
        w, h = png_ok(dest / f"frame_{i:03d}.png")
        assert w >= 2 * 320 and h > w * H / W  # two panels a row, two rows (frame, label / prediction, errors)


def test_a_runs_files_with_odd_values_leave_out_their_facts_not_the_report(tmp_path):
    run = make_run(tmp_path)
    out = make_output(tmp_path, run, frames=2)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["dataset"]["splits"] = {"train": "forty"}  # written by hand or another tool
    metrics["recipe"]["scale_range"] = [0.5]
    (run / "metrics.json").write_text(json.dumps(metrics))
    page = Path(build_report(str(out), str(tmp_path / "r"))).read_text()
    facts = section(page, "summary")
    assert "not understood" in facts and "unet (base_channels=8, depth=2)" in facts and "forty" not in facts
    assert "<h2>Confusion matrix</h2>" in page


def test_a_model_changed_since_infer_is_not_reported_as_the_predictions_model(tmp_path):
    run = make_run(tmp_path)
    out = make_output(tmp_path, run, frames=2)
    (run / "model" / "model.pt").write_bytes(b"other weights")
    page = Path(build_report(str(out), str(tmp_path / "a"))).read_text()
    assert "has changed since these predictions were made" in page and "base_channels=8" not in page
    assert not (tmp_path / "a" / "training.svg").exists() and "No training history" in page
    # named with --run, it is shown, with a warning
    page = Path(build_report(str(out), str(tmp_path / "b"), run=str(run))).read_text()
    assert "is not the one these predictions were made with" in page and "base_channels=8" in page
    assert (tmp_path / "b" / "training.svg").exists()


def test_write_report_takes_flat_facts_and_frames_without_labels(tmp_path):
    image = np.zeros((H, W, 3), np.uint8)
    pred = np.zeros((H, W), np.uint8)
    uri = write_report(str(tmp_path), title="t", cm=np.eye(3, dtype=np.int64), classes=TABLE,
                       facts={"network": "fcn", "where": shown(str(tmp_path / "x" / "y" / "z"))},
                       examples=[Example("a.png", image, pred)])
    page = Path(uri).read_text()
    assert "<th>network</th><td>fcn</td>" in page and "…/y/z" in page and str(tmp_path) not in page
    assert "<figcaption><b>#1</b> · a.png</figcaption>" in page
    png_ok(tmp_path / "frame_000.png")
    assert shown("s3://bucket/runs/unet16") == "s3://bucket/runs/unet16" and shown("runs/a") == "runs/a"


def test_report_figures_of_absent_classes(tmp_path):
    # road: labelled 5, predicted 5, right 4; car: never labelled, predicted once; tree: labelled
    # 3, predicted 2, right 2. Rows 5, 0, 3 (8 pixels); columns 5, 1, 2.
    cm = np.array([[4, 1, 0], [0, 0, 0], [1, 0, 2]], np.int64)
    page = Path(write_report(str(tmp_path), title="t", cm=cm, classes=TABLE)).read_text()
    # mIoU: IoU 4/(5+5-4) = 2/3, 0/1 = 0, 2/(3+2-2) = 2/3 -> 4/9; pixel accuracy 6/8;
    # class accuracy 4/5, -, 2/3 -> 11/15 = 0.733; Dice 8/10, 0/1, 4/5 -> 1.6/3 = 0.533;
    # fwIoU 5/8 * 2/3 + 0 * 0 + 3/8 * 2/3 = 2/3.
    assert ("mIoU <b>0.444</b> · pixel accuracy <b>0.750</b> · mean class accuracy <b>0.733</b> · mean Dice "
            "<b>0.533</b> · fwIoU <b>0.667</b> · 8 labelled pixels") in page
    table = section(page, "iou")
    # name, IoU, class accuracy, precision (4/5, 0/1, 2/2), Dice, labelled pixels
    for name, iou, acc, precision, dice, pixels in (("road", "0.667", "0.800", "0.800", "0.800", "5"),
                                                    ("car", "0.000", "–", "0.000", "0.000", "0"),
                                                    ("tree", "0.667", "0.667", "1.000", "0.800", "3")):
        assert re.search(rf"{name}</td><td>{iou}</td><td class='barcell'>.*?</td><td class='num'>{acc}</td>"
                         rf"<td class='num'>{precision}</td><td class='num'>{dice}</td><td class='num'>{pixels}</td>",
                         table), name
    assert ("<tr class='total'><td>mean</td><td>0.444</td><td></td><td class='num'>0.733</td><td></td>"
            "<td class='num'>0.533</td><td class='num'>8</td></tr>") in table

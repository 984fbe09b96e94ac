"""Classes as data, end to end: a generated 4-class source with ``classes.json`` (void 255)
through prepare -> train -> infer -> evaluate, each as its job's command line, on the session's
Ray cluster and moto S3 server. One short training run (Ray Train takes ~30-40 s to start)."""

from __future__ import annotations

import io
import json
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import BUCKET
from PIL import Image

from segray import storage
from segray.classes import ClassTable
from segray.dataset import load_info
from segray.metrics import confusion_matrix_np
from segray.predictions import COL_LABEL_URI, COL_MASK, METRICS_FILE, PREDICTIONS_DIR, parquet_files
from segray.synthetic import write_grouped_dataset

SIZE = (32, 48)
TABLE = ClassTable(
    names=("sky", "built", "ground", "vehicle"),
    colors=((70, 130, 180), (150, 40, 40), (120, 120, 60), (20, 20, 220)),
    void_index=255,
)
# The CamVid classes each of the 4 stands for (synthetic.render_scene draws CamVid's 11).
GROUPS = ((0,), (1, 5, 7), (3, 4), (8, 9, 10))


@pytest.fixture(scope="module")
def pipeline(s3_server, run_job) -> dict:
    root = f"s3://{BUCKET}/classes-{uuid.uuid4().hex[:8]}"
    write_grouped_dataset(f"{root}/source", TABLE, GROUPS, counts={"train": 32, "val": 8}, size=SIZE, seed=3)
    run_job("prepare", "--source", f"{root}/source", "--dest", f"{root}/prepared", check=True)
    run_job("train", "--data", f"{root}/prepared", "--storage", f"{root}/runs", "--name", "four", "--epochs", "2",
            "--num-workers", "1", "--batch-size", "8", "--base-channels", "8", "--lr", "0.003", check=True)
    run_job("infer", "--model", f"{root}/runs/four", "--images", f"{root}/source/val", "--labels",
            f"{root}/source/valannot", "--output", f"{root}/pred", "--write-masks", check=True)
    proc = run_job("evaluate", "--predictions", f"{root}/pred", "--dest", f"{root}/report", "--run",
                   f"{root}/runs/four", check=True)
    return {"root": root, "evaluate": proc}


def test_the_class_table_travels_from_classes_json_to_the_model(pipeline):
    root = pipeline["root"]
    info = load_info(f"{root}/prepared")
    assert info.class_table == TABLE
    assert len(info.class_pixel_counts) == 4 and info.void_pixel_count > 0
    config = json.loads(storage.read_bytes(f"{root}/runs/four/model/config.json"))
    assert config["classes"] == list(TABLE.names) and config["void_index"] == 255
    assert config["model"]["num_classes"] == 4 and config["arch"] == "unet"
    assert config["palette"][:4] == [list(c) for c in TABLE.colors]


def test_metrics_name_exactly_the_four_classes_and_equal_a_recomputed_matrix(pipeline):
    root = pipeline["root"]
    fs, path = storage.resolve(f"{root}/pred/{METRICS_FILE}")
    metrics = pq.read_table(path, filesystem=fs).to_pylist()
    per_class = [r for r in metrics if r["class_index"] is not None]
    assert [r["class_name"] for r in per_class] == list(TABLE.names)

    # The matrix recomputed here: every predicted mask against its label PNG, void (255) ignored.
    files = parquet_files(f"{root}/pred/{PREDICTIONS_DIR}")
    rows = pq.read_table([storage.resolve(f)[1] for f in files], filesystem=fs).to_pylist()
    assert len(rows) == 8
    cm = np.zeros((4, 4), np.int64)
    for row in rows:
        mask = np.asarray(Image.open(io.BytesIO(row[COL_MASK])))
        label = np.asarray(Image.open(io.BytesIO(storage.read_bytes(row[COL_LABEL_URI]))))
        assert mask.shape == label.shape == SIZE and mask.max() < 4
        cm += confusion_matrix_np(label, mask, num_classes=4, ignore_index=255)
    assert cm.sum() > 0
    np.testing.assert_array_equal(np.asarray([r["confusion"] for r in per_class]), cm)
    for c, r in enumerate(per_class):
        assert r["intersection"] == cm[c, c] and r["label_pixels"] == cm[c].sum()
    overall = next(r for r in metrics if r["class_index"] is None)
    assert overall["pixel_accuracy"] == pytest.approx(np.trace(cm) / cm.sum())


def test_masks_and_the_report_use_the_tables_colours_and_names(pipeline):
    root = pipeline["root"]
    masks = [u for u in storage.list_files(f"{root}/pred/masks") if u.endswith(".png")]
    assert len(masks) == 8
    colours = {tuple(c) for m in masks for c in np.asarray(Image.open(io.BytesIO(storage.read_bytes(m)))).reshape(-1, 3)}
    assert colours and colours <= set(TABLE.colors)
    page = storage.read_bytes(f"{root}/report/index.html").decode()
    for name in TABLE.names:
        assert f">{name}<" in page, name
    assert "Sky" not in page and "Bicyclist" not in page  # no CamVid names leak into another table's report

"""jobs/demo.py end to end (reduced sizes), and the report's numbers against metrics.parquet."""

from __future__ import annotations

import re

import numpy as np
import pyarrow.parquet as pq

from segray.evaluate import small_object_stats, connected_components


def test_demo_runs_end_to_end_and_reports_metrics_parquet(run_job, tmp_path):
    work = tmp_path / "demo"
    proc = run_job("demo", "--workdir", str(work), "--train-images", "24", "--val-images", "8", "--size", "32x48",
                   "--epochs", "2", "--base-channels", "4", "--num-workers", "1", "--batch-size", "8")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mIoU" in proc.stdout and "report (open in a browser)" in proc.stdout
    for rel in ("prepared/dataset.json", "runs/demo/model/config.json", "runs/demo/metrics.json",
                "predictions/metrics.parquet", "report/index.html", "report/confusion.png"):
        assert (work / rel).exists(), rel
    assert len(list((work / "predictions" / "masks").rglob("*.png"))) == 8
    assert list((work / "report").glob("frame_*.png"))

    metrics = pq.read_table(work / "predictions" / "metrics.parquet").to_pylist()
    overall = next(r for r in metrics if r["class_name"] == "overall")
    page = (work / "report" / "index.html").read_text()
    shown = float(re.search(r"mIoU <b>([0-9.]+)</b>", page).group(1))
    assert shown == round(overall["miou"], 3)
    shown_acc = float(re.search(r"pixel accuracy <b>([0-9.]+)</b>", page).group(1))
    assert shown_acc == round(overall["pixel_accuracy"], 3)
    for r in metrics:
        if r["class_name"] != "overall" and r["iou"] is not None:
            assert f"{r['class_name']}</td><td>{r['iou']:.3f}</td>" in page


def test_small_object_stats_by_hand():
    label = np.full((6, 8), 3, np.uint8)
    label[0, 0:3] = 2  # a 3-pixel pole, missed entirely
    label[2:5, 5] = 2  # a 3-pixel pole, 2 pixels found -> found (>= 50%)
    label[5, 0] = 9  # a 1-pixel pedestrian, found
    pred = np.full((6, 8), 3, np.uint8)
    pred[2:4, 5] = 2
    pred[5, 0] = 9
    stats = small_object_stats([(label, pred)], classes=(2, 9))
    assert stats[2]["< 64 px"] == [2, 6, 2, 1]
    assert stats[9]["< 64 px"] == [1, 1, 1, 1]
    comp, n = connected_components(label == 2)
    assert n == 2 and len(np.unique(comp)) == 3

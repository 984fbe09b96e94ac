"""jobs/demo.py end to end (reduced sizes), and the report's numbers against metrics.parquet."""

from __future__ import annotations

import argparse
import html
import importlib
import re

import numpy as np
import pyarrow.parquet as pq
import pytest


from segray.evaluate import connected_components, small_object_stats

DEMO_ARGS = ["--train-images", "24", "--val-images", "8", "--size", "32x48", "--epochs", "2", "--base-channels", "4",
             "--num-workers", "1", "--batch-size", "8"]


def _demo_module():
    return importlib.import_module("segray.commands.demo")  # what jobs/demo.py runs


def test_demo_runs_end_to_end_and_reports_metrics_parquet(run_job, tmp_path):
    work = tmp_path / "demo"
    proc = run_job("demo", "--workdir", str(work), *DEMO_ARGS, env={"SEGRAY_PROGRESS_INTERVAL": "3600"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mIoU" in proc.stdout and "report (open in a browser)" in proc.stdout
    # What a person reads (segray/console.py): segray's lines only, each stage's progress against
    # its exact total (32 pairs; 1 worker x 24 rows / batch 8 = 3 steps x 2 epochs; 8 frames).
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) <= 40 and all(re.match(r"(demo|prepare|train|infer|evaluate): |  ", x) for x in lines), lines
    for progress in ("prepare: pairs: +100% 32/32 ", "train: epoch 2/2: +100% 6/6 ", "infer: frames: +100% 8/8 "):
        assert sum(bool(re.match(progress, x)) for x in lines) == 1, (progress, lines)
    name = re.search(r"demo: run (demo-synthetic-[0-9a-f]{8}) ", proc.stdout).group(1)
    for rel in (f"prepared/{name}/dataset.json", f"runs/{name}/model/config.json", f"runs/{name}/metrics.json",
                f"predictions/{name}/metrics.parquet", f"report/{name}/index.html", f"report/{name}/confusion.png"):
        assert (work / rel).exists(), rel
    assert len(list((work / "predictions" / name / "masks").rglob("*.png"))) == 8
    assert list((work / "report" / name).glob("frame_*.png"))

    metrics = pq.read_table(work / "predictions" / name / "metrics.parquet").to_pylist()
    overall = next(r for r in metrics if r["class_name"] == "overall")
    page = (work / "report" / name / "index.html").read_text()
    shown = float(re.search(r"mIoU <b>([0-9.]+)</b>", page).group(1))
    assert shown == round(overall["miou"], 3)
    shown_acc = float(re.search(r"pixel accuracy <b>([0-9.]+)</b>", page).group(1))
    assert shown_acc == round(overall["pixel_accuracy"], 3)
    for r in metrics:
        if r["class_name"] != "overall" and r["iou"] is not None:
            assert f"{r['class_name']}</td><td>{r['iou']:.3f}</td>" in page
    for figure, key in (("mean class accuracy", "mean_class_accuracy"), ("mean Dice", "mean_dice"), ("fwIoU", "fwiou")):
        assert re.search(rf"· {figure} <b>([0-9.]+)</b>", page).group(1) == f"{overall[key]:.3f}", figure
    for r in metrics:
        if r["class_name"] != "overall":
            cls = re.escape(html.escape(r["class_name"]))
            row = re.search(rf"</span>{cls}</td><td>[^<]*</td><td class='barcell'>.*?</td><td class='num'>([^<]*)"
                            r"</td><td class='num'>[^<]*</td><td class='num'>([^<]*)</td>", page).groups()
            assert row == tuple("–" if v is None else f"{v:.3f}" for v in (r["class_accuracy"], r["dice"])), r


@pytest.mark.slow
def test_demo_on_another_source_in_the_same_workdir_gets_its_own_run(run_job, tmp_path):
    """The generated scenes as a --camvid source, in the same workdir: its own run, prepared data and
    outputs; it neither resumes nor touches the synthetic run (which trained 2 epochs at 32x48).
    Slow (two whole demos); test_demo_run_names_differ_per_data_source_and_recipe checks the names."""
    work = tmp_path / "demo"
    proc = run_job("demo", "--workdir", str(work), *DEMO_ARGS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    name = re.search(r"demo: run (demo-synthetic-[0-9a-f]{8}) ", proc.stdout).group(1)
    synthetic = (work / "runs" / name / "metrics.json").read_bytes()
    camvid = run_job("demo", "--workdir", str(work), "--camvid", str(work / "sources" / name), *DEMO_ARGS[4:])
    assert camvid.returncode == 0, camvid.stdout[-3000:] + camvid.stderr[-3000:]
    other = re.search(r"demo: run (demo-camvid-[0-9a-f]{8}) ", camvid.stdout).group(1)
    assert "resuming" not in camvid.stdout and "train: epoch 1/2 " in camvid.stdout + camvid.stderr
    assert (work / "runs" / other / "model" / "config.json").exists()
    assert (work / "prepared" / other / "dataset.json").exists()
    assert (work / "runs" / name / "metrics.json").read_bytes() == synthetic


def test_demo_run_names_differ_per_data_source_and_recipe():
    demo = _demo_module()

    def args(**kw):
        base = {"base_channels": 16, "batch_size": 8, "seed": 0, "train_images": 192, "val_images": 48, "epochs": None,
                "num_workers": 2}
        return argparse.Namespace(**{**base, **kw})

    synthetic = demo.demo_name(args(), None, (64, 96))
    camvid = demo.demo_name(args(), "/data/camvid", (176, 240))
    assert synthetic.startswith("demo-synthetic-") and camvid.startswith("demo-camvid-")
    assert camvid != demo.demo_name(args(), "/data/camvid-other", (176, 240))  # another path
    assert camvid != demo.demo_name(args(), "/data/camvid", (64, 96))  # another size: another dataset
    assert synthetic != demo.demo_name(args(train_images=24), None, (64, 96))
    assert synthetic != demo.demo_name(args(base_channels=8), None, (64, 96))  # would be refused on resume
    # What a resume may change keeps the name: the same command with more epochs extends the run.
    assert synthetic == demo.demo_name(args(epochs=20, num_workers=1), None, (64, 96))


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

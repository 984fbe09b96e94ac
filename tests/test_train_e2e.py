"""jobs/train.py end to end on the session's Ray cluster (2 CPUs) and moto S3 server.

Two training runs in all (Ray Train takes ~30-40 s to start one on CPU): 4 epochs, then the
same command with --epochs 5, which must resume. The rerun with nothing left to train and the
bad inputs start no workers.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import BUCKET, REPO

from segray import modelio, storage
from segray.precision import native_bf16_cpu
from segray.camvid import NUM_CLASSES, VOID_INDEX
from segray.dataset import COL_IMAGE, COL_LABEL, load_info, rows_to_arrays, split_files
from segray.metrics import confusion_matrix_np, summarize
from segray.recipe import class_weights

TRAIN, VAL, SIZE = 128, 24, (32, 48)
# lr 3e-3 rather than 1e-3: a clear learning signal within 4 short epochs (16 steps each with
# 2 workers x 4 images); measured with bench/train_plain.py on the same data: val mIoU
# ~0.10-0.14 after epoch 1 and ~0.28-0.34 after epoch 4 over seeds 0-2 (one DDP run had 0.19
# after epoch 1: the runs are not bitwise reproducible, shards are handed out dynamically).
ARGS = ["--num-workers", "2", "--batch-size", "4", "--base-channels", "8", "--lr", "0.003", "--seed", "0", "--ema", "0.9",
        "--logit-adjust", "1"]


@pytest.fixture(scope="module")
def prepared(s3_server, run_job) -> str:
    from segray.synthetic import write_dataset

    root = f"s3://{BUCKET}/train-{uuid.uuid4().hex[:8]}"
    write_dataset(f"{root}/source", layout="segnet", counts={"train": TRAIN, "val": VAL}, size=SIZE, seed=0)
    run_job("prepare", "--source", f"{root}/source", "--dest", f"{root}/prepared", check=True)
    return root


def val_arrays(data: str) -> tuple[np.ndarray, np.ndarray]:
    info = load_info(data)
    fs, _ = storage.resolve(data)
    paths = [storage.resolve(u)[1] for u in split_files(data, info, "val")]  # what dataset.json lists
    table = pq.read_table(paths, filesystem=fs, columns=[COL_IMAGE, COL_LABEL])
    images, labels = rows_to_arrays(table.to_pydict(), info.height, info.width)
    return images.copy(), labels.copy()


def chance_miou(labels: np.ndarray) -> float:
    """The best val mIoU of a model that ignores its input.

    Constant class k: IoU_k = p_k (union = every labelled pixel), IoU = 0 for the other classes
    present, so mIoU = max p / (classes present). Uniform random guesses over C classes:
    IoU_c = (p_c / C) / (p_c + 1/C - p_c/C), averaged over all C (every class is predicted).
    Learning must beat both by a wide margin.
    """
    counts = np.bincount(labels[labels != VOID_INDEX].ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES]
    p = counts / counts.sum()
    constant = p.max() / (p > 0).sum()
    c = NUM_CLASSES
    uniform = np.mean((p / c) / (p + 1 / c - p / c))
    return float(max(constant, uniform))


def epochs_trained(proc) -> list[int]:
    return [int(m) for m in re.findall(r"train: epoch (\d+)/\d+ ", proc.stdout + proc.stderr)]


def tensorboard_scalars(run: str, tmp_path) -> tuple[list[str], dict[str, list[tuple[int, float]]]]:
    """(event file names, {tag: [(step, value)]}) of ``<run>/tensorboard/``, read with TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = tmp_path / f"tensorboard-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    names = []
    for uri in storage.list_files(f"{run}/tensorboard"):
        names.append(storage.relative(f"{run}/tensorboard", uri))
        (folder / names[-1]).write_bytes(storage.read_bytes(uri))
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return names, {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_train_resumes_exports_and_learns(prepared, run_job, tmp_path):
    data, runs = f"{prepared}/prepared", f"{prepared}/runs"
    run = f"{runs}/unet"
    first = run_job("train", "--data", data, "--storage", runs, "--name", "unet", "--epochs", "4", *ARGS, check=True)
    out = first.stdout + first.stderr
    assert epochs_trained(first) == [1, 2, 3, 4], out[-3000:]
    assert out.count("train: epoch 1/4 ") == 1, "progress lines are printed once, by rank 0"
    # The console (segray/console.py): rank 0's lines without Ray's "(RayTrainWorker pid=...)"
    # prefix, no Ray log line, and the step count against the exact total: 128 rows in 2 shards
    # of 64, batches of 4: 16 steps an epoch.
    assert re.search(r"^train: epoch 4/4 ", first.stdout, re.M) and "RayTrainWorker" not in out, out[-3000:]
    assert not re.search(r"^\d{4}-\d\d-\d\d [\d:,]+\s+(INFO|WARNING) |Reporting training result", out, re.M), out
    assert re.findall(r"^train: epoch \d/4: +100% (\d+)/(\d+) \[", first.stdout, re.M) == [("64", "64")], out[-3000:]
    summary = first.stdout.strip().splitlines()[-1]
    assert summary.startswith("train: done: best val mIoU") and f"model: {run}/model" in summary

    # The run folder: Ray Train's checkpoints and snapshot, the exported model, metrics.json.
    files = {storage.relative(run, f) for f in storage.list_files(run)}
    assert {"checkpoint_manager_snapshot.json", "metrics.json", "model/model.pt", "model/config.json"} <= files
    assert "checkpoint_epoch_0004/state.pt" in files  # the latest is always kept
    assert len({f.split("/")[0] for f in files if f.startswith("checkpoint_epoch_")}) <= 3  # 2 best + latest

    m1 = json.loads(storage.read_bytes(f"{run}/metrics.json"))
    history = m1["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and m1["epochs"] == 4
    for h in history:
        assert {"train_loss", "val_loss", "val_miou", "val_pixel_accuracy", "val_iou", "images_per_s",
                "epoch_time_s"} <= set(h)
        assert set(h["val_iou"]) == set(load_info(data).classes) and h["train_images"] == TRAIN
        assert len(h["nodes"]) == 2 and all(len(n) == 56 for n in h["nodes"])  # each rank's Ray node id (hex)
    best = max(history, key=lambda h: (h["val_miou"], h["epoch"]))
    assert m1["best_epoch"] == best["epoch"] and m1["best"] == best and m1["final"] == history[-1]
    assert m1["config"]["lr"] == 0.003 and m1["config"]["base_channels"] == 8
    # --ema: the moving average is what is validated, checkpointed as "model" and exported (checked
    # below: the export reproduces the best epoch's val metrics); the trained weights are "trained".
    assert m1["config"]["ema"] == 0.9
    state4 = modelio.load_tensors(storage.read_bytes(f"{run}/checkpoint_epoch_0004/state.pt"), "state.pt")
    assert state4["model"].keys() == state4["trained"].keys()
    assert not all(torch.equal(v, state4["trained"][k]) for k, v in state4["model"].items()), "no average"

    # Learning: val mIoU climbs well above where it started and above chance (see chance_miou).
    images, labels = val_arrays(data)
    chance = chance_miou(labels)
    assert chance < 0.1
    first_miou, last_miou = history[0]["val_miou"], history[-1]["val_miou"]
    assert last_miou > first_miou + 0.05, [h["val_miou"] for h in history]
    assert last_miou > 2 * chance, (last_miou, chance)

    # Every val row counted exactly once across the two workers (no rows dropped by sharding).
    assert best["val_pixels"] == int((labels != VOID_INDEX).sum())
    # The exported model is the best epoch's and reproduces its val metrics in this process: with
    # --logit-adjust 1, validation and the export both add -log(class weight) to the logits.
    model, spec = modelio.load_model(run)
    assert spec.input_size == SIZE and spec.network.base_channels == 8 and spec.void_index == VOID_INDEX
    weights = class_weights("sqrt_median_freq", load_info(data).class_pixel_counts)
    assert spec.logit_bias == pytest.approx([-math.log(w) for w in weights]) and isinstance(model, modelio.LogitBias)
    with torch.no_grad():
        logits = model(modelio.images_to_tensor(images, spec.mean, spec.std))
    assert logits.shape == (len(images), NUM_CLASSES, *SIZE)
    scores = summarize(confusion_matrix_np(labels, logits.argmax(1).numpy()))
    assert scores["miou"] == pytest.approx(best["val_miou"], abs=0.01)
    assert scores["pixel_accuracy"] == pytest.approx(best["val_pixel_accuracy"], abs=0.01)

    # The same command with more epochs resumes after epoch 4: epochs 1-4 are not redone. This run
    # streams its shards through Ray Data every epoch, as a dataset too big to cache would
    # (the first kept them in worker memory after epoch 1).
    # It also switches to --precision bf16 (a compute setting, like --use-gpu: it may change).
    second = run_job("train", "--data", data, "--storage", runs, "--name", "unet", "--epochs", "5", *ARGS,
                     "--precision", "bf16", env={"SEGRAY_SHARD_CACHE_BYTES": "0"}, check=True)
    assert f"resuming {run} after epoch 4" in second.stdout
    assert epochs_trained(second) == [5], (second.stdout + second.stderr)[-3000:]
    m2 = json.loads(storage.read_bytes(f"{run}/metrics.json"))
    assert [h["epoch"] for h in m2["history"]] == [1, 2, 3, 4, 5]
    assert m2["history"][:4] == history  # carried over from the checkpoint, not retrained
    native = native_bf16_cpu()
    assert [h["precision"] for h in m2["history"]] == ["fp32"] * 4 + ["bf16" if native else "fp32"]
    assert ("this CPU has no native bf16" in second.stdout) == (not native)
    assert "(1 this run)" in second.stdout.strip().splitlines()[-1]
    assert re.findall(r"^train: epoch 5/5: +100% (\d+)/(\d+) \[", second.stdout, re.M) == [("80", "80")]

    # Training curves (segray/tensorboard.py): one event file per attempt in <run>/tensorboard/,
    # merged by TensorBoard into the history of metrics.json; without the package, one line.
    if importlib.util.find_spec("tensorboard") is None:
        assert (first.stdout + first.stderr).count("tensorboard is not installed") == 1
    else:
        names, scalars = tensorboard_scalars(run, tmp_path)
        assert len(names) == 2 and all(n.startswith("events.out.tfevents.") for n in names), names
        for key in ("val_miou", "train_loss", "val_loss", "val_pixel_accuracy", "lr", "images_per_s"):
            assert [s for s, _ in scalars[key]] == [1, 2, 3, 4, 5], (key, scalars[key])
            assert [v for _, v in scalars[key]] == pytest.approx([h[key] for h in m2["history"]], rel=1e-5), key
        present = {c for h in m2["history"] for c, v in h["val_iou"].items() if v is not None}  # all, or nearly
        assert {t for t in scalars if t.startswith("val_iou/")} == {f"val_iou/{c}" for c in present}, scalars.keys()
        road = [(h["epoch"], h["val_iou"]["Road"]) for h in m2["history"] if h["val_iou"]["Road"] is not None]
        assert scalars["val_iou/Road"] == [(e, pytest.approx(v, rel=1e-5)) for e, v in road]

    # Nothing left to train: no workers, only the export again.
    # The run's config.yaml (the effective settings of the latest command) is a recipe that
    # repeats that command: here, the same run, complete.
    saved = storage.read_bytes(f"{run}/config.yaml")
    third = run_job("train", "--recipe", f"{run}/config.yaml", check=True)
    assert "already has 5 epochs" in third.stdout and epochs_trained(third) == []
    assert storage.read_bytes(f"{run}/config.yaml") == saved
    assert json.loads(storage.read_bytes(f"{run}/metrics.json"))["history"] == m2["history"]
    assert len(storage.list_files(f"{run}/tensorboard")) == (2 if importlib.util.find_spec("tensorboard") else 0)

    # --export last (a final model trained with a fixed epoch count, e.g. on train+val): model/
    # becomes epoch 5's weights, whichever epoch scored best; no worker starts.
    last = run_job("train", "--recipe", f"{run}/config.yaml", "--export", "last", check=True)
    assert epochs_trained(last) == []
    m3 = json.loads(storage.read_bytes(f"{run}/metrics.json"))
    assert m3["exported"] == {"rule": "last", "epoch": 5, "val_in_train": False} and m3["best"] == m2["best"]
    state = modelio.load_tensors(storage.read_bytes(f"{run}/checkpoint_epoch_0005/state.pt"), "state.pt")
    exported = modelio.load_model(run)[0].net.state_dict()
    assert all(torch.equal(exported[k], v) for k, v in state["model"].items()), "model/ is not epoch 5"
    assert m2["exported"]["rule"] == "best" and m2["exported"]["epoch"] == m2["best_epoch"]

    # Another width under the same name is refused: the checkpoint could not be loaded.
    other = run_job("train", "--data", data, "--storage", runs, "--name", "unet", "--epochs", "6",
                    "--base-channels", "16")
    assert other.returncode == 1
    # (This command also leaves out ARGS: --lr, --batch-size, --ema and --logit-adjust are back at
    # their defaults.)
    last = other.stderr.strip().splitlines()[-1]
    assert last == (f"train: error: TrainError: {run} cannot resume: --base-channels was 8, this command has 16; "
                    "--lr was 0.003, this command has 0.001; --batch-size was 4, this command has 8; --ema was 0.9, "
                    "this command has 0.0; --logit-adjust was 1.0, this command has 0.0; pass the same "
                    "--base-channels, --lr, --batch-size, --ema and --logit-adjust to resume it, "
                    "or a new --name to start a new run"), last


def fails_fast(proc, message: str, runs: str | None = None) -> None:
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train: error: ") and message in last, last
    assert proc.stderr.count("train: error:") == 1
    # No trainer was made: Ray Train writes .validate_storage_marker into the run folder first.
    if runs is not None:
        assert not [f for f in storage.list_files(runs) if f.endswith(".validate_storage_marker")]


def test_bad_inputs_fail_before_any_worker_starts(prepared, run_job):
    data, runs = f"{prepared}/prepared", f"{prepared}/runs-bad"
    common = ["--epochs", "1", "--base-channels", "8"]
    # A folder that is not a prepared dataset (the raw source: no dataset.json).
    fails_fast(run_job("train", "--data", f"{prepared}/source", "--storage", runs, "--name", "x", *common),
               "DatasetError: " + f"{prepared}/source: not a prepared dataset (no dataset.json)")
    fails_fast(run_job("train", "--data", f"{prepared}/nothing", "--storage", runs, "--name", "x", *common),
               "not found; pass the --dest of jobs/prepare.py")
    # More workers than the cluster's 2 CPUs.
    fails_fast(run_job("train", "--data", data, "--storage", runs, "--name", "x", "--num-workers", "3", *common),
               "--num-workers 3 needs 3 CPUs but the cluster has 2", runs)
    # Storage that cannot be written: an unknown scheme, a bucket that does not exist.
    fails_fast(run_job("train", "--data", data, "--storage", "ftp://host/runs", "--name", "x", *common),
               "unsupported scheme 'ftp'")
    fails_fast(run_job("train", "--data", data, "--storage", "s3://no-such-bucket-segray/runs", "--name", "x",
                       *common), "bucket 'no-such-bucket-segray' does not exist")
    # A run folder that holds someone's files (export would overwrite metrics.json and model/).
    storage.write_bytes(f"{runs}/mine/metrics.json", b"{}")
    fails_fast(run_job("train", "--data", data, "--storage", runs, "--name", "mine", *common),
               f"{runs}/mine holds 1 files (e.g. {runs}/mine/metrics.json) but no segray training run (run.json)")
    assert storage.read_bytes(f"{runs}/mine/metrics.json") == b"{}"


def test_help():
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--help"], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0
    for flag in ("--data", "--storage", "--name", "--epochs", "--num-workers", "--use-gpu", "--batch-size", "--lr",
                 "--base-channels", "--lr-schedule", "--class-weighting", "--no-augment", "--max-failures",
                 "--weight-decay", "--seed"):
        assert flag in proc.stdout

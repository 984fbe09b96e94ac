"""jobs/train.py refuses a resume that would mix two runs, and extends one without an LR jump.

One 1-epoch Ray Train run (module fixture) is shared: the refusals fail before any worker
starts (seconds each); the only other Ray Train run is the accepted extension to 2 epochs.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid

import pytest
from conftest import BUCKET

from segray import storage
from segray.dataset import load_info, split_files

TRAIN, VAL, SIZE = 32, 8, (32, 48)
LR = "0.003"
ARGS = ["--num-workers", "2", "--batch-size", "4", "--base-channels", "4", "--lr", LR, "--seed", "0",
        "--lr-schedule", "cosine"]


def _args(data: str, runs: str, epochs: int = 1, **override: str) -> list[str]:
    args = list(ARGS)
    for flag, value in override.items():
        flag = "--" + flag.replace("_", "-")
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag] + ([value] if value else [])
    return ["--data", data, "--storage", runs, "--name", "g", "--epochs", str(epochs), *args]


def _copy_tree(src: str, dest: str) -> None:
    for uri in storage.list_files(src):
        storage.write_bytes(storage.join(dest, storage.relative(src, uri)), storage.read_bytes(uri))


def _epochs_trained(proc) -> list[int]:
    return [int(m) for m in re.findall(r"train: epoch (\d+)/\d+ ", proc.stdout + proc.stderr)]


@pytest.fixture(scope="module")
def first(s3_server, run_job) -> dict:
    from segray.synthetic import write_dataset

    root = f"s3://{BUCKET}/guard-{uuid.uuid4().hex[:8]}"
    data, runs = f"{root}/prepared", f"{root}/runs"
    write_dataset(f"{root}/source", layout="segnet", counts={"train": TRAIN, "val": VAL}, size=SIZE, seed=0)
    run_job("prepare", "--source", f"{root}/source", "--dest", data, check=True)
    # A file in the split folder that dataset.json does not list is not part of the dataset
    # (prepare may leave such files): a copy of a real shard, which would double the rows if read.
    info = load_info(data)
    assert info.files, "prepare lists the dataset's files in dataset.json"
    listed = split_files(data, info, "train")
    storage.write_bytes(f"{data}/train/not-listed-copy.parquet", storage.read_bytes(listed[0]))
    proc = run_job("train", *_args(data, runs), check=True)
    assert _epochs_trained(proc) == [1], (proc.stdout + proc.stderr)[-3000:]
    return {"root": root, "data": data, "runs": runs, "run": f"{runs}/g",
            "metrics": json.loads(storage.read_bytes(f"{runs}/g/metrics.json"))}


def _refused(proc, *parts: str) -> str:
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train: error: TrainError: ") and proc.stderr.count("train: error:") == 1, last
    for part in parts:
        assert part in last, last
    assert not _epochs_trained(proc) and "resuming" not in proc.stdout
    return last


def _folder(run: str) -> dict[str, bytes]:
    return {storage.relative(run, u): storage.read_bytes(u) for u in storage.list_files(run)}


def test_the_run_records_what_it_is_made_from(first):
    data, run = first["data"], first["run"]
    sha = hashlib.sha256(storage.read_bytes(f"{data}/dataset.json")).hexdigest()
    recipe = json.loads(storage.read_bytes(f"{run}/run.json"))["recipe"]
    assert recipe["data"] == data and recipe["dataset_sha256"] == sha and recipe["input_size"] == list(SIZE)
    assert recipe["classes"] == load_info(data).classes and recipe["model"]["base_channels"] == 4
    assert (recipe["lr"], recipe["lr_schedule"], recipe["batch_size"], recipe["seed"]) == (0.003, "cosine", 4, 0)
    assert first["metrics"]["recipe"] == recipe  # and in every checkpoint's meta.json
    checkpoint = next(u for u in storage.list_files(run) if u.endswith("checkpoint_epoch_0001/meta.json"))
    assert json.loads(storage.read_bytes(checkpoint))["recipe"] == recipe
    # Only the files dataset.json lists were read: not the unlisted copy of a shard.
    assert first["metrics"]["history"][0]["train_images"] == TRAIN


def test_resume_with_another_data_uri_is_refused(first, run_job):
    data, run = first["data"], first["run"]
    other = f"{first['root']}/prepared-copy"  # the same content at another URI: another dataset
    _copy_tree(data, other)
    before = _folder(run)
    proc = run_job("train", *_args(other, first["runs"], epochs=2))
    sha = hashlib.sha256(storage.read_bytes(f"{data}/dataset.json")).hexdigest()[:12]
    _refused(proc, f"{run} cannot resume: --data was {data} (32x48, dataset.json sha256 {sha}), "
                   f"this command has {other} (32x48, dataset.json sha256 {sha})",
             "pass the same --data to resume it, or a new --name to start a new run")
    assert _folder(run) == before


@pytest.mark.parametrize("flag, value, recorded", [
    ("lr", "0.01", LR), ("batch_size", "2", "4"), ("seed", "1", "0"), ("lr_schedule", "constant", "cosine"),
])
def test_resume_with_another_setting_is_refused(first, run_job, flag, value, recorded):
    name = "--" + flag.replace("_", "-")
    before = _folder(first["run"])
    proc = run_job("train", *_args(first["data"], first["runs"], epochs=2, **{flag: value}))
    _refused(proc, f"cannot resume: {name} was {recorded}, this command has {value}; pass the same {name} to resume it")
    assert _folder(first["run"]) == before


def test_resume_on_the_same_uri_re_prepared_is_refused(first, run_job):
    data, run = first["data"], first["run"]
    saved = {u: storage.read_bytes(u) for u in storage.list_files(data)}
    try:
        from segray.synthetic import write_dataset

        write_dataset(f"{first['root']}/source-2", layout="segnet", counts={"train": TRAIN, "val": VAL}, size=SIZE,
                      seed=1)
        storage.delete(f"{data}/train/not-listed-copy.parquet")
        run_job("prepare", "--source", f"{first['root']}/source-2", "--dest", data, check=True)
        before = _folder(run)
        proc = run_job("train", *_args(data, first["runs"], epochs=2))
        _refused(proc, f"cannot resume: --data {data} was re-prepared since the run used it",
                 "pass the dataset it was trained on to resume it, or a new --name")
        assert _folder(run) == before
    finally:  # the dataset as it was (the same dataset.json bytes: the same identity) for the other tests
        storage.delete(data)
        for uri, body in saved.items():
            storage.write_bytes(uri, body)


def test_more_epochs_resume_and_continue_the_schedule_without_a_jump(first, run_job):
    run = first["run"]
    # --epochs 2 and --num-workers 1 (resources may change): accepted, epoch 2 only.
    proc = run_job("train", *_args(first["data"], first["runs"], epochs=2, num_workers="1"), check=True)
    assert f"resuming {run} after epoch 1" in proc.stdout, proc.stdout[-3000:]
    assert _epochs_trained(proc) == [2], (proc.stdout + proc.stderr)[-3000:]
    m = json.loads(storage.read_bytes(f"{run}/metrics.json"))
    h1, h2 = m["history"]
    assert h1 == first["metrics"]["history"][0]  # epoch 1 carried over, not retrained
    assert h2["world_size"] == 1 and h2["train_images"] == TRAIN
    # The first step of epoch 2 has the LR the run had reached (cosine: its end, 0 after epoch 1
    # of 1); a schedule recomputed over 2 epochs would restart it at lr * 0.5.
    assert h2["lr_start"] == pytest.approx(h1["lr"], abs=1e-12)
    assert h2["lr"] == pytest.approx(0.0, abs=1e-12)
    assert m["schedule"]["knots"] == [[0.0, 0.0], [1.0, 1.0], [2.0, 1.0]]
    assert json.loads(storage.read_bytes(f"{run}/run.json"))["recipe"] == m["recipe"]

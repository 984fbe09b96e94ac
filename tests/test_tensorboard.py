"""segray/tensorboard.py: event files in <run>/tensorboard/, read back with TensorBoard's own reader.

The end-to-end check (a real training run and its resume) is in tests/test_train_e2e.py."""

from __future__ import annotations

import math
import os
import sys

import pytest

from segray import storage
from segray import tensorboard as tb
from segray.runrecord import RunFolderError, check_run_folder

CLASSES = ("Road", "Sky", "traffic light", "a/b", "a b", "Ünïcode?")


def metrics(epoch: int) -> dict:
    return {
        "epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": 1.5 / epoch, "val_miou": 0.1 * epoch,
        "val_pixel_accuracy": 0.5 + 0.01 * epoch, "lr": 1e-3 / epoch, "lr_start": 1e-3, "images_per_s": 10.0 * epoch,
        "val_iou": {c: (None if c == "Sky" else 0.01 * epoch + 0.001 * i) for i, c in enumerate(CLASSES)},
        "val_pixels": 100, "train_images": 8,
    }


def read_events(folder: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(folder, size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def test_safe_unique_class_tags():
    tags = tb.class_tags(CLASSES)
    assert tags["Road"] == "val_iou/Road" and tags["traffic light"] == "val_iou/traffic_light"
    assert tags["a/b"] == "val_iou/a_b" and tags["a b"] == "val_iou/a_b_4"  # no two classes share a curve
    for names in (["a b", "a_b_2", "a/b"], ["x", "x_1", "x?"]):  # a suffixed form that is taken too
        assert len(set(tb.class_tags(names).values())) == len(names), tb.class_tags(names)
    assert tags["Ünïcode?"] == "val_iou/Ünïcode" and tb.safe_tag("???") == "class"
    assert len(set(tags.values())) == len(CLASSES)


def test_scalars_per_epoch_and_a_resume_adds_a_file(tmp_path):
    pytest.importorskip("tensorboard")
    run = str(tmp_path / "run")
    lines: list[str] = []
    first = tb.Curves(run, say=lines.append)
    for epoch in (1, 2):
        first.log(metrics(epoch))
        # After every epoch the file is in the run folder already (curves while the run trains).
        acc = read_events(os.path.join(run, "tensorboard"))
        assert [e.step for e in acc.Scalars("val_miou")] == list(range(1, epoch + 1))
    first.close()
    (file1,) = os.listdir(os.path.join(run, "tensorboard"))
    assert file1.startswith("events.out.tfevents.")
    before = open(os.path.join(run, "tensorboard", file1), "rb").read()

    second = tb.Curves(run, say=lines.append)  # a resume: another attempt, epoch 3 on
    second.log(metrics(3))
    second.close()
    files = sorted(os.listdir(os.path.join(run, "tensorboard")))
    assert len(files) == 2 and file1 in files
    assert open(os.path.join(run, "tensorboard", file1), "rb").read() == before  # never overwritten

    acc = read_events(os.path.join(run, "tensorboard"))  # TensorBoard merges the files of a folder
    scalars = set(acc.Tags()["scalars"])
    assert set(tb.SCALARS) <= scalars and "lr_start" not in scalars
    assert {"val_iou/Road", "val_iou/traffic_light", "val_iou/a_b", "val_iou/a_b_4", "val_iou/Ünïcode"} <= scalars
    assert "val_iou/Sky" not in scalars  # absent from val: no point rather than a fake 0
    for key in tb.SCALARS:
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2, 3]
        for e in events:
            assert math.isclose(e.value, metrics(e.step)[key], rel_tol=1e-6)
    assert [round(e.value, 6) for e in acc.Scalars("val_iou/a_b_4")] == [0.014, 0.024, 0.034]
    assert lines == []
    check_run_folder(run)  # does not raise: a folder of nothing but event files is not someone else's


def test_without_tensorboard_training_goes_on_and_one_line_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` raises ImportError
    monkeypatch.setattr(tb, "_said_missing", False)
    run = str(tmp_path / "run")
    for _ in range(2):  # a second writer in the same process says nothing more
        curves = tb.Curves(run)
        assert not curves.enabled
        curves.log(metrics(1))
        curves.close()
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "tensorboard is not installed" in out[0] and tb.INSTALL_HINT in out[0], out
    assert not os.path.exists(run)


def test_off_rank_0_or_without_a_run_folder_nothing_is_written(tmp_path, capsys):
    run = str(tmp_path / "run")
    for curves in (tb.Curves(run, enabled=False), tb.Curves(tb.run_folder({}))):
        curves.log(metrics(1))
        curves.close()
    assert not os.path.exists(run) and capsys.readouterr().out == ""
    assert tb.run_folder({"storage": str(tmp_path) + "/", "name": "x"}) == str(tmp_path / "x")


def test_the_run_folder_check_ignores_event_files_only(tmp_path):
    run = str(tmp_path / "run")
    storage.write_bytes(f"{run}/tensorboard/events.out.tfevents.1.host.1.0.abcd1234", b"x")
    check_run_folder(run)  # only event files: accepted
    storage.write_bytes(f"{run}/notes.txt", b"someone's")
    with pytest.raises(RunFolderError, match="holds 1 files"):
        check_run_folder(run)
    storage.write_bytes(f"{run}/run.json", b"{}")
    check_run_folder(run)  # a segray run with curves: accepted (resumes)

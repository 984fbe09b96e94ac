"""The layout of the code as a contract (docs/design.md, "Layout of the code"): which module may
import which, config in one place per stage, one error base, one registry per extension point."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from segray import archives, errors, recipe, runrecord, sources
from segray.classes import CAMVID, ClassTable
from segray.jobs import defaults

REPO = Path(__file__).resolve().parents[1]


def _imported_by(module: str) -> set[str]:
    """segray modules that importing ``module`` loads, in a fresh interpreter."""
    code = f"import sys, {module}; print('\\n'.join(m for m in sys.modules if m.startswith('segray')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_the_worker_and_evaluate_do_not_import_their_stages_drivers():
    assert "segray.train" not in _imported_by("segray.worker")
    loaded = _imported_by("segray.evaluate")
    assert not loaded & {"segray.infer", "segray.frames", "segray.predictor"}, loaded


def test_every_module_but_synthetic_stays_near_500_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (REPO / "segray").glob("*.py")}
    assert {n: s for n, s in sizes.items() if s > 520 and n != "synthetic.py"} == {}


def test_every_error_segray_raises_on_purpose_derives_from_segray_error():
    import segray

    classes = []
    for path in (REPO / "segray").glob("*.py"):
        module = importlib.import_module(f"segray.{path.stem}") if path.stem != "__init__" else segray
        classes += [c for _, c in inspect.getmembers(module, inspect.isclass)
                    if c.__module__ == module.__name__ and issubclass(c, Exception)]
    assert len(classes) >= 10
    assert [c.__name__ for c in classes if not issubclass(c, errors.SegrayError)] == []
    assert errors.one_line(sources.SourceError("x: the fix")) == "SourceError: x: the fix"


def _job(name: str):
    return importlib.import_module(f"segray.commands.{name}")  # what jobs/<name>.py runs


def test_flag_defaults_come_from_the_stage_configs():
    from segray.infer import InferConfig
    from segray.train import TrainConfig

    job = _job("train")
    args = job.build_parser().parse_args(["--data", "d", "--storage", "s", "--name", "n"])
    assert job.config_from_args(args, environ={}) == TrainConfig(data="d", storage="s", name="n")
    d = defaults(InferConfig)
    assert d["batch_size"] == InferConfig(model="m", images="i", output="o").batch_size
    flags = job.config_from_args(job.build_parser().parse_args(
        ["--data", "d", "--storage", "s", "--name", "n", "--jitter", "0.1", "--flip-prob", "0", "--crop", "32x32",
         "--arch", "fcn", "--arch-arg", "depth=3", "--base-channels", "8"]), environ={"SEGRAY_SHARD_CACHE_BYTES": "7"})
    assert flags.augmentation == recipe.Augmentation(crop=(32, 32), flip_prob=0.0, jitter=0.1)
    assert flags.model_args(4) == {"in_channels": 3, "num_classes": 4, "base_channels": 8, "depth": 3}
    assert flags.arch == "fcn" and flags.shard_cache_bytes == 7


def test_an_augmentation_setting_is_recorded_and_guarded_on_resume_by_its_field_alone():
    fields = [f.name for f in dataclasses.fields(recipe.Augmentation)]
    keys = [k for k, _ in recipe.augmentation_names()]
    assert keys == ["augment", *fields[1:]]
    assert {k for k, _ in runrecord.RECIPE_SETTINGS} >= set(keys)
    old = {"jitter": 0.25, "flip_prob": 0.5, "augment": True}
    message = runrecord.resume_refusal("r", old, {**old, "jitter": 0.1})
    assert "--jitter was 0.25, this command has 0.1" in message
    # A recipe recorded before a setting existed is not compared on it.
    assert runrecord.resume_refusal("r", {"augment": True}, {**old, "jitter": 0.1}) is None
    with pytest.raises(errors.ConfigError, match="--flip-prob"):
        recipe.Augmentation(flip_prob=1.5)


def test_a_container_kind_is_one_reader_and_one_entry(monkeypatch, tmp_path):
    """A registered reader is all that listing and reading need: here a fake '.frames' kind."""
    def read_frames(uri, skip=(), taken=()):
        yield archives.Member("a.png", b"png bytes")

    reader = archives.ContainerReader("frames", (".frames",), read_frames)
    monkeypatch.setattr(archives, "CONTAINER_READERS", (*archives.CONTAINER_READERS, reader))
    assert archives.is_archive("clips/x.FRAMES") and archives.reader_for("x.frames") is reader
    assert [m.path for m in archives.iter_archive(str(tmp_path / "x.frames"))] == ["a.png"]
    assert sources.archive_folder("seq/x.frames") == "seq/x"
    # The tar reader is found by its longest extension and streams as before.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("f.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    (tmp_path / "a.tar.gz").write_bytes(buf.getvalue())
    assert archives.reader_for("a.tar.gz").kind == "tar" and sources.archive_folder("s/a.tar.gz") == "s/a"
    assert [(m.path, m.data) for m in archives.iter_archive(str(tmp_path / "a.tar.gz"))] == [("f.png", b"abc")]


def test_the_class_table_travels_in_dataset_json_and_the_model_config(tmp_path):
    from segray.dataset import DatasetError, DatasetInfo, load_info, write_info
    from segray.modelio import ModelSpec

    four = ClassTable(("a", "b", "c", "d"), ((1, 2, 3), (4, 5, 6), (7, 8, 9), (10, 11, 12)), 255)
    info = DatasetInfo(height=4, width=4, splits={"train": 1}, class_pixel_counts=[1, 2, 3, 4], void_pixel_count=0,
                       source="s", layout="segnet", **four.to_fields())
    write_info(str(tmp_path), info)
    assert load_info(str(tmp_path)).class_table == four
    assert DatasetInfo(height=4, width=4, splits={}, class_pixel_counts=[], void_pixel_count=0, source="s",
                       layout="segnet").class_table == CAMVID
    spec = ModelSpec(model={"num_classes": 4}, input_height=4, input_width=4,
                     **{k: v for k, v in four.to_fields().items() if k != "void_name"})
    assert spec.class_table == four and spec.num_classes == 4
    bad = json.loads(info.to_json())
    bad["void_index"] = 2  # a class index
    (tmp_path / "dataset.json").write_text(json.dumps(bad))
    with pytest.raises(DatasetError, match="void index 2 is the index of class 2"):
        load_info(str(tmp_path))


def test_evaluate_reads_colour_labels_with_the_one_decoder(tmp_path):
    """The report used to decode index PNGs only and silently left `_L.png` frames out."""
    import numpy as np

    from segray import evaluate
    from segray.camvid import ORIGINAL_COLORS
    from segray.layout import label_color_table
    from segray.preprocess import encode_png

    rgb = dict((name, c) for c, name in ORIGINAL_COLORS)
    label = np.zeros((2, 3, 3), np.uint8)
    label[0] = rgb["Sky"]
    label[1] = rgb["Car"]
    label[1, 2] = (1, 2, 3)  # not in the table: void
    (tmp_path / "f_L.png").write_bytes(encode_png(label))
    row = {"label_uri": str(tmp_path / "f_L.png")}
    decoded = evaluate._read_label(row, CAMVID, label_color_table(None))
    np.testing.assert_array_equal(decoded, [[0, 0, 0], [8, 8, CAMVID.void_index]])
    (tmp_path / "g.png").write_bytes(encode_png(np.full((2, 3), 3, np.uint8)))
    assert evaluate._read_label({"label_uri": str(tmp_path / "g.png")}, CAMVID, ()).tolist() == [[3] * 3] * 2

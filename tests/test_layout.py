from pathlib import Path

import pytest

from segray.layout import ORIGINAL, SEGNET, LayoutError, detect, split_of


def touch(root: Path, *rels: str) -> None:
    for rel in rels:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def test_segnet_pairs_by_split_and_stem(tmp_path):
    touch(tmp_path, "train/a.png", "trainannot/a.png", "train/sub/b.png", "trainannot/sub/b.png",
          "val/c.png", "valannot/c.png", "train.txt", "README.md")
    layout = detect(str(tmp_path))
    assert layout.kind == SEGNET
    assert [(p.split, p.name) for p in layout.pairs] == [("train", "a"), ("train", "sub/b"), ("val", "c")]
    assert layout.pairs[0].image == str(tmp_path / "train/a.png")
    assert layout.pairs[0].label == str(tmp_path / "trainannot/a.png")
    assert layout.split_counts() == {"train": 2, "val": 1}


def test_segnet_missing_label_names_the_file(tmp_path):
    touch(tmp_path, "train/a.png", "trainannot/a.png", "train/lonely.png")
    with pytest.raises(LayoutError, match=r"train/lonely.png has no label in trainannot/"):
        detect(str(tmp_path))


def test_segnet_missing_image_names_the_file(tmp_path):
    touch(tmp_path, "val/a.png", "valannot/a.png", "valannot/orphan.png")
    with pytest.raises(LayoutError, match=r"valannot/orphan.png has no image in val/"):
        detect(str(tmp_path))


def test_original_layout_pairs_and_split_rule(tmp_path):
    touch(tmp_path, "label_colors.txt", "frames/0001TP_000010.png", "labels/0001TP_000010_L.png",
          "frames/Seq05VD_f00030.png", "labels/Seq05VD_f00030_L.png")
    (tmp_path / "label_colors.txt").write_text("0 0 0\tVoid\n64 0 128\tCar\n")
    layout = detect(str(tmp_path))
    assert layout.kind == ORIGINAL
    assert [p.name for p in layout.pairs] == ["frames/0001TP_000010", "frames/Seq05VD_f00030"]
    assert [p.split for p in layout.pairs] == [split_of("0001TP_000010"), split_of("Seq05VD_f00030")]
    assert dict(layout.label_colors) == {(0, 0, 0): 11, (64, 0, 128): 8}


def test_original_layout_split_lists(tmp_path):
    touch(tmp_path, "a.png", "a_L.png", "b.png", "b_L.png", "c.png", "c_L.png")
    (tmp_path / "train.txt").write_text("a\nc.png\n")
    (tmp_path / "test.txt").write_text("b\n")
    layout = detect(str(tmp_path))
    assert {p.name: p.split for p in layout.pairs} == {"a": "train", "b": "test", "c": "train"}


def test_split_rule_is_deterministic_and_balanced():
    names = [f"0016E5_{i:05d}" for i in range(2000)]
    splits = [split_of(n) for n in names]
    assert splits == [split_of(n) for n in names]
    share = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert 0.65 < share["train"] < 0.75 and 0.12 < share["val"] < 0.18 and 0.12 < share["test"] < 0.18


def test_original_missing_label(tmp_path):
    touch(tmp_path, "a.png", "a_L.png", "b.png")
    with pytest.raises(LayoutError, match=r"b.png has no label b_L.png"):
        detect(str(tmp_path))


def test_neither_layout_says_what_was_found(tmp_path):
    touch(tmp_path, "images/x.png", "notes.txt")
    with pytest.raises(LayoutError, match=r"neither CamVid layout: found 2 files .*images"):
        detect(str(tmp_path))


def test_empty_source(tmp_path):
    with pytest.raises(LayoutError, match="no files found"):
        detect(str(tmp_path / "nothing"))

from pathlib import Path

import pytest

from segray.layout import ORIGINAL, SEGNET, LayoutError, detect, parse_holdout, resplit, split_of


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


# --- prepare --holdout / --train-on-val (layout.resplit) ---

def _camvid_like(tmp_path):
    touch(tmp_path, "train/0001TP_006690.png", "trainannot/0001TP_006690.png",
          "train/0006R0_f02430.png", "trainannot/0006R0_f02430.png",
          "train/0016E5_00390.png", "trainannot/0016E5_00390.png",
          "val/0016E5_07959.png", "valannot/0016E5_07959.png",
          "test/0006R0_f03000.png", "testannot/0006R0_f03000.png",
          "test/Seq05VD_f00000.png", "testannot/Seq05VD_f00000.png")
    return detect(str(tmp_path))


def splits(layout):
    return [(p.split, p.name) for p in layout.pairs]


def test_holdout_moves_a_whole_sequence_of_train_and_val_to_val(tmp_path):
    layout = _camvid_like(tmp_path)
    out = resplit(layout, ("0006R0",))
    # The held-out sequence's train frame is val; the old val frame (another sequence) is train;
    # test is untouched, even its 0006R0 frame.
    assert splits(out) == [("train", "0001TP_006690"), ("train", "0016E5_00390"), ("train", "0016E5_07959"),
                           ("val", "0006R0_f02430"), ("test", "0006R0_f03000"), ("test", "Seq05VD_f00000")]
    moved = {p.name: p for p in out.pairs}
    assert moved["0016E5_07959"].image == str(tmp_path / "val/0016E5_07959.png")  # files stay where they are
    assert resplit(layout) is layout
    # Two prefixes, and a list of exact names, give val exactly those.
    assert [n for s, n in splits(resplit(layout, ("0006R0", "0001TP"))) if s == "val"] == ["0001TP_006690",
                                                                                          "0006R0_f02430"]
    assert [n for s, n in splits(resplit(layout, ("0016E5_07959",))) if s == "val"] == ["0016E5_07959"]


def test_train_on_val_adds_val_to_train_and_keeps_val(tmp_path):
    layout = _camvid_like(tmp_path)
    out = resplit(layout, ("0006R0",), train_on_val=True)
    train = [n for s, n in splits(out) if s == "train"]
    assert train == ["0001TP_006690", "0006R0_f02430", "0016E5_00390", "0016E5_07959"]
    assert [n for s, n in splits(out) if s == "val"] == ["0006R0_f02430"]
    assert [n for s, n in splits(resplit(layout, train_on_val=True)) if s == "train"] == [
        "0001TP_006690", "0006R0_f02430", "0016E5_00390", "0016E5_07959"]


def test_holdout_refusals_name_the_entry(tmp_path):
    layout = _camvid_like(tmp_path)
    with pytest.raises(LayoutError, match=r"--holdout '0006RO' matches no train or val frame \(names look like 0001TP"):
        resplit(layout, ("0006R0", "0006RO"))
    with pytest.raises(LayoutError, match="no train frame left after --holdout"):
        resplit(layout, ("0001TP", "0006R0", "0016E5"))
    with pytest.raises(LayoutError, match="matches no train or val frame"):
        resplit(layout, ("Seq05VD",))  # test frames are never moved


def test_holdout_refuses_a_name_in_two_splits(tmp_path):
    touch(tmp_path, "train/a.png", "trainannot/a.png", "val/a.png", "valannot/a.png", "val/b.png", "valannot/b.png")
    with pytest.raises(LayoutError, match=r"a is in both train/ and val/ of the source"):
        resplit(detect(str(tmp_path)), ("b",))


def test_parse_holdout(tmp_path):
    assert parse_holdout("0006R0") == ("0006R0",)
    assert parse_holdout(" 0006R0, 0001TP ,0006R0") == ("0006R0", "0001TP")
    listing = tmp_path / "val.txt"
    listing.write_text("# held-out frames\n0006R0_f02430\n\n0001TP  # a sequence\n")
    assert parse_holdout(f"@{listing}") == ("0006R0_f02430", "0001TP")
    with pytest.raises(LayoutError, match="names nothing"):
        parse_holdout(" , ")
    with pytest.raises(LayoutError, match=r"--holdout @.*missing.txt: cannot read the list"):
        parse_holdout(f"@{tmp_path / 'missing.txt'}")

"""Classes as data (segray.classes): classes.json, the one label decoder, and every consumer of
a class table (layout, metrics, report, visualize) with K from 2 to 255 and void 255."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segray import camvid
from segray.classes import (
    CAMVID,
    CLASSES_FILE,
    ClassTable,
    ClassTableError,
    load_classes_file,
)
from segray.layout import SEGNET, LayoutError, detect
from segray.metrics import confusion_matrix, confusion_matrix_np, iou_per_class, summarize
from segray.preprocess import (
    BadInputError,
    color_lookup,
    colorize,
    colors_to_index,
    decode_index_label,
    decode_label,
)
from segray.report import iou_table, write_report, Example
from segray.visualize import confusion_image, overlay, side_by_side

SRC = "s3://b/src/classes.json"
FOUR = ClassTable(("road", "car", "tree", "sky"), ((128, 64, 128), (64, 0, 128), (128, 128, 0), (128, 128, 128)), 255)


def png(arr, mode=None) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(arr) if mode is None else Image.fromarray(arr, mode=mode)).save(buf, format="PNG")
    return buf.getvalue()


def doc(k: int = 4, void=255, **change) -> str:
    d = {"classes": [{"name": f"c{i}", "color": [i, i, i]} for i in range(k)], "void": void}
    d.update(change)
    return json.dumps(d)


def table_of(k: int, void: int = 255) -> ClassTable:
    return ClassTable(tuple(f"class{i}" for i in range(k)), tuple((i, 255 - i, (7 * i) % 256) for i in range(k)), void)


# ----------------------------------------------------------------------------- classes.json


def test_classes_json_parses_with_and_without_void():
    t = ClassTable.from_json(doc(3, void=200), SRC)
    assert t.names == ("c0", "c1", "c2") and t.colors == ((0, 0, 0), (1, 1, 1), (2, 2, 2))
    assert t.void_index == 200 and t.num_classes == 3 and t.void_name == "Void"
    no_void = json.loads(doc(3))
    del no_void["void"]
    assert ClassTable.from_json(json.dumps(no_void), SRC).void_index == 255
    # K = 255 with void 255 is the largest table an 8-bit label can hold.
    assert ClassTable.from_json(doc(255), SRC).num_classes == 255


def bad_docs():
    dup = json.loads(doc(3))
    dup["classes"][2]["name"] = "c0"
    noname = json.loads(doc(4))
    del noname["classes"][3]["name"]
    nocolor = json.loads(doc(4))
    del nocolor["classes"][1]["color"]
    empty = json.loads(doc(2))
    empty["classes"][1]["name"] = "  "
    typo = json.loads(doc(2))
    typo["classes"][0]["colour"] = [1, 2, 3]

    def colour(c):
        d = json.loads(doc(2))
        d["classes"][1]["color"] = c
        return json.dumps(d)

    return [
        (json.dumps(dup), r"class 2 is named 'c0' like class 0: class names must be unique; rename one"),
        (doc(1), r"1 classes: a class table needs 2 to 255 classes"),
        (doc(256, void=255), r"256 classes: a class table needs 2 to 255 classes"),
        (doc(4, void=3), r"void index 3 is the index of class 3 \('c3'\): void must not be a class index \(0..3\)"),
        (doc(4, void=0), r"void index 0 is the index of class 0"),
        (doc(4, void=256), r"void index 256 is not an integer 0..255"),
        (doc(4, void="255"), r"\"void\" is '255': it must be an integer"),
        (colour([1, 2]), r"the color of class 1 \('c1'\) is \[1, 2\]: a colour must be 3 integers 0..255"),
        (colour([1, 2, 256]), r"class 1 .* is \[1, 2, 256\]: a colour must be 3 integers"),
        (colour([1.0, 2, 3]), r"class 1 .* is \[1.0, 2, 3\]"),
        (colour([True, 0, 0]), r"class 1 .* is \[True, 0, 0\]"),
        (colour("red"), r"class 1 .* is 'red'"),
        (json.dumps(noname), r"class 3 has no name"),
        (json.dumps(nocolor), r"class 1 \('c1'\) has no color"),
        (json.dumps(empty), r"class 1 has an empty name"),
        (json.dumps(typo), r"class 0 has unknown key 'colour'"),
        (doc(2, Void=3), r"unknown key 'Void'"),
        ('{"classes": [', r"not valid JSON \(.* at line 1 column \d+\)"),
        ("[1, 2]", r"expected a JSON object with \"classes\""),
        ('{"void": 255}', r"no \"classes\" list"),
        ('{"classes": {"road": [1, 2, 3]}}', r"\"classes\" must be a list"),
        ('{"classes": ["road", "car"]}', r"class 0 is 'road': expected"),
    ]


@pytest.mark.parametrize("text, message", bad_docs())
def test_bad_classes_json_names_the_file_and_the_fix(text, message):
    with pytest.raises(ClassTableError, match=message) as e:
        ClassTable.from_json(text, SRC)
    assert str(e.value).startswith(f"{SRC}: ")
    assert isinstance(e.value, ValueError)


def test_load_classes_file_checks_the_bytes():
    assert load_classes_file(doc(2).encode(), SRC).names == ("c0", "c1")
    assert load_classes_file(b"\xef\xbb\xbf" + doc(2).encode(), SRC).num_classes == 2  # BOM
    for data, message in [(b"", "empty file"), (b"\xff\xfe{", "not UTF-8"), (b"nope", "not valid JSON"),
                          (b" " * 2_000_000, "2000000 bytes is over the 1000000 limit")]:
        with pytest.raises(ClassTableError, match=f"^{re.escape(SRC)}: {message}"):
            load_classes_file(data, SRC)


def test_constructor_validates_too():
    with pytest.raises(ClassTableError, match="1 colours for 2 classes"):
        ClassTable(("a", "b"), ((0, 0, 0),), 255)
    with pytest.raises(ClassTableError, match="void index 1 is the index of class 1"):
        ClassTable(("a", "b"), ((0, 0, 0), (1, 1, 1)), 1)
    with pytest.raises(ClassTableError, match="void colour"):
        ClassTable(("a", "b"), ((0, 0, 0), (1, 1, 1)), 2, void_color=(0, 0))
    with pytest.raises(ClassTableError, match="list of strings"):
        ClassTable("ab", ((0, 0, 0), (1, 1, 1)), 2)
    # lists are accepted and stored as tuples: the table stays hashable and comparable
    t = ClassTable(["a", "b"], [[0, 0, 0], np.array([1, 1, 1])], np.int64(9))
    same = ClassTable(("a", "b"), ((0, 0, 0), (1, 1, 1)), 9)
    assert t == same and hash(t) == hash(same)
    assert type(t.void_index) is int


def test_round_trips():
    for t in (CAMVID, FOUR, table_of(255), ClassTable(("x", "y"), ((1, 2, 3), (4, 5, 6)), 2, "unlabelled", (9, 9, 9))):
        fields = t.to_fields()
        assert set(fields) == {"classes", "palette", "void_index", "void_name"}
        assert len(fields["palette"]) == t.num_classes + 1 and fields["palette"][-1] == list(t.void_color)
        assert ClassTable.from_fields(**json.loads(json.dumps(fields))) == t
        back = ClassTable.from_json(t.to_json(), "x")
        assert (back.names, back.colors, back.void_index) == (t.names, t.colors, t.void_index)
    # a K-entry palette: void black
    short = ClassTable.from_fields(["a", "b"], [[1, 1, 1], [2, 2, 2]], 255)
    assert short.void_color == (0, 0, 0) and short.palette == [[1, 1, 1], [2, 2, 2], [0, 0, 0]]
    with pytest.raises(ClassTableError, match=r"^cfg.json: palette has 1 colours for 2 classes: expected 3"):
        ClassTable.from_fields(["a", "b"], [[1, 1, 1]], 255, source="cfg.json")


def test_camvid_table_is_todays_constants():
    assert CAMVID.names == camvid.CLASSES and CAMVID.num_classes == camvid.NUM_CLASSES
    assert CAMVID.void_index == camvid.VOID_INDEX and CAMVID.void_name == camvid.VOID_NAME
    assert CAMVID.palette == [list(c) for c in camvid.PALETTE]
    assert CAMVID.to_fields() == {"classes": list(camvid.CLASSES), "palette": [list(c) for c in camvid.PALETTE],
                                  "void_index": camvid.VOID_INDEX, "void_name": camvid.VOID_NAME}
    old_lut = np.zeros((256, 3), np.uint8)
    old_lut[: len(camvid.PALETTE)] = camvid.PALETTE
    assert np.array_equal(CAMVID.lut(), old_lut)
    assert CLASSES_FILE == "classes.json"


def test_lut_places_void_at_its_index():
    t = ClassTable(("a", "b"), ((10, 20, 30), (40, 50, 60)), 255, void_color=(1, 2, 3))
    lut = t.lut()
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    assert lut[0].tolist() == [10, 20, 30] and lut[1].tolist() == [40, 50, 60]
    assert lut[255].tolist() == [1, 2, 3] and not lut[2:255].any()


# ----------------------------------------------------------------------------- the label decoder


def test_decode_label_four_classes_void_255():
    ok = np.array([[0, 1, 2], [3, 255, 0]], np.uint8)
    mask, unmapped = decode_label(png(ok), "lab.png", FOUR)
    assert np.array_equal(mask, ok) and mask.dtype == np.uint8 and unmapped == 0
    assert np.array_equal(decode_index_label(png(ok), "lab.png", FOUR), ok)
    rgb_grey = np.repeat(ok[:, :, None], 3, axis=2)  # RGB with equal channels is read as indices
    assert np.array_equal(decode_label(png(rgb_grey), "lab.png", FOUR)[0], ok)
    bad = np.array([[0, 4], [254, 255]], np.uint8)
    with pytest.raises(BadInputError, match=r"s3://b/l/x.png: label values outside class indices 0..3 and void 255: 4, 254$"):
        decode_label(png(bad), "s3://b/l/x.png", FOUR)
    # the CamVid default refuses 255, the 4-class table 11
    with pytest.raises(BadInputError, match="outside 0..11: 255"):
        decode_label(png(ok), "lab.png")
    with pytest.raises(BadInputError, match="lab.png: label values outside class indices 0..3 and void 255: 11"):
        decode_label(png(np.array([[11, 0]], np.uint8)), "lab.png", FOUR)


def test_decode_label_refuses_colour_and_wide_values():
    colour = np.zeros((2, 2, 3), np.uint8)
    colour[0, 0] = (1, 2, 3)
    with pytest.raises(BadInputError, match=r"c.png: label is a colour image; expected single-channel class indices "
                                            r"class indices 0..3 and void 255"):
        decode_label(png(colour), "c.png", FOUR)
    wide = np.array([[0, 300], [255, 3]], np.uint16)
    with pytest.raises(BadInputError, match=r"w.png: label values outside .*: 300$"):
        decode_label(png(wide), "w.png", FOUR)
    many = np.arange(4, 20, dtype=np.uint8).reshape(4, 4)
    with pytest.raises(BadInputError, match=r": 4, 5, 6, 7, 8 \(and 11 more\)"):
        decode_label(png(many), "m.png", FOUR)


def test_decode_label_palette_png_read_by_index():
    ok = np.array([[0, 255], [3, 1]], np.uint8)
    pimg = Image.fromarray(ok, mode="L").convert("P")
    pimg.putpalette([v for i in range(256) for v in (i * 7 % 256, 0, 0)])
    buf = io.BytesIO()
    pimg.save(buf, format="PNG")
    assert np.array_equal(decode_label(buf.getvalue(), "p.png", FOUR)[0], ok)


def test_decode_label_with_colours():
    table = {(128, 64, 128): 0, (64, 0, 128): 1, (0, 0, 0): 255}
    rgb = np.array([[[128, 64, 128], [9, 9, 9]], [[64, 0, 128], [0, 0, 0]]], np.uint8)
    for colors in (color_lookup(table), table, tuple(table.items())):
        mask, unmapped = decode_label(png(rgb), "x_L.png", FOUR, colors)
        assert mask.tolist() == [[0, 255], [1, 255]] and unmapped == 1
    # CamVid's original colours with the default table: unmapped -> 11
    lookup = color_lookup(camvid.parse_label_colors(camvid.format_label_colors()))
    mask, unmapped = decode_label(png(rgb), "x_L.png", colors=lookup)
    assert mask.tolist() == [[3, 11], [8, 11]] and unmapped == 1
    # colors_to_index keeps its CamVid default and takes any void
    assert colors_to_index(rgb, color_lookup(table))[0].tolist() == [[0, 11], [1, 255]]
    assert colors_to_index(rgb, color_lookup(table), 200)[0].tolist() == [[0, 200], [1, 255]]
    # a colour table that maps to a value that is neither a class nor void is a setup error
    with pytest.raises(ValueError, match="maps to 7, which is neither a class nor void"):
        decode_label(png(rgb), "x_L.png", FOUR, {(1, 1, 1): 7})
    with pytest.raises(BadInputError, match="x_L.png: not a readable image"):
        decode_label(b"junk", "x_L.png", FOUR, table)


def test_colorize_with_a_table_and_a_palette():
    mask = np.array([[0, 3], [255, 4]], np.uint8)
    t = ClassTable(FOUR.names, FOUR.colors, 255, void_color=(5, 5, 5))
    out = colorize(mask, t)
    assert out[0, 0].tolist() == [128, 64, 128] and out[0, 1].tolist() == [128, 128, 128]
    assert out[1, 0].tolist() == [5, 5, 5] and out[1, 1].tolist() == [0, 0, 0]
    # a palette list: value i gets palette[i] (the old behaviour), so void 255 stays black
    assert colorize(mask, t.palette)[1, 0].tolist() == [0, 0, 0]
    assert np.array_equal(colorize(mask), colorize(mask, camvid.PALETTE))


# ----------------------------------------------------------------------------- layout


def segnet_source(root: Path, classes: bytes | None) -> None:
    for rel in ("train/a.png", "trainannot/a.png", "val/b.png", "valannot/b.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    if classes is not None:
        (root / CLASSES_FILE).write_bytes(classes)


def test_layout_reads_classes_json(tmp_path):
    segnet_source(tmp_path, FOUR.to_json().encode())
    layout = detect(str(tmp_path))
    assert layout.kind == SEGNET and layout.classes == FOUR
    assert layout.ignored_files == 0 and len(layout.pairs) == 2


def test_layout_without_classes_json_is_camvid(tmp_path):
    segnet_source(tmp_path, None)
    assert detect(str(tmp_path)).classes == CAMVID


def test_layout_bad_classes_json_names_it(tmp_path):
    segnet_source(tmp_path, doc(4, void=2).encode())
    with pytest.raises(LayoutError, match=rf"^{re.escape(str(tmp_path / CLASSES_FILE))}: void index 2 is the index"):
        detect(str(tmp_path))
    (tmp_path / CLASSES_FILE).write_bytes(b"{not json")
    with pytest.raises(LayoutError, match=rf"^{re.escape(str(tmp_path / CLASSES_FILE))}: not valid JSON"):
        detect(str(tmp_path))


def test_original_layout_refuses_classes_json(tmp_path):
    for rel in ("a.png", "a_L.png", CLASSES_FILE):
        (tmp_path / rel).write_bytes(b"x")
    with pytest.raises(LayoutError, match=r"classes.json: classes.json is read only in the SegNet layout"):
        detect(str(tmp_path))


# ----------------------------------------------------------------------------- metrics, report, pictures


@pytest.mark.parametrize("k", [2, 40, 255])
def test_metrics_for_any_k_with_void_255(k):
    rng = np.random.default_rng(k)
    target = rng.choice([*range(k), 255], size=(3, 9, 11)).astype(np.uint8)
    pred = rng.integers(0, k, size=target.shape).astype(np.uint8)
    cm = confusion_matrix_np(target, pred, num_classes=k)  # no ignore_index: void is outside 0..k-1
    assert cm.shape == (k, k) and cm.sum() == (target != 255).sum()
    assert np.array_equal(confusion_matrix_np(target, pred, k, 255), cm)
    import torch

    assert np.array_equal(confusion_matrix(torch.from_numpy(target), torch.from_numpy(pred), k).numpy(), cm)
    table = table_of(k)
    summary = summarize(cm, table)
    assert list(summary["iou"]) == list(table.names) and summary["pixels"] == int(cm.sum())


def test_class_11_counts_when_it_is_a_class():
    # CamVid's void 11 is an ordinary class of a 40-class table.
    target = np.array([11, 11, 255], np.uint8)
    cm = confusion_matrix_np(target, np.array([11, 3, 0], np.uint8), num_classes=40)
    assert cm[11, 11] == 1 and cm[11, 3] == 1 and cm.sum() == 2


@pytest.mark.parametrize("k", [2, 40, 255])
def test_confusion_image_and_iou_table_for_any_k(k):
    table = table_of(k)
    cm = np.diag(np.arange(1, k + 1)).astype(np.int64)
    cm[0, k - 1] = 5
    img = confusion_image(cm, list(table.names))
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[0] <= 1300 and img.shape[1] >= img.shape[0]
    assert np.array_equal(confusion_image(cm, table), img)
    html = iou_table(cm, table)
    assert html.count("<tr>") == k + 1 and "class0" in html and f"class{k - 1}" in html
    assert iou_table(cm, list(table.names), table.palette) == html
    with pytest.raises(ValueError, match="confusion matrix"):
        confusion_image(cm[:1, :1], table)
    with pytest.raises(ValueError, match="confusion matrix"):
        iou_table(cm[:1, :1], table)
    assert np.allclose(iou_per_class(cm)[1:k - 1], 1.0)


def test_overlay_leaves_void_of_the_table_alone():
    image = np.full((2, 2, 3), 100, np.uint8)
    mask = np.array([[0, 255], [1, 11]], np.uint8)
    table = ClassTable(("a", "b"), ((200, 0, 0), (0, 200, 0)), 255)
    out = overlay(image, mask, palette=table)
    assert out[0, 1].tolist() == [100, 100, 100]  # void 255: the image as is
    assert out[0, 0].tolist() == [150, 50, 50] and out[1, 1].tolist() == [50, 50, 50]  # 11: no colour (black)
    # a palette list with void last (dataset.json's palette) and CamVid's void
    camvid_mask = np.array([[0, 11]], np.uint8)
    assert overlay(image[:1], camvid_mask, palette=list(camvid.PALETTE))[0, 1].tolist() == [100, 100, 100]
    with pytest.raises(TypeError, match="classes"):
        overlay(image, mask)
    with pytest.raises(TypeError, match="palette"):
        side_by_side(image, mask)
    assert side_by_side(image, mask, palette=table).shape == (2, 2 + 4 + 2, 3)


def test_write_report_with_40_classes_and_void_255(tmp_path):
    table = table_of(40)
    rng = np.random.default_rng(3)
    label = rng.choice([*range(40), 255], size=(12, 16)).astype(np.uint8)
    pred = rng.integers(0, 40, size=(12, 16)).astype(np.uint8)
    cm = confusion_matrix_np(label, pred, num_classes=40)
    image = rng.integers(0, 255, size=(12, 16, 3), dtype=np.uint8)
    uri = write_report(str(tmp_path), title="forty", cm=cm, examples=[Example("f", image, pred, label, 0.5)],
                       classes=table)
    page = Path(uri).read_text()
    assert "class39" in page and "class0" in page and (tmp_path / "confusion.png").exists()
    assert (tmp_path / "frame_000.png").exists()
    # the fields of dataset.json work as well, and the CamVid call evaluate makes today
    fields = table.to_fields()
    write_report(str(tmp_path / "b"), title="b", cm=cm, class_names=fields["classes"], palette=fields["palette"],
                 void_index=fields["void_index"])
    write_report(str(tmp_path / "c"), title="c", cm=np.eye(11, dtype=np.int64), class_names=camvid.CLASSES,
                 palette=camvid.PALETTE)
    with pytest.raises(TypeError, match="needs the classes"):
        write_report(str(tmp_path / "d"), title="d", cm=cm)
    with pytest.raises(ValueError, match=r"confusion matrix of shape \(40, 40\) for 11 classes"):
        write_report(str(tmp_path / "e"), title="e", cm=cm, classes=CAMVID)

import io

import numpy as np
import pytest
from PIL import Image

from segray.camvid import ORIGINAL_COLORS, ORIGINAL_TO_11, PALETTE, VOID_INDEX, parse_label_colors, format_label_colors
from segray.preprocess import (
    BadInputError,
    color_lookup,
    colors_to_index,
    colorize,
    decode_image,
    decode_index_label,
    parse_size,
    resize_image,
    resize_label,
)


def png(arr, mode=None, fmt="PNG"):
    buf = io.BytesIO()
    img = Image.fromarray(arr) if mode is None else Image.fromarray(arr, mode=mode)
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_parse_size():
    assert parse_size("176x240") == (176, 240)
    for bad in ("176", "axb", "0x10", "-1x5"):
        with pytest.raises(ValueError, match="HxW|positive"):
            parse_size(bad)


def test_resize_label_keeps_only_source_values():
    rng = np.random.default_rng(0)
    mask = rng.choice([0, 3, 7, 11], size=(37, 53)).astype(np.uint8)
    for size in [(16, 24), (80, 100), (37, 53), (5, 200)]:
        out = resize_label(mask, size)
        assert out.shape == size and out.dtype == np.uint8
        assert set(np.unique(out)) <= {0, 3, 7, 11}


def test_resize_image_antialiases():
    # A fine checkerboard shrunk 4x must average out, not alias into stripes.
    board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    img = np.repeat(board[:, :, None], 3, axis=2)
    out = resize_image(img, (16, 16))
    assert out.shape == (16, 16, 3)
    assert abs(float(out.mean()) - 127.5) < 10 and out.std() < 20


def test_decode_odd_images():
    rgb = np.random.default_rng(1).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    assert np.array_equal(decode_image(png(rgb)), rgb)
    gray = rgb[:, :, 0]
    out = decode_image(png(gray))
    assert out.shape == (10, 12, 3) and np.array_equal(out[:, :, 1], gray)
    rgba = np.concatenate([rgb, np.full((10, 12, 1), 255, np.uint8)], axis=2)
    assert np.array_equal(decode_image(png(rgba)), rgb)
    deep = (gray.astype(np.uint16) * 257)
    out16 = decode_image(png(deep))
    assert out16.shape == (10, 12, 3) and np.array_equal(out16[:, :, 0], gray)
    pal = Image.fromarray(rgb).quantize(8)
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    assert decode_image(buf.getvalue()).shape == (10, 12, 3)
    assert decode_image(png(rgb, fmt="JPEG")).shape == (10, 12, 3)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "empty file"),
        (b"this is text, not a png", "not a readable image"),
        (None, "not a readable image"),  # truncated PNG, filled below
    ],
)
def test_decode_bad_files_name_the_file(data, match):
    if data is None:
        data = png(np.zeros((50, 50, 3), np.uint8) + 7)[:60]
    with pytest.raises(BadInputError, match=match) as e:
        decode_image(data, "s3://b/x/frame.png")
    assert "s3://b/x/frame.png" in str(e.value)


def test_decompression_bomb_refused():
    img = Image.new("1", (20000, 20000))  # 400 Mpx, tiny as a 1-bit PNG
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    with pytest.raises(BadInputError, match="bomb|limit"):
        decode_image(buf.getvalue(), "bomb.png")


def test_index_label_checks_values():
    ok = np.array([[0, 11], [5, 10]], np.uint8)
    assert np.array_equal(decode_index_label(png(ok)), ok)
    with pytest.raises(BadInputError, match="outside 0..11: 12, 255"):
        decode_index_label(png(np.array([[0, 12], [255, 3]], np.uint8)), "lab.png")
    # palette PNGs are read by index, not colour
    pimg = Image.fromarray(ok, mode="L").convert("P")
    pimg.putpalette([v for i in range(256) for v in (i * 3 % 256, 0, 0)])
    buf = io.BytesIO()
    pimg.save(buf, format="PNG")
    assert np.array_equal(decode_index_label(buf.getvalue()), ok)


def test_colour_mapping_against_official_palette():
    table = parse_label_colors(format_label_colors())
    assert len(table) == 32
    # hand-checked entries of the official label_colors.txt
    assert table[(64, 0, 128)] == 8  # Car
    assert table[(64, 128, 192)] == 8  # SUVPickupTruck -> Car
    assert table[(0, 0, 192)] == 4  # Sidewalk -> Pavement
    assert table[(192, 192, 128)] == 2  # Column_Pole -> Pole
    assert table[(0, 128, 192)] == 10  # Bicyclist
    assert table[(0, 0, 0)] == VOID_INDEX
    assert sorted(set(ORIGINAL_TO_11.values())) == list(range(12))
    rgb = np.array([[[64, 0, 128], [1, 2, 3]], [[128, 128, 128], [0, 0, 192]]], np.uint8)
    idx, unmapped = colors_to_index(rgb, color_lookup(table))
    assert idx.tolist() == [[8, VOID_INDEX], [0, 4]] and unmapped == 1


def test_label_colors_errors_name_the_line():
    with pytest.raises(ValueError, match=r"colors.txt:2: unknown CamVid class 'Dragon'"):
        parse_label_colors("0 0 0\tVoid\n1 2 3\tDragon\n", source="colors.txt")
    with pytest.raises(ValueError, match=r":1: expected 'R G B Name'"):
        parse_label_colors("red Void\n")


def test_colorize_uses_palette():
    mask = np.array([[0, 11], [8, 3]], np.uint8)
    out = colorize(mask)
    assert out[0, 0].tolist() == list(PALETTE[0]) and out[0, 1].tolist() == [0, 0, 0]
    assert out[1, 0].tolist() == list(PALETTE[8])
    assert len(ORIGINAL_COLORS) == 32

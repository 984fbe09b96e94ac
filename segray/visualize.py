"""Pictures for people: mask overlays, a confusion-matrix heat map, SVG training curves.

Pure functions on numpy arrays (``(H, W, 3) uint8`` images, ``(H, W) uint8`` masks); no
plotting library is needed, so the report renders wherever segray runs. The classes are always
the caller's (a :class:`segray.classes.ClassTable`): nothing here assumes CamVid's.
"""

from __future__ import annotations

import html
import math

import numpy as np
from PIL import Image, ImageDraw

from segray.classes import ClassTable
from segray.preprocess import colorize


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    alpha: float = 0.5,
    palette: ClassTable | list | tuple | None = None,
    void_index: int | None = None,
) -> np.ndarray:
    """Blend the colourised ``mask`` over ``image``; void pixels keep the image as is.

    ``palette``: the ClassTable of the mask (its colours and void index), or a palette list
    (``palette[i]`` colours value ``i``) with ``void_index`` (default: the last entry, as in the
    ``palette`` field of dataset.json: K class colours, then void)."""
    if palette is None:
        raise TypeError("overlay needs the mask's classes: pass palette=<ClassTable> (or a palette list)")
    if isinstance(palette, ClassTable):
        void = palette.void_index if void_index is None else void_index
    else:
        void = len(palette) - 1 if void_index is None else void_index
    if image.shape[:2] != mask.shape:
        image = np.asarray(Image.fromarray(image).resize((mask.shape[1], mask.shape[0]), Image.Resampling.BILINEAR))
    colours = colorize(mask, palette).astype(np.float32)
    out = image.astype(np.float32) * (1 - alpha) + colours * alpha
    keep = mask == void
    out[keep] = image[keep]
    return out.round().clip(0, 255).astype(np.uint8)


def side_by_side(*panels: np.ndarray, gap: int = 4, palette: ClassTable | list | tuple | None = None) -> np.ndarray:
    """Concatenate ``(H, W, 3)`` panels of equal height left to right with white gaps.

    A 2-D panel is a mask, colourised with ``palette`` (a ClassTable or a palette list), which
    must then be given."""
    h = max(p.shape[0] for p in panels)
    parts = []
    for i, p in enumerate(panels):
        if p.ndim == 2:
            if palette is None:
                raise TypeError("side_by_side got a mask panel: pass palette=<ClassTable> to colour it")
            p = colorize(p, palette)
        if p.shape[0] != h:
            p = np.asarray(Image.fromarray(p).resize((round(p.shape[1] * h / p.shape[0]), h)))
        parts.append(p)
        if i < len(panels) - 1:
            parts.append(np.full((h, gap, 3), 255, np.uint8))
    return np.concatenate(parts, axis=1)


def confusion_image(cm: np.ndarray, names, cell: int | None = None) -> np.ndarray:
    """Row-normalised confusion matrix (true rows, predicted columns) as an RGB heat map.

    ``names``: the K class names (or a ClassTable) of a ``(K, K)`` matrix, K from 1 to 255.
    ``cell`` (pixels a cell) defaults to 28, smaller for many classes so the picture stays about
    1200 pixels wide; rows are labelled "index name", columns by index, numbers drawn where they fit."""
    if isinstance(names, ClassTable):
        names = names.names
    names = [str(n) for n in names]
    cm = np.asarray(cm, dtype=np.float64)
    n = len(names)
    if cm.shape != (n, n):
        raise ValueError(f"{n} class names for a confusion matrix of shape {cm.shape}; expected ({n}, {n})")
    if cell is None:
        cell = max(4, min(28, 1120 // max(n, 1)))
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    margin = 90
    title = "predicted (columns) vs true (rows), % of row"
    side = margin + n * cell + 4
    img = Image.new("RGB", (max(side + 16, margin + 6 * len(title)), side), "white")
    draw = ImageDraw.Draw(img)
    numbers = cell >= 24  # room for "100" in the default font
    # Rows: "index name" where a line of text fits, else the index every few rows; columns: the
    # index, every few columns where three digits do not fit in one cell.
    row_step = 1 if cell >= 10 else math.ceil(12 / cell)
    col_step = 1 if cell >= 20 else math.ceil(24 / cell)
    for i in range(n):
        for j in range(n):
            v = norm[i, j]
            shade = int(255 * (1 - v))
            fill = (shade, shade, 255) if i != j else (shade, 255, shade)
            x0, y0 = margin + j * cell, margin + i * cell
            outline = (220, 220, 220) if cell >= 6 else None
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=fill, outline=outline)
            if numbers and v >= 0.01:
                draw.text((x0 + 3, y0 + cell // 2 - 6), f"{round(100 * v)}", fill="black" if v < 0.6 else "white")
        y = margin + i * cell + max(0, cell // 2 - 6)
        if row_step == 1:
            _text(draw, (2, y), f"{i} {names[i]}"[:15])
        elif i % row_step == 0:
            _text(draw, (2, y), str(i))
        if i % col_step == 0:
            _text(draw, (margin + i * cell + (3 if cell >= 24 else 0), margin - 14), str(i))
    draw.text((margin, 4), title, fill="black")
    return np.asarray(img)


def _text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str) -> None:
    """Draw a class name; without FreeType PIL's bitmap font knows Latin-1 only, so others become '?'."""
    try:
        draw.text(xy, text, fill="black")
    except UnicodeEncodeError:
        draw.text(xy, text.encode("latin-1", "replace").decode("latin-1"), fill="black")


def svg_lines(series: dict[str, list[float]], x: list[float], title: str, width: int = 520, height: int = 220) -> str:
    """A small SVG line chart: one polyline per named series over ``x``."""
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    values = [v for vs in series.values() for v in vs if v is not None and math.isfinite(v)]
    if not x or not values:
        return f"<p>{html.escape(title)}: no data</p>"
    lo, hi = min(values + [0.0]), max(values)
    hi = hi if hi > lo else lo + 1
    x0, x1 = min(x), max(x) if max(x) > min(x) else min(x) + 1
    pad_l, pad_b, pad_t, pad_r = 44, 26, 24, 110

    def px(xv: float, yv: float) -> tuple[float, float]:
        return (
            pad_l + (xv - x0) / (x1 - x0) * (width - pad_l - pad_r),
            pad_t + (1 - (yv - lo) / (hi - lo)) * (height - pad_t - pad_b),
        )

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="chart">',
        f'<text x="{pad_l}" y="15" font-size="13">{html.escape(title)}</text>',
        f'<line x1="{pad_l}" y1="{height - pad_b}" x2="{width - pad_r}" y2="{height - pad_b}" stroke="#888"/>',
        f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{height - pad_b}" stroke="#888"/>',
        f'<text x="2" y="{pad_t + 4}" font-size="10">{hi:.3g}</text>',
        f'<text x="2" y="{height - pad_b}" font-size="10">{lo:.3g}</text>',
        f'<text x="{pad_l}" y="{height - 8}" font-size="10">{x0:g}</text>',
        f'<text x="{width - pad_r - 20}" y="{height - 8}" font-size="10">{x1:g} (epoch)</text>',
    ]
    for k, (name, vs) in enumerate(series.items()):
        pts = [px(xv, yv) for xv, yv in zip(x, vs) if yv is not None and math.isfinite(yv)]
        colour = colours[k % len(colours)]
        path = " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        for a, b in pts:
            parts.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.5" fill="{colour}"/>')
        ly = pad_t + 14 * k + 8
        parts.append(f'<rect x="{width - pad_r + 8}" y="{ly - 8}" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{width - pad_r + 22}" y="{ly + 1}" font-size="11">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)

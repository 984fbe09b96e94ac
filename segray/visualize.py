"""Pictures for people: mask overlays, a confusion-matrix heat map, SVG training curves.

Pure functions on numpy arrays (``(H, W, 3) uint8`` images, ``(H, W) uint8`` masks); no
plotting library is needed, so the report renders wherever segray runs.
"""

from __future__ import annotations

import html
import math

import numpy as np
from PIL import Image, ImageDraw

from segray.camvid import PALETTE, VOID_INDEX
from segray.preprocess import colorize


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5, palette=PALETTE) -> np.ndarray:
    """Blend the colourised ``mask`` over ``image``; void pixels keep the image as is."""
    if image.shape[:2] != mask.shape:
        image = np.asarray(Image.fromarray(image).resize((mask.shape[1], mask.shape[0]), Image.Resampling.BILINEAR))
    colours = colorize(mask, palette).astype(np.float32)
    out = image.astype(np.float32) * (1 - alpha) + colours * alpha
    keep = mask == VOID_INDEX
    out[keep] = image[keep]
    return out.round().clip(0, 255).astype(np.uint8)


def side_by_side(*panels: np.ndarray, gap: int = 4) -> np.ndarray:
    """Concatenate ``(H, W, 3)`` panels of equal height left to right with white gaps."""
    h = max(p.shape[0] for p in panels)
    parts = []
    for i, p in enumerate(panels):
        if p.ndim == 2:
            p = colorize(p)
        if p.shape[0] != h:
            p = np.asarray(Image.fromarray(p).resize((round(p.shape[1] * h / p.shape[0]), h)))
        parts.append(p)
        if i < len(panels) - 1:
            parts.append(np.full((h, gap, 3), 255, np.uint8))
    return np.concatenate(parts, axis=1)


def confusion_image(cm: np.ndarray, names: list[str], cell: int = 28) -> np.ndarray:
    """Row-normalised confusion matrix (true rows, predicted columns) as an RGB heat map."""
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(names)
    margin = 90
    img = Image.new("RGB", (margin + n * cell + 4, margin + n * cell + 4), "white")
    draw = ImageDraw.Draw(img)
    for i in range(n):
        for j in range(n):
            v = norm[i, j]
            shade = int(255 * (1 - v))
            fill = (shade, shade, 255) if i != j else (shade, 255, shade)
            x0, y0 = margin + j * cell, margin + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=fill, outline=(220, 220, 220))
            if v >= 0.01:
                draw.text((x0 + 3, y0 + 8), f"{round(100 * v)}", fill="black" if v < 0.6 else "white")
        draw.text((2, margin + i * cell + 8), names[i][:14], fill="black")
        # column labels: first letters, stacked, to stay inside the picture
        draw.text((margin + i * cell + 3, margin - 14), names[i][:3], fill="black")
    draw.text((margin, 4), "predicted (columns) vs true (rows), % of row", fill="black")
    return np.asarray(img)


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

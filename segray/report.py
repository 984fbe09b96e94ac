"""An HTML report people look at: metrics, per-class IoU, confusion matrix, training curves
and frames with their predicted masks. Written as ``index.html`` plus PNGs to any URI, so it
opens in a browser from a local folder or from object storage. The classes (names, colours,
void) are the caller's: a :class:`segray.classes.ClassTable`, or its names and palette."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from segray import storage
from segray.classes import ClassTable
from segray.metrics import iou_per_class, mean_iou, pixel_accuracy
from segray.preprocess import encode_png
from segray.visualize import confusion_image, overlay, side_by_side, svg_lines

REPORT_FILE = "index.html"
# Marks a page as segray's: evaluate rewrites a --dest only when it holds such a page (or nothing).
GENERATOR_TAG = "<meta name='generator' content='segray report'>"


@dataclass(frozen=True)
class Example:
    """One frame for the report: ``image (H, W, 3) uint8``, masks ``(H, W) uint8``."""

    name: str
    image: np.ndarray
    pred: np.ndarray
    label: np.ndarray | None = None
    score: float | None = None  # e.g. the frame's pixel accuracy


def _fmt(v: float | None, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _swatch(rgb) -> str:
    r, g, b = rgb
    return f'<span class="sw" style="background:rgb({r},{g},{b})"></span>'


def _table(class_names, palette, void_index: int | None = None) -> ClassTable:
    """The report's ClassTable: given as such, or built from names and a palette (K class colours,
    optionally then void; void index ``void_index``, default K)."""
    if isinstance(class_names, ClassTable):
        return class_names
    if isinstance(palette, ClassTable):
        if class_names is not None and tuple(class_names) != palette.names:
            raise ValueError(f"class names {list(class_names)} are not those of the palette's table {list(palette.names)}")
        return palette
    if class_names is None or palette is None:
        raise TypeError("the report needs the classes: pass classes=<ClassTable>, or class_names= and palette=")
    k = len(class_names)
    return ClassTable.from_fields(class_names, palette, k if void_index is None else void_index)


def _check_cm(cm: np.ndarray, table: ClassTable) -> np.ndarray:
    cm = np.asarray(cm)
    k = table.num_classes
    if cm.shape != (k, k):
        raise ValueError(f"confusion matrix of shape {cm.shape} for {k} classes; expected ({k}, {k})")
    return cm


def iou_table(cm: np.ndarray, class_names: Sequence[str] | ClassTable, palette=None) -> str:
    """HTML table of per-class IoU and true pixels. ``class_names``: a ClassTable, or the K names
    with ``palette`` (a ClassTable or K or K+1 colours)."""
    table = _table(class_names, palette)
    cm = _check_cm(cm, table)
    ious = iou_per_class(cm)
    support = cm.sum(axis=1)
    rows = [
        f"<tr><td>{_swatch(c)} {html.escape(n)}</td><td>{_fmt(float(iou))}</td><td>{int(s):,}</td></tr>"
        for n, c, iou, s in zip(table.names, table.colors, ious, support)
    ]
    rows.append(f"<tr class='total'><td>mean IoU</td><td>{_fmt(mean_iou(cm))}</td><td>{int(support.sum()):,}</td></tr>")
    return "<table><tr><th>class</th><th>IoU</th><th>true pixels</th></tr>" + "".join(rows) + "</table>"


def history_charts(history: list[dict]) -> str:
    if not history:
        return "<p>No training history.</p>"
    epochs = [h.get("epoch") for h in history]
    losses = {k: [h.get(k) for h in history] for k in ("train_loss", "val_loss") if any(k in h for h in history)}
    scores = {k: [h.get(k) for h in history] for k in ("val_miou", "val_pixel_accuracy") if any(k in h for h in history)}
    return svg_lines(losses, epochs, "loss") + svg_lines(scores, epochs, "validation")


def write_report(
    dest: str,
    *,
    title: str,
    cm: np.ndarray | None,
    history: list[dict] | None = None,
    examples: list[Example] = (),
    facts: dict[str, str] | None = None,
    sections: list[tuple[str, str]] = (),
    class_names: Sequence[str] | None = None,
    palette=None,
    classes: ClassTable | None = None,
    void_index: int | None = None,
) -> str:
    """Write ``<dest>/index.html`` and its PNGs; returns the page's URI.

    ``cm`` is the summed confusion matrix ``(K, K)`` the numbers come from; ``sections`` are
    extra ``(heading, html)`` blocks. The classes: ``classes`` (a ClassTable), or ``class_names``
    with ``palette`` (K class colours, then void: the fields of dataset.json/config.json) and
    ``void_index`` (default K). Void pixels of the examples' masks are left uncoloured."""
    if classes is not None:
        if class_names is not None or palette is not None or void_index is not None:
            raise TypeError("pass classes=<ClassTable>, or class_names= and palette= (and void_index=), not both")
        table = classes
    else:
        table = _table(class_names, palette, void_index)
    if cm is not None:
        cm = _check_cm(cm, table)
    body = [f"<h1>{html.escape(title)}</h1>"]
    if cm is not None:
        body.append(
            f"<p class='big'>mIoU <b>{_fmt(mean_iou(cm))}</b> · pixel accuracy <b>{_fmt(pixel_accuracy(cm))}</b>"
            f" · {int(np.asarray(cm).sum()):,} labelled pixels</p>"
        )
    if facts:
        cells = (f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
        body.append("<table>" + "".join(cells) + "</table>")
    if history:
        body.append("<h2>Training</h2>" + history_charts(history))
    if cm is not None:
        storage.write_bytes(storage.join(dest, "confusion.png"), encode_png(confusion_image(cm, list(table.names))))
        body.append("<h2>Per-class IoU</h2><div class='row'>" + iou_table(cm, table))
        body.append("<img src='confusion.png' alt='confusion matrix'></div>")
    for heading, block in sections:
        body.append(f"<h2>{html.escape(heading)}</h2>{block}")
    if examples:
        body.append("<h2>Frames</h2><p>frame · prediction overlaid · label overlaid (where known)</p>")
        for i, ex in enumerate(examples):
            panels = [ex.image, overlay(ex.image, ex.pred, palette=table)]
            if ex.label is not None:
                panels.append(overlay(ex.image, ex.label, palette=table))
            name = f"frame_{i:03d}.png"
            storage.write_bytes(storage.join(dest, name), encode_png(side_by_side(*panels)))
            score = f" — pixel accuracy {_fmt(ex.score)}" if ex.score is not None else ""
            caption = f"<figcaption>{html.escape(ex.name)}{score}</figcaption>"
            body.append(f"<figure><img src='{name}' alt='{html.escape(ex.name)}'>{caption}</figure>")
        legend = " ".join(f"{_swatch(c)}{html.escape(n)}" for n, c in zip(table.names, table.colors))
        body.append(f"<p class='legend'>{legend}</p>")
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'>{GENERATOR_TAG}"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:24px;max-width:1200px}"
        "table{border-collapse:collapse;margin:8px 16px 8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        ".sw{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle;border:1px solid #999}"
        ".row{display:flex;align-items:flex-start;flex-wrap:wrap}.big{font-size:1.3em}.total{font-weight:bold}"
        "figure{margin:8px 0}img{max-width:100%}.chart{margin-right:12px}.legend{line-height:1.8}"
        "</style></head><body>" + "\n".join(body) + "</body></html>\n"
    )
    uri = storage.join(dest, REPORT_FILE)
    storage.write_bytes(uri, page.encode())
    return uri

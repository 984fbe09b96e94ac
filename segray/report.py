"""An HTML report worth sharing: the run's facts, mIoU, pixel accuracy, mean class accuracy, mean
Dice and frequency-weighted IoU, per-class IoU, accuracy and Dice, the confusion matrix, training
curves, the best and worst frames with their error maps, and any extra sections (evaluate adds
small objects by size).

Written as one self-contained ``index.html`` (its CSS inline) plus the charts and frames as PNG
and SVG files beside it, through segray.storage, so it opens in a browser from a local folder or
from object storage. The charts are matplotlib's (segray.visualize), imported only when a report
is written. The classes (names, colours, void) are the caller's: a
:class:`segray.classes.ClassTable`, or its names and palette."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

import segray
from segray import storage
from segray.classes import ClassTable
from segray.metrics import (
    class_accuracy,
    confusion_matrix_np,
    dice_per_class,
    frequency_weighted_iou,
    iou_per_class,
    mean_class_accuracy,
    mean_dice,
    mean_iou,
    pixel_accuracy,
)

REPORT_FILE = "index.html"
CONFUSION_FILE = "confusion.png"
TRAINING_FILE = "training.svg"
FRAME_FILE = "frame_{:03d}.png"
# Marks a page as segray's: evaluate rewrites a --dest only when it holds such a page (or nothing).
GENERATOR_TAG = "<meta name='generator' content='segray report'>"
GROUP_TITLES = {"best": "Best frames (highest pixel accuracy)", "worst": "Worst frames (lowest pixel accuracy)"}

CSS = """
:root{--fg:#1d2330;--muted:#5b6472;--line:#d9dde3;--bg:#f6f7f9;--accent:#2f6db5}
*{box-sizing:border-box}
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:var(--fg);
margin:0;background:#fff}
main{max-width:1140px;margin:0 auto;padding:20px 28px 48px}
h1{font-size:1.7em;margin:.2em 0 .1em}h2{font-size:1.3em;margin:1.8em 0 .5em;padding-bottom:.2em;
border-bottom:2px solid var(--line)}h3{font-size:1.05em;margin:1.3em 0 .4em}
.sub,.note,figcaption{color:var(--muted)}.sub{margin:0 0 .6em}
nav{font-size:.92em;margin:.4em 0 0}nav a{color:var(--accent);margin-right:14px;text-decoration:none}
.big{font-size:1.3em;margin:.6em 0}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0}
.card{background:var(--bg);border:1px solid var(--line);border-radius:8px;padding:10px 16px;min-width:150px}
.card b{display:block;font-size:1.6em}.card span{color:var(--muted);font-size:.9em}
.facts{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:4px 24px;align-items:start}
.facts table{width:100%}
table{border-collapse:collapse;margin:6px 0 12px;font-size:.93em}
td,th{border-bottom:1px solid var(--line);padding:4px 10px 4px 4px;text-align:left;vertical-align:top}
th{font-weight:600}.facts th{color:var(--muted);font-weight:500;width:34%}
caption{text-align:left;font-weight:600;padding:4px 0;font-size:1.02em}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.sw{display:inline-block;width:13px;height:13px;margin-right:6px;vertical-align:-2px;border:1px solid #888;
border-radius:2px}
.bar{height:10px;background:var(--accent);border-radius:2px;min-width:1px}.barcell{width:180px}
.total td{font-weight:600;border-top:2px solid var(--line)}
.warn{color:#a23c00;font-weight:600}
figure{margin:10px 0 22px}img{max-width:100%;height:auto}.chart{display:block;margin:6px 0}
.legend{line-height:2;font-size:.92em}.legend span.item{margin-right:14px;white-space:nowrap}
footer{margin-top:36px;color:var(--muted);font-size:.85em}
"""


@dataclass(frozen=True)
class Example:
    """One frame for the report: ``image (H, W, 3) uint8``, masks ``(H, W) uint8``; ``group``
    (e.g. ``"best"``, ``"worst"``) gathers frames under one heading."""

    name: str
    image: np.ndarray
    pred: np.ndarray
    label: np.ndarray | None = None
    score: float | None = None  # the frame's pixel accuracy
    group: str = ""


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
    """HTML table of per-class IoU (a number and a bar), class accuracy (recall), precision, Dice
    and pixels, then their means over the classes that have them.
    ``class_names``: a ClassTable, or the K names with ``palette`` (a ClassTable or K or K+1 colours)."""
    table = _table(class_names, palette)
    cm = _check_cm(cm, table)
    ious, accuracy, dice = iou_per_class(cm), class_accuracy(cm), dice_per_class(cm)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    rows = []
    for c, (name, colour) in enumerate(zip(table.names, table.colors)):
        iou = float(ious[c])
        precision = cm[c, c] / predicted[c] if predicted[c] else None
        bar = f"<div class='bar' style='width:{100 * iou:.1f}%'></div>" if not math.isnan(iou) else ""
        rows.append(f"<tr><td>{_swatch(colour)}{html.escape(name)}</td><td>{_fmt(iou)}</td>"
                    f"<td class='barcell'>{bar}</td><td class='num'>{_fmt(float(accuracy[c]))}</td>"
                    f"<td class='num'>{_fmt(precision)}</td><td class='num'>{_fmt(float(dice[c]))}</td>"
                    f"<td class='num'>{int(support[c]):,}</td></tr>")
    # Class accuracy is recall: one column, named as the field reports its mean.
    rows.append(f"<tr class='total'><td>mean</td><td>{_fmt(mean_iou(cm))}</td><td></td>"
                f"<td class='num'>{_fmt(mean_class_accuracy(cm))}</td><td></td><td class='num'>{_fmt(mean_dice(cm))}</td>"
                f"<td class='num'>{int(support.sum()):,}</td></tr>")
    head = ("<tr><th>class</th><th>IoU</th><th></th><th title='labelled pixels of the class predicted as it (recall)'>"
            "class accuracy</th><th title='pixels predicted as the class that are it'>precision</th>"
            "<th title='2 × true positives / (labelled + predicted pixels): F1'>Dice</th><th>labelled pixels</th></tr>")
    return "<table class='iou'>" + head + "".join(rows) + "</table>"


def frame_scores(pred: np.ndarray, label: np.ndarray | None, table: ClassTable) -> tuple[float | None, float | None]:
    """(pixel accuracy, mIoU) of one frame, from its own confusion matrix; (None, None) without a
    label of the prediction's shape."""
    if label is None or np.shape(label) != np.shape(pred):
        return None, None
    cm = confusion_matrix_np(label, pred, table.num_classes, table.void_index)
    acc, miou = pixel_accuracy(cm), mean_iou(cm)
    return (None if math.isnan(acc) else acc), (None if math.isnan(miou) else miou)


def _facts_html(facts: Mapping) -> str:
    """Facts as tables: ``{heading: {name: value}}`` (one table a heading) or ``{name: value}``."""
    groups = facts.items() if all(isinstance(v, Mapping) for v in facts.values()) else [("", facts)]
    out = []
    for heading, items in groups:
        if not items:
            continue
        cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                        for k, v in items.items())
        caption = f"<caption>{html.escape(str(heading))}</caption>" if heading else ""
        out.append(f"<table>{caption}{cells}</table>")
    return "<div class='facts'>" + "".join(out) + "</div>"


def _class_legend(table: ClassTable, errors: bool) -> str:
    items = [f"<span class='item'>{_swatch(c)}{html.escape(n)}</span>" for n, c in zip(table.names, table.colors)]
    if errors:
        from segray.visualize import ERROR_COLOR, UNSCORED_COLOR

        items.append(f"<span class='item'>{_swatch(ERROR_COLOR)}error map: predicted wrong</span>")
        items.append(f"<span class='item'>{_swatch(UNSCORED_COLOR)}error map: {html.escape(table.void_name)} (not scored)"
                     "</span>")
    return "<p class='legend'>" + " ".join(items) + "</p>"


def _frames(dest: str, examples: Sequence[Example], table: ClassTable) -> str:
    """The frames' figures (one PNG each, labelled inside and below), under their groups' headings."""
    from segray.visualize import figure_bytes, frame_figure

    out = [_class_legend(table, any(ex.label is not None for ex in examples))]
    seen: dict[str, int] = {}
    for i, ex in enumerate(examples):
        if ex.group not in seen:
            if ex.group or seen:
                out.append(f"<h3>{html.escape(GROUP_TITLES.get(ex.group, ex.group or 'Other frames'))}</h3>")
            seen[ex.group] = 0
        seen[ex.group] += 1
        acc, miou = frame_scores(ex.pred, ex.label, table)
        acc = ex.score if ex.score is not None else acc
        scores = " · ".join(s for s in (f"pixel accuracy {_fmt(acc)}" if acc is not None else "",
                                         f"mIoU {_fmt(miou)}" if miou is not None else "") if s)
        rank = f"{ex.group} #{seen[ex.group]}" if ex.group else f"#{i + 1}"
        title = f"{ex.name} ({rank})" + (f": {scores}" if scores else "")
        name = FRAME_FILE.format(i)
        storage.write_bytes(storage.join(dest, name), figure_bytes(frame_figure(ex.image, ex.pred, ex.label, table, title)))
        caption = (f"<figcaption><b>{html.escape(rank.capitalize())}</b> · {html.escape(ex.name)}"
                   + (f" · {scores}" if scores else "") + "</figcaption>")
        out.append(f"<figure><img src='{name}' alt='{html.escape(ex.name)}: frame, label, prediction and "
                   f"errors'>{caption}</figure>")
    return "".join(out)


def write_report(
    dest: str,
    *,
    title: str,
    cm: np.ndarray | None,
    history: list[dict] | None = None,
    examples: Sequence[Example] = (),
    facts: Mapping | None = None,
    sections: Sequence[tuple[str, str]] = (),
    class_names: Sequence[str] | None = None,
    palette=None,
    classes: ClassTable | None = None,
    void_index: int | None = None,
    best_epoch: int | None = None,
) -> str:
    """Write ``<dest>/index.html`` with its charts and frames; returns the page's URI.

    ``cm`` is the summed confusion matrix ``(K, K)`` the numbers come from. ``facts``: what the
    run is (model, training, data, software), ``{heading: {name: value}}`` or ``{name: value}``;
    ``history``: metrics.json's epochs (``best_epoch`` marked); ``sections``: extra
    ``(heading, html)`` blocks at the end. The classes: ``classes`` (a ClassTable), or
    ``class_names`` with ``palette`` (K class colours, then void: the fields of
    dataset.json/config.json) and ``void_index`` (default K). Void pixels of the examples'
    masks are left uncoloured."""
    if classes is not None:
        if class_names is not None or palette is not None or void_index is not None:
            raise TypeError("pass classes=<ClassTable>, or class_names= and palette= (and void_index=), not both")
        table = classes
    else:
        table = _table(class_names, palette, void_index)
    if cm is not None:
        cm = _check_cm(cm, table)
    from segray.visualize import confusion_figure, figure_bytes, training_figure

    parts: list[tuple[str, str, str]] = []  # (id, heading, html)
    summary = []
    if cm is not None:
        summary.append(
            f"<p class='big'>mIoU <b>{_fmt(mean_iou(cm))}</b> · pixel accuracy <b>{_fmt(pixel_accuracy(cm))}</b>"
            f" · mean class accuracy <b>{_fmt(mean_class_accuracy(cm))}</b> · mean Dice <b>{_fmt(mean_dice(cm))}</b>"
            f" · fwIoU <b>{_fmt(frequency_weighted_iou(cm))}</b> · {int(np.asarray(cm).sum()):,} labelled pixels</p>"
        )
    if facts:
        summary.append(_facts_html(facts))
    parts.append(("summary", "Summary", "".join(summary) or "<p class='note'>No metrics.</p>"))
    if cm is not None:
        parts.append(("iou", "Per-class IoU", iou_table(cm, table) +
                      "<p class='note'>IoU = true positives / (labelled + predicted − true positives) per class; class "
                      "accuracy (recall) = true positives / labelled; Dice = 2 × true positives / (labelled + predicted); "
                      "precision from the same matrix; void pixels count nowhere. A class absent from the labels has no "
                      "accuracy (–), one absent from labels and predictions no IoU or Dice; means are over the classes "
                      "with a value. fwIoU weighs each class's IoU by its share of the labelled pixels.</p>"))
        storage.write_bytes(storage.join(dest, CONFUSION_FILE), figure_bytes(confusion_figure(cm, table)))
        absent = int((cm.sum(axis=1) == 0).sum())
        note = f" Grey rows: {absent} classes absent from the labels." if absent else ""
        parts.append(("confusion", "Confusion matrix",
                      f"<img class='chart' src='{CONFUSION_FILE}' alt='confusion matrix, row-normalised'>"
                      f"<p class='note'>Row i, column j: the share of class i's labelled pixels predicted as "
                      f"class j; the diagonal is each class's accuracy (recall).{note}</p>"))
    fig = training_figure(history, best_epoch) if history else None
    if fig is not None:
        storage.write_bytes(storage.join(dest, TRAINING_FILE), figure_bytes(fig, "svg"))
        block = f"<img class='chart' src='{TRAINING_FILE}' alt='training curves: loss, validation scores, learning rate'>"
    else:
        block = "<p class='note'>No training history (pass the training run to show its curves).</p>"
    parts.append(("training", "Training curves", block))
    if examples:
        parts.append(("frames", "Best and worst frames", _frames(dest, examples, table)))
    for i, (heading, extra) in enumerate(sections):
        parts.append((f"extra{i}", heading, extra))

    written = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f"<a href='#{sid}'>{html.escape(heading)}</a>" for sid, heading, _ in parts)
    body = "\n".join(f"<section id='{sid}'><h2>{html.escape(heading)}</h2>{block}</section>" for sid, heading, block in parts)
    page = (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'>{GENERATOR_TAG}"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body><main>"
        f"<header><h1>{html.escape(title)}</h1><p class='sub'>Semantic segmentation report · "
        f"{table.num_classes} classes · written {written}</p><nav>{nav}</nav></header>\n{body}\n"
        f"<footer>Written by segray {html.escape(segray.__version__)} on {written}.</footer>"
        "</main></body></html>\n"
    )
    uri = storage.join(dest, REPORT_FILE)
    storage.write_bytes(uri, page.encode())
    return uri

"""The report of a model on labelled frames, built from the infer stage's outputs.

Reads ``<output>/predictions/`` (confusion counts, pixel accuracy, mask PNGs) and
``<output>/metrics.parquet``; with a training run, also its ``metrics.json`` curves. Writes an
HTML page with PNGs (segray.report) anywhere a URI points. Every number on the page comes
from the same summed confusion matrix that ``metrics.parquet`` was computed from.
"""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from segray import sources, storage, video
from segray.classes import CAMVID, ClassTable
from segray.errors import SegrayError
from segray.layout import label_color_table
from segray.predictions import (
    COL_ACCURACY,
    COL_LABEL_URI,
    COL_MASK,
    COL_URI,
    METRICS_FILE,
    PREDICTIONS_DIR,
    read_confusion,
    read_record,
    read_table,
)
from segray.preprocess import decode_image, decode_label
from segray.report import GENERATOR_TAG, REPORT_FILE, Example, write_report

# Small, often occluded classes whose IoU hides how many objects are missed (the CamVid weak spot);
# for another class table, the SMALL_CLASS_COUNT classes with the fewest labelled pixels.
SMALL_CLASSES: tuple[int, ...] = (2, 6, 9, 10)  # Pole, SignSymbol, Pedestrian, Bicyclist
SMALL_CLASS_COUNT = 4
SIZE_BUCKETS: tuple[tuple[str, int, int], ...] = (
    ("< 64 px", 0, 64),
    ("64-255 px", 64, 256),
    ("256-1023 px", 256, 1024),
    ("≥ 1024 px", 1024, 1 << 62),
)


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean ``(H, W)`` mask -> ``(labels int32, count)``.

    Label propagation with pointer jumping: every pixel starts with its own index + 1, takes
    the smallest label among its neighbours, then jumps to the label of the pixel its label
    names (always a pixel of the same component), which halves long chains such as poles
    each round. numpy only; no SciPy dependency for one function."""
    h, w = mask.shape
    flat_mask = mask.ravel()
    labels = np.where(mask, np.arange(1, h * w + 1, dtype=np.int64).reshape(h, w), 0)
    big = np.iinfo(np.int64).max
    while True:
        cur = np.where(mask, labels, big)
        nxt = cur.copy()
        nxt[1:, :] = np.minimum(nxt[1:, :], cur[:-1, :])
        nxt[:-1, :] = np.minimum(nxt[:-1, :], cur[1:, :])
        nxt[:, 1:] = np.minimum(nxt[:, 1:], cur[:, :-1])
        nxt[:, :-1] = np.minimum(nxt[:, :-1], cur[:, 1:])
        nxt = np.where(mask, nxt, 0)
        flat = nxt.ravel()
        for _ in range(4):
            flat[flat_mask] = flat[flat[flat_mask] - 1]
        if np.array_equal(nxt, labels):
            break
        labels = nxt
    uniq, inverse = np.unique(labels, return_inverse=True)
    out = inverse.reshape(h, w).astype(np.int32)  # 0 stays background since it sorts first
    return out, len(uniq) - 1 if uniq[0] == 0 else len(uniq)


def small_object_stats(pairs: list[tuple[np.ndarray, np.ndarray]], classes=SMALL_CLASSES) -> dict:
    """Per small class and object-size bucket: objects, their pixels, pixels found, objects found.

    ``pairs`` are ``(label, prediction)`` masks. An object is a 4-connected component of the
    class in the label; it is *found* when at least half its pixels are predicted as the class.
    The bucket's IoU counts its objects' pixels as truth and the class's predicted pixels that
    touch none of the class's objects as false positives of the smallest bucket they are
    closest to — too arbitrary, so the table reports recall (pixels found / object pixels)."""
    stats = {c: {b[0]: [0, 0, 0, 0] for b in SIZE_BUCKETS} for c in classes}
    for label, pred in pairs:
        for c in classes:
            comp, n = connected_components(label == c)
            if n == 0:
                continue
            areas = np.bincount(comp.ravel(), minlength=n + 1)
            hits = np.bincount(comp.ravel(), weights=(pred == c).ravel(), minlength=n + 1)
            for k in range(1, n + 1):
                for name, lo, hi in SIZE_BUCKETS:
                    if lo <= areas[k] < hi:
                        s = stats[c][name]
                        s[0] += 1
                        s[1] += int(areas[k])
                        s[2] += int(hits[k])
                        s[3] += int(hits[k] * 2 >= areas[k])
    return stats


def small_object_table(stats: dict, class_names=CAMVID.names) -> str:
    head = "<tr><th>class</th><th>object size</th><th>objects</th><th>pixel recall</th><th>objects found (≥50% px)</th></tr>"
    rows = []
    for c, buckets in stats.items():
        for name, (objects, pixels, found_px, found) in buckets.items():
            if objects == 0:
                continue
            rows.append(
                f"<tr><td>{class_names[c]}</td><td>{name}</td><td>{objects}</td>"
                f"<td>{found_px / pixels:.3f}</td><td>{found / objects:.3f}</td></tr>"
            )
    return "<table>" + head + "".join(rows) + "</table>" if rows else "<p>No small objects in the labels.</p>"


def _load_history(run: str | None) -> list[dict]:
    if not run:
        return []
    uri = storage.join(run, "metrics.json")
    if not storage.exists(uri):
        return []
    data = json.loads(storage.read_bytes(uri))
    return data.get("history", []) if isinstance(data, dict) else []


def _read_label(row: dict, classes: ClassTable, colors: tuple) -> np.ndarray | None:
    """The frame's label with the one decoder of prepare and infer (index or colour-coded ``_L``
    PNG, by its name as the listing paired it), or None when it cannot be read now."""
    uri = row.get(COL_LABEL_URI)
    if not uri:
        return None
    kind = sources.label_key(uri.rsplit("/", 1)[-1])[1]
    try:
        return decode_label(storage.read_bytes(uri), uri, classes, colors if kind == sources.LABEL_COLOR else None)[0]
    except Exception:  # noqa: BLE001 - a label that vanished or changed since infer: left out of the pictures
        return None


def _read_example(row: dict, classes: ClassTable, colors: tuple) -> Example | None:
    frame = video.split_frame_uri(row[COL_URI])
    try:
        if frame is not None:
            image = video.read_frame(*frame)
        else:
            image = decode_image(storage.read_bytes(row[COL_URI]), row[COL_URI])
    except Exception:  # noqa: BLE001 - archive members and vanished files are left out of the pictures
        return None
    pred = np.asarray(Image.open(io.BytesIO(row[COL_MASK])))
    label = _read_label(row, classes, colors)
    return Example(row[COL_URI].rsplit("/", 1)[-1], image, pred, label, row.get(COL_ACCURACY))


def output_classes(record: dict, names: list[str]) -> ClassTable:
    """The class table of an infer output: what its ``infer.json`` (``record``) holds, else (an
    output written before it did) CamVid's when ``metrics.parquet`` names CamVid's classes, else
    the names with grey shades."""
    fields = record.get("classes")
    if isinstance(fields, dict):
        try:
            return ClassTable.from_fields(**fields)
        except (TypeError, ValueError):
            pass
    if list(names) == list(CAMVID.names):
        return CAMVID
    shades = [[int(40 + 200 * i / max(1, len(names) - 1))] * 3 for i in range(len(names))]
    return ClassTable(tuple(names), tuple(tuple(c) for c in shades), 255)


def small_classes(classes: ClassTable, cm: np.ndarray) -> tuple[int, ...]:
    """The classes of the small-object table (SMALL_CLASSES for CamVid)."""
    if classes.names == CAMVID.names:
        return SMALL_CLASSES
    present = [c for c in range(classes.num_classes) if cm[c].sum() > 0]
    return tuple(sorted(sorted(present, key=lambda c: cm[c].sum())[:SMALL_CLASS_COUNT]))


class EvaluateError(SegrayError, ValueError):
    """The report cannot be written as asked; the message names the URI and the fix."""


def check_dest(dest: str) -> None:
    """A report rewrites ``index.html``, ``confusion.png`` and ``frame_*.png`` in ``dest``: refuse a
    ``dest`` that holds files but no earlier segray report, so that nobody's page is overwritten."""
    files = storage.list_files(dest)
    if not files:
        return
    index = storage.join(dest, REPORT_FILE)
    if index not in files or GENERATOR_TAG.encode() not in storage.read_bytes(index):
        raise EvaluateError(f"--dest {dest} holds {len(files)} files (e.g. {files[0]}) and no earlier segray report; "
                            "choose an empty or new --dest")


def build_report(output: str, dest: str, run: str | None = None, title: str = "segray report",
                 examples: int = 6, small_object_frames: int = 200) -> str:
    """Write the report of infer ``output`` (with labels) to ``dest``; returns the page URI."""
    output, dest = storage.normalize(output), storage.normalize(dest)
    check_dest(dest)
    if not storage.exists(storage.join(output, METRICS_FILE)):
        raise FileNotFoundError(f"{output}: no {METRICS_FILE}; run jobs/infer.py with --labels to this output first")
    cm, names = read_confusion(output)
    record = read_record(output)
    classes = output_classes(record, names)
    colors = label_color_table(record.get("labels"))
    table = read_table(storage.join(output, PREDICTIONS_DIR), columns=[COL_URI, COL_LABEL_URI, COL_ACCURACY])
    scored = [r for r in table.to_pylist() if r[COL_ACCURACY] is not None]
    scored.sort(key=lambda r: r[COL_ACCURACY])
    half = max(1, examples // 2)
    # Best and worst frames for the pictures, and up to `small_object_frames` for the size table.
    wanted = {r[COL_URI] for r in scored[-half:] + scored[:half] + scored[:: max(1, len(scored) // small_object_frames)]}
    rows = {}
    if wanted:
        full = read_table(storage.join(output, PREDICTIONS_DIR), filters=[(COL_URI, "in", sorted(wanted))])
        rows = {r[COL_URI]: r for r in full.to_pylist()}
    picked = []
    for r in scored[-half:][::-1] + scored[:half]:
        ex = _read_example(rows[r[COL_URI]], classes, colors) if r[COL_URI] in rows else None
        if ex is not None and ex.name not in [p.name for p in picked]:
            picked.append(ex)
    pairs = []
    for r in rows.values():
        label = _read_label(r, classes, colors)
        if label is not None:
            pairs.append((label, np.asarray(Image.open(io.BytesIO(r[COL_MASK])))))
    stats = small_object_stats(pairs, small_classes(classes, cm))
    sections = [("Small objects by size", small_object_table(stats, classes.names) +
                 f"<p>Over {len(pairs)} labelled frames. Object = 4-connected region of the class in the label.</p>")]
    facts = {"predictions": output, "frames scored": f"{len(scored)}", "classes": f"{classes.num_classes}",
             "void label": f"{classes.void_index} (ignored)"}
    if run:
        facts["training run"] = run
    return write_report(dest, title=title, cm=cm, history=_load_history(run), examples=picked, facts=facts,
                        sections=sections, classes=classes)

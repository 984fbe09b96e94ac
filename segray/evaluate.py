"""The report of a model on labelled frames, built from the infer stage's outputs.

Reads ``<output>/predictions/`` (confusion counts, pixel accuracy, mask PNGs),
``<output>/metrics.parquet`` and ``<output>/infer.json`` (the model, the frames, the classes);
from the training run (``--run``, else the model infer.json names, when it is still the model
of these predictions by its sha256) its model ``config.json`` (network, input size),
``metrics.json`` (curves, settings, best epoch) and ``run.json`` (the recipe). Writes an HTML
page with its charts and frames (segray.report) anywhere a URI points. Every number on the page
comes from the same summed confusion matrix that ``metrics.parquet`` was computed from; the
facts show locations by name (object-store URIs in full), never this machine's paths.
"""

from __future__ import annotations

import dataclasses
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
from PIL import Image

from segray import modelio, sources, storage, video
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
from segray import software_versions
from segray.report import GENERATOR_TAG, REPORT_FILE, Example, write_report
from segray.runrecord import RUN_FILE as TRAIN_RUN_FILE

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


def small_object_table(stats: dict, class_names: Sequence[str] | ClassTable = CAMVID.names) -> str:
    """The small-object table of small_object_stats(); ``class_names``: the names, or a ClassTable
    (its colours then mark the classes)."""
    table = class_names if isinstance(class_names, ClassTable) else None
    names = table.names if table is not None else class_names
    head = ("<tr><th>class</th><th>object size</th><th>objects</th><th>pixel recall</th>"
            "<th>objects found (≥50% px)</th></tr>")
    rows = []
    for c, buckets in stats.items():
        swatch = ""
        if table is not None:
            r, g, b = table.colors[c]
            swatch = f'<span class="sw" style="background:rgb({r},{g},{b})"></span>'
        for name, (objects, pixels, found_px, found) in buckets.items():
            if objects == 0:
                continue
            rows.append(
                f"<tr><td>{swatch}{html.escape(names[c])}</td><td>{name}</td><td class='num'>{objects:,}</td>"
                f"<td class='num'>{found_px / pixels:.3f}</td><td class='num'>{found / objects:.3f}</td></tr>"
            )
    return "<table>" + head + "".join(rows) + "</table>" if rows else "<p>No small objects in the labels.</p>"


TRAIN_METRICS_FILE = "metrics.json"  # segray.train's, named here so that evaluate does not import Ray Train


def shown(uri: str | None) -> str:
    """A location as the report shows it: an object-store URI in full (it means the same to every
    reader), a local path by its last two names (the rest is this machine's)."""
    if not uri:
        return "–"
    if storage.is_s3(uri):
        return uri
    names = [p for p in str(uri).replace("\\", "/").split("/") if p]
    return "…/" + "/".join(names[-2:]) if len(names) > 2 else "/".join(names)


def _read_json(uri: str) -> dict:
    try:
        data = json.loads(storage.read_bytes(uri)) if storage.exists(uri) else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _run_folder(uri: str) -> str:
    """A run folder, or the run folder of its ``model/`` folder."""
    uri = uri.rstrip("/")
    if uri.rsplit("/", 1)[-1] == modelio.MODEL_DIR and storage.exists(storage.join(uri, modelio.CONFIG_FILE)):
        return uri.rsplit("/", 1)[0]
    return uri


@dataclass
class RunInfo:
    """What the report knows of the model and its training: the run folder, the model's
    ``config.json`` (None when unreadable), ``metrics.json``, the recipe, and a warning."""

    run: str | None = None
    spec: modelio.ModelSpec | None = None
    metrics: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)
    note: str | None = None


def load_run(record: dict, run: str | None) -> RunInfo:
    """The model and training run of the predictions whose ``infer.json`` is ``record``: ``run``
    (--run) when given, else the model infer.json names. A model whose sha256 is not the one
    infer.json recorded is not the model of these predictions: with --run it is shown with a
    warning; found through infer.json it is left out (with a note)."""
    uri = run or record.get("model")
    if not uri:
        return RunInfo()
    uri = storage.normalize(uri)
    try:
        spec = modelio.load_spec(uri)
    except Exception:  # noqa: BLE001 - a run without an exported model yet, or one deleted since
        spec = None
    if spec is None and not run:
        return RunInfo()  # the model infer.json names is gone: whatever is there now is not it
    note = None
    recorded = record.get("model_sha256")
    if spec is not None and isinstance(recorded, str):
        try:
            now = "sha256 " + modelio.fingerprint(uri)[:12]
        except Exception:  # noqa: BLE001 - weights unreadable: not the model of these predictions either
            now = "weights unreadable"
        if now != "sha256 " + recorded[:12]:
            if not run:
                return RunInfo(note=f"the model at {shown(uri)} has changed since these predictions were made "
                                    f"({now}, then sha256 {recorded[:12]}); its facts and curves are left out")
            note = f"the model of this run ({now}) is not the one these predictions were made with ({recorded[:12]})"
    folder = _run_folder(uri)
    metrics = _read_json(storage.join(folder, TRAIN_METRICS_FILE))
    recipe = metrics.get("recipe") or _read_json(storage.join(folder, TRAIN_RUN_FILE)).get("recipe") or {}
    return RunInfo(folder, spec, metrics, recipe if isinstance(recipe, dict) else {}, note)


def _num(v) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _augmentation(recipe: dict) -> str | None:
    if "augment" not in recipe:
        return None
    if not recipe["augment"]:
        return "off"
    crop = recipe.get("crop")
    parts = [f"flip {_num(recipe.get('flip_prob'))}" if recipe.get("flip_prob") is not None else "",
             "scale {}–{}".format(*map(_num, recipe["scale_range"])) if recipe.get("scale_range") else "",
             f"crop {crop[0]}×{crop[1]}" if crop else "whole frames",
             f"colour jitter {_num(recipe.get('jitter'))}" if recipe.get("jitter") is not None else ""]
    return "on: " + ", ".join(p for p in parts if p)


def run_facts(record: dict, info: RunInfo, classes: ClassTable, frames: int, versions: dict[str, str],
              output: str | None = None) -> dict:
    """The facts of the report, ``{heading: {name: value}}``: the model (network and its
    arguments, input size, classes), its training (dataset, epochs, recipe, time) and the
    evaluation (frames, date, the ``versions`` of the software), from infer.json, config.json,
    metrics.json and run.json. Locations are shown by name (see shown())."""
    spec, recipe, metrics = info.spec, info.recipe, info.metrics
    config = metrics.get("config") if isinstance(metrics.get("config"), dict) else {}
    model: dict[str, str] = {}
    arch, args = (spec.arch, spec.model) if spec else (recipe.get("arch"), recipe.get("model"))
    if arch:
        shown_args = {k: v for k, v in (args or {}).items() if k not in ("in_channels", "num_classes")}
        model["network"] = arch + (" (" + ", ".join(f"{k}={_num(v)}" for k, v in shown_args.items()) + ")"
                                   if shown_args else "")
    size = spec.input_size if spec else recipe.get("input_size")
    if size:
        model["input size"] = f"{size[0]} × {size[1]} pixels (height × width)"
    model["classes"] = f"{classes.num_classes}: " + ", ".join(classes.names)
    model["void"] = f"label value {classes.void_index} ({classes.void_name}), not scored"
    if record.get("model"):
        model["model"] = shown(record["model"])
    if record.get("model_sha256"):
        model["model sha256"] = str(record["model_sha256"])[:12]
    if info.note:
        model["warning"] = info.note
    training: dict[str, str] = {}
    if info.run:
        training["run"] = info.run.rstrip("/").rsplit("/", 1)[-1]
    data = recipe.get("data") or metrics.get("data")
    if data:
        sha = recipe.get("dataset_sha256")
        training["dataset"] = shown(data) + (f" (dataset.json sha256 {sha[:12]})" if isinstance(sha, str) else "")
    splits = (metrics.get("dataset") or {}).get("splits") if isinstance(metrics.get("dataset"), dict) else None
    if isinstance(splits, dict) and splits:
        training["dataset frames"] = ", ".join(f"{n:,} {split}" for split, n in splits.items())
    if metrics.get("epochs"):
        best = metrics.get("best") if isinstance(metrics.get("best"), dict) else {}
        miou = best.get("val_miou")
        training["epochs"] = f"{metrics['epochs']}" + (
            f"; best epoch {metrics.get('best_epoch')}" + (f" (validation mIoU {miou:.3f})" if isinstance(miou, float) else "")
            if metrics.get("best_epoch") is not None else "")
    if "lr" in recipe:
        training["optimiser"] = (f"AdamW, learning rate {_num(recipe['lr'])}, {recipe.get('lr_schedule', 'constant')} "
                                 f"schedule, weight decay {_num(recipe.get('weight_decay', 0))}")
    if "batch_size" in recipe:
        workers = config.get("num_workers")
        device = "GPU" if config.get("use_gpu") else "CPU"
        training["batch size"] = f"{recipe['batch_size']} a worker" + (
            f" × {workers} {device} workers" if isinstance(workers, int) else "")
    if "class_weighting" in recipe:
        training["loss"] = f"cross-entropy ignoring void, class weighting {recipe['class_weighting']}"
    augmentation = _augmentation(recipe)
    if augmentation:
        training["augmentation"] = augmentation
    if "seed" in recipe:
        training["seed"] = str(recipe["seed"])
    elapsed = metrics.get("elapsed_s")
    if isinstance(elapsed, (int, float)) and math.isfinite(elapsed):
        training["training time"] = _duration(elapsed)
    evaluation = {"predictions": shown(output), "images": shown(record.get("images")),
                  "labels": shown(record.get("labels")), "frames scored": f"{frames:,}"}
    if record.get("every") or record.get("fps"):
        evaluation["video frames"] = f"every {record['every']}th" if record.get("every") else f"{record['fps']} a second"
    evaluation["report date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    evaluation["software"] = ", ".join(f"{name} {version}" for name, version in versions.items())
    return {"Model": model, "Training": training, "Evaluation": evaluation}

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
    """A report rewrites ``index.html``, ``confusion.png``, ``training.svg`` and ``frame_*.png`` in ``dest``: refuse a
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
    picked, seen = [], set()
    for group, chosen in (("best", scored[-half:][::-1]), ("worst", scored[:half])):
        for r in chosen:
            if r[COL_URI] in seen or r[COL_URI] not in rows:
                continue
            ex = _read_example(rows[r[COL_URI]], classes, colors)
            if ex is not None:
                seen.add(r[COL_URI])
                picked.append(dataclasses.replace(ex, group=group))
    pairs = []
    for r in rows.values():
        label = _read_label(r, classes, colors)
        if label is not None:
            pairs.append((label, np.asarray(Image.open(io.BytesIO(r[COL_MASK])))))
    stats = small_object_stats(pairs, small_classes(classes, cm))
    sections = [("Small objects by size", small_object_table(stats, classes) +
                 f"<p class='note'>Over {len(pairs)} labelled frames. An object is a 4-connected region of the class "
                 "in the label; pixel recall: its pixels predicted as the class; found: at least half of them.</p>")]
    info = load_run(record, run)
    best = info.metrics.get("best_epoch")
    history = info.metrics.get("history")
    history = [h for h in history if isinstance(h, dict)] if isinstance(history, list) else []
    versions = software_versions("ray", "torch", "matplotlib")
    try:
        facts = run_facts(record, info, classes, len(scored), versions, output)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        # The run's files edited by hand or written by another tool: the report, without their facts.
        bare = RunInfo(run=info.run, spec=info.spec, note=f"metrics.json/run.json of the run not understood ({e})")
        facts = run_facts(record, bare, classes, len(scored), versions, output)
    return write_report(dest, title=title, cm=cm, history=history, examples=picked, facts=facts, sections=sections,
                        classes=classes, best_epoch=best if isinstance(best, int) else None)

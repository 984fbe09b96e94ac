"""The infer stage's artifact: what ``<output>/`` holds, and every reader and writer of it.

The infer stage (segray/infer.py) writes it; evaluate, the benchmarks and anyone with pyarrow
read it through here, never through the stage. Output layout (``<output>/``), the contract of docs/design.md:

``infer.json``: what made the output: the model (URI and the sha256 of its ``model.pt`` and
    ``config.json``), ``--images`` and ``--labels``. Written before the first row; a rerun that
    differs in any of them is refused, so rows of two models or collections are never mixed.

``predictions/part-<hash>.parquet``, one row per predicted frame:
    uri                 string         the input's URI (archive members: ``<archive>/<member>``,
                                       video frames: ``<video>#frame=<k>``)
    height, width       int32          the frame's own size
    mask_png            binary         PNG (mode L) of class indices 0..C-1 at height x width
    class_pixel_counts  list<int64>    C pixel counts of the predicted mask
    label_uri           string         null when the frame has no label (or no --labels)
    confusion           list<int64>    C*C counts cm[true, pred] row-major, void pixels left
                                       out; null without a label
    pixel_accuracy      double         trace / total of ``confusion``; null without a label or
                                       when every label pixel is void
    frame_index         int64          video frames: k, 0-based in the decoder's (presentation)
                                       order; null for images and archive members
    timestamp_s         double         video frames: presentation time in seconds; null else
    decode_node         string         the Ray node id of the task that read and decoded the frame
    predict_node        string         the Ray node id of the model replica that predicted it
                                       (both: where the work ran; null in outputs written before
                                       they were recorded, and outside Ray)
  The label columns are always present (null without --labels), so that every file of the
  folder has one schema, whatever run wrote it.

``errors/part-<hash>.parquet``, one row per input that could not be used:
    uri, stage, message  string        stage: list (not an image, or a name segray refuses),
                                       read, archive, decode, label, postprocess, write (its mask)
  A video that cannot be read at all is one row of its own URI; a video whose decoding stopped
  early is one row ``<video>#frame=<k>``, k the first frame not decoded (past the last frame
  when the file ends before its container says).

Only ``part-*.parquet`` files directly in those folders are parts (parquet_files); a killed
write's temporary file is not.

``metrics.parquet``: one row per class (IoU, class accuracy, Dice, pixel counts, the class's row
of the summed confusion matrix) and one ``overall`` row (mIoU, pixel accuracy, mean class
accuracy, mean Dice, frequency-weighted IoU, image counts): METRICS_SCHEMA, :func:`metrics_table`.
Every ratio is segray.metrics' from that one matrix; null where it is undefined.

``masks/<path below --images>.png``: colour PNGs, with ``--write-masks``; the source extension
stays in the name (``a/X.jpg`` -> ``masks/a/X.jpg.png``), so two inputs never share a mask.
Video frames: ``masks/<video path>/<k>.png``.

``overlays/<video path>.mp4``: with ``--write-video``, each video's sampled frames with their
colour masks blended in (H.264, playable anywhere), written after every frame is predicted.

rows(predictions) + rows(errors) = number of inputs (sources.py says what an input is; a video's
inputs are its decoded frames, plus one for a video that failed).
Problems of the *input* become error rows: every exception raised while reading, decoding,
pairing, postprocessing or writing one input is that input's row, never the job's end.
Problems of the *system* (the store is unreachable after its retries, a replica dies) fail the
job, and a rerun resumes. The model is loaded and checked on the driver before the output is
touched.

Rerun: the same command over the same output skips every input whose URI is already in
``predictions/`` or ``errors/`` and processes the rest, so an interrupted run is completed
without duplicates or gaps; error rows of stage ``read`` (RETRY_STAGES) are removed and those
inputs tried again. Part files are named by a hash of the URIs they hold, so a retried write
task overwrites its own file. Nothing is recomputed: to start over (another model), delete the
output or pick a new one. ``metrics.parquet`` is deleted when a run starts and written when it
ends; a folder with it is complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from segray import storage
from segray.metrics import (
    class_accuracy,
    dice_per_class,
    frequency_weighted_iou,
    iou_per_class,
    mean_class_accuracy,
    mean_dice,
    mean_iou,
    pixel_accuracy,
)

PREDICTIONS_DIR = "predictions"
ERRORS_DIR = "errors"
METRICS_FILE = "metrics.parquet"
MASKS_DIR = "masks"
OVERLAYS_DIR = "overlays"
# What made the output (model, --images, --labels): written before the first row, checked by
# every rerun so that rows of two models or two collections are never mixed.
RUN_FILE = "infer.json"
RUN_FORMAT = "segray-infer-output/1"
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"

COL_URI = "uri"
COL_HEIGHT = "height"
COL_WIDTH = "width"
COL_MASK = "mask_png"
COL_COUNTS = "class_pixel_counts"
COL_LABEL_URI = "label_uri"
COL_CONFUSION = "confusion"
COL_ACCURACY = "pixel_accuracy"
COL_FRAME_INDEX = "frame_index"
COL_TIMESTAMP = "timestamp_s"
COL_DECODE_NODE = "decode_node"
COL_PREDICT_NODE = "predict_node"
COL_STAGE = "stage"
COL_MESSAGE = "message"

STAGE_LIST = "list"
STAGE_READ = "read"
STAGE_ARCHIVE = "archive"
STAGE_DECODE = "decode"
STAGE_LABEL = "label"
STAGE_WRITE = "write"  # the frame's mask could not be written (--write-masks)
STAGE_POSTPROCESS = "postprocess"  # the predicted mask could not be finished (resized, counted, encoded)
# Error rows a rerun tries again: reading can fail for reasons that pass (a throttled or
# unreachable store, an object being replaced); a bad file stays bad.
RETRY_STAGES = frozenset({STAGE_READ})

PREDICTIONS_SCHEMA = pa.schema(
    [
        (COL_URI, pa.string()),
        (COL_HEIGHT, pa.int32()),
        (COL_WIDTH, pa.int32()),
        (COL_MASK, pa.binary()),
        (COL_COUNTS, pa.list_(pa.int64())),
        (COL_LABEL_URI, pa.string()),
        (COL_CONFUSION, pa.list_(pa.int64())),
        (COL_ACCURACY, pa.float64()),
        (COL_FRAME_INDEX, pa.int64()),
        (COL_TIMESTAMP, pa.float64()),
        (COL_DECODE_NODE, pa.string()),
        (COL_PREDICT_NODE, pa.string()),
    ]
)
ERRORS_SCHEMA = pa.schema([(COL_URI, pa.string()), (COL_STAGE, pa.string()), (COL_MESSAGE, pa.string())])


@dataclass(frozen=True)
class Totals:
    """Counts that add up across tasks, runs and files; ratios are read from them at the end."""

    num_classes: int
    frames: int = 0  # predicted frames
    labelled: int = 0  # predicted frames with a label (their confusion counts are in `cm`)
    errors: int = 0
    cm: np.ndarray | None = None  # (C, C) int64 cm[true, pred]
    class_pixels: np.ndarray | None = None  # (C,) int64 predicted pixels per class, all frames
    stages: dict[str, int] = field(default_factory=dict)  # error rows per stage

    def __post_init__(self) -> None:
        c = self.num_classes
        if self.cm is None:
            object.__setattr__(self, "cm", np.zeros((c, c), dtype=np.int64))
        if self.class_pixels is None:
            object.__setattr__(self, "class_pixels", np.zeros(c, dtype=np.int64))

    def __add__(self, other: Totals) -> Totals:
        stages = dict(self.stages)
        for k, v in other.stages.items():
            stages[k] = stages.get(k, 0) + v
        return Totals(
            num_classes=self.num_classes,
            frames=self.frames + other.frames,
            labelled=self.labelled + other.labelled,
            errors=self.errors + other.errors,
            cm=self.cm + other.cm,
            class_pixels=self.class_pixels + other.class_pixels,
            stages=stages,
        )


def totals_of(predictions: pa.Table, errors: pa.Table, num_classes: int) -> Totals:
    """Sum the rows of a predictions table and count an errors table."""
    cm = np.zeros(num_classes * num_classes, dtype=np.int64)
    labelled = 0
    for row in predictions.column(COL_CONFUSION).to_pylist():
        if row is not None:
            cm += np.asarray(row, dtype=np.int64)
            labelled += 1
    class_pixels = np.zeros(num_classes, dtype=np.int64)
    for row in predictions.column(COL_COUNTS).to_pylist():
        class_pixels += np.asarray(row, dtype=np.int64)
    stages: dict[str, int] = {}
    for stage in errors.column(COL_STAGE).to_pylist() if errors.num_rows else []:
        stages[stage] = stages.get(stage, 0) + 1
    return Totals(
        num_classes=num_classes,
        frames=predictions.num_rows,
        labelled=labelled,
        errors=errors.num_rows,
        cm=cm.reshape(num_classes, num_classes),
        class_pixels=class_pixels,
        stages=stages,
    )



# ----------------------------------------------------------------------------- writing


def part_name(uris: list[str]) -> str:
    """A part file's name from the URIs it holds: a retried task rewrites the same file."""
    digest = hashlib.sha1("\n".join(sorted(uris)).encode("utf-8", "surrogateescape")).hexdigest()
    return f"part-{digest[:20]}.parquet"


def write_parquet(uri: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes(uri, buf.getvalue())  # atomic: a reader never sees half a part file


def write_results(table: pa.Table, output: str, num_classes: int) -> Totals:
    """Split result rows into ``predictions/`` and ``errors/`` part files; return their totals."""
    ok = pc.is_null(table.column(COL_STAGE))
    predictions = table.filter(ok).select(PREDICTIONS_SCHEMA.names).cast(PREDICTIONS_SCHEMA)
    errors = table.filter(pc.invert(ok)).select(ERRORS_SCHEMA.names).cast(ERRORS_SCHEMA)
    for folder, part in ((PREDICTIONS_DIR, predictions), (ERRORS_DIR, errors)):
        if part.num_rows:
            write_parquet(storage.join(output, folder, part_name(part.column(COL_URI).to_pylist())), part)
    return totals_of(predictions, errors, num_classes)



# ----------------------------------------------------------------------------- reading and totals


def parquet_files(folder: str) -> list[str]:
    """The part files of a folder: ``part-*.parquet`` directly in it. A killed write's temporary
    ``part-*.parquet.tmp-*`` and anything else a person put there are not parts; every reader of
    an infer output (this stage, evaluate, the benchmarks) reads exactly these."""
    out = []
    for uri in storage.list_files(folder):
        name = uri.replace(os.sep, "/").rsplit("/", 1)[-1]
        rel = storage.relative(folder, uri)
        if "/" not in rel and name.startswith(PART_PREFIX) and name.endswith(PART_SUFFIX):
            out.append(uri)
    return out


def done_uris(output: str) -> set[str]:
    """URIs of every input already in ``predictions/`` or ``errors/`` (their uri column only)."""
    done: set[str] = set()
    for folder in (PREDICTIONS_DIR, ERRORS_DIR):
        for uri in parquet_files(storage.join(output, folder)):
            fs, path = storage.resolve(uri)
            done.update(pq.read_table(path, columns=[COL_URI], filesystem=fs).column(0).to_pylist())
    return done


def drop_retryable_errors(output: str) -> int:
    """Remove the error rows of RETRY_STAGES from ``errors/``, so that a rerun tries those inputs
    again; returns how many. Each part file is rewritten without them (atomically) or deleted
    when nothing else is in it: an interruption leaves those inputs not done, never doubled."""
    dropped = 0
    for uri in parquet_files(storage.join(output, ERRORS_DIR)):
        fs, path = storage.resolve(uri)
        table = pq.read_table(path, filesystem=fs)
        retry = pc.is_in(table.column(COL_STAGE), value_set=pa.array(sorted(RETRY_STAGES), pa.string()))
        n = pc.sum(retry).as_py() or 0
        if not n:
            continue
        keep = table.filter(pc.invert(retry))
        if keep.num_rows:
            write_parquet(uri, keep)
        else:
            storage.delete(uri)
        dropped += n
    return dropped


def _batch_sums(batch: pa.Table, num_classes: int) -> pa.Table:
    """A block of prediction rows -> one row of its sums (frames, labelled, cm, class pixels)."""
    t = totals_of(batch, pa.table({COL_STAGE: pa.array([], pa.string())}), num_classes)
    return pa.table(
        {
            "frames": [t.frames],
            "labelled": [t.labelled],
            "cm": [t.cm.ravel().tolist()],
            "class_pixels": [t.class_pixels.tolist()],
        }
    )


def _totals_from_sums(row: dict, num_classes: int) -> Totals:
    return Totals(
        num_classes=num_classes,
        frames=row["frames"],
        labelled=row["labelled"],
        cm=np.asarray(row["cm"], dtype=np.int64).reshape(num_classes, num_classes),
        class_pixels=np.asarray(row["class_pixels"], dtype=np.int64),
    )


def aggregate_predictions(output: str, num_classes: int) -> Totals:
    """Totals of every row in ``<output>/`` (this run's and earlier runs'), by a Ray Data pass.

    Only the two count columns are read; each block is summed in its task to one row of
    scalars, and the driver adds those few rows (one per block, never a prediction). Error
    rows are counted from the Parquet footers."""
    import ray

    errors = 0
    for uri in parquet_files(storage.join(output, ERRORS_DIR)):
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            errors += pq.ParquetFile(f).metadata.num_rows
    total = Totals(num_classes, errors=errors)
    files = parquet_files(storage.join(output, PREDICTIONS_DIR))
    if not files:
        return total
    fs, _ = storage.resolve(files[0])
    ds = ray.data.read_parquet([storage.resolve(f)[1] for f in files], filesystem=fs)
    ds = ds.select_columns([COL_COUNTS, COL_CONFUSION])
    ds = ds.map_batches(_batch_sums, fn_kwargs={"num_classes": num_classes}, batch_size=None, batch_format="pyarrow")
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            total = total + _totals_from_sums(row, num_classes)
    return total


OVERALL = "overall"
METRICS_SCHEMA = pa.schema(
    [
        ("class_index", pa.int32()),  # 0..C-1; null on the overall row
        ("class_name", pa.string()),  # OVERALL on the overall row
        ("iou", pa.float64()),  # class IoU; null when the class is in neither labels nor predictions
        ("miou", pa.float64()),  # overall row only: mean IoU over classes with an IoU
        ("pixel_accuracy", pa.float64()),  # overall row only: trace / total
        ("intersection", pa.int64()),  # cm[c, c]; overall: trace
        ("label_pixels", pa.int64()),  # cm row sum (labelled, non-void); overall: total
        ("predicted_pixels", pa.int64()),  # cm column sum (at labelled pixels); overall: total
        ("mask_pixels", pa.int64()),  # pixels of the class in every predicted mask, labelled or not
        ("images", pa.int64()),  # overall row only: predicted frames
        ("labelled_images", pa.int64()),  # overall row only: predicted frames with a label
        ("error_images", pa.int64()),  # overall row only: rows of errors/
        ("confusion", pa.list_(pa.int64())),  # class rows: cm[c, :], the class's row of the summed matrix
        # Added after the columns above (readers of older files find them missing, not moved):
        ("class_accuracy", pa.float64()),  # class rows: cm[c, c] / label_pixels; null when not labelled
        ("dice", pa.float64()),  # class rows: 2 intersection / (label + predicted pixels); null where iou is
        ("mean_class_accuracy", pa.float64()),  # overall row only: mean class_accuracy of labelled classes
        ("mean_dice", pa.float64()),  # overall row only: mean dice over classes with a dice
        ("fwiou", pa.float64()),  # overall row only: sum of label_pixels / total * iou (labelled classes)
    ]
)


def _or_null(value: float) -> float | None:
    """A ratio for Parquet: null (None) where segray.metrics says undefined (NaN)."""
    return None if np.isnan(value) else float(value)


def metrics_table(totals: Totals, class_names: list[str]) -> pa.Table:
    """``metrics.parquet``: one row per class, then the ``overall`` row (schema METRICS_SCHEMA).

    Every ratio comes from the one summed confusion matrix (segray.metrics); without labels
    the ratios are null and the pixel and image counts remain."""
    cm = totals.cm
    has_labels = cm.sum() > 0
    iou, accuracy, dice = iou_per_class(cm), class_accuracy(cm), dice_per_class(cm)
    rows = []
    for c, name in enumerate(class_names):
        rows.append(
            {
                "class_index": c,
                "class_name": name,
                "iou": _or_null(iou[c]),
                "class_accuracy": _or_null(accuracy[c]),
                "dice": _or_null(dice[c]),
                "intersection": int(cm[c, c]),
                "label_pixels": int(cm[c].sum()),
                "predicted_pixels": int(cm[:, c].sum()),
                "mask_pixels": int(totals.class_pixels[c]),
                "confusion": cm[c].astype(np.int64).tolist(),
            }
        )
    total = int(cm.sum())
    rows.append(
        {
            "class_name": OVERALL,
            "miou": mean_iou(cm) if has_labels else None,
            "pixel_accuracy": pixel_accuracy(cm) if has_labels else None,
            "mean_class_accuracy": mean_class_accuracy(cm) if has_labels else None,
            "mean_dice": mean_dice(cm) if has_labels else None,
            "fwiou": frequency_weighted_iou(cm) if has_labels else None,
            "intersection": int(np.trace(cm)),
            "label_pixels": total,
            "predicted_pixels": total,
            "mask_pixels": int(totals.class_pixels.sum()),
            "images": totals.frames,
            "labelled_images": totals.labelled,
            "error_images": totals.errors,
        }
    )
    return pa.Table.from_pylist(rows, schema=METRICS_SCHEMA)


# ----------------------------------------------------------------------------- readers


def read_table(folder: str, columns: list[str] | None = None, filters=None):
    """The part files of an infer output folder, exactly those infer counts (predictions.parquet_files):
    a killed write's ``*.tmp-*`` file or a stray file is not read."""
    files = parquet_files(folder)
    if not files:
        schema = PREDICTIONS_SCHEMA if columns is None else pa.schema([PREDICTIONS_SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    fs, _ = storage.resolve(files[0])
    return pq.read_table([storage.resolve(f)[1] for f in files], filesystem=fs, columns=columns, filters=filters,
                         schema=PREDICTIONS_SCHEMA)


def read_record(output: str) -> dict:
    """``<output>/infer.json`` ({} when there is none or it is not a segray record)."""
    uri = storage.join(output, RUN_FILE)
    if not storage.exists(uri):
        return {}
    try:
        raw = json.loads(storage.read_bytes(uri))
    except ValueError:
        return {}
    return raw if isinstance(raw, dict) and raw.get("format") == RUN_FORMAT else {}


def read_confusion(output: str) -> tuple[np.ndarray, list[str]]:
    """The summed confusion matrix ``(C, C)`` int64 and the class names of ``metrics.parquet``:
    the matrix every figure of the output was computed from. An output written before
    metrics.parquet held the matrix has it summed from ``predictions/`` (its confusion column)."""
    fs, path = storage.resolve(storage.join(output, METRICS_FILE))
    table = pq.read_table(path, filesystem=fs)
    rows = [r for r in table.to_pylist() if r.get("class_index") is not None]
    rows.sort(key=lambda r: r["class_index"])
    names = [r["class_name"] for r in rows]
    if rows and all(r.get("confusion") is not None for r in rows):
        return np.asarray([r["confusion"] for r in rows], dtype=np.int64).reshape(len(rows), len(rows)), names
    cm = np.zeros(len(names) * len(names), dtype=np.int64)
    for row in read_table(storage.join(output, PREDICTIONS_DIR), [COL_CONFUSION]).column(COL_CONFUSION).to_pylist():
        if row is not None:
            cm += np.asarray(row, dtype=np.int64)
    return cm.reshape(len(names), len(names)), names

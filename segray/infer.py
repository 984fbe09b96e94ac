"""The infer stage: a trained model over any image collection, streaming, into Parquet.

One Ray Data pass, memory flat in the number of frames::

    listing (driver: object names only, sources.list_inputs)
      -> load_frames      tasks   read, expand .tar archives, decode, resize to the model's size
      -> Predictor        actors  one model per replica (GPU with --use-gpu), argmax masks
      -> postprocess      tasks   mask back to the frame's size (NEAREST), PNG, counts, confusion
      -> PredictionSink   tasks   predictions/ and errors/ Parquet; per-task summed counts

then ``metrics.parquet``, written last, from one confusion matrix summed inside Ray Data: by
the write tasks of a first run, or, when the output already held rows (a rerun), over every
row of ``predictions/`` (:func:`aggregate_predictions`). Never from predictions on the driver.

The output (``<output>/``: ``infer.json``, ``predictions/``, ``errors/``, ``metrics.parquet``,
``masks/``) and its readers and writers are the artifact module segray/predictions.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from segray import modelio, sources, storage
from segray.errors import describe
from segray.camvid import ORIGINAL_COLORS, ORIGINAL_TO_11, parse_label_colors
from segray.layout import LABEL_COLORS_FILE, is_image
from segray.metrics import confusion_matrix_np, iou_per_class, mean_iou, pixel_accuracy
from segray.predictions import (  # noqa: F401 - the artifact's names, re-exported for the stage's users
    COL_ACCURACY,
    COL_CONFUSION,
    COL_COUNTS,
    COL_HEIGHT,
    COL_LABEL_URI,
    COL_MASK,
    COL_MESSAGE,
    COL_STAGE,
    COL_URI,
    COL_WIDTH,
    ERRORS_DIR,
    ERRORS_SCHEMA,
    MASKS_DIR,
    METRICS_FILE,
    METRICS_SCHEMA,
    OVERALL,
    PREDICTIONS_DIR,
    PREDICTIONS_SCHEMA,
    RUN_FILE,
    RUN_FORMAT,
    STAGE_ARCHIVE,
    STAGE_DECODE,
    STAGE_LABEL,
    STAGE_LIST,
    STAGE_POSTPROCESS,
    STAGE_READ,
    STAGE_WRITE,
    Totals,
    aggregate_predictions,
    done_uris,
    drop_retryable_errors,
    metrics_table,
    parquet_files,
    part_name,
    totals_of,
    write_parquet,
    write_results,
)
from segray.preprocess import (
    BadInputError,
    color_lookup,
    colorize,
    colors_to_index,
    decode_image,
    decode_index_label,
    encode_png,
    resize_image,
    resize_label,
)


# Between the stages (not stored): the listing, the decoded frames, the predicted masks.
_COL_KIND = "kind"
_COL_LABEL_KIND = "label_kind"
_COL_DONE = "done"
_COL_ERROR = "list_error"  # the listing's verdict on an input's name (sources.Input.error)
_COL_TAKEN = "taken"  # URIs of other objects below an archive's URI (sources.Input.taken)
_COL_IMAGE = "image"  # the frame resized to the model's input size, (h, w, 3) uint8 bytes
_COL_PRED = "pred"  # the predicted mask at the model's size, (h, w) uint8 bytes
_LISTING_SCHEMA = pa.schema(
    [
        (COL_URI, pa.string()),
        (_COL_KIND, pa.string()),
        (COL_LABEL_URI, pa.string()),
        (_COL_LABEL_KIND, pa.string()),
        (_COL_DONE, pa.list_(pa.string())),
        (_COL_ERROR, pa.string()),
        (_COL_TAKEN, pa.list_(pa.string())),
    ]
)
_FRAMES_SCHEMA = pa.schema(
    [
        (COL_URI, pa.string()),
        (COL_LABEL_URI, pa.string()),
        (_COL_LABEL_KIND, pa.string()),
        (COL_HEIGHT, pa.int32()),
        (COL_WIDTH, pa.int32()),
        (_COL_IMAGE, pa.binary()),
        (COL_STAGE, pa.string()),
        (COL_MESSAGE, pa.string()),
    ]
)
_RESULTS_SCHEMA = pa.schema([*PREDICTIONS_SCHEMA, ERRORS_SCHEMA.field(COL_STAGE), ERRORS_SCHEMA.field(COL_MESSAGE)])

# Image files per load task: enough to amortise a task's start, few enough to spread a small
# collection over every CPU. An archive is always a task of its own.
FILES_PER_TASK = 16
# Frames per block out of load_frames: an archive's members leave its task in pieces this big.
FRAMES_PER_BLOCK = 16


class InferError(ValueError):
    """The job cannot run as asked; the message names the thing and the fix."""


@dataclass(frozen=True)
class InferConfig:
    model: str  # training run or its model/ folder
    images: str  # prefix of image files and/or .tar archives
    output: str
    labels: str | None = None  # prefix of label PNGs, paired by path (sources.py)
    use_gpu: bool = False
    batch_size: int = 16  # frames per model call
    num_replicas: int = 1  # model actors; each takes one GPU with use_gpu
    write_masks: bool = False  # colour PNGs under <output>/masks/
    cpus_per_replica: float = 1.0  # CPUs Ray reserves for each CPU model actor
    threads: int | None = None  # torch threads of a CPU replica; None: cpu_threads_default()
    rows_per_file: int = 1000  # rows per Parquet part file (at least; the last may be smaller)

    def __post_init__(self) -> None:
        for name in ("batch_size", "num_replicas", "rows_per_file"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InferError(f"{name} must be a positive integer, got {value!r}")
        if self.cpus_per_replica <= 0:
            raise InferError(f"cpus_per_replica must be positive, got {self.cpus_per_replica!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise InferError(f"threads must be a positive integer, got {self.threads!r}")


# ----------------------------------------------------------------------------- stage 1: load


def listing_tables(listing: sources.Listing) -> list[pa.Table]:
    """The listing as Ray Data input blocks: each archive alone, image files FILES_PER_TASK a block."""
    archives = [i for i in listing.inputs if i.kind == sources.KIND_ARCHIVE]
    files = [i for i in listing.inputs if i.kind != sources.KIND_ARCHIVE]
    groups = [[a] for a in archives] + [files[k : k + FILES_PER_TASK] for k in range(0, len(files), FILES_PER_TASK)]
    return [
        pa.Table.from_pylist(
            [
                {
                    COL_URI: i.uri,
                    _COL_KIND: i.kind,
                    COL_LABEL_URI: i.label.uri if i.label else None,
                    _COL_LABEL_KIND: i.label.kind if i.label else None,
                    _COL_DONE: list(i.done),
                    _COL_ERROR: i.error or None,
                    _COL_TAKEN: list(i.taken),
                }
                for i in group
            ],
            schema=_LISTING_SCHEMA,
        )
        for group in groups
    ]


def _error(uri: str, stage: str, message: str) -> dict:
    return {COL_URI: storage.printable(uri), COL_STAGE: stage, COL_MESSAGE: storage.printable(message)}


def load_frame(data: bytes, uri: str, size: tuple[int, int]) -> tuple[np.ndarray, int, int]:
    """Encoded bytes -> the frame resized to ``size`` ``(h, w, 3) uint8``, and its own height, width.

    Raises BadInputError naming ``uri`` for anything that is not a readable image."""
    try:
        image = decode_image(data, uri)
    except BadInputError:
        raise
    except Exception as e:  # noqa: BLE001 - a mode PIL cannot convert is still a bad input
        raise BadInputError(f"{uri}: cannot convert to RGB ({type(e).__name__}: {e})") from None
    return resize_image(image, size), image.shape[0], image.shape[1]


def _frame_row(data: bytes, uri: str, size: tuple[int, int], label: sources.Label | None) -> dict:
    try:
        resized, height, width = load_frame(data, uri, size)
    except BadInputError as e:
        return _error(uri, STAGE_DECODE, str(e))
    except Exception as e:  # noqa: BLE001 - whatever one frame does, it is that frame's error row
        return _error(uri, STAGE_DECODE, f"{uri}: cannot be decoded ({describe(e)})")
    return {
        COL_URI: storage.printable(uri),
        COL_LABEL_URI: storage.printable(label.uri) if label else None,
        _COL_LABEL_KIND: label.kind if label else None,
        COL_HEIGHT: height,
        COL_WIDTH: width,
        _COL_IMAGE: resized.tobytes(),
    }


def _archive_rows(archive_uri: str, images_root: str, done: frozenset[str], taken: tuple[str, ...], size,
                  labels) -> Iterator[dict]:
    """Rows of one archive's members, streaming; never raises. Members read before damage keep
    their rows and the rest of the archive is one error row; an archive without a single
    member is one error row too (sources.iter_archive yields it), so that nothing vanishes."""
    archive_rel = sources.input_rel(images_root, archive_uri)
    try:
        for member in sources.iter_archive(archive_uri, skip=done, taken=taken):
            uri = sources.member_uri(archive_uri, member.path) if member.path else archive_uri
            try:
                if member.error:
                    yield _error(uri, STAGE_LIST if member.path else STAGE_ARCHIVE, member.error)
                elif not is_image(member.path):
                    yield _error(uri, STAGE_LIST, sources.not_an_image_message(uri))
                else:
                    label = sources.label_for_member(archive_rel, member.path, labels) if labels else None
                    yield _frame_row(member.data, uri, size, label)
            except Exception as e:  # noqa: BLE001 - one member's failure is that member's row
                yield _error(uri, STAGE_DECODE, f"{uri}: {describe(e)}")
    except (FileNotFoundError, storage.StorageError) as e:
        if archive_uri not in done:
            yield _error(archive_uri, STAGE_READ, f"{archive_uri}: cannot be read ({describe(e)})")
    except sources.ArchiveError as e:
        if archive_uri not in done:
            yield _error(archive_uri, STAGE_ARCHIVE, f"{e}; the members before the damage were processed")
    except Exception as e:  # noqa: BLE001 - whatever else the stream raises: the archive's row
        if archive_uri not in done:
            yield _error(archive_uri, STAGE_ARCHIVE, f"{archive_uri}: broken archive ({describe(e)}); "
                         "the members before the damage were processed")


def load_frames(
    batch: pa.Table,
    size: tuple[int, int],
    images_root: str,
    labels: dict[str, sources.Label] | None = None,
) -> Iterator[pa.Table]:
    """Listing rows -> frame rows (decoded, resized to ``size``) or error rows; never raises for
    a bad input. ``labels`` (the whole label index) is needed only to pair archive members."""
    rows: list[dict] = []
    for item in batch.to_pylist():
        uri, kind = item[COL_URI], item[_COL_KIND]
        if item[_COL_ERROR]:
            produced: Iterable[dict] = [_error(uri, STAGE_LIST, item[_COL_ERROR])]
        elif kind == sources.KIND_ARCHIVE:
            produced = _archive_rows(uri, images_root, frozenset(item[_COL_DONE]), tuple(item[_COL_TAKEN] or ()),
                                     size, labels)
        elif kind == sources.KIND_IMAGE:
            label = sources.Label(item[COL_LABEL_URI], item[_COL_LABEL_KIND]) if item[COL_LABEL_URI] else None
            try:
                data = storage.read_bytes(uri)
            except Exception as e:  # noqa: BLE001 - unreadable now; a rerun tries it again
                produced = [_error(uri, STAGE_READ, str(e) if isinstance(e, storage.StorageError)
                                   else f"{uri}: cannot be read ({describe(e)})")]
            else:
                produced = [_frame_row(data, uri, size, label)]
        else:
            produced = [_error(uri, STAGE_LIST, sources.not_an_image_message(uri))]
        for row in produced:
            rows.append(row)
            if len(rows) >= FRAMES_PER_BLOCK:
                yield pa.Table.from_pylist(rows, schema=_FRAMES_SCHEMA)
                rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=_FRAMES_SCHEMA)


# ----------------------------------------------------------------------------- stage 2: predict

ModelLoader = Callable[..., tuple]  # (uri, device) -> (model in eval mode, ModelSpec)


def _assigned_cpus() -> int:
    """CPUs Ray reserved for this actor (its torch threads), or torch's default outside Ray."""
    import ray
    import torch

    if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpus:
            return max(1, round(cpus))
    return torch.get_num_threads()


def cpu_threads_default(num_replicas: int, reserved: int) -> int:
    """Torch threads of a CPU replica: this machine's cores shared among the replicas, at least
    the CPUs Ray reserved for it.

    Deliberately more than the reservation: the decode/encode tasks that share the node run in
    short bursts between model batches, and a replica held to its one reserved CPU left the
    other cores idle while it computed (docs/benchmarks.md, 2 cores: 14.8 steady frames/s with
    1 thread, 28.3 with 2). The OS interleaves the two; the model is most of the work per frame."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, reserved, cores // max(1, num_replicas))


class Predictor:
    """A model replica: loads the model once, then maps frame batches to argmax masks.

    ``loader(uri, device) -> (model, spec)`` is modelio.load_model unless a test hands another.
    Error rows pass through untouched; the frame column is replaced by the mask column.
    On CPU the model runs in channels-last (NHWC) memory format, oneDNN's fast layout for
    convolutions, with ``threads`` torch threads (default: cpu_threads_default).
    """

    def __init__(
        self,
        model_uri: str,
        use_gpu: bool = False,
        loader: ModelLoader = modelio.load_model,
        threads: int | None = None,
        num_replicas: int = 1,
    ) -> None:
        import torch

        self.torch = torch
        self.use_gpu = use_gpu
        if use_gpu:
            if not torch.cuda.is_available():
                raise InferError("--use-gpu: this replica sees no CUDA device")
            self.device = torch.device("cuda")
            # Convs on tensor cores are fastest in NHWC, with bf16 inputs.
            torch.backends.cudnn.benchmark = True
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(threads or cpu_threads_default(num_replicas, _assigned_cpus()))
        self.model, self.spec = loader(model_uri, self.device)
        self.model = self.model.to(memory_format=torch.channels_last)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """``(N, h, w, 3) uint8`` frames at the model's size -> ``(N, h, w) uint8`` class indices."""
        torch = self.torch
        with torch.inference_mode():
            x = modelio.images_to_tensor(images, self.spec.mean, self.spec.std, self.device, channels_last=True)
            if self.use_gpu:
                with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                    logits = self.model(x)
            else:
                logits = self.model(x)
            # argmax on the device: only 1 byte per pixel comes back to the host.
            return logits.argmax(dim=1).to(torch.uint8).cpu().numpy()

    def __call__(self, batch: pa.Table) -> pa.Table:
        h, w = self.spec.input_size
        good = pc.is_null(batch.column(COL_STAGE)).to_pylist()
        idx = [i for i, ok in enumerate(good) if ok]
        preds: list[bytes | None] = [None] * batch.num_rows
        if idx:
            frames = batch.column(_COL_IMAGE).to_pylist()
            # bytearray: one copy into a writable buffer, which torch.as_tensor wants.
            joined = bytearray(b"".join(frames[i] for i in idx))
            images = np.frombuffer(joined, dtype=np.uint8).reshape(len(idx), h, w, 3)
            masks = self.predict(images)
            for k, i in enumerate(idx):
                preds[i] = masks[k].tobytes()
        out = batch.drop_columns([_COL_IMAGE])
        return out.append_column(_COL_PRED, pa.array(preds, type=pa.binary()))


# ----------------------------------------------------------------------------- stage 3: postprocess


def load_label(uri: str, kind: str, color_table: tuple) -> np.ndarray:
    """A label file -> ``(H, W) uint8`` class indices (index PNG, or colour-coded via ``color_table``)."""
    data = storage.read_bytes(uri)
    if kind == sources.LABEL_COLOR:
        mask, _ = colors_to_index(decode_image(data, uri), color_lookup(color_table))
        return mask
    return decode_index_label(data, uri)


@dataclass(frozen=True)
class FrameResult:
    mask: np.ndarray  # (H, W) uint8 class indices at the frame's own size
    mask_png: bytes
    class_pixel_counts: list[int]  # C
    confusion: list[int] | None  # C*C row-major cm[true, pred]; None without a label
    pixel_accuracy: float | None


def finish_frame(
    pred: np.ndarray, size: tuple[int, int], num_classes: int, void_index: int, label: np.ndarray | None = None
) -> FrameResult:
    """A mask at the model's size -> the frame's own ``size`` (NEAREST), its PNG and counts.

    With ``label`` (``(H, W)`` class indices, same size as the frame) also its confusion counts."""
    mask = resize_label(pred, size)
    counts = np.bincount(mask.ravel(), minlength=num_classes)[:num_classes]
    confusion, accuracy = None, None
    if label is not None:
        cm = confusion_matrix_np(label, mask, num_classes=num_classes, ignore_index=void_index)
        confusion = cm.ravel().tolist()
        acc = pixel_accuracy(cm)
        accuracy = None if np.isnan(acc) else acc
    return FrameResult(mask, encode_png(mask), counts.astype(np.int64).tolist(), confusion, accuracy)


def _lies_below(uri: str, root: str) -> bool:
    """``uri`` is a plain path strictly below ``root``: no ``.``/``..``/empty segment anywhere."""
    body = uri.split("://", 1)[-1].replace(os.sep, "/")
    top = root.split("://", 1)[-1].replace(os.sep, "/").rstrip("/")
    return posixpath.normpath(body) == body and body.startswith(top + "/")


def mask_uri(output: str, images_root: str, uri: str) -> str:
    """``<images>/a/b/X.jpg`` -> ``<output>/masks/a/b/X.jpg.png`` (archive members below ``A.tar/``).

    The source extension stays in the name, so ``X.jpg`` and ``X.png`` never share a mask.
    Raises ValueError for a path that would not lie below ``<output>/masks/`` (the listing
    already refuses such names; this is the last check before a write)."""
    rel = sources.mask_rel(sources.input_rel(images_root, uri))
    masks = storage.join(output, MASKS_DIR)
    target = storage.join(masks, *rel.split("/"))
    if not _lies_below(target, masks):
        raise ValueError(f"{uri}: its mask path {target} would leave {masks}")
    return target


def _result_row(item: dict, model_size: tuple[int, int], num_classes: int, void_index: int, color_table: tuple,
                palette: list, images_root: str, output: str, write_masks: bool) -> dict:
    """One predicted frame -> its predictions row, or the error row of its label or its mask."""
    uri = item[COL_URI]
    size = (item[COL_HEIGHT], item[COL_WIDTH])
    label = None
    if item[COL_LABEL_URI]:
        try:
            label = load_label(item[COL_LABEL_URI], item[_COL_LABEL_KIND], color_table)
        except (BadInputError, storage.StorageError) as e:
            return _error(uri, STAGE_LABEL, str(e))
        except Exception as e:  # noqa: BLE001 - a label PIL cannot convert, a truncated PNG, ...
            return _error(uri, STAGE_LABEL, f"{item[COL_LABEL_URI]}: cannot be used as a label ({describe(e)})")
        if label.shape != size:
            return _error(uri, STAGE_LABEL, f"{item[COL_LABEL_URI]}: label is {label.shape[1]}x{label.shape[0]} "
                          f"but the frame is {size[1]}x{size[0]}; they must be the same size")
    pred = np.frombuffer(item[_COL_PRED], dtype=np.uint8).reshape(model_size)
    result = finish_frame(pred, size, num_classes, void_index, label)
    if write_masks:
        try:
            storage.write_bytes(mask_uri(output, images_root, uri), encode_png(colorize(result.mask, palette)))
        except Exception as e:  # noqa: BLE001 - a name the store refuses, a folder in the way, ...
            return _error(uri, STAGE_WRITE, f"{uri}: its mask could not be written ({describe(e)}); rename the input")
    return {
        COL_URI: uri,
        COL_HEIGHT: size[0],
        COL_WIDTH: size[1],
        COL_MASK: result.mask_png,
        COL_COUNTS: result.class_pixel_counts,
        COL_LABEL_URI: item[COL_LABEL_URI],
        COL_CONFUSION: result.confusion,
        COL_ACCURACY: result.pixel_accuracy,
    }


def postprocess(
    batch: pa.Table,
    model_size: tuple[int, int],
    num_classes: int,
    void_index: int,
    color_table: tuple,
    palette: list,
    images_root: str,
    output: str,
    write_masks: bool,
) -> pa.Table:
    """Mask rows -> result rows (the predictions schema plus stage and message)."""
    h, w = model_size
    rows: list[dict] = []
    for item in batch.to_pylist():
        uri = item[COL_URI]
        if item[COL_STAGE] is not None:
            rows.append(_error(uri, item[COL_STAGE], item[COL_MESSAGE]))
            continue
        try:
            rows.append(_result_row(item, (h, w), num_classes, void_index, color_table, palette, images_root,
                                    output, write_masks))
        except Exception as e:  # noqa: BLE001 - one frame's failure is that frame's row, never the job's
            rows.append(_error(uri, STAGE_POSTPROCESS, f"{uri}: {describe(e)}"))
    return pa.Table.from_pylist(rows, schema=_RESULTS_SCHEMA)


# ----------------------------------------------------------------------------- stage 4: write


def _datasink_class():
    """PredictionSink, defined on first use: importing segray.infer must not import Ray Data."""
    from ray.data.block import BlockAccessor
    from ray.data.datasource import Datasink

    class PredictionSink(Datasink):
        """Writes each task's rows to predictions/ and errors/; sums the tasks' totals."""

        def __init__(self, output: str, num_classes: int, rows_per_file: int) -> None:
            self.output = output
            self.num_classes = num_classes
            self.rows_per_file = rows_per_file
            self.totals = Totals(num_classes)

        @property
        def min_rows_per_write(self) -> int:
            return self.rows_per_file

        def write(self, blocks, ctx) -> Totals:
            tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
            tables = [t for t in tables if t.num_rows]
            if not tables:
                return Totals(self.num_classes)
            totals = write_results(pa.concat_tables(tables), self.output, self.num_classes)
            print(f"infer: wrote {totals.frames} predictions, {totals.errors} errors", flush=True)
            return totals

        def on_write_complete(self, write_result) -> None:
            for t in write_result.write_returns:
                self.totals = self.totals + t

    return PredictionSink


# ----------------------------------------------------------------------------- metrics


# ----------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class InferSummary:
    output: str
    listed: int  # inputs handed to this run (archives count as one until expanded)
    skipped: int  # inputs already in the output (rerun)
    run: Totals  # rows this run wrote
    total: Totals  # every row in the output, this run's and earlier ones'
    unpaired: int  # predicted frames (all runs) that had no label, with --labels
    seconds: float
    with_labels: bool
    class_names: tuple[str, ...] = ()

    @property
    def frames_per_second(self) -> float:
        return (self.run.frames + self.run.errors) / self.seconds if self.seconds > 0 else 0.0


def format_summary(s: InferSummary) -> str:
    """The one-screen report printed at the end of a run."""
    t = s.total
    stages = ", ".join(f"{k} {v}" for k, v in sorted(s.run.stages.items())) or "none"
    lines = [
        (
            f"infer: done in {s.seconds:.1f} s: {s.run.frames + s.run.errors} inputs this run "
            f"({s.frames_per_second:.2f} frames/s), {s.skipped} already done"
        ),
        f"  predicted  {t.frames} frames ({s.run.frames} this run)",
        f"  errors     {t.errors} ({s.run.errors} this run: {stages})" + (
            f", see {storage.join(s.output, ERRORS_DIR)}" if t.errors else ""),
    ]
    if s.with_labels:
        lines.append(f"  labelled   {t.labelled} frames, {s.unpaired} without a label (predicted, not scored)")
        if t.cm.sum():
            iou = iou_per_class(t.cm)
            lines.append(f"  mIoU       {mean_iou(t.cm):.4f}   pixel accuracy {pixel_accuracy(t.cm):.4f}")
            per_class = [f"{n} {'-' if np.isnan(v) else f'{v:.3f}'}" for n, v in zip(s.class_names, iou)]
            for k in range(0, len(per_class), 6):
                lines.append(("  IoU        " if k == 0 else "             ") + ", ".join(per_class[k : k + 6]))
    lines.append(f"  output     {s.output}: {PREDICTIONS_DIR}/ {ERRORS_DIR}/ {METRICS_FILE}")
    return "\n".join(lines)


def run_record(config: InferConfig, model_sha256: str) -> dict:
    """What ``infer.json`` says made the output (URIs normalised)."""
    return {
        "format": RUN_FORMAT,
        "model": config.model,
        "model_sha256": model_sha256,
        "images": config.images,
        "labels": config.labels,
        # Masks are written with the rows: a rerun that adds --write-masks would leave the frames
        # of the earlier run without one, silently.
        "write_masks": config.write_masks,
    }


def check_output(config: InferConfig, record: dict) -> bool:
    """Refuse an output that another model, collection or label set made; True when it holds an
    earlier run of this same job (a rerun), False when it is new or empty.

    An output folder that holds files but no ``infer.json`` is not segray's to write into."""
    run_file = storage.join(config.output, RUN_FILE)
    start_over = f"pass the same flags to complete it, or delete {config.output} or choose another --output to start over"
    if not storage.exists(run_file):
        others = [u for u in storage.list_files(config.output)]
        if others:
            raise InferError(
                f"--output {config.output} holds {len(others)} files (e.g. {others[0]}) but no {RUN_FILE}: it is not "
                "the output of a segray infer run (or one written before outputs recorded their model); choose an "
                "empty or new --output"
            )
        return False
    try:
        earlier = json.loads(storage.read_bytes(run_file))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InferError(f"{run_file}: not valid JSON ({e}); delete {config.output} or choose another --output") from None
    if not isinstance(earlier, dict) or earlier.get("format") != RUN_FORMAT:
        raise InferError(f"{run_file}: not a segray infer record; delete {config.output} or choose another --output")
    checks = (
        ("model_sha256", "--model", "the model (sha256 of its model.pt and config.json)"),
        ("images", "--images", "--images"),
        ("labels", "--labels", "--labels"),
        ("write_masks", "--write-masks", "--write-masks"),
    )
    for key, flag, what in checks:
        if earlier.get(key, False if key == "write_masks" else None) != record[key]:
            before, now = earlier.get(key), record[key]
            if key == "model_sha256":
                before = f"{earlier.get('model')} (sha256 {str(before)[:12]})"
                now = f"{record['model']} (sha256 {str(now)[:12]})"
            if key == "write_masks":
                raise InferError(f"--output {config.output} was made {'with' if before else 'without'} --write-masks, "
                                 f"this run is {'with' if now else 'without'}: some frames would have masks and "
                                 f"others not; {start_over}")
            raise InferError(
                f"--output {config.output} was made with {what} {before or 'none'}, this run has {flag} "
                f"{now or 'none'}; {start_over}"
            )
    return True


def color_table(labels: str | None) -> tuple:
    """Colour -> class table for ``_L.png`` labels: ``label_colors.txt`` at the labels root if
    there is one, else the original CamVid table."""
    if labels:
        uri = storage.join(labels, LABEL_COLORS_FILE)
        if storage.exists(uri):
            return tuple(sorted(parse_label_colors(storage.read_bytes(uri).decode("utf-8", "replace"), uri).items()))
    return tuple(sorted((rgb, ORIGINAL_TO_11[name]) for rgb, name in ORIGINAL_COLORS))


def _check_resources(config: InferConfig) -> None:
    import ray

    resources = ray.cluster_resources()
    if config.use_gpu and resources.get("GPU", 0) < config.num_replicas:
        raise InferError(
            f"--use-gpu with {config.num_replicas} replicas needs {config.num_replicas} GPUs; the cluster has "
            f"{resources.get('GPU', 0):g}; lower --num-replicas or drop --use-gpu"
        )
    cpus = resources.get("CPU", 0)
    # Decode and encode tasks take one whole CPU each: with less than one left over they would
    # never be scheduled and the job would wait forever.
    if not config.use_gpu and cpus - config.num_replicas * config.cpus_per_replica < 1:
        raise InferError(
            f"{config.num_replicas} CPU replicas x {config.cpus_per_replica:g} CPUs leave less than 1 of the "
            f"cluster's {cpus:g} CPUs for decoding; lower --num-replicas or --cpus-per-replica"
        )


def run_pipeline(
    config: InferConfig, listing: sources.Listing, spec: modelio.ModelSpec, loader: ModelLoader = modelio.load_model
) -> Totals:
    """The streaming pass over the listed inputs; returns the totals of the rows it wrote."""
    import ray

    num_classes = spec.unet.num_classes
    # A map task's exception as itself, not as "UserCodeException: UDF failed to process a data
    # block." (segray turns every input's failure into a row; what is left is a system failure
    # whose own message the job's last line should show).
    ray.data.DataContext.get_current().raise_original_map_exception = True
    ds = ray.data.from_arrow(listing_tables(listing))
    ds = ds.map_batches(
        load_frames,
        fn_kwargs={
            "size": spec.input_size,
            "images_root": config.images,
            # The whole label index travels only when archive members need pairing in tasks.
            "labels": listing.labels if listing.archives else None,
        },
        batch_size=None,
        batch_format="pyarrow",
    )
    # Blocks of exactly one model batch. This also keeps decoding in the tasks: Ray Data would
    # otherwise fuse a task map into the actor map after it, and decode inside the model's actor.
    ds = ds.repartition(target_num_rows_per_block=config.batch_size)
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={
            "model_uri": config.model,
            "use_gpu": config.use_gpu,
            "loader": loader,
            "threads": config.threads,
            "num_replicas": config.num_replicas,
        },
        compute=ray.data.ActorPoolStrategy(size=config.num_replicas),
        batch_size=config.batch_size,
        batch_format="pyarrow",
        num_gpus=1 if config.use_gpu else None,
        num_cpus=1 if config.use_gpu else config.cpus_per_replica,
    )
    ds = ds.map_batches(
        postprocess,
        fn_kwargs={
            "model_size": spec.input_size,
            "num_classes": num_classes,
            "void_index": spec.void_index,
            "color_table": color_table(config.labels),
            "palette": spec.palette,
            "images_root": config.images,
            "output": config.output,
            "write_masks": config.write_masks,
        },
        batch_size=None,
        batch_format="pyarrow",
    )
    # Blocks of one part file each. Unfused from the write, postprocessing streams batch by
    # batch behind the model instead of waiting for a whole file's rows.
    ds = ds.repartition(target_num_rows_per_block=config.rows_per_file)
    sink = _datasink_class()(config.output, num_classes, config.rows_per_file)
    ds.write_datasink(sink)
    return sink.totals


def infer(config: InferConfig, loader: ModelLoader = modelio.load_model) -> InferSummary:
    """Run the infer stage on the connected Ray cluster (module doc: outputs and reruns)."""
    start = time.perf_counter()
    config = dataclasses.replace(
        config,
        model=storage.normalize(config.model),
        images=storage.normalize(config.images),
        output=storage.normalize(config.output),
        labels=storage.normalize(config.labels) if config.labels else None,
    )
    # The model is loaded and checked here, on the driver (weights-only, every tensor against the
    # network of config.json), before the output is touched: a model that cannot load must not
    # be found inside the actor after metrics.parquet of a finished output was deleted.
    _, spec = loader(config.model, "cpu")
    num_classes = spec.unet.num_classes
    record = run_record(config, modelio.fingerprint(config.model))
    _check_resources(config)
    rerun = check_output(config, record)
    # An input tree that yields nothing fails here, before anything is written.
    listing = sources.list_inputs(config.images, config.labels, done_uris(config.output) if rerun else set(),
                                  output=config.output)
    storage.check_writable(config.output)
    if not rerun:
        storage.write_bytes(storage.join(config.output, RUN_FILE), (json.dumps(record, indent=2) + "\n").encode())
    # From here on the output is incomplete until metrics.parquet is written again.
    storage.delete(storage.join(config.output, METRICS_FILE))
    retried = drop_retryable_errors(config.output) if rerun else 0
    if retried:
        # Those inputs are not done any more: list again, with them.
        listing = sources.list_inputs(config.images, config.labels, done_uris(config.output), output=config.output)
    done = rerun
    skipped = listing.skipped + sum(len(i.done) for i in listing.inputs)
    print(
        f"infer: {config.images}: {listing.images} image files, {listing.archives} archives, {listing.others} other "
        f"files to process; {skipped} inputs already in {config.output}"
        + (f" ({retried} earlier read errors tried again)" if retried else "")
        + (f"; {len(listing.labels)} labels in {config.labels}" if config.labels else ""),
        flush=True,
    )
    print(f"infer: model {config.model}: input {spec.input_height}x{spec.input_width}, {num_classes} classes, "
          f"{config.num_replicas} replica(s) on {'GPU' if config.use_gpu else 'CPU'}", flush=True)

    run = Totals(num_classes)
    if listing.inputs:
        run = run_pipeline(config, listing, spec, loader)
    # A first run's totals are the sums its write tasks returned; after a rerun the earlier
    # rows count too, so every part file is summed again (two small columns only).
    total = aggregate_predictions(config.output, num_classes) if done else run
    write_parquet(storage.join(config.output, METRICS_FILE), metrics_table(total, list(spec.classes)))
    summary = InferSummary(
        output=config.output,
        listed=len(listing.inputs),
        skipped=skipped,
        run=run,
        total=total,
        unpaired=total.frames - total.labelled,
        seconds=time.perf_counter() - start,
        with_labels=bool(config.labels),
        class_names=tuple(spec.classes),
    )
    print(format_summary(summary), flush=True)
    return summary

"""Stages 2 and 3 of infer: the model replicas (Ray Data actors) and the postprocessing tasks.

A :class:`Predictor` loads the exported model once per replica and maps batches of frames at
the model's input size to argmax masks (with the test-time options of segray/tta.py: flip and
scale averaging; with a tile, frames and masks at the frame's own size, windows averaged);
:func:`postprocess` brings each mask back to its frame's own size (NEAREST), encodes it, counts
its classes and, with a label, its confusion matrix, and writes the colour mask when asked.
Error rows pass through both untouched.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from segray import modelio, sources, storage, video
from segray.classes import CAMVID, ClassTable
from segray.errors import SegrayError, describe
from segray.frames import COL_IMAGE, COL_LABEL_KIND, COL_PRED, RESULTS_SCHEMA, error_row
from segray.metrics import confusion_matrix_np, pixel_accuracy
from segray.predictions import (
    COL_ACCURACY,
    COL_CONFUSION,
    COL_COUNTS,
    COL_DECODE_NODE,
    COL_FRAME_INDEX,
    COL_HEIGHT,
    COL_LABEL_URI,
    COL_MASK,
    COL_MESSAGE,
    COL_PREDICT_NODE,
    COL_STAGE,
    COL_TIMESTAMP,
    COL_URI,
    COL_WIDTH,
    MASKS_DIR,
    STAGE_LABEL,
    STAGE_POSTPROCESS,
    STAGE_WRITE,
)
from segray.preprocess import (
    BadInputError,
    colorize,
    decode_label,
    encode_png,
    resize_label,
)
from segray.runtime import node_id


class PredictorError(SegrayError, ValueError):
    """A model replica that cannot run as asked; the message names the flag."""


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
    other cores idle while it computed (docs/benchmarks.md, "CPU tuning": about half the speed).
    The OS interleaves the two; the model is most of the work per frame."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, reserved, cores // max(1, num_replicas))


class Predictor:
    """A model replica: loads the model once, then maps frame batches to argmax masks.

    ``loader(uri, device) -> (model, spec)`` is modelio.load_model unless a test hands another.
    Error rows pass through untouched; the frame column is replaced by the mask column.
    On CPU the model runs in channels-last (NHWC) memory format, oneDNN's fast layout for
    convolutions, with ``threads`` torch threads (default: cpu_threads_default); ``precision``:
    segray/precision.py.
    """

    def __init__(
        self,
        model_uri: str,
        use_gpu: bool = False,
        loader: ModelLoader = modelio.load_model,
        threads: int | None = None,
        num_replicas: int = 1,
        tta: str | None = None,
        scales: tuple[float, ...] | None = None,
        tile: tuple[int, int] | None = None,
        overlap: int | None = None,
        batch_size: int = 16,
        precision: str = "auto",
    ) -> None:
        import torch

        from segray import precision as compute
        from segray import tta as testtime

        # Test-time options (segray/tta.py): frames come at the model's size, or with a tile at
        # their own; the masks leave at the same size.
        self.scales, self.tile, self.overlap = testtime.check_options(tta, scales, tile, overlap)
        self.flip = tta == testtime.FLIP
        self.batch_size = batch_size
        self.testtime = testtime

        self.torch = torch
        self.use_gpu = use_gpu
        if use_gpu:
            if not torch.cuda.is_available():
                raise PredictorError("--use-gpu: this replica sees no CUDA device")
            self.device = torch.device("cuda")
            # Convs on tensor cores are fastest in NHWC, with bf16 inputs.
            torch.backends.cudnn.benchmark = True
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(threads or cpu_threads_default(num_replicas, _assigned_cpus()))
        self.model, self.spec = loader(model_uri, self.device)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.precision = compute.compute_precision(precision, self.device)  # "bf16" or "fp32" on this replica
        self.autocast = compute.autocast
        self.node = node_id()  # recorded with every frame this replica predicts (COL_PREDICT_NODE)

    def _forward(self, x):
        """The model on a normalised batch: channels-last, under bf16 autocast with --precision's
        bf16 (on GPU by default; every pass of a test-time option goes through here). The logits
        leave as float32, so that averages and argmax are fp32's."""
        x = x.contiguous(memory_format=self.torch.channels_last)
        with self.autocast(self.device, self.precision):
            return self.model(x).float()

    def predict(self, images: np.ndarray) -> np.ndarray:
        """``(N, h, w, 3) uint8`` frames at the model's size -> ``(N, h, w) uint8`` class indices
        (with --tta/--scales: of the averaged logits). With a tile, frames of any one size."""
        torch = self.torch
        with torch.inference_mode():
            x = modelio.images_to_tensor(images, self.spec.mean, self.spec.std, self.device, channels_last=True)
            if self.tile:
                logits = self.testtime.tiled_logits(self._forward, x, self.tile, self.overlap, self.batch_size, self.flip)
            elif self.flip or self.scales:
                logits = self.testtime.augmented_logits(self._forward, x, self.flip, self.scales)
            else:
                logits = self._forward(x)
            # argmax on the device: only 1 byte per pixel comes back to the host.
            return logits.argmax(dim=1).to(torch.uint8).cpu().numpy()

    def _predict_tiled(self, batch: pa.Table, idx: list[int], preds: list) -> None:
        """Frames at their own sizes: each size's frames together, in chunks of about
        ``batch_size`` windows (one frame's logits at a time when it alone has that many)."""
        frames = batch.column(COL_IMAGE).to_pylist()
        sizes = list(zip(batch.column(COL_HEIGHT).to_pylist(), batch.column(COL_WIDTH).to_pylist()))
        groups: dict[tuple[int, int], list[int]] = {}
        for i in idx:
            groups.setdefault(sizes[i], []).append(i)
        for (h, w), rows in groups.items():
            windows = len(self.testtime.window_grid((h, w), self.tile, self.overlap)[1])
            step = max(1, self.batch_size // windows)
            for k in range(0, len(rows), step):
                part = rows[k : k + step]
                joined = bytearray(b"".join(frames[i] for i in part))
                masks = self.predict(np.frombuffer(joined, dtype=np.uint8).reshape(len(part), h, w, 3))
                for mask, i in zip(masks, part):
                    preds[i] = mask.tobytes()

    def __call__(self, batch: pa.Table) -> pa.Table:
        h, w = self.spec.input_size
        good = pc.is_null(batch.column(COL_STAGE)).to_pylist()
        idx = [i for i, ok in enumerate(good) if ok]
        preds: list[bytes | None] = [None] * batch.num_rows
        if idx and self.tile:
            self._predict_tiled(batch, idx, preds)
        elif idx:
            frames = batch.column(COL_IMAGE).to_pylist()
            # bytearray: one copy into a writable buffer, which torch.as_tensor wants.
            joined = bytearray(b"".join(frames[i] for i in idx))
            images = np.frombuffer(joined, dtype=np.uint8).reshape(len(idx), h, w, 3)
            masks = self.predict(images)
            for k, i in enumerate(idx):
                preds[i] = masks[k].tobytes()
        out = batch.drop_columns([COL_IMAGE])
        out = out.append_column(COL_PRED, pa.array(preds, type=pa.binary()))
        return out.append_column(COL_PREDICT_NODE, pa.array([self.node] * batch.num_rows, type=pa.string()))


# ----------------------------------------------------------------------------- stage 3: postprocess


def load_label(uri: str, kind: str, color_table: tuple, classes: ClassTable = CAMVID) -> np.ndarray:
    """A label file -> ``(H, W) uint8`` values of ``classes`` (an index PNG, or colour-coded via
    ``color_table``): preprocess.decode_label, the one label decoder."""
    data = storage.read_bytes(uri)
    return decode_label(data, uri, classes, color_table if kind == sources.LABEL_COLOR else None)[0]


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


def mask_uri(output: str, images_root: str, uri: str) -> str:
    """``<images>/a/b/X.jpg`` -> ``<output>/masks/a/b/X.jpg.png`` (archive members below ``A.tar/``,
    frame k of a video ``a/clip.mp4`` at ``a/clip.mp4/<k>.png``).

    The source extension stays in the name, so ``X.jpg`` and ``X.png`` never share a mask.
    Raises ValueError for a path that would not lie below ``<output>/masks/`` (the listing
    already refuses such names; this is the last check before a write)."""
    frame = video.split_frame_uri(uri)
    if frame is not None:
        rel = video.frame_mask_rel(sources.input_rel(images_root, frame[0]), frame[1])
    else:
        rel = sources.mask_rel(sources.input_rel(images_root, uri))
    masks = storage.join(output, MASKS_DIR)
    target = storage.join(masks, *rel.split("/"))
    if not sources.lies_below(target, masks):
        raise ValueError(f"{uri}: its mask path {target} would leave {masks}")
    return target


def _result_row(item: dict, model_size: tuple[int, int] | None, classes: ClassTable, color_table: tuple,
                images_root: str, output: str, write_masks: bool) -> dict:
    """One predicted frame -> its predictions row, or the error row of its label or its mask."""
    uri = item[COL_URI]
    size = (item[COL_HEIGHT], item[COL_WIDTH])
    label = None
    if item[COL_LABEL_URI]:
        try:
            label = load_label(item[COL_LABEL_URI], item[COL_LABEL_KIND], color_table, classes)
        except (BadInputError, storage.StorageError) as e:
            return error_row(uri, STAGE_LABEL, str(e))
        except Exception as e:  # noqa: BLE001 - a label PIL cannot convert, a truncated PNG, ...
            return error_row(uri, STAGE_LABEL, f"{item[COL_LABEL_URI]}: cannot be used as a label ({describe(e)})")
        if label.shape != size:
            return error_row(uri, STAGE_LABEL, f"{item[COL_LABEL_URI]}: label is {label.shape[1]}x{label.shape[0]} "
                          f"but the frame is {size[1]}x{size[0]}; they must be the same size")
    pred = np.frombuffer(item[COL_PRED], dtype=np.uint8).reshape(model_size or size)
    result = finish_frame(pred, size, classes.num_classes, classes.void_index, label)
    if write_masks:
        try:
            storage.write_bytes(mask_uri(output, images_root, uri), encode_png(colorize(result.mask, classes)))
        except Exception as e:  # noqa: BLE001 - a name the store refuses, a folder in the way, ...
            return error_row(uri, STAGE_WRITE, f"{uri}: its mask could not be written ({describe(e)}); rename the input")
    return {
        COL_URI: uri,
        COL_HEIGHT: size[0],
        COL_WIDTH: size[1],
        COL_MASK: result.mask_png,
        COL_COUNTS: result.class_pixel_counts,
        COL_LABEL_URI: item[COL_LABEL_URI],
        COL_CONFUSION: result.confusion,
        COL_ACCURACY: result.pixel_accuracy,
        COL_FRAME_INDEX: item[COL_FRAME_INDEX],
        COL_TIMESTAMP: item[COL_TIMESTAMP],
        COL_DECODE_NODE: item.get(COL_DECODE_NODE),
        COL_PREDICT_NODE: item.get(COL_PREDICT_NODE),
    }


def postprocess(
    batch: pa.Table,
    model_size: tuple[int, int] | None,
    classes: ClassTable,
    color_table: tuple,
    images_root: str,
    output: str,
    write_masks: bool,
) -> pa.Table:
    """Mask rows -> result rows (the predictions schema plus stage and message). ``model_size``:
    the size of every mask; None when each is at its frame's own size (--tile)."""
    rows: list[dict] = []
    for item in batch.to_pylist():
        uri = item[COL_URI]
        if item[COL_STAGE] is not None:
            rows.append(error_row(uri, item[COL_STAGE], item[COL_MESSAGE]))
            continue
        try:
            rows.append(_result_row(item, model_size, classes, color_table, images_root, output, write_masks))
        except Exception as e:  # noqa: BLE001 - one frame's failure is that frame's row, never the job's
            rows.append(error_row(uri, STAGE_POSTPROCESS, f"{uri}: {describe(e)}"))
    return pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA)

"""The one segmentation metric: an integer confusion matrix, and the ratios read from it.

`cm[true, pred]` counts non-void pixels. Counts are summed across batches, workers and files
(`cm_a + cm_b`, or one `all_reduce`), and ratios are taken only at the end:

    IoU_c    = cm[c, c] / (row_c + col_c - cm[c, c])
    mIoU     = mean of IoU_c over classes with row_c + col_c - cm[c, c] > 0
    accuracy = trace / total

Never average per-batch or per-image ratios: small images and batches without a class would
weigh as much as full ones.

Works for any number of classes K (2..255 in a ClassTable); void, which a ClassTable never
places inside 0..K-1, counts nowhere. The defaults (CamVid's 11 classes) are kept for callers
of the CamVid-only days; pass ``num_classes`` and the class names of your table.
"""

from __future__ import annotations

from typing import Any, Sequence, TypeVar

import numpy as np
import torch

from segray.camvid import CLASSES, NUM_CLASSES
from segray.classes import ClassTable

_Array = TypeVar("_Array", np.ndarray, torch.Tensor)


def _flat_indices(target: _Array, pred: _Array, num_classes: int, ignore_index: int | None) -> _Array:
    """Flat cm indices `target * num_classes + pred` of the pixels that count.

    Written once for numpy and torch alike (only operators both share), so the two public
    versions differ only in how they cast and count. Inputs are already int64: uint8 label
    maps would overflow in `target * num_classes`.
    """
    if tuple(target.shape) != tuple(pred.shape):
        raise ValueError(
            f"target and pred must have the same shape, got {tuple(target.shape)} "
            f"and {tuple(pred.shape)}"
        )
    # Void, and anything outside 0..num_classes-1 (e.g. 255 borders from augmentation), is not
    # a labelled pixel and counts nowhere.
    keep = (target >= 0) & (target < num_classes)
    if ignore_index is not None and 0 <= ignore_index < num_classes:
        keep = keep & (target != ignore_index)
    target, pred = target[keep], pred[keep]
    # An out-of-range prediction is a bug upstream, not data to ignore: it would land silently in
    # another cell (t*n + n == (t+1)*n + 0). On CUDA this check is a host sync; bincount below
    # syncs anyway, as its output size depends on the data.
    if bool(((pred < 0) | (pred >= num_classes)).any()):
        raise ValueError(f"pred holds values outside 0..{num_classes - 1} at labelled pixels")
    return target * num_classes + pred


def confusion_matrix(
    target: torch.Tensor,
    pred: torch.Tensor,
    num_classes: int = NUM_CLASSES,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """Confusion matrix of one batch, on the inputs' device.

    target, pred: integer tensors of the same shape, e.g. (N, H, W) class indices.
    Returns (num_classes, num_classes) int64 counts of pixels, cm[true, pred]; pixels whose
    target is outside 0..num_classes-1 (void, e.g. 11 for CamVid or 255) or is `ignore_index`
    are not counted. `ignore_index` None (the default) ignores exactly the former: a void index
    is never a class index, so it need not be passed.
    """
    for name, t in (("target", target), ("pred", pred)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor of class indices, got {t.dtype}")
    idx = _flat_indices(target.long(), pred.long(), num_classes, ignore_index)
    # One bincount over the whole batch instead of a loop over classes: one kernel on GPU.
    counts = torch.bincount(idx.reshape(-1), minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def confusion_matrix_np(
    target: np.ndarray,
    pred: np.ndarray,
    num_classes: int = NUM_CLASSES,
    ignore_index: int | None = None,
) -> np.ndarray:
    """numpy twin of `confusion_matrix`: same rule, returns (num_classes, num_classes) np.int64."""
    target, pred = np.asarray(target), np.asarray(pred)
    for name, a in (("target", target), ("pred", pred)):
        if not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"{name} must be an integer array of class indices, got {a.dtype}")
    idx = _flat_indices(target.astype(np.int64), pred.astype(np.int64), num_classes, ignore_index)
    counts = np.bincount(idx.reshape(-1), minlength=num_classes * num_classes)
    return counts.astype(np.int64).reshape(num_classes, num_classes)


def _as_numpy(cm: np.ndarray | torch.Tensor) -> np.ndarray:
    """A square (C, C) confusion matrix as a numpy array on the host."""
    if isinstance(cm, torch.Tensor):
        cm = cm.detach().cpu().numpy()
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {cm.shape}")
    return cm


def iou_per_class(cm: np.ndarray | torch.Tensor) -> np.ndarray:
    """(C,) float64 IoU per class; NaN for a class absent from both targets and predictions.

    A class with zero union has no defined IoU; NaN (not 0, not 1) keeps it out of the mean.
    """
    cm = _as_numpy(cm).astype(np.float64)
    intersection = np.diag(cm)
    union = cm.sum(axis=1) + cm.sum(axis=0) - intersection
    iou = np.full(cm.shape[0], np.nan, dtype=np.float64)
    np.divide(intersection, union, out=iou, where=union > 0)
    return iou


def mean_iou(cm: np.ndarray | torch.Tensor) -> float:
    """Mean IoU over classes with a nonzero union; NaN if there is none (e.g. an all-void image)."""
    iou = iou_per_class(cm)
    present = ~np.isnan(iou)
    # Checked by hand because np.nanmean of all-NaN warns ("Mean of empty slice").
    if not present.any():
        return float("nan")
    return float(iou[present].mean())


def pixel_accuracy(cm: np.ndarray | torch.Tensor) -> float:
    """Fraction of counted pixels predicted correctly (trace / total); NaN if nothing counted."""
    cm = _as_numpy(cm)
    total = cm.sum()
    if total == 0:
        return float("nan")
    return float(np.trace(cm) / total)


def summarize(
    cm: np.ndarray | torch.Tensor, class_names: Sequence[str] | ClassTable = CLASSES
) -> dict[str, Any]:
    """Everything a report needs from one (summed) confusion matrix.

    ``class_names``: the K names (or a ClassTable) of the matrix's rows; CamVid's by default.

    Returns {"miou": float (NaN if undefined), "pixel_accuracy": float (NaN if undefined),
    "iou": {class name: float, or None where the class is absent}, "pixels": int counted pixels}.
    None rather than NaN in "iou" because it survives JSON and Parquet as a null.
    """
    cm = _as_numpy(cm)
    if isinstance(class_names, ClassTable):
        class_names = class_names.names
    if len(class_names) != cm.shape[0]:
        raise ValueError(
            f"{len(class_names)} class names for a {cm.shape[0]}x{cm.shape[0]} confusion matrix"
        )
    iou = iou_per_class(cm)
    return {
        "miou": mean_iou(cm),
        "pixel_accuracy": pixel_accuracy(cm),
        "iou": {
            name: None if np.isnan(value) else float(value)
            for name, value in zip(class_names, iou)
        },
        "pixels": int(cm.sum()),
    }

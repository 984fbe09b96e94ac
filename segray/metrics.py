"""The one segmentation metric: an integer confusion matrix, and the ratios read from it.

`cm[true, pred]` counts non-void pixels. Counts are summed across batches, workers and files
(`cm_a + cm_b`, or one `all_reduce`), and ratios are taken only at the end:

    IoU_c    = cm[c, c] / (row_c + col_c - cm[c, c])
    mIoU     = mean of IoU_c over classes with row_c + col_c - cm[c, c] > 0
    accuracy = trace / total                                  (pixel accuracy)
    acc_c    = cm[c, c] / row_c                               (class accuracy: the class's recall)
    mAcc     = mean of acc_c over classes with row_c > 0      (mean class accuracy)
    Dice_c   = 2 cm[c, c] / (row_c + col_c)                   (per-class Dice, i.e. F1)
    mDice    = mean of Dice_c over classes with row_c + col_c > 0
    fwIoU    = sum over classes with row_c > 0 of (row_c / total) * IoU_c

row_c = sum_j cm[c, j] (labelled pixels of c), col_c = sum_i cm[i, c] (pixels predicted as c at
labelled pixels), total = sum of cm. A ratio whose denominator is 0 is undefined (NaN, None in
``summarize``), never 0 or 1, and stays out of its mean; a mean with nothing to average, and
every figure of an all-zero matrix, is NaN. So a class absent from the labels has no accuracy;
absent from the labels but predicted, it has IoU 0 and Dice 0 (both in their means) and weight 0
in fwIoU; absent from both, no IoU and no Dice. Dice_c = 2 IoU_c / (1 + IoU_c) for every class,
but mDice is not a function of mIoU (the mean is taken after the ratio). Pixel accuracy and fwIoU
weigh classes by their labelled pixels; mIoU, mAcc and mDice weigh every class present alike.

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
    return _ratio(intersection, cm.sum(axis=1) + cm.sum(axis=0) - intersection)


def _defined_mean(values: np.ndarray) -> float:
    """Mean of the values that are not NaN; NaN when none is (not a warning)."""
    defined = ~np.isnan(values)
    # Checked by hand because np.nanmean of all-NaN warns ("Mean of empty slice").
    if not defined.any():
        return float("nan")
    return float(values[defined].mean())


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator as float64, NaN where the denominator is 0 (undefined, not 0)."""
    out = np.full(numerator.shape, np.nan, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def mean_iou(cm: np.ndarray | torch.Tensor) -> float:
    """Mean IoU over classes with a nonzero union; NaN if there is none (e.g. an all-void image)."""
    return _defined_mean(iou_per_class(cm))


def class_accuracy(cm: np.ndarray | torch.Tensor) -> np.ndarray:
    """(C,) float64 accuracy per class, cm[c, c] / row_c (the class's recall); NaN for a class
    absent from the labels.

    A class nobody labelled has no pixels to get right: NaN keeps it out of the mean, where a 0
    would punish the model for the data and a 1 would reward it for nothing.
    """
    cm = _as_numpy(cm).astype(np.float64)
    return _ratio(np.diag(cm), cm.sum(axis=1))


def mean_class_accuracy(cm: np.ndarray | torch.Tensor) -> float:
    """Mean of the class accuracies over classes in the labels; NaN if there is none.

    Unlike pixel accuracy, every labelled class weighs the same: a model that never finds a
    small class loses 1/C of it however few pixels the class has."""
    return _defined_mean(class_accuracy(cm))


def dice_per_class(cm: np.ndarray | torch.Tensor) -> np.ndarray:
    """(C,) float64 Dice (F1) per class, 2 cm[c, c] / (row_c + col_c); NaN for a class absent
    from both targets and predictions (the classes whose IoU is NaN, for the same reason)."""
    cm = _as_numpy(cm).astype(np.float64)
    return _ratio(2.0 * np.diag(cm), cm.sum(axis=1) + cm.sum(axis=0))


def mean_dice(cm: np.ndarray | torch.Tensor) -> float:
    """Mean Dice over classes with a Dice (labelled or predicted); NaN if there is none."""
    return _defined_mean(dice_per_class(cm))


def frequency_weighted_iou(cm: np.ndarray | torch.Tensor) -> float:
    """sum_c (row_c / total) IoU_c over classes with row_c > 0; NaN if nothing counted.

    A class predicted but never labelled has IoU 0 and weight 0: it adds nothing, as its
    false positives already lower the IoU of the classes whose pixels they took."""
    cm = _as_numpy(cm)
    total = cm.sum()
    if total == 0:
        return float("nan")
    rows = cm.sum(axis=1)
    labelled = rows > 0  # these have a union > 0, hence an IoU
    return float((rows[labelled] / total * iou_per_class(cm)[labelled]).sum())


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

    Returns {"miou", "pixel_accuracy", "mean_class_accuracy", "mean_dice", "fwiou": float (NaN
    if undefined), "iou", "class_accuracy", "dice": {class name: float, or None where undefined
    for the class}, "pixels": int counted pixels}. None rather than NaN per class because it
    survives JSON and Parquet as a null.
    """
    cm = _as_numpy(cm)
    if isinstance(class_names, ClassTable):
        class_names = class_names.names
    if len(class_names) != cm.shape[0]:
        raise ValueError(
            f"{len(class_names)} class names for a {cm.shape[0]}x{cm.shape[0]} confusion matrix"
        )

    def by_name(values: np.ndarray) -> dict[str, float | None]:
        return {name: None if np.isnan(value) else float(value) for name, value in zip(class_names, values)}

    return {
        "miou": mean_iou(cm),
        "pixel_accuracy": pixel_accuracy(cm),
        "mean_class_accuracy": mean_class_accuracy(cm),
        "mean_dice": mean_dice(cm),
        "fwiou": frequency_weighted_iou(cm),
        "iou": by_name(iou_per_class(cm)),
        "class_accuracy": by_name(class_accuracy(cm)),
        "dice": by_name(dice_per_class(cm)),
        "pixels": int(cm.sum()),
    }

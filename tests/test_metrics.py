"""Confusion matrix and ratios against small matrices worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segray.camvid import CLASSES, NUM_CLASSES, VOID_INDEX
from segray.metrics import (
    confusion_matrix,
    confusion_matrix_np,
    iou_per_class,
    mean_iou,
    pixel_accuracy,
    summarize,
)

# Three classes and void = 3 keep the hand computations readable.
N, VOID = 3, 3


def cm_torch(target: list, pred: list, num_classes: int = N, ignore: int = VOID) -> torch.Tensor:
    return confusion_matrix(torch.tensor(target), torch.tensor(pred), num_classes, ignore)


def test_basic_matrix_and_ratios() -> None:
    target = [[0, 0, 1], [1, 2, 3]]
    pred = [[0, 1, 1], [2, 2, 0]]
    # Pairs (true, pred): (0,0) (0,1) (1,1) (1,2) (2,2); the void pixel is dropped.
    expected = [[1, 1, 0], [0, 1, 1], [0, 0, 1]]
    cm = cm_torch(target, pred)
    assert cm.dtype == torch.int64
    assert cm.tolist() == expected
    # IoU_0 = 1/(2+1-1), IoU_1 = 1/(2+2-1), IoU_2 = 1/(1+2-1)
    np.testing.assert_allclose(iou_per_class(cm), [1 / 2, 1 / 3, 1 / 2])
    assert mean_iou(cm) == pytest.approx(4 / 9)
    assert pixel_accuracy(cm) == pytest.approx(3 / 5)


def test_absent_class_excluded_from_mean() -> None:
    cm = cm_torch([0, 0, 1, 1], [0, 1, 1, 1])
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    iou = iou_per_class(cm)
    assert iou[0] == pytest.approx(1 / 2) and iou[1] == pytest.approx(2 / 3)
    assert math.isnan(iou[2])
    assert mean_iou(cm) == pytest.approx((1 / 2 + 2 / 3) / 2)  # 7/12, not 7/18
    assert pixel_accuracy(cm) == pytest.approx(3 / 4)


def test_class_only_predicted_counts_as_zero() -> None:
    # Class 2 never in the target but predicted once: union 1, IoU 0, and it is in the mean.
    cm = cm_torch([0, 0], [0, 2])
    iou = iou_per_class(cm)
    assert iou[0] == pytest.approx(1 / 2) and math.isnan(iou[1]) and iou[2] == 0.0
    assert mean_iou(cm) == pytest.approx(1 / 4)


def test_all_void_image() -> None:
    target = np.full((4, 5), VOID_INDEX, dtype=np.uint8)
    pred = np.zeros((4, 5), dtype=np.int64)
    cm = confusion_matrix_np(target, pred)  # CamVid defaults: 11 classes, void 11
    assert cm.shape == (NUM_CLASSES, NUM_CLASSES) and cm.dtype == np.int64
    assert not cm.any()
    assert np.isnan(iou_per_class(cm)).all()
    assert math.isnan(mean_iou(cm))
    assert math.isnan(pixel_accuracy(cm))
    summary = summarize(cm)
    assert math.isnan(summary["miou"]) and math.isnan(summary["pixel_accuracy"])
    assert summary["iou"] == {name: None for name in CLASSES}
    assert summary["pixels"] == 0


def test_void_and_out_of_range_targets_ignored() -> None:
    # Same labelled pixels as in test_absent_class_excluded_from_mean, plus void (3), 255 and -1
    # targets with arbitrary predictions: the matrix must not change.
    cm = cm_torch([0, 3, 0, 255, 1, -1, 1, 3], [0, 2, 1, 0, 1, 2, 1, 0])
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]


def test_summing_batches_is_not_averaging_ratios() -> None:
    # Two classes, void = 2.
    target_a, pred_a = [0, 0, 0, 0], [0, 0, 0, 0]
    target_b, pred_b = [1, 1], [0, 1]
    cm_a = cm_torch(target_a, pred_a, num_classes=2, ignore=2)
    cm_b = cm_torch(target_b, pred_b, num_classes=2, ignore=2)
    assert cm_a.tolist() == [[4, 0], [0, 0]]  # mIoU 1 (class 1 absent)
    assert cm_b.tolist() == [[0, 0], [1, 1]]  # IoU 0 and 1/2: mIoU 1/4
    concatenated = cm_torch(target_a + target_b, pred_a + pred_b, num_classes=2, ignore=2)
    assert torch.equal(cm_a + cm_b, concatenated)
    # Summed: [[4,0],[1,1]]: IoU_0 = 4/(4+5-4) = 4/5, IoU_1 = 1/(2+1-1) = 1/2.
    assert mean_iou(concatenated) == pytest.approx(13 / 20)
    assert pixel_accuracy(concatenated) == pytest.approx(5 / 6)
    average_of_batches = (mean_iou(cm_a) + mean_iou(cm_b)) / 2
    assert average_of_batches == pytest.approx(5 / 8)
    assert mean_iou(concatenated) != pytest.approx(average_of_batches)


def test_torch_and_numpy_agree() -> None:
    rng = np.random.default_rng(0)
    # Targets include void (11) and a 255 border value; any integer dtypes.
    target = rng.choice([*range(NUM_CLASSES), VOID_INDEX, 255], size=(2, 13, 17)).astype(np.uint8)
    pred = rng.integers(0, NUM_CLASSES, size=(2, 13, 17)).astype(np.int32)
    cm_np = confusion_matrix_np(target, pred)
    cm_t = confusion_matrix(torch.from_numpy(target), torch.from_numpy(pred))
    np.testing.assert_array_equal(cm_t.numpy(), cm_np)
    kept = (target < NUM_CLASSES).sum()  # uint8: neither void (11) nor 255 is below 11
    assert cm_np.sum() == kept
    assert summarize(cm_t) == summarize(cm_np)


def test_uint8_labels_do_not_overflow() -> None:
    # 19 * 20 + 19 = 399 does not fit in uint8: the flat index must be computed in int64.
    target = np.array([19, 0], dtype=np.uint8)
    pred = np.array([19, 1], dtype=np.uint8)
    for cm in (
        confusion_matrix_np(target, pred, num_classes=20, ignore_index=255),
        confusion_matrix(torch.from_numpy(target), torch.from_numpy(pred), 20, 255).numpy(),
    ):
        assert cm[19, 19] == 1 and cm[0, 1] == 1 and cm.sum() == 2


def test_summarize_values() -> None:
    cm = cm_torch([0, 0, 1, 1], [0, 1, 1, 1])
    summary = summarize(cm, class_names=("a", "b", "c"))
    assert summary["miou"] == pytest.approx(7 / 12)
    assert summary["pixel_accuracy"] == pytest.approx(3 / 4)
    assert summary["iou"]["a"] == pytest.approx(1 / 2)
    assert summary["iou"]["b"] == pytest.approx(2 / 3)
    assert summary["iou"]["c"] is None
    assert summary["pixels"] == 4 and isinstance(summary["pixels"], int)


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="same shape"):
        cm_torch([0, 1], [0])
    with pytest.raises(TypeError, match="integer"):
        confusion_matrix(torch.zeros(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        confusion_matrix_np(np.zeros(2, dtype=np.int64), np.zeros(2))
    with pytest.raises(ValueError, match="outside"):
        cm_torch([0, 1], [0, 3])
    with pytest.raises(ValueError, match="3 class names"):
        summarize(np.zeros((2, 2), dtype=np.int64), class_names=("a", "b", "c"))
    with pytest.raises(ValueError, match="square"):
        mean_iou(np.zeros((2, 3)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_confusion_matrix_stays_on_device() -> None:
    target = torch.tensor([0, 1, 3], device="cuda")
    pred = torch.tensor([0, 1, 2], device="cuda")
    cm = confusion_matrix(target, pred, N, VOID)
    assert cm.device.type == "cuda"
    assert cm.cpu().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]

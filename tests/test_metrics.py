"""Confusion matrix and ratios against small matrices worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segray.camvid import CLASSES, NUM_CLASSES, VOID_INDEX
from segray.metrics import (
    class_accuracy,
    confusion_matrix,
    confusion_matrix_np,
    dice_per_class,
    frequency_weighted_iou,
    iou_per_class,
    mean_class_accuracy,
    mean_dice,
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


# ----------------------------------------------------------------------------- the other figures
# Mean class accuracy, Dice and frequency-weighted IoU, against matrices worked out by hand.

# Five classes, one of each kind the definitions treat apart:
#   0: labelled and predicted; 1: absent from the labels but predicted (col 1 = 1 + 2 = 3);
#   2: labelled, never predicted; 3: absent from both; 4: labelled and predicted.
KINDS = np.array(
    [
        [3, 1, 0, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 2, 0, 0, 0],
        [0, 0, 0, 0, 0],
        [1, 0, 0, 0, 5],
    ],
    dtype=np.int64,
)
# rows (labelled) 4, 0, 2, 0, 6 (total 12); columns (predicted) 4, 3, 0, 0, 5; diagonal 3, 0, 0, 0, 5.


def test_class_accuracy_by_hand() -> None:
    acc = class_accuracy(KINDS)
    # 0: 3/4; 1: row 0, undefined; 2: 0/2; 3: row 0, undefined; 4: 5/6
    assert acc[0] == pytest.approx(3 / 4) and acc[2] == 0.0 and acc[4] == pytest.approx(5 / 6)
    assert math.isnan(acc[1]) and math.isnan(acc[3])
    # mean over the three labelled classes: (3/4 + 0 + 5/6) / 3 = (9/12 + 10/12) / 3 = 19/36
    assert mean_class_accuracy(KINDS) == pytest.approx(19 / 36)
    # not pixel accuracy (8/12 = 24/36), nor a mean over all five classes (19/60)
    assert mean_class_accuracy(KINDS) != pytest.approx(pixel_accuracy(KINDS))


def test_dice_by_hand() -> None:
    dice = dice_per_class(KINDS)
    # 0: 2*3/(4+4) = 3/4; 1: 2*0/(0+3) = 0; 2: 2*0/(2+0) = 0; 3: 0/(0+0) undefined; 4: 2*5/(6+5) = 10/11
    assert dice[0] == pytest.approx(3 / 4) and dice[4] == pytest.approx(10 / 11)
    assert dice[1] == 0.0 and dice[2] == 0.0 and math.isnan(dice[3])
    # mean over the four classes with a Dice: (3/4 + 0 + 0 + 10/11) / 4 = (33/44 + 40/44) / 4 = 73/176
    assert mean_dice(KINDS) == pytest.approx(73 / 176)
    # Dice is undefined exactly where IoU is, and Dice_c = 2 IoU_c / (1 + IoU_c) elsewhere
    iou = iou_per_class(KINDS)
    np.testing.assert_array_equal(np.isnan(dice), np.isnan(iou))
    np.testing.assert_allclose(dice[~np.isnan(iou)], (2 * iou / (1 + iou))[~np.isnan(iou)])


def test_frequency_weighted_iou_by_hand() -> None:
    # IoU: 0: 3/(4+4-3) = 3/5; 1: 0/3 = 0; 2: 0/2 = 0; 3: undefined; 4: 5/(6+5-5) = 5/6
    # weights row_c / 12: 4/12, 0, 2/12, 0, 6/12 (class 1, predicted but unlabelled, weighs 0)
    # fwIoU = 4/12 * 3/5 + 2/12 * 0 + 6/12 * 5/6 = 1/5 + 5/12 = 37/60
    assert frequency_weighted_iou(KINDS) == pytest.approx(37 / 60)
    # Class 1 adds nothing itself, but its false positive at a class-0 pixel lowers IoU_0: moving
    # that pixel from predicted 1 back to 0 (cm[0] = 4 0 0 0 0; col 0 = 4 + 1 = 5) raises IoU_0 to
    # 4/(4+5-4) = 4/5 and fwIoU to 4/12 * 4/5 + 6/12 * 5/6 = 16/60 + 25/60 = 41/60.
    fixed = KINDS.copy()
    fixed[0, 1], fixed[0, 0] = 0, 4
    assert frequency_weighted_iou(fixed) == pytest.approx(41 / 60)


def test_a_class_present_but_never_predicted() -> None:
    # Two classes, everything predicted as 0: [[2, 0], [3, 0]].
    cm = np.array([[2, 0], [3, 0]], np.int64)
    # acc: 2/2, 0/3 -> mean 1/2; Dice: 2*2/(2+5) = 4/7, 0/(3+0) = 0 -> mean 2/7
    np.testing.assert_allclose(class_accuracy(cm), [1.0, 0.0])
    assert mean_class_accuracy(cm) == pytest.approx(1 / 2)
    np.testing.assert_allclose(dice_per_class(cm), [4 / 7, 0.0])
    assert mean_dice(cm) == pytest.approx(2 / 7)
    # IoU_0 = 2/(2+5-2) = 2/5, IoU_1 = 0; fwIoU = 2/5 * 2/5 + 3/5 * 0 = 4/25
    assert frequency_weighted_iou(cm) == pytest.approx(4 / 25)


def test_all_zero_matrix_has_no_figures() -> None:
    cm = np.zeros((3, 3), np.int64)
    assert np.isnan(class_accuracy(cm)).all() and np.isnan(dice_per_class(cm)).all()
    for figure in (mean_class_accuracy, mean_dice, frequency_weighted_iou):
        assert math.isnan(figure(cm)), figure.__name__
    summary = summarize(cm, class_names=("a", "b", "c"))
    for key in ("mean_class_accuracy", "mean_dice", "fwiou"):
        assert math.isnan(summary[key]), key
    assert summary["class_accuracy"] == summary["dice"] == {"a": None, "b": None, "c": None}


def test_summarize_has_the_other_figures_with_none_where_undefined() -> None:
    summary = summarize(torch.from_numpy(KINDS), class_names=("a", "b", "c", "d", "e"))
    assert summary["mean_class_accuracy"] == pytest.approx(19 / 36)
    assert summary["mean_dice"] == pytest.approx(73 / 176)
    assert summary["fwiou"] == pytest.approx(37 / 60)
    assert summary["class_accuracy"] == pytest.approx({"a": 3 / 4, "b": None, "c": 0.0, "d": None, "e": 5 / 6})
    assert summary["dice"] == pytest.approx({"a": 3 / 4, "b": 0.0, "c": 0.0, "d": None, "e": 10 / 11})
    assert summary["iou"]["b"] == 0.0 and summary["iou"]["d"] is None  # the keys callers had are unchanged
    assert summary["pixels"] == 12 and summary["pixel_accuracy"] == pytest.approx(8 / 12)
    for key in ("class_accuracy", "dice"):
        assert all(v is None or type(v) is float for v in summary[key].values())  # JSON-able, not np.float64


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_summarize_matches_a_brute_force_over_pixels(seed: int) -> None:
    """Each figure from boolean masks of the pixels, never from a confusion matrix."""
    rng = np.random.default_rng(seed)
    k, void = 7, 255
    # Labels use classes 0..4 and void; predictions 0..3 and 5: class 4 is labelled and never
    # predicted, 5 predicted and never labelled, 6 in neither.
    target = rng.choice([0, 1, 2, 3, 4, void], size=(3, 21, 17), p=[0.3, 0.2, 0.2, 0.1, 0.1, 0.1]).astype(np.uint8)
    pred = rng.choice([0, 1, 2, 3, 5], size=target.shape).astype(np.uint8)
    pred[target == 0] = np.where(rng.random((target == 0).sum()) < 0.7, 0, pred[target == 0])  # some skill
    summary = summarize(confusion_matrix_np(target, pred, k, void), class_names=[str(c) for c in range(k)])

    scored = target != void
    total = scored.sum()
    accuracy, dice, iou = {}, {}, {}
    for c in range(k):
        is_c, said_c = scored & (target == c), scored & (pred == c)
        hit = (is_c & said_c).sum()
        accuracy[str(c)] = hit / is_c.sum() if is_c.sum() else None
        dice[str(c)] = 2 * hit / (is_c.sum() + said_c.sum()) if (is_c | said_c).any() else None
        iou[str(c)] = hit / (is_c | said_c).sum() if (is_c | said_c).any() else None
    assert accuracy["5"] is None and accuracy["6"] is None and dice["6"] is None and dice["5"] == 0.0
    assert accuracy["4"] == 0.0 and dice["4"] == 0.0
    assert summary["class_accuracy"] == pytest.approx(accuracy)
    assert summary["dice"] == pytest.approx(dice)
    defined_acc = [v for v in accuracy.values() if v is not None]
    defined_dice = [v for v in dice.values() if v is not None]
    assert summary["mean_class_accuracy"] == pytest.approx(sum(defined_acc) / len(defined_acc))
    assert summary["mean_dice"] == pytest.approx(sum(defined_dice) / len(defined_dice))
    fw = sum((scored & (target == c)).sum() / total * iou[str(c)] for c in range(k) if (scored & (target == c)).any())
    assert summary["fwiou"] == pytest.approx(fw)
    assert summary["pixel_accuracy"] == pytest.approx((target == pred)[scored].mean())

"""``train --lovasz WEIGHT`` (segray/recipe.py lovasz_softmax): the loss against the Lovász
extension computed from its definition, against ``1 - IoU`` for hard predictions, its gradient,
void pixels, and the training step that adds it (segray/worker.py train_one_epoch)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segray import worker
from segray.metrics import confusion_matrix, iou_per_class
from segray.recipe import Augmentation, lovasz_softmax, make_scheduler
from segray.runrecord import resume_refusal
from segray.train import TrainConfig, TrainError

VOID = 255


def _brute_force(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The Lovász extension of the Jaccard loss from its definition, class by class, with sets:
    errors m sorted decreasingly, sum_i m_(i) * (J(first i pixels) - J(first i-1)), where
    J(M) = |M| / |{y = c} union M| for the set M of pixels counted as mistakes."""
    out = []
    for c in range(probs.shape[1]):
        fg = {i for i in range(len(labels)) if labels[i] == c}
        if not fg:
            continue
        m = [abs((1.0 if i in fg else 0.0) - probs[i, c].item()) for i in range(len(labels))]
        order = sorted(range(len(labels)), key=lambda i: -m[i])
        total, mistakes, previous = 0.0, set(), 0.0
        for i in order:
            mistakes.add(i)
            j = len(mistakes) / len(fg | mistakes)
            total += m[i] * (j - previous)
            previous = j
        out.append(total)
    return sum(out) / len(out)


@pytest.mark.parametrize("seed", range(4))
def test_the_loss_is_the_lovasz_extension_of_the_jaccard_loss(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 3, 5, generator=g) * 2
    labels = torch.randint(0, 3, (2, 3, 5), generator=g)  # class 3 absent: not averaged
    labels[0, 1, :2] = VOID
    probs = logits.softmax(1).permute(0, 2, 3, 1)[labels != VOID]
    expected = _brute_force(probs, labels[labels != VOID])
    assert lovasz_softmax(logits, labels, VOID).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_for_hard_predictions_it_is_one_minus_iou_over_the_present_classes(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (3, 6, 7), generator=g)
    labels[:, 0] = VOID
    pred = torch.randint(0, 5, (3, 6, 7), generator=g)  # predicts class 4, which no label has
    logits = F.one_hot(pred, 5).permute(0, 3, 1, 2).float() * 50  # softmax = one-hot to float precision
    iou = iou_per_class(confusion_matrix(labels, pred, 5, VOID))
    present = [c for c in range(5) if (labels == c).any()]
    expected = sum(1 - iou[c] for c in present) / len(present)
    assert lovasz_softmax(logits, labels, VOID).item() == pytest.approx(expected, abs=1e-6)
    perfect = F.one_hot(labels.clamp(max=4), 5).permute(0, 3, 1, 2).float() * 50
    assert lovasz_softmax(perfect, labels, VOID).item() == pytest.approx(0.0, abs=1e-6)


def test_an_all_void_batch_gives_zero_and_a_zero_gradient():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = lovasz_softmax(logits, torch.full((1, 4, 4), VOID), VOID)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_descending_its_gradient_raises_the_iou():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (2, 8, 8), generator=g)
    logits = torch.randn(2, 3, 8, 8, generator=g, requires_grad=True)
    start = lovasz_softmax(logits, labels, VOID).item()
    opt = torch.optim.SGD([logits], lr=20.0)
    for _ in range(60):
        opt.zero_grad()
        lovasz_softmax(logits, labels, VOID).backward()
        opt.step()
    miou = iou_per_class(confusion_matrix(labels, logits.argmax(1), 3, VOID)).mean()
    assert lovasz_softmax(logits, labels, VOID).item() < start / 3 and miou > 0.9


def _step(lovasz: float):
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 3, padding=1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = make_scheduler(opt, 0.01, "constant", [[1.0, 1.0]], 0, 1)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, 3, 6, 8, generator=g), torch.randint(0, 4, (2, 6, 8), generator=g))]
    totals = worker.train_one_epoch(model, opt, sched, batches, None, 0, Augmentation(enabled=False),
                                    torch.device("cpu"), VOID, 1, agree=False, lovasz=lovasz)
    return totals, model.weight.detach().clone()


def test_a_training_step_adds_it_and_train_loss_stays_the_cross_entropy():
    (ce_totals, ce_weights), (lz_totals, lz_weights) = _step(0.0), _step(1.0)
    assert torch.equal(ce_totals, lz_totals)  # the same cross-entropy sum, before the step
    assert not torch.allclose(ce_weights, lz_weights)  # a different gradient


def test_the_flag_is_checked_and_is_part_of_the_recipe():
    assert TrainConfig(data="d", storage="s", name="n", lovasz=0.5).lovasz == 0.5
    for bad in (-1, 10.5, float("nan"), None):
        with pytest.raises(TrainError, match="--lovasz must be a number from 0"):
            TrainConfig(data="d", storage="s", name="n", lovasz=bad)
    assert "--lovasz was 1.0, this command has 0.0" in resume_refusal("r", {"lovasz": 1.0}, {"lovasz": 0.0})
    assert resume_refusal("r", {}, {"lovasz": 1.0}) is None  # a run from before the flag


def test_the_brute_force_reference_is_itself_right_on_a_hand_case():
    """Two pixels of class 0, one of class 1; hard, wrong on one class-0 pixel: IoU_0 = 1/2,
    IoU_1 = 1/2, loss 1/2 (a check of _brute_force, which the other tests trust)."""
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    assert _brute_force(probs, labels) == pytest.approx(0.5)

"""The training recipe: what a researcher tunes, in pure torch and numpy (no Ray, no storage).

Class weights from the prepared dataset's pixel counts, the learning-rate schedule (a function of
the epoch position through knots, so that a run extended on resume continues without a jump:
below), augmentation (flip, scale-crop, colour jitter, ClassMix; labels with NEAREST,
padding with void; every setting in one frozen :class:`Augmentation`) and the weighted loss.
segray/worker.py wires them into the Ray Train loop.

**The LR schedule** is ``lr * lr_factor(schedule, progress)``, where progress in [0, 1] is a
piecewise-linear function of the *epoch position* x (epoch e, step k of S steps of an epoch:
x = e - 1 + k / S) through the knots ``[(0, 0), (E, 1)]`` of a run of E epochs: a function of
epochs, not of a step count, so a resume with another ``--num-workers`` (another S) continues
where it was. A resume after epoch d with a new ``--epochs`` E1 (longer or, if not yet reached,
shorter) keeps the knots up to d and re-anchors the rest: ``(d, p_d)`` then ``(E1, 1)``, with
p_d the progress the run had reached at d. The first new step gets exactly the LR the run
would have had at that point (no jump), the rest of the schedule is stretched (or squeezed)
over epochs d..E1, and it ends at the schedule's final value at E1. A run whose schedule had
already ended (d = E) stays at the final value (0 for cosine and onecycle) for its extra
epochs: train on with a new run instead. The knots are in every checkpoint (``schedule``);
on resume the scheduler is rebuilt from them and the epoch, never from a step count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segray import modelio
from segray.camvid import VOID_INDEX
from segray.errors import ConfigError

SCHEDULES: tuple[str, ...] = ("constant", "cosine", "onecycle")
CLASS_WEIGHTINGS: tuple[str, ...] = ("median_freq", "sqrt_median_freq", "none")

# Median-frequency weights of a class seen in a handful of pixels run into the thousands, and
# then a few (possibly mislabelled) pixels dominate the loss; CamVid's rarest class gets ~15.
MAX_CLASS_WEIGHT = 50.0
# Random scale of the scale-crop augmentation, drawn log-uniformly (zoom in and out equally
# often). Milder than torchvision's 0.5-2.0: short runs on small frames.
SCALE_RANGE: tuple[float, float] = (0.75, 1.5)
FLIP_PROB = 0.5
# Colour jitter: brightness, contrast and saturation each scaled by a factor drawn uniformly
# from [1 - JITTER, 1 + JITTER] per image (torchvision's ColorJitter(0.25, 0.25, 0.25), no hue).
JITTER = 0.25
# OneCycle-shaped schedule: linear warm-up from lr/25 over the first 30 % of steps, then cosine
# to ~0 (torch.optim.lr_scheduler.OneCycleLR's defaults, without momentum cycling).
ONECYCLE_WARMUP = 0.3
ONECYCLE_START = 1 / 25


@dataclass(frozen=True)
class Augmentation:
    """Every augmentation setting of a run, in one frozen object (TrainConfig.augmentation).

    One field is one setting: its ``metadata`` holds the command-line flag (``jobs/train.py``
    makes a flag whose ``dest`` is the field's name) and the key under which the run's recipe
    records it (segray/runrecord.py compares it on resume). Adding a setting is a field here,
    its use in :func:`augment_batch`, and its flag."""

    enabled: bool = field(default=True, metadata={"flag": "augmentation (--no-augment)", "key": "augment"})
    crop: tuple[int, int] | None = field(default=None, metadata={"flag": "--crop"})
    scale_range: tuple[float, float] = field(default=SCALE_RANGE, metadata={"flag": "--scale-range"})
    flip_prob: float = field(default=FLIP_PROB, metadata={"flag": "--flip-prob"})
    jitter: float = field(default=JITTER, metadata={"flag": "--jitter"})
    classmix: float = field(default=0.0, metadata={"flag": "--classmix"})

    def __post_init__(self) -> None:
        # JSON and argparse hand lists; keep tuples so that the object stays hashable and equal.
        if self.crop is not None:
            object.__setattr__(self, "crop", tuple(self.crop))
        object.__setattr__(self, "scale_range", tuple(self.scale_range))
        if self.crop is not None:
            if len(self.crop) != 2 or any(not isinstance(v, int) or v < 16 for v in self.crop):
                raise ConfigError(f"--crop must be HxW with both sides at least 16, got {self.crop!r}")
        if len(self.scale_range) != 2:
            raise ConfigError(f"--scale-range must be LO,HI, e.g. 0.75,1.5; got {self.scale_range!r}")
        lo, hi = self.scale_range
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise ConfigError(f"--scale-range must be LO,HI with 0 < LO <= HI, e.g. 0.75,1.5; got {lo:g},{hi:g}")
        if not (isinstance(self.flip_prob, (int, float)) and 0.0 <= self.flip_prob <= 1.0):
            raise ConfigError(f"--flip-prob must be between 0 and 1, got {self.flip_prob!r}")
        if not (isinstance(self.jitter, (int, float)) and 0.0 <= self.jitter < 1.0):
            raise ConfigError(f"--jitter must be at least 0 and below 1, got {self.jitter!r}")
        if not (isinstance(self.classmix, (int, float)) and 0.0 <= self.classmix <= 1.0):
            raise ConfigError(f"--classmix must be between 0 and 1, got {self.classmix!r}")
        for flag, on in (("--crop", self.crop is not None), ("--classmix", bool(self.classmix))):
            if on and not self.enabled:
                raise ConfigError(f"{flag} is an augmentation; it cannot be combined with --no-augment")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def record(self) -> dict[str, Any]:
        """The settings as the run's recipe records them: ``{key: JSON value}``."""
        return {f.metadata.get("key", f.name): _json(getattr(self, f.name)) for f in fields(self)}


def augmentation_names() -> tuple[tuple[str, str], ...]:
    """(recipe key, name in messages) of every augmentation setting."""
    return tuple((f.metadata.get("key", f.name), f.metadata.get("flag", f.name)) for f in fields(Augmentation))


def _json(x: Any) -> Any:
    return [_json(v) for v in x] if isinstance(x, (list, tuple)) else x


def median_frequency_weights(counts: Sequence[int], max_weight: float = MAX_CLASS_WEIGHT) -> np.ndarray:
    """Class weights ``median(freq) / freq_c`` (Eigen & Fergus 2015, as SegNet uses on CamVid).

    ``counts``: (C,) training pixels per class, void excluded. freq_c = count_c / total (the
    paper divides by the pixels of images containing c; dataset.json keeps totals only).
    The median is over classes that occur. A class with no pixels never is a training target,
    so its weight only matters for the validation loss: 1, neutral. Returns (C,) float32,
    capped at ``max_weight``.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError(f"class pixel counts must be a 1-D list of non-negative numbers, got {counts.tolist()}")
    weights = np.ones(counts.shape, dtype=np.float64)
    present = counts > 0
    if present.any():
        freq = counts / counts.sum()
        weights[present] = np.median(freq[present]) / freq[present]
    return np.minimum(weights, max_weight).astype(np.float32)


def class_weights(weighting: str, counts: Sequence[int]) -> np.ndarray | None:
    """The loss weights of ``--class-weighting``: (C,) float32, or None for plain cross-entropy."""
    if weighting == "none":
        return None
    if weighting == "median_freq":
        return median_frequency_weights(counts)
    if weighting == "sqrt_median_freq":
        # Softer: rare classes still count more, but a building pixel no longer weighs 24x less
        # than a pole pixel (CamVid: 0.19 vs 4.6 become 0.44 vs 2.1), which trades fewer
        # building pixels for false poles, signs and fences.
        return np.sqrt(median_frequency_weights(counts)).astype(np.float32)
    raise ValueError(f"unknown class weighting {weighting!r}; valid: {', '.join(CLASS_WEIGHTINGS)}")


def logit_bias(tau: float, weights: Sequence[float] | None) -> tuple[float, ...] | None:
    """What ``--logit-adjust TAU`` adds to the logits before the argmax: ``-TAU * log(w_c)`` for
    the class weights ``w`` of --class-weighting (None when TAU is 0 or there are no weights).

    A loss that weighs class c by w_c is minimised by scores whose softmax is proportional to
    ``w_c * p(c|x)``: the rare classes' scores are pushed up by ``log w_c``, and an unseen street
    gets poles, fences and cars where there are none. TAU 1 removes that shift at prediction time
    and keeps the weighted gradient's effect on what the network learns (the logit adjustment of
    Menon et al., 2021, for the prior a weighted loss induces); TAU between 0 and 1 removes part.
    """
    if not tau or weights is None:
        return None
    return tuple(float(-tau * math.log(w)) for w in weights)


def lr_factor(schedule: str, progress: float) -> float:
    """Multiplier of the base learning rate at ``progress`` in [0, 1] of all training steps."""
    p = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "onecycle":
        if p < ONECYCLE_WARMUP:
            return ONECYCLE_START + (1.0 - ONECYCLE_START) * p / ONECYCLE_WARMUP
        return 0.5 * (1.0 + math.cos(math.pi * (p - ONECYCLE_WARMUP) / (1.0 - ONECYCLE_WARMUP)))
    raise ValueError(f"unknown lr schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")


def fresh_schedule(epochs: int) -> list[list[float]]:
    """The knots (epoch position, progress) of a run of ``epochs`` epochs: progress = x / epochs."""
    return [[0.0, 0.0], [float(epochs), 1.0]]


def schedule_progress(knots: Sequence[Sequence[float]], position: float) -> float:
    """Progress in [0, 1] at epoch position ``position`` (epoch e, step k of S: e - 1 + k / S),
    piecewise linear through ``knots``; constant past the last knot."""
    return float(np.interp(position, [float(k[0]) for k in knots], [float(k[1]) for k in knots]))


def extend_schedule(knots: Sequence[Sequence[float]], done: int, epochs: int) -> list[list[float]]:
    """The knots of a run resumed after epoch ``done`` with ``--epochs epochs``.

    Unchanged when the run keeps its length (or has nothing left to train); a run that has not
    trained yet starts afresh. Otherwise the knots up to ``done`` are kept and the rest of the
    schedule is re-anchored: ``(done, p)`` with p the progress reached at ``done``, then
    ``(epochs, 1)``. The LR is continuous at ``done`` and reaches the schedule's final value at
    ``epochs`` (module docstring)."""
    knots = [[float(e), float(p)] for e, p in knots]
    if done <= 0:
        return fresh_schedule(epochs)
    if knots[-1][0] == float(epochs) or done >= epochs:
        return knots
    reached = schedule_progress(knots, done)
    return [k for k in knots if k[0] < done] + [[float(done), reached], [float(epochs), 1.0]]


def lr_factor_at(schedule: str, knots: Sequence[Sequence[float]], position: float) -> float:
    """Multiplier of the base learning rate at epoch position ``position`` of a run with ``knots``."""
    return lr_factor(schedule, schedule_progress(knots, position))


def make_scheduler(optimizer, lr: float, schedule: str, knots: Sequence[Sequence[float]], start_epoch: int,
                   steps_per_epoch: int):
    """A LambdaLR whose step t (counted from this call) is at epoch position
    ``start_epoch + t / steps_per_epoch``: the optimizer's LR is ``lr * lr_factor_at(...)``.

    Built from the epoch and the knots on every (re)start, never restored from a step count, so
    a resume continues on the schedule whatever the steps per epoch were before. Call it after
    ``optimizer.load_state_dict``: it resets every group's base LR to ``lr``."""
    knots = [list(k) for k in knots]
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["initial_lr"] = lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: lr_factor_at(schedule, knots, start_epoch + t / steps_per_epoch)
    )


def augment(
    images: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    scale_range: tuple[float, float] = SCALE_RANGE,
    flip_prob: float = FLIP_PROB,
    void_index: int = VOID_INDEX,
    jitter: float = JITTER,
    mean: Sequence[float] = modelio.DEFAULT_MEAN,
    std: Sequence[float] = modelio.DEFAULT_STD,
    crop: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random colour jitter, then horizontal flip and scale-crop in one resampling pass, per image.

    With ``crop = (ch, cw)`` the output is a random ch x cw window of the scaled image, at the same
    pixel scale (a cheaper training step; validation still sees whole frames).

    images: (N, C, H, W) float, already normalised, so that padding with 0 is the mean colour
    (what the network's own zero padding shows too). labels: (N, H, W) integer class indices.
    Each image is scaled by s in ``scale_range`` (log-uniform) around a random centre and cut
    back to (H, W): s > 1 crops a random window of the enlarged image, s < 1 places the shrunk
    image at a random position and pads the rest. Images are resampled bilinearly, labels with
    nearest neighbour (no new class values) and padded with ``void_index``. Before that, with
    ``jitter`` > 0, brightness, contrast and saturation are scaled in pixel space (``mean``/``std``
    undo the normalisation) and clipped to [0, 1]. Random numbers come from ``generator`` (CPU),
    so results do not depend on the device. Same shapes and dtypes out.
    """
    n, _, h, w = images.shape
    if jitter > 0:
        images = color_jitter(images, generator, jitter, mean, std)
    lo, hi = math.log(scale_range[0]), math.log(scale_range[1])
    scale = torch.exp(lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64))
    flip = torch.where(torch.rand(n, generator=generator) < flip_prob, -1.0, 1.0).double()
    oh, ow = crop if crop is not None else (h, w)
    # Output -> input coordinates, in [-1, 1] units: the window covers (ow / w) / scale of the width.
    zoom_x, zoom_y = (ow / w) / scale, (oh / h) / scale
    # How far the window may move and stay inside (window smaller than the image) / on it (larger).
    room = torch.stack([(1.0 - zoom_x).abs(), (1.0 - zoom_y).abs()])
    shift = (torch.rand(2, n, generator=generator, dtype=torch.float64) * 2 - 1) * room
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = zoom_x * flip
    theta[:, 0, 2] = shift[0]
    theta[:, 1, 1] = zoom_y
    theta[:, 1, 2] = shift[1]
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, [n, 1, oh, ow], align_corners=False)
    out_images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # Labels shifted by +1 so that zero padding becomes -1, i.e. "outside", then void.
    shifted = (labels.to(images.dtype) + 1).unsqueeze(1)
    sampled = F.grid_sample(shifted, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    sampled = sampled.squeeze(1).round().long() - 1
    out_labels = torch.where(sampled < 0, torch.full_like(sampled, void_index), sampled).to(labels.dtype)
    return out_images, out_labels


def augment_batch(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, settings: Augmentation,
                  void_index: int = VOID_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`augment` with a run's :class:`Augmentation` (``enabled`` False: unchanged)."""
    if not settings.enabled:
        return images, labels
    images, labels = augment(images, labels, generator, scale_range=settings.scale_range, flip_prob=settings.flip_prob,
                             void_index=void_index, jitter=settings.jitter, crop=settings.crop)
    if settings.classmix:
        images, labels = class_mix(images, labels, generator, settings.classmix, void_index)
    return images, labels


def class_mix(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, prob: float,
              void_index: int = VOID_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """ClassMix (Olsson et al., WACV 2021) within a batch: with probability ``prob``, image i
    receives the pixels of half the classes (rounded up, drawn at random) present in its partner,
    image i - 1 (cyclically), image and label alike; void pixels are never pasted. Objects then
    appear on streets and beside neighbours they were not filmed with, so that the network
    learns them from their own appearance rather than their context (train --classmix).

    Same shapes and dtypes out; the inputs are not modified. Random numbers come from
    ``generator`` (CPU); a batch of one is returned unchanged."""
    n = images.shape[0]
    if n < 2:
        return images, labels
    out_images, out_labels = images.clone(), labels.clone()
    for i in range(n):
        if torch.rand(1, generator=generator).item() >= prob:
            continue
        j = (i - 1) % n
        present = torch.unique(labels[j])
        present = present[present != void_index]
        if present.numel() == 0:
            continue
        chosen = present[torch.randperm(present.numel(), generator=generator)[: (present.numel() + 1) // 2].to(present.device)]
        mask = torch.isin(labels[j], chosen)
        out_labels[i] = torch.where(mask, labels[j], out_labels[i])
        out_images[i] = torch.where(mask.unsqueeze(0), images[j], out_images[i])
    return out_images, out_labels


def color_jitter(
    images: torch.Tensor,
    generator: torch.Generator,
    strength: float = JITTER,
    mean: Sequence[float] = modelio.DEFAULT_MEAN,
    std: Sequence[float] = modelio.DEFAULT_STD,
) -> torch.Tensor:
    """Brightness, contrast, saturation of normalised (N, 3, H, W) images, each scaled by a factor in
    [1 - strength, 1 + strength] per image (ColorJitter's definitions), in pixel space, clipped."""
    n = images.shape[0]
    factors = 1.0 + (torch.rand(3, n, 1, 1, 1, generator=generator) * 2 - 1) * strength
    factors = factors.to(device=images.device, dtype=images.dtype)
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    rgb = images * s + m
    rgb = (rgb * factors[0]).clamp(0, 1)  # brightness
    luma = torch.tensor((0.299, 0.587, 0.114), device=images.device, dtype=images.dtype).view(1, 3, 1, 1)  # as PIL
    mean_gray = (rgb * luma).sum(dim=1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    rgb = ((rgb - mean_gray) * factors[1] + mean_gray).clamp(0, 1)  # contrast
    gray = (rgb * luma).sum(dim=1, keepdim=True)
    rgb = ((rgb - gray) * factors[2] + gray).clamp(0, 1)  # saturation
    return ((rgb - m) / s).contiguous(memory_format=torch.contiguous_format)


def lovasz_softmax(logits: torch.Tensor, labels: torch.Tensor, void_index: int = VOID_INDEX) -> torch.Tensor:
    """The Lovász-softmax loss (Berman et al., CVPR 2018) of a batch: a convex surrogate of
    ``1 - IoU``, averaged over the classes present in ``labels``, over every labelled pixel of
    the batch at once (train --lovasz).

    Per class c: the pixels' errors ``|[y = c] - softmax_c|`` sorted in decreasing order, dotted
    with the increments of the Jaccard loss along that order. For one-hot probabilities it
    equals the mean of ``1 - IoU_c`` over the present classes; a class absent from the labels
    does not count (its false positives still cost the classes they were taken from). An
    all-void batch gives 0 with no gradient. Computed in float32."""
    valid = labels != void_index
    target = labels[valid].long()
    if target.numel() == 0:
        return logits.float().sum() * 0.0
    probs = logits.float().softmax(1).permute(0, 2, 3, 1)[valid]  # (P, C)
    fg = F.one_hot(target, probs.shape[1]).to(probs.dtype)
    errors, order = (fg - probs).abs().sort(dim=0, descending=True)
    fg = fg.gather(0, order)
    total = fg.sum(0)
    jaccard = 1.0 - (total - fg.cumsum(0)) / (total + (1.0 - fg).cumsum(0))  # the union is >= 1
    grad = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
    return (errors * grad).sum(0)[total > 0].mean()


def weighted_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None, void_index: int = VOID_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over labelled pixels of w[t] * CE, sum of w[t]): a weighted mean is their ratio.

    Kept as two sums so that an all-void batch gives 0 / 0 (no gradient) rather than NaN, and
    so that workers can add their sums before dividing, like the confusion matrix."""
    loss_sum = F.cross_entropy(logits.float(), labels, weight=weight, ignore_index=void_index, reduction="sum")
    valid = labels != void_index
    if weight is None:
        denom = valid.sum().to(loss_sum.dtype)
    else:
        denom = weight[labels[valid]].sum()
    return loss_sum, denom

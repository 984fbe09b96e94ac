"""The train stage: a U-Net trained with DDP on Ray Train, checkpoints in object storage.

    driver (train)                             each Ray Train worker (train_loop_per_worker)
    --------------                             ----------------------------------------------
    check dataset, storage, cluster size       resume from ray.train.get_checkpoint()
    read Parquet splits into the object store  per epoch: its shard of train -> augment -> DDP step
    TorchTrainer.fit()                   --->  its shard of val -> confusion matrix, all_reduce
    export the best checkpoint to model/       rank 0: checkpoint to a temp dir; all ranks report
    write metrics.json, print a summary

Run folder ``<storage>/<name>/``: Ray Train's ``checkpoint_epoch_NNNN/`` folders (``state.pt``:
weights, optimizer, scheduler, epoch, model config, classes, history; ``meta.json``: the same
without tensors) and ``checkpoint_manager_snapshot.json``, then ``model/`` (modelio) and
``metrics.json`` once training ends. Rerunning the same command resumes after the latest
checkpoint (Ray Train V2 reloads the snapshot of the run folder of the same name); with every
epoch done it only re-exports.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segray import modelio, storage
from segray.camvid import NUM_CLASSES, VOID_INDEX
from segray.dataset import COL_IMAGE, COL_LABEL, DatasetError, DatasetInfo, load_info, rows_to_arrays, split_uri
from segray.metrics import confusion_matrix, summarize
from segray.model import UNetConfig, build_model

TRAIN_SPLIT = "train"
VAL_SPLIT = "val"
CHECKPOINT_FILE = "state.pt"  # torch.save of plain containers: loads with weights_only=True
CHECKPOINT_META = "meta.json"
CHECKPOINT_PREFIX = "checkpoint_epoch_"
METRICS_FILE = "metrics.json"
SCORE = "val_miou"  # what "best checkpoint" means

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
SHUFFLE_BUFFER_ROWS = 256  # rows held per worker to shuffle its shard locally, every epoch
BLOCK_BYTES = 32 * 1024 * 1024  # Ray Data block size of the training data in the object store
# A worker whose train + val shards fit in this many bytes (decoded uint8) keeps them in memory
# after the first epoch and shuffles them itself: every later epoch then skips Ray Data's split
# (its start-up, object transfers and shuffle buffer): +3 % images/s on a 2-core machine, and
# validation starts at once (docs/benchmarks.md). CamVid at 176x240: ~40 MB a worker.
# SEGRAY_SHARD_CACHE_BYTES in the driver's environment overrides it (0: stream every epoch).
CACHE_SHARD_MAX_BYTES = 1024**3

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class TrainError(ValueError):
    """A training run that cannot start or finish; the message names the thing and the fix."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run is made from; built once from the command line."""

    data: str  # prepared dataset (jobs/prepare.py --dest)
    storage: str  # parent of the run folder
    name: str  # run folder name; the same name resumes
    epochs: int = 10
    num_workers: int = 2
    use_gpu: bool = False
    batch_size: int = 8  # per worker
    lr: float = 1e-3
    weight_decay: float = 0.0  # decoupled (AdamW); with 0 the optimizer is exactly Adam
    base_channels: int = 64
    seed: int = 0
    lr_schedule: str = "constant"
    class_weighting: str = "sqrt_median_freq"
    augment: bool = True
    max_failures: int = 0  # worker-group restarts from the latest checkpoint
    cpus_per_worker: int = 1
    threads: int | None = None  # torch threads per CPU worker; None: cpus_per_worker
    keep_checkpoints: int = 2  # best by val mIoU (the latest is always kept too)
    crop: tuple[int, int] | None = None  # train on random (H, W) windows; None: whole frames
    scale_range: tuple[float, float] = SCALE_RANGE  # of the scale-crop augmentation

    def __post_init__(self) -> None:
        for flag, value in (("--data", self.data), ("--storage", self.storage)):
            if not isinstance(value, str) or not value:
                raise TrainError(f"{flag} is empty; pass s3://bucket/prefix or a local path")
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise TrainError(f"--name {self.name!r}: use letters, digits, '.', '_' and '-' (no '/'), e.g. unet-camvid")
        positive = {
            "--epochs": self.epochs,
            "--num-workers": self.num_workers,
            "--batch-size": self.batch_size,
            "--base-channels": self.base_channels,
            "--cpus-per-worker": self.cpus_per_worker,
            "--keep-checkpoints": self.keep_checkpoints,
        }
        if self.threads is not None:
            positive["--threads"] = self.threads
        for flag, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TrainError(f"{flag} must be a positive whole number, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise TrainError(f"--lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise TrainError(f"--weight-decay must be >= 0, got {self.weight_decay!r}")
        if self.lr_schedule not in SCHEDULES:
            raise TrainError(f"--lr-schedule {self.lr_schedule!r} is unknown; valid: {', '.join(SCHEDULES)}")
        if self.class_weighting not in CLASS_WEIGHTINGS:
            raise TrainError(
                f"--class-weighting {self.class_weighting!r} is unknown; valid: {', '.join(CLASS_WEIGHTINGS)}"
            )
        if not isinstance(self.max_failures, int) or self.max_failures < -1:
            raise TrainError(f"--max-failures must be >= 0 (or -1: retry forever), got {self.max_failures!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise TrainError(f"--seed must be a non-negative whole number, got {self.seed!r}")
        if self.crop is not None:
            if len(self.crop) != 2 or any(not isinstance(v, int) or v < 16 for v in self.crop):
                raise TrainError(f"--crop must be HxW with both sides at least 16, got {self.crop!r}")
            if not self.augment:
                raise TrainError("--crop is an augmentation; it cannot be combined with --no-augment")
        lo, hi = self.scale_range
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise TrainError(f"--scale-range must be LO,HI with 0 < LO <= HI, e.g. 0.75,1.5; got {lo:g},{hi:g}")

    @property
    def torch_threads(self) -> int:
        return self.threads or self.cpus_per_worker

    @property
    def run_uri(self) -> str:
        return storage.join(storage.normalize(self.storage), self.name)

    @property
    def unet(self) -> UNetConfig:
        return UNetConfig(base_channels=self.base_channels)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LoopSpec:
    """What every worker needs besides the config: facts of the dataset, decided on the driver."""

    config: TrainConfig
    height: int
    width: int
    train_rows: int
    classes: tuple[str, ...]
    class_weights: tuple[float, ...] | None  # None: unweighted cross-entropy
    cache_shards: bool = False  # workers keep their shards in memory after epoch 1 (CACHE_SHARD_MAX_BYTES)


@dataclass(frozen=True)
class TrainResult:
    run: str  # <storage>/<name>
    model: str  # <run>/model
    history: list[dict]  # one entry per epoch, from epoch 1
    best_epoch: int
    best: dict  # the history entry of best_epoch
    epochs_this_run: int
    elapsed_s: float


# ------------------------------------------------------------------- pure parts (no Ray)


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
    (what the U-Net's own zero padding shows too). labels: (N, H, W) integer class indices.
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


def weighted_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over labelled pixels of w[t] * CE, sum of w[t]): a weighted mean is their ratio.

    Kept as two sums so that an all-void batch gives 0 / 0 (no gradient) rather than NaN, and
    so that workers can add their sums before dividing, like the confusion matrix."""
    loss_sum = F.cross_entropy(logits.float(), labels, weight=weight, ignore_index=VOID_INDEX, reduction="sum")
    valid = labels != VOID_INDEX
    if weight is None:
        denom = valid.sum().to(loss_sum.dtype)
    else:
        denom = weight[labels[valid]].sum()
    return loss_sum, denom


# --------------------------------------------------------------- the worker side (Ray Train)


def _say(line: str) -> None:
    # Ray Train patches print() on its workers to tee into its logger, and the driver then shows
    # every line twice; a write to the process's real stdout is forwarded once.
    print(line, file=sys.__stdout__, flush=True)


def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _batches(shard, spec: LoopSpec, device: torch.device, channels_last: bool, shuffle_seed: int | None):
    """(images (N, 3, H, W) float normalised, labels (N, H, W) int64) on ``device``."""
    shuffle = {"local_shuffle_buffer_size": SHUFFLE_BUFFER_ROWS, "local_shuffle_seed": shuffle_seed} if (
        shuffle_seed is not None
    ) else {}
    for batch in shard.iter_batches(batch_size=spec.config.batch_size, batch_format="numpy", **shuffle):
        images, labels = rows_to_arrays(batch, spec.height, spec.width)
        # frombuffer arrays are read-only; torch wants writable memory (a batch: ~1 MB to copy).
        x = modelio.images_to_tensor(images.copy(), device=device, channels_last=channels_last)
        y = torch.from_numpy(labels.copy()).to(device, non_blocking=True).long()
        yield x, y


def read_shard(shard, spec: LoopSpec) -> tuple[np.ndarray, np.ndarray]:
    """This worker's whole shard, in memory: images (N, H, W, 3) and labels (N, H, W) uint8."""
    images, labels = [], []
    for batch in shard.iter_batches(batch_size=256, batch_format="numpy"):
        x, y = rows_to_arrays(batch, spec.height, spec.width)
        images.append(x.copy())
        labels.append(y.copy())
    if not images:
        return np.zeros((0, spec.height, spec.width, 3), np.uint8), np.zeros((0, spec.height, spec.width), np.uint8)
    return np.concatenate(images), np.concatenate(labels)


def array_batches(arrays: tuple[np.ndarray, np.ndarray], batch_size: int, order: np.ndarray, device: torch.device,
                  channels_last: bool):
    """Batches of an in-memory shard in ``order``, as :func:`_batches` yields them."""
    images, labels = arrays
    for k in range(0, len(order), batch_size):
        idx = np.sort(order[k : k + batch_size])  # sorted: the same rows, faster gathers
        x = modelio.images_to_tensor(images[idx], device=device, channels_last=channels_last)
        y = torch.from_numpy(labels[idx]).to(device, non_blocking=True).long()
        yield x, y


def shard_cache_fits(train_rows: int, val_rows: int, num_workers: int, height: int, width: int) -> bool:
    """Whether one worker's train + val shards (uint8 image + label) fit CACHE_SHARD_MAX_BYTES."""
    rows = -(-train_rows // num_workers) + -(-val_rows // num_workers)
    limit = int(os.environ.get("SEGRAY_SHARD_CACHE_BYTES", CACHE_SHARD_MAX_BYTES))
    return rows * height * width * 4 <= limit


def _autocast(device: torch.device):
    # bf16 on GPU: the speed of fp16 without loss scaling; CPU autocast is slower for convs.
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def train_one_epoch(
    model,
    optimizer,
    scheduler,
    batches,
    weight,
    generator,
    augment_on: bool,
    device,
    crop: tuple[int, int] | None = None,
    scale_range: tuple[float, float] = SCALE_RANGE,
):
    """One pass over this worker's shard; returns (loss sum, weight sum, images) of this worker."""
    model.train()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss*weight, weight, images
    for x, y in batches:
        if augment_on:
            x, y = augment(x, y, generator, scale_range=scale_range, crop=crop)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)  # grid_sample returns NCHW-contiguous
        with _autocast(device):
            logits = model(x)
        loss_sum, denom = weighted_loss_sum(logits, y, weight)
        loss = loss_sum / denom.clamp_min(1e-12)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        # Accumulated on the device: .item() here would be a host sync every step on GPU.
        totals[0] += loss_sum.detach().double()
        totals[1] += denom.detach().double()
        totals[2] += len(x)
    return totals


@torch.no_grad()
def evaluate(model, batches, weight, device, num_classes: int = NUM_CLASSES):
    """This worker's (confusion matrix (C, C) int64, [loss*weight, weight] float64) on its val shard."""
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loss = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in batches:
        with _autocast(device):
            logits = model(x)
        loss_sum, denom = weighted_loss_sum(logits, y, weight)
        loss += torch.stack([loss_sum.double(), denom.double()])
        cm += confusion_matrix(y, logits.argmax(dim=1), num_classes)
    return cm, loss


def _save_checkpoint(directory: str, state: dict, meta: dict) -> None:
    torch.save(state, os.path.join(directory, CHECKPOINT_FILE))
    with open(os.path.join(directory, CHECKPOINT_META), "w") as f:
        json.dump(meta, f, indent=2)


def _load_checkpoint(checkpoint) -> dict:
    with checkpoint.as_directory() as d:
        with open(os.path.join(d, CHECKPOINT_FILE), "rb") as f:
            return modelio.load_tensors(f.read(), f"{checkpoint.path}/{CHECKPOINT_FILE}")


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker. ``loop_config = {"spec": LoopSpec}``."""
    import ray.train
    import ray.train.torch

    spec: LoopSpec = loop_config["spec"]
    config = spec.config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(config.torch_threads)

    torch.manual_seed(config.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(config.unet)
    # Steps of one epoch on this worker: train is split into equal shards (DataConfig below).
    steps_per_epoch = max(1, math.ceil((spec.train_rows // world) / config.batch_size))
    total_steps = config.epochs * steps_per_epoch

    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    state = _load_checkpoint(checkpoint) if checkpoint else None
    if state is not None:
        model.load_state_dict(state["model"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        if rank == 0:
            _say(f"train: worker resumed after epoch {start_epoch} of {config.epochs}")

    if on_gpu:
        if world > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics over the global batch
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)  # to the device, DDP when world > 1 (gloo on CPU)
    net = model.module if hasattr(model, "module") else model

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(config.lr_schedule, step / total_steps)
    )
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    weight = torch.tensor(spec.class_weights, device=device) if spec.class_weights else None

    train_shard = ray.train.get_dataset_shard(TRAIN_SPLIT)
    val_shard = ray.train.get_dataset_shard(VAL_SPLIT)
    cached: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def batches_of(split: str, shard, shuffle_seed: int | None):
        """One pass over this worker's ``split``: from memory when shards are cached (read in full
        on first use, reshuffled with ``shuffle_seed``), else streamed through Ray Data."""
        if not spec.cache_shards:
            return _batches(shard, spec, device, on_gpu, shuffle_seed)
        if split not in cached:
            cached[split] = read_shard(shard, spec)
        rows = len(cached[split][0])
        order = np.arange(rows) if shuffle_seed is None else np.random.default_rng(shuffle_seed).permutation(rows)
        return array_batches(cached[split], config.batch_size, order, device, on_gpu)

    for epoch in range(start_epoch + 1, config.epochs + 1):
        t0 = time.perf_counter()
        generator = torch.Generator().manual_seed(_seed_for(config.seed, rank, epoch))
        batches = batches_of(TRAIN_SPLIT, train_shard, _seed_for(config.seed, rank, epoch, 1))
        train_totals = _all_reduce(
            train_one_epoch(
                model, optimizer, scheduler, batches, weight, generator, config.augment, device, config.crop,
                tuple(config.scale_range),
            )
        )
        train_time = time.perf_counter() - t0
        # The bare module: DDP's forward syncs buffers across ranks, and val shards differ in size.
        cm, val_loss = evaluate(net, batches_of(VAL_SPLIT, val_shard, None), weight, device)
        # Counts and sums from every worker first; ratios only after (metrics.py).
        cm, val_loss = _all_reduce(cm), _all_reduce(val_loss)
        epoch_time = time.perf_counter() - t0
        scores = summarize(cm, spec.classes)
        train_loss, train_weight, images = train_totals.tolist()
        val_sum, val_weight = val_loss.tolist()
        metrics = {
            "epoch": epoch,
            "train_loss": train_loss / train_weight if train_weight else float("nan"),
            "val_loss": val_sum / val_weight if val_weight else float("nan"),
            SCORE: scores["miou"],
            "val_pixel_accuracy": scores["pixel_accuracy"],
            "val_iou": scores["iou"],
            "val_pixels": scores["pixels"],
            "lr": optimizer.param_groups[0]["lr"],
            "train_images": int(images),
            "images_per_s": images / train_time if train_time > 0 else float("nan"),
            "train_time_s": train_time,
            "epoch_time_s": epoch_time,
            "world_size": world,
        }
        history.append(metrics)
        name = f"{CHECKPOINT_PREFIX}{epoch:04d}"
        if rank == 0:
            _say(format_epoch(metrics, config.epochs))
            state = {
                "model": net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "model_config": config.unet.to_dict(),
                "classes": list(spec.classes),
                "history": history,
                "config": config.to_dict(),
            }
            meta = {k: v for k, v in state.items() if k not in ("model", "optimizer", "scheduler")}
            with tempfile.TemporaryDirectory() as d:
                _save_checkpoint(d, state, meta)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name)
        else:
            # Every rank reports (a barrier); only rank 0's metrics and checkpoint are kept.
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)


def format_epoch(m: dict, epochs: int) -> str:
    return (
        f"train: epoch {m['epoch']}/{epochs}  train_loss {m['train_loss']:.4f}  val_loss {m['val_loss']:.4f}  "
        f"val_mIoU {m[SCORE]:.4f}  pixel_acc {m['val_pixel_accuracy']:.4f}  lr {m['lr']:.2e}  "
        f"{m['images_per_s']:.1f} images/s  epoch {m['epoch_time_s']:.1f} s"
    )


# ------------------------------------------------------------------------- the driver side


def _check_dataset(config: TrainConfig) -> DatasetInfo:
    if not storage.exists(config.data):
        raise DatasetError(f"--data {config.data}: not found; pass the --dest of jobs/prepare.py")
    info = load_info(config.data)
    for split in (TRAIN_SPLIT, VAL_SPLIT):
        rows = info.splits.get(split, 0)
        if rows < 1:
            raise DatasetError(
                f"{config.data}: dataset.json lists no {split!r} rows (splits: {info.splits}); training needs "
                f"{TRAIN_SPLIT} and {VAL_SPLIT}; prepare a source that has both"
            )
        if not any(u.endswith(".parquet") for u in storage.list_files(split_uri(config.data, split))):
            raise DatasetError(
                f"{split_uri(config.data, split)}: no Parquet files although dataset.json lists {rows} rows; "
                "the dataset is incomplete, rerun jobs/prepare.py"
            )
    if info.splits[TRAIN_SPLIT] < config.num_workers:
        raise TrainError(
            f"{config.data}: {info.splits[TRAIN_SPLIT]} training rows cannot feed {config.num_workers} workers "
            "(each needs at least one); lower --num-workers"
        )
    if len(info.classes) != NUM_CLASSES:
        raise DatasetError(f"{config.data}: {len(info.classes)} classes in dataset.json, the model has {NUM_CLASSES}")
    return info


def _check_cluster(config: TrainConfig) -> None:
    """Enough CPUs/GPUs for the workers, now (static cluster) or at most (autoscaling cluster)."""
    import ray

    have = {k: float(v) for k, v in ray.cluster_resources().items()}
    where = "the cluster has"
    try:  # An autoscaling cluster may start with no GPU node: compare with what it can grow to.
        from ray._private.state import state as ray_state

        most = ray_state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - private API; without it, the current size is the limit
        most = None
    if most:
        have = {**have, **{k: max(float(v), have.get(k, 0.0)) for k, v in most.items()}}
        where = "the cluster can grow to"
    need = {"CPU": config.num_workers * config.cpus_per_worker}
    if config.use_gpu:
        need["GPU"] = config.num_workers
    for resource, amount in need.items():
        if amount > have.get(resource, 0.0):
            per = f" x {config.cpus_per_worker} CPUs" if resource == "CPU" and config.cpus_per_worker > 1 else ""
            raise TrainError(
                f"--num-workers {config.num_workers}{per} needs {amount:g} {resource}s but {where} "
                f"{have.get(resource, 0.0):g}; lower --num-workers"
                + (" or --cpus-per-worker" if resource == "CPU" else "")
                + (" or drop --use-gpu" if resource == "GPU" else "")
            )


def _read_json(checkpoint, name: str) -> dict:
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{name}") as f:
        return json.loads(f.read())


def _previous(config: TrainConfig):
    """The Ray Train result of an earlier run of this name, or None for a new run."""
    from ray.train import Result

    fs, path = storage.resolve(config.run_uri)
    snapshot = storage.join(config.run_uri, "checkpoint_manager_snapshot.json")
    if not storage.exists(snapshot):
        return None
    result = Result.from_path(path, storage_filesystem=fs)
    if result.checkpoint is None:
        return None
    meta = _read_json(result.checkpoint, CHECKPOINT_META)
    if meta.get("model_config") != config.unet.to_dict():
        raise TrainError(
            f"{config.run_uri} holds a run of model {meta.get('model_config')}, this command asks for "
            f"{config.unet.to_dict()}; pass the same --base-channels to resume it, or a new --name"
        )
    return result


def _datasets(config: TrainConfig) -> dict:
    """Both splits as Ray Datasets held in the object store, in blocks of at most ~32 MB.

    Read once, by the driver, with pyarrow, not with ``ray.data.read_parquet``: a streaming read
    needs CPUs for its read tasks every epoch, and where the workers hold every CPU (a CPU box)
    they never get one and the run hangs; materialising such a read first took 15-40 s on a
    busy 2-core machine for a few MB, the driver's read takes about 1 s. A prepared CamVid is
    ~80 MB at 176x240; every epoch then streams from memory, split across the workers by
    Ray Data, instead of from object storage. (A dataset larger than the object store would
    need streaming reads and spare CPUs for them.)
    """
    import pyarrow.parquet as pq
    import ray

    out = {}
    for split in (TRAIN_SPLIT, VAL_SPLIT):
        fs, path = storage.resolve(split_uri(config.data, split))
        table = pq.read_table(path, filesystem=fs, columns=[COL_IMAGE, COL_LABEL])
        # Several blocks per worker, so that the val split (not split equally) is shared out evenly.
        blocks = max(4 * config.num_workers, math.ceil(table.nbytes / BLOCK_BYTES))
        rows = max(1, math.ceil(table.num_rows / blocks))
        out[split] = ray.data.from_arrow([table.slice(i, rows) for i in range(0, table.num_rows, rows)])
    return out


def _data_config():
    """train: equal shards (DDP hangs when ranks take different numbers of steps); val: every
    row exactly once (an equal split would drop rows and bias the metrics)."""
    import ray.train

    class ShardConfig(ray.train.DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            val = datasets.get(VAL_SPLIT)
            rest = {k: v for k, v in datasets.items() if k != VAL_SPLIT}
            out = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
            if val is not None:
                for i, it in enumerate(val.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)):
                    out[i][VAL_SPLIT] = it
            return out

    return ShardConfig(datasets_to_split=[TRAIN_SPLIT, VAL_SPLIT])


def _fit(config: TrainConfig, spec: LoopSpec):
    import ray.train
    from ray.train.torch import TorchTrainer

    fs, path = storage.resolve(storage.normalize(config.storage))
    resources = {"CPU": config.cpus_per_worker}
    if config.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=config.name,
            storage_path=path,
            storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.keep_checkpoints, checkpoint_score_attribute=SCORE, checkpoint_score_order="max"
            ),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            # Ray Train's INFO lines repeat every reported metric dict twice per epoch; the
            # workers' own progress lines (rank 0) and warnings remain.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets=_datasets(config),
        dataset_config=_data_config(),
    )
    return trainer.fit()


def _best(result) -> tuple:
    """(checkpoint, metrics) with the highest val mIoU (the later epoch on ties)."""
    scored = [(c, m) for c, m in result.best_checkpoints if m and m.get(SCORE) is not None]
    if not scored:
        raise TrainError(f"{result.path}: no checkpoint with {SCORE} to export")
    return max(scored, key=lambda cm: (_finite(cm[1][SCORE], -1.0), cm[1].get("epoch", 0)))


def _finite(x: Any, default: float | None = None) -> Any:
    return x if not isinstance(x, float) or math.isfinite(x) else default


def _jsonable(x: Any) -> Any:
    """NaN/inf -> None, recursively: JSON has no NaN."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return _finite(x)


def export(config: TrainConfig, info: DatasetInfo, result, start: float, done_before: int) -> TrainResult:
    """Best checkpoint -> ``<run>/model/`` (modelio); history -> ``<run>/metrics.json``."""
    best_ckpt, _ = _best(result)
    with best_ckpt.filesystem.open_input_stream(f"{best_ckpt.path}/{CHECKPOINT_FILE}") as f:
        state = modelio.load_tensors(f.read(), f"{best_ckpt.path}/{CHECKPOINT_FILE}")
    spec = modelio.ModelSpec(
        model=state["model_config"],
        input_height=info.height,
        input_width=info.width,
        classes=list(info.classes),
        palette=[list(c) for c in info.palette],
        void_index=info.void_index,
    )
    model_uri = storage.join(config.run_uri, modelio.MODEL_DIR)
    modelio.save_model(model_uri, state["model"], spec)

    history = _read_json(result.checkpoint, CHECKPOINT_META)["history"]  # the latest knows every epoch
    best = next(h for h in history if h["epoch"] == state["epoch"])
    elapsed = time.perf_counter() - start
    doc = {
        "run": config.run_uri,
        "data": storage.normalize(config.data),
        "model": model_uri,
        "epochs": len(history),
        "best_epoch": best["epoch"],
        "best": best,
        "final": history[-1],
        "history": history,
        "config": config.to_dict(),
        "dataset": {"height": info.height, "width": info.width, "splits": info.splits},
        "checkpoint": best_ckpt.path,
        "elapsed_s": elapsed,
    }
    storage.write_bytes(storage.join(config.run_uri, METRICS_FILE),
                        (json.dumps(_jsonable(doc), indent=2) + "\n").encode())
    return TrainResult(config.run_uri, model_uri, history, best["epoch"], best, len(history) - done_before, elapsed)


def train(config: TrainConfig) -> TrainResult:
    """Train (or resume) the run ``<storage>/<name>`` and export its best model.

    Every check that can fail fast runs before any worker starts: the dataset, the storage,
    the size of the cluster. Connects to Ray (runtime.init_ray) if not connected yet."""
    from segray.runtime import init_ray

    start = time.perf_counter()
    config = dataclasses.replace(config, data=storage.normalize(config.data), storage=storage.normalize(config.storage))
    info = _check_dataset(config)
    storage.check_writable(config.run_uri)
    init_ray(gpu=config.use_gpu)
    _check_cluster(config)

    previous = _previous(config)
    done = _read_json(previous.checkpoint, CHECKPOINT_META)["epoch"] if previous else 0
    weights = class_weights(config.class_weighting, info.class_pixel_counts)
    print(
        f"train: {config.data} (train {info.splits[TRAIN_SPLIT]}, val {info.splits[VAL_SPLIT]} at "
        f"{info.height}x{info.width}) -> {config.run_uri}; {config.num_workers} worker{'s' if config.num_workers > 1 else ''}"
        f"{' with a GPU each' if config.use_gpu else f' x {config.cpus_per_worker} CPU'}, batch {config.batch_size}"
        f"/worker, lr {config.lr:g} ({config.lr_schedule}), U-Net base {config.base_channels}",
        flush=True,
    )
    if done >= config.epochs:
        print(f"train: {config.run_uri} already has {done} epochs (--epochs {config.epochs}); exporting only",
              flush=True)
        result = previous
    else:
        if done:
            print(f"train: resuming {config.run_uri} after epoch {done}; epochs {done + 1}..{config.epochs}",
                  flush=True)
        spec = LoopSpec(
            config=config,
            height=info.height,
            width=info.width,
            train_rows=info.splits[TRAIN_SPLIT],
            classes=tuple(info.classes),
            class_weights=None if weights is None else tuple(float(w) for w in weights),
            cache_shards=shard_cache_fits(info.splits[TRAIN_SPLIT], info.splits[VAL_SPLIT], config.num_workers,
                                          info.height, info.width),
        )
        result = _fit(config, spec)
    out = export(config, info, result, start, done_before=done)
    print(format_summary(out), flush=True)
    return out


def format_summary(r: TrainResult) -> str:
    b = r.best
    return (
        f"train: done: best val mIoU {b[SCORE]:.4f} at epoch {r.best_epoch} (pixel accuracy "
        f"{b['val_pixel_accuracy']:.4f}); {len(r.history)} epochs ({r.epochs_this_run} this run) in "
        f"{r.elapsed_s:.1f} s; model: {r.model}"
    )

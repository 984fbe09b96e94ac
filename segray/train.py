"""The train stage: a U-Net trained with DDP on Ray Train, checkpoints in object storage.

    driver (train)                             each Ray Train worker (train_loop_per_worker)
    --------------                             ----------------------------------------------
    check dataset, storage, cluster size       resume from ray.train.get_checkpoint()
    refuse a resume that would mix two runs    per epoch: its shard of train -> augment -> DDP step
    read Parquet splits into the object store  its shard of val -> confusion matrix, all_reduce
    TorchTrainer.fit()                   --->  rank 0: checkpoint to a temp dir; all ranks report
    export the best checkpoint to model/
    write metrics.json, print a summary

Run folder ``<storage>/<name>/``: ``run.json`` (what the run is made from, written before any
worker starts), Ray Train's ``checkpoint_epoch_NNNN/`` folders (``state.pt``: weights, optimizer,
LR schedule, epoch, model config, classes, recipe, history; ``meta.json``: the same without
tensors) and ``checkpoint_manager_snapshot.json``, then ``model/`` (modelio) and
``metrics.json`` once training ends. Rerunning the same command resumes after the latest
checkpoint (Ray Train V2 reloads the snapshot of the run folder of the same name); with every
epoch done it only re-exports.

**What a run is made from** (its *recipe*, :func:`recipe`): the dataset (normalized URI and the
sha256 of its ``dataset.json`` bytes, which a re-prepare always rewrites), its input size and
classes, the model config (``--base-channels``) and the training settings that shape the
weights: ``--lr``, ``--weight-decay``, ``--lr-schedule``, ``--batch-size`` (per worker),
``--class-weighting``, augmentation on/off, ``--crop``, ``--scale-range`` and ``--seed``. Every
checkpoint's ``meta.json`` holds it (the record that travels with the weights) and ``run.json``
holds it from the moment the run starts. A resume whose recipe differs from the latest
checkpoint's is refused before any worker starts, with one line naming each setting, its
recorded and its new value, and the fix (the same value, or a new ``--name``). What may change
on resume: ``--epochs`` (below), ``--num-workers``, ``--use-gpu``, ``--cpus-per-worker``,
``--threads``, ``--max-failures``, ``--keep-checkpoints`` (resources and bookkeeping). A run
killed before its first checkpoint has nothing to resume: the next command starts it afresh
and rewrites ``run.json``. Checkpoints written before recipes existed are compared on what
their ``config`` recorded (no dataset content identity).

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

import dataclasses
import hashlib
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

from segray import modelio, storage
from segray.camvid import NUM_CLASSES
from segray.dataset import (
    COL_IMAGE,
    COL_LABEL,
    DATASET_FILE,
    DatasetError,
    DatasetInfo,
    load_info,
    rows_to_arrays,
    split_files,
    split_uri,
)
from segray.metrics import confusion_matrix, summarize
from segray.model import UNetConfig, build_model
from segray.recipe import (  # noqa: F401 - the recipe's names, re-exported for the stage's users
    CLASS_WEIGHTINGS,
    FLIP_PROB,
    JITTER,
    MAX_CLASS_WEIGHT,
    ONECYCLE_START,
    ONECYCLE_WARMUP,
    SCALE_RANGE,
    SCHEDULES,
    augment,
    class_weights,
    color_jitter,
    extend_schedule,
    fresh_schedule,
    lr_factor,
    lr_factor_at,
    make_scheduler,
    median_frequency_weights,
    schedule_progress,
    weighted_loss_sum,
)

TRAIN_SPLIT = "train"
VAL_SPLIT = "val"
CHECKPOINT_FILE = "state.pt"  # torch.save of plain containers: loads with weights_only=True
CHECKPOINT_META = "meta.json"
CHECKPOINT_PREFIX = "checkpoint_epoch_"
METRICS_FILE = "metrics.json"
RUN_FILE = "run.json"  # the run's recipe, written before any worker starts
RUN_FORMAT = "segray-train-run/1"
SCORE = "val_miou"  # what "best checkpoint" means

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
    schedule_knots: tuple[tuple[float, float], ...] = ()  # the run's LR schedule; () = fresh_schedule(epochs)
    recipe: dict | None = None  # what the run is made from (recipe()); saved in every checkpoint


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


RECIPE_SETTINGS: tuple[tuple[str, str], ...] = (
    ("lr", "--lr"),
    ("weight_decay", "--weight-decay"),
    ("lr_schedule", "--lr-schedule"),
    ("batch_size", "--batch-size"),
    ("class_weighting", "--class-weighting"),
    ("augment", "augmentation (--no-augment)"),
    ("crop", "--crop"),
    ("scale_range", "--scale-range"),
    ("seed", "--seed"),
)


def _plain(x: Any) -> Any:
    """Tuples -> lists, recursively: the value as it comes back from JSON."""
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def recipe(config: TrainConfig, info: DatasetInfo, dataset_sha256: str) -> dict:
    """What the run ``config`` on the dataset ``info`` is made from (module docstring), as JSON."""
    return {
        "data": storage.normalize(config.data),
        "dataset_sha256": dataset_sha256,
        "input_size": [info.height, info.width],
        "classes": list(info.classes),
        "model": config.unet.to_dict(),
        **{field: _plain(getattr(config, field)) for field, _ in RECIPE_SETTINGS},
    }


def legacy_recipe(meta: dict) -> dict:
    """The recipe of a checkpoint written before recipes existed, from what its meta.json has:
    only the keys it recorded (an absent key is not compared; there is no dataset identity)."""
    config = meta.get("config") or {}
    out = {k: v for k, v in (("data", config.get("data")), ("classes", meta.get("classes")),
                             ("model", meta.get("model_config"))) if v is not None}
    out.update({field: _plain(config[field]) for field, _ in RECIPE_SETTINGS if field in config})
    return out


def _show(field: str, value: Any) -> str:
    if field == "crop":
        return "whole frames" if value is None else f"{value[0]}x{value[1]}"
    if field == "scale_range":
        return f"{value[0]!r},{value[1]!r}"
    if field == "augment":
        return "on" if value else "off"
    return str(value)


def _facts(r: dict) -> str:
    """'32x48, dataset.json sha256 1a2b3c4d5e6f' (what is known of it)."""
    facts = []
    if r.get("input_size"):
        facts.append(f"{r['input_size'][0]}x{r['input_size'][1]}")
    if r.get("dataset_sha256"):
        facts.append(f"dataset.json sha256 {r['dataset_sha256'][:12]}")
    if r.get("classes") is not None and "dataset_sha256" not in r:
        facts.append(f"{len(r['classes'])} classes")
    return ", ".join(facts)


def _and(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def resume_refusal(run_uri: str, recorded: dict, current: dict) -> str | None:
    """The one-line refusal of a resume whose recipe ``current`` differs from the ``recorded``
    one (keys absent from ``recorded`` are unknown and not compared), or None when it may resume.

    ``<run> cannot resume: <setting> was <recorded>, this command has <new>[; ...]; pass the same
    <settings> to resume it, or a new --name to start a new run``; a dataset re-prepared at the
    same URI reads ``--data <uri> was re-prepared since the run used it (<then>; now <now>)``
    and its fix ``pass the dataset it was trained on``."""
    clauses: list[str] = []
    same: list[str] = []
    content_changed = False

    def differs(key: str) -> bool:
        return key in recorded and _plain(recorded[key]) != _plain(current.get(key))

    if differs("data"):
        was, now = _facts(recorded), _facts(current)
        clauses.append(f"--data was {recorded['data']}{f' ({was})' if was else ''}, "
                       f"this command has {current.get('data')}{f' ({now})' if now else ''}")
        same.append("--data")
    elif any(differs(k) for k in ("dataset_sha256", "input_size", "classes")):
        content_changed = True
        clauses.append(f"--data {current.get('data')} was re-prepared since the run used it "
                       f"({_facts(recorded)}; now {_facts(current)})")
    old_model, new_model = recorded.get("model"), current.get("model") or {}
    if old_model is not None and _plain(old_model) != _plain(new_model):
        for key in sorted(set(old_model) | set(new_model)):
            if old_model.get(key) != new_model.get(key):
                name = "--base-channels" if key == "base_channels" else f"model {key}"
                clauses.append(f"{name} was {old_model.get(key)}, this command has {new_model.get(key)}")
                same.append(name)
    for field, name in RECIPE_SETTINGS:
        if differs(field):
            clauses.append(f"{name} was {_show(field, recorded[field])}, "
                           f"this command has {_show(field, current.get(field))}")
            same.append(name)
    if not clauses:
        return None
    fixes = ([f"the same {_and(same)}"] if same else []) + (["the dataset it was trained on"] if content_changed else [])
    return (f"{run_uri} cannot resume: {'; '.join(clauses)}; pass {' and '.join(fixes)} to resume it, "
            "or a new --name to start a new run")


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
    knots = [list(k) for k in spec.schedule_knots] or fresh_schedule(config.epochs)

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
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    # From the epoch and the knots, not from the checkpoint's step count (module docstring).
    scheduler = make_scheduler(optimizer, config.lr, config.lr_schedule, knots, start_epoch, steps_per_epoch)
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
        lr_start = optimizer.param_groups[0]["lr"]
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
            "lr": optimizer.param_groups[0]["lr"],  # after the epoch's last step: the next step's
            "lr_start": lr_start,  # of the epoch's first step
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
                "epoch": epoch,
                "schedule": {"name": config.lr_schedule, "knots": knots, "epochs": config.epochs},
                "model_config": config.unet.to_dict(),
                "classes": list(spec.classes),
                "recipe": spec.recipe,
                "history": history,
                "config": config.to_dict(),
            }
            meta = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
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
        files = split_files(config.data, info, split)
        if not files:
            raise DatasetError(
                f"{split_uri(config.data, split)}: no Parquet files although dataset.json lists {rows} rows; "
                "the dataset is incomplete, rerun jobs/prepare.py"
            )
        if info.files:  # listed by dataset.json: each must be there (one listing of the split, not a HEAD each)
            there = set(storage.list_files(split_uri(config.data, split)))
            missing = [u for u in files if u not in there]
            if missing:
                raise DatasetError(
                    f"{missing[0]}: listed in dataset.json but missing ({len(missing)} of {len(files)} {split} "
                    "files); the dataset is incomplete, rerun jobs/prepare.py"
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


def dataset_sha256(data_uri: str) -> str:
    """The identity of a prepared dataset: the sha256 of its dataset.json bytes (a re-prepare
    rewrites them: new counts, new file names)."""
    return hashlib.sha256(storage.read_bytes(storage.join(data_uri, DATASET_FILE))).hexdigest()


def _previous(config: TrainConfig, current: dict):
    """(Ray Train result, its latest checkpoint's meta.json) of an earlier run of this name, or
    (None, None) for a new run. Raises TrainError when ``current`` (this command's recipe)
    differs from the recipe the checkpoint recorded: resuming would mix two runs."""
    from ray.train import Result

    fs, path = storage.resolve(config.run_uri)
    snapshot = storage.join(config.run_uri, "checkpoint_manager_snapshot.json")
    if not storage.exists(snapshot):
        return None, None
    result = Result.from_path(path, storage_filesystem=fs)
    if result.checkpoint is None:
        return None, None
    meta = _read_json(result.checkpoint, CHECKPOINT_META)
    recorded = meta.get("recipe") or legacy_recipe(meta)
    refusal = resume_refusal(config.run_uri, recorded, current)
    if refusal:
        raise TrainError(refusal)
    return result, meta


def _write_run_file(config: TrainConfig, current: dict, previous_meta: dict | None) -> None:
    """``<run>/run.json``: the recipe, before any worker starts. A new run (no checkpoint) writes
    it, replacing the record of a run killed before its first checkpoint; a resumed run keeps its
    own (the recipe matched) and writes one only if it has none."""
    uri = storage.join(config.run_uri, RUN_FILE)
    if previous_meta is not None and storage.exists(uri):
        return
    if previous_meta is None and storage.exists(uri):
        try:
            old = json.loads(storage.read_bytes(uri)).get("recipe")
        except (ValueError, AttributeError):
            old = None
        if old != current:
            print(f"train: {config.run_uri} has no checkpoint to resume; starting it afresh (run.json replaced)",
                  flush=True)
    doc = {"format": RUN_FORMAT, "run": config.run_uri, "recipe": current}
    storage.write_bytes(uri, (json.dumps(doc, indent=2) + "\n").encode())


def _datasets(config: TrainConfig, info: DatasetInfo) -> dict:
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
    fs, _ = storage.resolve(config.data)
    for split in (TRAIN_SPLIT, VAL_SPLIT):
        # Exactly the files dataset.json lists: the folder may hold others (prepare's leftovers).
        paths = [storage.resolve(u)[1] for u in split_files(config.data, info, split)]
        table = pq.read_table(paths, filesystem=fs, columns=[COL_IMAGE, COL_LABEL])
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


def _fit(config: TrainConfig, spec: LoopSpec, info: DatasetInfo):
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
        datasets=_datasets(config, info),
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

    latest = _read_json(result.checkpoint, CHECKPOINT_META)
    history = latest["history"]  # the latest knows every epoch
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
        "recipe": latest.get("recipe"),  # what the run is made from (module docstring)
        "schedule": latest.get("schedule"),  # the LR schedule's knots (epoch position, progress)
        "dataset": {"height": info.height, "width": info.width, "splits": info.splits,
                    "dataset_sha256": (latest.get("recipe") or {}).get("dataset_sha256")},
        "checkpoint": best_ckpt.path,
        "elapsed_s": elapsed,
    }
    storage.write_bytes(storage.join(config.run_uri, METRICS_FILE),
                        (json.dumps(_jsonable(doc), indent=2) + "\n").encode())
    return TrainResult(config.run_uri, model_uri, history, best["epoch"], best, len(history) - done_before, elapsed)


def _check_run_folder(config: TrainConfig) -> None:
    """The run folder is new, or an earlier segray run (``run.json``, or Ray Train's snapshot of a
    run from before run.json): export writes ``model/`` and ``metrics.json`` there, and nobody's
    files of those names may be overwritten."""
    files = [f for f in storage.list_files(config.run_uri) if ".segray-write-probe-" not in f]
    if not files:
        return
    tops = {storage.relative(config.run_uri, f).split("/", 1)[0] for f in files}
    if RUN_FILE in tops or "checkpoint_manager_snapshot.json" in tops:
        return
    raise TrainError(
        f"{config.run_uri} holds {len(files)} files (e.g. {files[0]}) but no segray training run ({RUN_FILE}); "
        "training would write model/ and metrics.json there: choose another --name or --storage"
    )


def train(config: TrainConfig) -> TrainResult:
    """Train (or resume) the run ``<storage>/<name>`` and export its best model.

    Every check that can fail fast runs before any worker starts: the dataset, the storage,
    the size of the cluster. Connects to Ray (runtime.init_ray) if not connected yet."""
    from segray.runtime import init_ray

    start = time.perf_counter()
    config = dataclasses.replace(config, data=storage.normalize(config.data), storage=storage.normalize(config.storage))
    info = _check_dataset(config)
    _check_run_folder(config)
    storage.check_writable(config.run_uri)
    init_ray(gpu=config.use_gpu)
    _check_cluster(config)

    current = recipe(config, info, dataset_sha256(config.data))
    previous, meta = _previous(config, current)  # refuses a resume that would mix two runs
    _write_run_file(config, current, meta)
    done = int(meta["epoch"]) if meta else 0
    if meta and meta.get("schedule"):
        knots = meta["schedule"]["knots"]
    elif meta:  # a checkpoint from before the knots: its schedule ran over its config's epochs
        knots = fresh_schedule((meta.get("config") or {}).get("epochs", done))
    else:
        knots = fresh_schedule(config.epochs)
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
            reached = schedule_progress(knots, done)
            if knots[-1][0] != config.epochs:
                print(f"train: --epochs {config.epochs} (was {knots[-1][0]:g}): the rest of the {config.lr_schedule} "
                      f"LR schedule (from {reached:.0%}) now runs over epochs {done + 1}..{config.epochs}", flush=True)
            if reached >= 1.0 and config.lr_schedule != "constant":
                print(f"train: the {config.lr_schedule} schedule had ended at epoch {done}; epochs {done + 1}.."
                      f"{config.epochs} keep its final LR ({config.lr * lr_factor(config.lr_schedule, 1.0):g}); "
                      "use a new --name to train with a fresh schedule", flush=True)
            knots = extend_schedule(knots, done, config.epochs)
        spec = LoopSpec(
            config=config,
            height=info.height,
            width=info.width,
            train_rows=info.splits[TRAIN_SPLIT],
            classes=tuple(info.classes),
            class_weights=None if weights is None else tuple(float(w) for w in weights),
            cache_shards=shard_cache_fits(info.splits[TRAIN_SPLIT], info.splits[VAL_SPLIT], config.num_workers,
                                          info.height, info.width),
            schedule_knots=tuple((float(e), float(p)) for e, p in knots),
            recipe=current,
        )
        result = _fit(config, spec, info)
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

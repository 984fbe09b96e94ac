"""What runs inside each Ray Train worker: the epoch loop, validation, checkpoints.

The driver (segray/train.py) hands every worker one :class:`WorkerPayload`: plain values decided
once from the command line and the dataset (network, classes, sizes, optimiser and schedule,
augmentation, class weights). Nothing here imports the driver, so the loop can be read, tested
and changed on its own. Per epoch, each worker trains on its shard of the train split
(augment -> DDP step), evaluates its shard of val into a confusion matrix, sums the matrices
over the workers with all_reduce, and rank 0 writes a checkpoint that Ray Train copies into the
run folder (``checkpoint_epoch_NNNN/``: ``state.pt`` with the weights, optimiser, LR schedule,
epoch, network, classes, recipe and history; ``meta.json`` the same without tensors).

Two rules keep DDP in lock-step and make failures cheap:

- *Step parity*: every rank runs exactly ``steps_per_epoch`` steps or, if one runs out of
  batches first, stops with it. Cached shards have equal rows by construction (segray/ingest.py);
  streamed ones need not (ray-project/ray#66085), so there the ranks agree before each step (one
  tiny all_reduce, a host sync on GPU) that every one of them has a batch. No input path can
  make one rank wait forever in a step the others never run.
- *Mid-epoch checkpoints* (``--checkpoint-every-steps N``): after every N-th step of an epoch
  (not its last), rank 0 also writes ``checkpoint_epoch_NNNN_step_KKKKKK/`` with the epochs
  done, the K steps done of epoch NNNN, and that epoch's summed loss so far; its val_miou is NaN,
  so it is never exported as the best. Ray Train ranks it last: it stays while it is the latest
  or among the ``--keep-checkpoints`` best (a run with fewer epochs than that keeps it). A restart from
  it skips the epoch's first K batches: with cached shards (the default below 1 GiB) the same
  batches in the same order, augmented alike (step k's augmentation is seeded by k); with
  streamed shards the first K batches of Ray Data's new pass, which deals rows anew. With
  another worker count the epoch starts over.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from segray import console, modelio
from segray.averaging import WeightAverage
from segray.dataset import rows_to_arrays
from segray.metrics import confusion_matrix, summarize
from segray.model import build_network
from segray.precision import autocast, compute_precision
from segray.recipe import Augmentation, augment_batch, fresh_schedule, lovasz_softmax, make_scheduler, weighted_loss_sum
from segray.tensorboard import Curves, run_folder

TRAIN_SPLIT = "train"
VAL_SPLIT = "val"
CHECKPOINT_FILE = "state.pt"  # torch.save of plain containers: loads with weights_only=True
CHECKPOINT_META = "meta.json"
CHECKPOINT_PREFIX = "checkpoint_epoch_"
SCORE = "val_miou"  # what "best checkpoint" means
SHUFFLE_BUFFER_ROWS = 256  # rows held per worker to shuffle its shard locally, every epoch


@dataclass(frozen=True)
class WorkerPayload:
    """Everything a worker needs, decided on the driver; plain values and frozen records only."""

    arch: str  # model.NETWORKS name
    model_args: dict  # its arguments, num_classes included (model.network_config)
    classes: tuple[str, ...]
    void_index: int  # label value ignored by the loss and the metrics
    height: int
    width: int
    train_rows: int
    epochs: int
    batch_size: int  # per worker
    lr: float
    weight_decay: float
    lr_schedule: str
    seed: int
    threads: int  # torch threads of a CPU worker
    augmentation: Augmentation = field(default_factory=Augmentation)
    class_weights: tuple[float, ...] | None = None  # None: unweighted cross-entropy
    lovasz: float = 0.0  # weight of the Lovász-softmax term of the training loss (--lovasz); 0: off
    logit_bias: tuple[float, ...] | None = None  # added to the logits before validation's argmax (--logit-adjust)
    cache_shards: bool = False  # shards in memory: train's from ingest.py, val's after epoch 1 (train.shard_cache_fits)
    schedule_knots: tuple[tuple[float, float], ...] = ()  # the run's LR schedule; () = fresh_schedule(epochs)
    recipe: dict | None = None  # what the run is made from (runrecord.recipe); saved in every checkpoint
    config: dict = field(default_factory=dict)  # the command's TrainConfig, as a dict: saved in every checkpoint
    checkpoint_every_steps: int | None = None  # also a checkpoint every N steps within an epoch
    precision: str = "auto"  # --precision: compute_precision() decides on each worker
    ema: float = 0.0  # --ema: decay of the weights' moving average (segray/averaging.py); 0: off


def _say(line: str) -> None:
    # Ray Train patches print() on its workers to tee into its logger, and the driver then shows
    # every line twice; a write to the process's real stdout is forwarded once.
    print(line, file=sys.__stdout__, flush=True)


def steps_per_epoch(train_rows: int, world: int, batch_size: int) -> int:
    """Steps of one epoch on each worker: train is split into equal shards (segray/ingest.py)."""
    return max(1, math.ceil((train_rows // world) / batch_size))


def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _batches(shard, p: WorkerPayload, device: torch.device, channels_last: bool, shuffle_seed: int | None):
    """(images (N, 3, H, W) float normalised, labels (N, H, W) int64) on ``device``."""
    shuffle = {"local_shuffle_buffer_size": SHUFFLE_BUFFER_ROWS, "local_shuffle_seed": shuffle_seed} if (
        shuffle_seed is not None
    ) else {}
    for batch in shard.iter_batches(batch_size=p.batch_size, batch_format="numpy", **shuffle):
        images, labels = rows_to_arrays(batch, p.height, p.width)
        # frombuffer arrays are read-only; torch wants writable memory (a batch: ~1 MB to copy).
        x = modelio.images_to_tensor(images.copy(), device=device, channels_last=channels_last)
        y = torch.from_numpy(labels.copy()).to(device, non_blocking=True).long()
        yield x, y


def read_shard(shard, p: WorkerPayload) -> tuple[np.ndarray, np.ndarray]:
    """This worker's whole shard, in memory: images (N, H, W, 3) and labels (N, H, W) uint8."""
    images, labels = [], []
    for batch in shard.iter_batches(batch_size=256, batch_format="numpy"):
        x, y = rows_to_arrays(batch, p.height, p.width)
        images.append(x.copy())
        labels.append(y.copy())
    if not images:
        return np.zeros((0, p.height, p.width, 3), np.uint8), np.zeros((0, p.height, p.width), np.uint8)
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


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _all_have_a_batch(has: bool, device: torch.device) -> bool:
    """Step parity: True when every rank has a batch for the next step. One tiny all_reduce per
    step, so that no rank ever runs a step the others do not (DDP would wait forever in it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return has
    flag = torch.tensor([0 if has else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    return int(flag.item()) == 0


def _node_ids(mine: str, world: int) -> list[str]:
    """Every rank's node id, in rank order (one all_gather at the start of an attempt)."""
    import torch.distributed as dist

    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [mine]
    out: list = [None] * world
    dist.all_gather_object(out, mine)
    return [str(n) for n in out]


def _rank0_buffers(net) -> None:
    """Every rank takes rank 0's buffers (BatchNorm's running statistics): each rank updated its
    own in its last training forward, and validation must score one model, the one rank 0
    checkpoints and exports, whichever val rows Ray Data deals to which rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in net.buffers():
            dist.broadcast(buffer, src=0)


def train_one_epoch(
    model,
    optimizer,
    scheduler,
    batches,
    weight,
    seed: int,
    augmentation: Augmentation,
    device,
    void_index: int,
    steps: int,
    first_step: int = 0,
    totals: torch.Tensor | None = None,
    after_step=None,
    agree: bool = True,
    precision: str = "fp32",
    lovasz: float = 0.0,
):
    """Steps ``first_step``..``steps - 1`` of one epoch over this worker's shard (``batches``
    holds those steps' batches). Every rank runs the same steps: the epoch ends for all at
    ``steps`` or, with ``agree`` (batch counts that may differ between ranks), as soon as one
    rank has no batch left. Step k's augmentation draws from a
    generator seeded with (``seed``, k), so a resumed epoch augments its steps as the first pass
    did. ``precision``: compute_precision's. The step's loss is the weighted cross-entropy plus
    ``lovasz`` x the Lovász-softmax loss; ``totals`` sum the cross-entropy alone (train_loss).
    ``after_step(k, totals)`` runs after step k (1-based). Returns (loss sum, weight sum, images)
    of this worker, added to ``totals``."""
    model.train()
    if totals is None:
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss*weight, weight, images
    generator = torch.Generator()
    it = iter(batches)
    for step in range(first_step, steps):
        batch = next(it, None)
        if not (_all_have_a_batch(batch is not None, device) if agree else batch is not None):
            break
        x, y = batch
        if augmentation.enabled:
            generator.manual_seed(_seed_for(seed, step))
            x, y = augment_batch(x, y, generator, augmentation, void_index)
            if precision == "bf16":
                x = x.contiguous(memory_format=torch.channels_last)  # grid_sample returns NCHW-contiguous
        with autocast(device, precision):
            logits = model(x)
        loss_sum, denom = weighted_loss_sum(logits, y, weight, void_index)
        loss = loss_sum / denom.clamp_min(1e-12)
        if lovasz:
            loss = loss + lovasz * lovasz_softmax(logits, y, void_index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        # Accumulated on the device: .item() here would be a host sync every step on GPU.
        totals[0] += loss_sum.detach().double()
        totals[1] += denom.detach().double()
        totals[2] += len(x)
        if after_step is not None:
            after_step(step + 1, totals)
    return totals


@torch.no_grad()
def evaluate(model, batches, weight, device, num_classes: int, void_index: int, precision: str = "fp32",
             bias: torch.Tensor | None = None):
    """This worker's (confusion matrix (C, C) int64, [loss*weight, weight] float64) on its val shard.
    ``bias`` (C,) is added to the logits before the argmax (not in the loss): --logit-adjust."""
    model.eval()
    bias = None if bias is None else bias.view(1, -1, 1, 1)
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loss = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in batches:
        with autocast(device, precision):
            logits = model(x)
        loss_sum, denom = weighted_loss_sum(logits, y, weight, void_index)
        loss += torch.stack([loss_sum.double(), denom.double()])
        cm += confusion_matrix(y, (logits if bias is None else logits.float() + bias).argmax(dim=1), num_classes, void_index)
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
    """Runs on every Ray Train worker. ``loop_config = {"payload": WorkerPayload, "progress": handle,
    "train_shards": [object ref per rank]}`` (the handle: console.py's progress display, reported
    to by rank 0; the shards: with cached shards, segray/ingest.py)."""
    import ray
    import ray.train
    import ray.train.torch

    p: WorkerPayload = loop_config["payload"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(p.threads)
    precision = compute_precision(p.precision, device)
    channels_last = precision == "bf16"  # oneDNN's and cuDNN's bf16 convs are fastest in NHWC
    if rank == 0 and p.precision == "bf16" and precision != "bf16":
        _say("train: --precision bf16: this CPU has no native bf16 (AMX or AVX512-BF16); training in fp32")

    torch.manual_seed(p.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_network(p.arch, p.model_args)
    steps = steps_per_epoch(p.train_rows, world, p.batch_size)
    progress = loop_config.get("progress") if rank == 0 else None
    knots = [list(k) for k in p.schedule_knots] or fresh_schedule(p.epochs)

    # A checkpoint holds the epochs done and, when written mid-epoch (--checkpoint-every-steps),
    # the steps done of the next one and that epoch's summed loss so far.
    start_epoch, start_step, history, partial = 0, 0, [], None
    checkpoint = ray.train.get_checkpoint()
    state = _load_checkpoint(checkpoint) if checkpoint else None
    if state is not None:
        model.load_state_dict(state.get("trained") or state["model"])  # "model" is the average with --ema
        start_epoch, history = int(state["epoch"]), list(state["history"])
        start_step, partial = int(state.get("step", 0)), state.get("partial")
        if start_step and state.get("world") != world:  # another shard size: that epoch starts over
            start_step, partial = 0, None
        if rank == 0:
            at = f" and step {start_step} of epoch {start_epoch + 1}" if start_step else ""
            _say(f"train: worker resumed after epoch {start_epoch}{at} of {p.epochs}")

    if on_gpu and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics over the global batch
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)  # to the device, DDP when world > 1 (gloo on CPU)
    net = model.module if hasattr(model, "module") else model

    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    # From the epoch position and the knots, not from the checkpoint's step count (module docstring).
    scheduler = make_scheduler(optimizer, p.lr, p.lr_schedule, knots, start_epoch + start_step / steps, steps)
    weight = torch.tensor(p.class_weights, device=device) if p.class_weights else None
    bias = torch.tensor(p.logit_bias, device=device) if p.logit_bias else None
    # --ema: the average is what is validated, checkpointed as "model" and exported; the trained
    # weights travel as "trained" for a resume. Its warm-up counts the run's steps.
    ema = WeightAverage(net, p.ema, state["model"] if state is not None and "trained" in state else None,
                        start_epoch * steps + start_step) if p.ema else None

    nodes = _node_ids(ray.get_runtime_context().get_node_id(), world)  # by rank: where this attempt runs
    val_shard = ray.train.get_dataset_shard(VAL_SPLIT)
    cached: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if p.cache_shards:  # this rank's rows of train, the same on any node (segray/ingest.py)
        table = ray.get(loop_config["train_shards"][rank])
        cached[TRAIN_SPLIT] = tuple(a.copy() for a in rows_to_arrays(table.to_pydict(), p.height, p.width))
        train_shard = None
    else:
        train_shard = ray.train.get_dataset_shard(TRAIN_SPLIT)
    curves = Curves(run_folder(p.config), enabled=rank == 0, say=_say)  # <run>/tensorboard/

    def batches_of(split: str, shard, shuffle_seed: int | None, skip: int = 0):
        """One pass over this worker's ``split``, without its first ``skip`` batches (a resumed
        epoch): from memory when shards are cached (train's from its object, val's read in full
        on first use; reshuffled with ``shuffle_seed``: the same order again), else streamed
        through Ray Data (its first ``skip`` batches read and dropped; rows dealt anew each pass)."""
        if not p.cache_shards:
            return itertools.islice(_batches(shard, p, device, channels_last, shuffle_seed), skip, None)
        if split not in cached:
            cached[split] = read_shard(shard, p)
        rows = len(cached[split][0])
        order = np.arange(rows) if shuffle_seed is None else np.random.default_rng(shuffle_seed).permutation(rows)
        return array_batches(cached[split], p.batch_size, order[skip * p.batch_size:], device, channels_last)

    def state_of(epochs_done: int, step: int = 0, partial: list | None = None) -> dict:
        return {
            "model": ema.state if ema else net.state_dict(),
            **({"trained": net.state_dict()} if ema else {}),
            "optimizer": optimizer.state_dict(),
            "epoch": epochs_done,
            "step": step,  # steps done of epoch epochs_done + 1 (a mid-epoch checkpoint)
            "partial": partial,  # [loss sum, weight sum, images, train seconds] of those steps, all ranks
            "world": world,  # the steps are this many workers' (a resume with another count restarts the epoch)
            "schedule": {"name": p.lr_schedule, "knots": knots, "epochs": p.epochs},
            "arch": p.arch,
            "model_config": dict(p.model_args),
            "classes": list(p.classes),
            "recipe": p.recipe,
            "history": history,
            "config": p.config,
        }

    def report(metrics: dict, name: str, state: dict | None) -> None:
        """Every rank reports (a barrier); only rank 0's metrics and checkpoint are kept."""
        if state is None:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        meta = {k: v for k, v in state.items() if k not in ("model", "trained", "optimizer")}
        with tempfile.TemporaryDirectory() as d:
            _save_checkpoint(d, state, meta)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name)

    for epoch in range(start_epoch + 1, p.epochs + 1):
        t0 = time.perf_counter()
        first = start_step if epoch == start_epoch + 1 else 0
        before = partial if first else None  # what the steps before `first` summed, and their time
        carried_s = before[3] if before else 0.0
        lr_start = optimizer.param_groups[0]["lr"]
        batches = batches_of(TRAIN_SPLIT, train_shard, _seed_for(p.seed, rank, epoch, 1), skip=first)

        def after_step(k: int, totals: torch.Tensor) -> None:
            if ema:
                ema.update(net)
            console.report_position(progress, (epoch - 1) * steps + k, f"epoch {epoch}/{p.epochs}")
            if p.checkpoint_every_steps and k % p.checkpoint_every_steps == 0 and k < steps:
                sums = _all_reduce(totals.clone()).tolist()  # every rank's, so that rank 0 keeps them all
                seconds = time.perf_counter() - t0 + carried_s
                metrics = {"epoch": epoch - 1, "step": k, SCORE: float("nan")}  # never the best checkpoint
                keep = state_of(epoch - 1, k, sums + [seconds]) if rank == 0 else None
                report(metrics, f"{CHECKPOINT_PREFIX}{epoch:04d}_step_{k:06d}", keep)

        # Rank 0 carries the sums of the steps before a mid-epoch resume; the others start at 0.
        totals = torch.tensor(before[:3] if before and rank == 0 else [0.0] * 3, dtype=torch.float64, device=device)
        train_totals = _all_reduce(
            train_one_epoch(
                model, optimizer, scheduler, batches, weight, _seed_for(p.seed, rank, epoch), p.augmentation, device,
                p.void_index, steps, first, totals, after_step, agree=not p.cache_shards, precision=precision,
                lovasz=p.lovasz,
            )
        )
        train_time = time.perf_counter() - t0 + carried_s
        # The bare module: DDP's forward syncs buffers across ranks, and val shards differ in size.
        # With --ema the average is scored (its BatchNorm statistics rank 0's too).
        with ema.swapped_into(net) if ema else contextlib.nullcontext():
            _rank0_buffers(net)
            cm, val_loss = evaluate(net, batches_of(VAL_SPLIT, val_shard, None), weight, device, len(p.classes),
                                    p.void_index, precision, bias)
        # Counts and sums from every worker first; ratios only after (metrics.py).
        cm, val_loss = _all_reduce(cm), _all_reduce(val_loss)
        epoch_time = time.perf_counter() - t0 + carried_s
        scores = summarize(cm, p.classes)
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
            "lr_start": lr_start,  # of the epoch's first step (after a mid-epoch resume: of that step)
            "train_images": int(images),
            "images_per_s": images / train_time if train_time > 0 else float("nan"),
            "train_time_s": train_time,
            "epoch_time_s": epoch_time,
            "world_size": world,
            "precision": precision,  # rank 0's compute dtype (compute_precision)
            "nodes": nodes,  # the Ray node id of each rank, in rank order
        }
        history.append(metrics)
        if rank == 0:
            _say(format_epoch(metrics, p.epochs))
        report(metrics, f"{CHECKPOINT_PREFIX}{epoch:04d}", state_of(epoch) if rank == 0 else None)
        if rank == 0:
            curves.log(metrics)  # after the report: the curves hold checkpointed epochs (segray/tensorboard.py)
    curves.close()


def format_epoch(m: dict, epochs: int) -> str:
    return (
        f"train: epoch {m['epoch']}/{epochs}  train_loss {m['train_loss']:.4f}  val_loss {m['val_loss']:.4f}  "
        f"val_mIoU {m[SCORE]:.4f}  pixel_acc {m['val_pixel_accuracy']:.4f}  lr {m['lr']:.2e}  "
        f"{m['images_per_s']:.1f} images/s  epoch {m['epoch_time_s']:.1f} s"
    )

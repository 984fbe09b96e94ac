"""The train stage: a network (model.NETWORKS) trained with DDP on Ray Train, checkpoints in object storage.

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

What a run is made from (its *recipe*) and when a resume is refused: segray/runrecord.py. What
may change on resume: ``--epochs`` (the LR schedule is stretched without a jump: segray/recipe.py),
``--num-workers``, ``--use-gpu``, ``--precision``, ``--cpus-per-worker``, ``--threads``, ``--max-failures``,
``--keep-checkpoints``, ``--checkpoint-every-steps`` (resources and bookkeeping; a mid-epoch
checkpoint resumes at its step, or at the start of its epoch if ``--num-workers`` changed,
segray/worker.py). A run killed before its first checkpoint has
nothing to resume: the next command starts it afresh and rewrites ``run.json``. The worker's side
(the epoch loop) is segray/worker.py; it gets a self-contained WorkerPayload from :func:`train`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from segray import console, modelio, storage
from segray.dataset import (
    DatasetError,
    DatasetInfo,
    load_info,
    split_files,
    split_uri,
)
from segray.errors import ConfigError, SegrayError
from segray.ingest import data_config, training_datasets
from segray.model import DEFAULT_ARCH, ModelConfigError, network_config
from segray.precision import PRECISIONS
from segray.recipe import CLASS_WEIGHTINGS, SCHEDULES, Augmentation, class_weights, extend_schedule, fresh_schedule
from segray.recipe import logit_bias, lr_factor, schedule_progress
from segray.runrecord import check_run_folder, finite, jsonable, dataset_sha256, legacy_recipe, recipe
from segray.runrecord import resume_refusal, write_config_file, write_run_file
from segray.worker import (
    CHECKPOINT_FILE,
    CHECKPOINT_META,
    SCORE,
    TRAIN_SPLIT,
    VAL_SPLIT,
    WorkerPayload,
    steps_per_epoch,
    train_loop_per_worker,
)

METRICS_FILE = "metrics.json"
# A worker whose train + val shards fit in this many bytes (decoded uint8) keeps them in memory
# after the first epoch and shuffles them itself: every later epoch then skips Ray Data's split
# (its start-up, object transfers and shuffle buffer; docs/benchmarks.md has the gain).
# jobs/train.py takes SEGRAY_SHARD_CACHE_BYTES from the environment (0: stream every epoch).
CACHE_SHARD_MAX_BYTES = 1024**3

# Which epoch's checkpoint becomes model/: the best by val mIoU, the last one, or (auto) the best
# unless the dataset's val frames are also in train (prepare --train-on-val), where val measures
# fit and a final model is the last epoch of a count fixed beforehand.
EXPORTS: tuple[str, ...] = ("auto", "best", "last")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class TrainError(SegrayError, ValueError):
    """A training run that cannot start or finish; the message names the thing and the fix."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run is made from; built once from the command line (jobs/train.py
    takes every flag's default from here) and checked here, in terms of the flags."""

    data: str  # prepared dataset (jobs/prepare.py --dest)
    storage: str  # parent of the run folder
    name: str  # run folder name; the same name resumes
    epochs: int = 10
    num_workers: int = 2
    use_gpu: bool = False
    batch_size: int = 8  # per worker
    lr: float = 1e-3
    weight_decay: float = 0.0  # decoupled (AdamW); with 0 the optimizer is exactly Adam
    arch: str = DEFAULT_ARCH  # model.NETWORKS name
    arch_args: dict[str, Any] = field(default_factory=dict)  # the network's arguments (--arch-arg KEY=VALUE)
    base_channels: int | None = None  # shorthand for --arch-arg base_channels=N; None: the network's default
    seed: int = 0
    lr_schedule: str = "constant"
    class_weighting: str = "sqrt_median_freq"
    augmentation: Augmentation = field(default_factory=Augmentation)
    max_failures: int = 0  # worker-group restarts from the latest checkpoint
    cpus_per_worker: int = 1
    threads: int | None = None  # torch threads per CPU worker; None: cpus_per_worker
    keep_checkpoints: int = 2  # best by val mIoU (the latest is always kept too)
    shard_cache_bytes: int = CACHE_SHARD_MAX_BYTES  # workers keep shards up to this size in memory; 0: stream
    checkpoint_every_steps: int | None = None  # a checkpoint every N steps within an epoch too
    export: str = "auto"  # which epoch becomes model/: EXPORTS
    precision: str = "auto"  # compute dtype of the passes: segray/precision.py
    ema: float = 0.0  # decay of the weights' moving average (segray/averaging.py); 0: off
    lovasz: float = 0.0  # weight of the Lovász-softmax loss added to the cross-entropy (recipe.lovasz_softmax); 0: off
    logit_adjust: float = 0.0  # validation and export subtract this x log(class weight) from the logits (recipe.logit_bias)

    def __post_init__(self) -> None:
        for flag, value in (("--data", self.data), ("--storage", self.storage)):
            if not isinstance(value, str) or not value:
                raise TrainError(f"{flag} is empty; pass s3://bucket/prefix or a local path")
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise TrainError(f"--name {self.name!r}: use letters, digits, '.', '_' and '-' (no '/'), e.g. unet-camvid")
        positive = {"--epochs": self.epochs, "--num-workers": self.num_workers, "--batch-size": self.batch_size,
                    "--cpus-per-worker": self.cpus_per_worker, "--keep-checkpoints": self.keep_checkpoints}
        optional = {"--threads": self.threads, "--base-channels": self.base_channels,
                    "--checkpoint-every-steps": self.checkpoint_every_steps}  # None: the default
        positive.update({flag: value for flag, value in optional.items() if value is not None})
        for flag, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TrainError(f"{flag} must be a positive whole number, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise TrainError(f"--lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise TrainError(f"--weight-decay must be >= 0, got {self.weight_decay!r}")
        if not (isinstance(self.ema, (int, float)) and 0 <= self.ema < 1):
            raise TrainError(f"--ema must be 0 (off) or a decay in (0, 1), e.g. 0.999, got {self.ema!r}")
        for flag, value in (("--lovasz", self.lovasz), ("--logit-adjust", self.logit_adjust)):
            if not (isinstance(value, (int, float)) and 0 <= value <= 10):
                raise TrainError(f"{flag} must be a number from 0 (off) to 10, e.g. 1, got {value!r}")
        if self.logit_adjust and self.class_weighting == "none":
            raise TrainError("--logit-adjust undoes the shift of --class-weighting, and --class-weighting none has "
                             "none: drop --logit-adjust or pick a weighting")
        if self.lr_schedule not in SCHEDULES:
            raise TrainError(f"--lr-schedule {self.lr_schedule!r} is unknown; valid: {', '.join(SCHEDULES)}")
        if self.export not in EXPORTS:
            raise TrainError(f"--export {self.export!r} is unknown; valid: {', '.join(EXPORTS)}")
        if self.precision not in PRECISIONS:
            raise TrainError(f"--precision {self.precision!r} is unknown; valid: {', '.join(PRECISIONS)}")
        if self.class_weighting not in CLASS_WEIGHTINGS:
            raise TrainError(
                f"--class-weighting {self.class_weighting!r} is unknown; valid: {', '.join(CLASS_WEIGHTINGS)}"
            )
        if not isinstance(self.max_failures, int) or self.max_failures < -1:
            raise TrainError(f"--max-failures must be >= 0 (or -1: retry forever), got {self.max_failures!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise TrainError(f"--seed must be a non-negative whole number, got {self.seed!r}")
        if not isinstance(self.shard_cache_bytes, int) or self.shard_cache_bytes < 0:
            raise TrainError(f"SEGRAY_SHARD_CACHE_BYTES must be a whole number >= 0, got {self.shard_cache_bytes!r}")
        if not isinstance(self.augmentation, Augmentation):
            raise TrainError(f"augmentation must be a recipe.Augmentation, got {type(self.augmentation).__name__}")
        fixed = sorted({"num_classes", "in_channels"} & set(self.arch_args))
        if fixed:
            raise TrainError(f"--arch-arg {fixed[0]}: set by the data (RGB frames, the dataset's classes), not a flag")
        try:
            self.model_args(2)  # the network and its arguments exist (the class count comes with the data)
        except ModelConfigError as e:
            raise TrainError(f"--arch {self.arch}: {e}") from None

    @property
    def torch_threads(self) -> int:
        return self.threads or self.cpus_per_worker

    @property
    def run_uri(self) -> str:
        return storage.join(storage.normalize(self.storage), self.name)

    def model_args(self, num_classes: int) -> dict[str, Any]:
        """The network's full arguments for ``num_classes`` classes (defaults filled in)."""
        args = dict(self.arch_args)
        if self.base_channels is not None:
            args["base_channels"] = self.base_channels
        args["num_classes"] = num_classes
        return network_config(self.arch, args).to_dict()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_augmentation(**settings: Any) -> Augmentation:
    """An Augmentation from flag values, its refusal as a TrainError naming the flag."""
    try:
        return Augmentation(**settings)
    except ConfigError as e:
        raise TrainError(str(e)) from None


@dataclass(frozen=True)
class TrainResult:
    run: str  # <storage>/<name>
    model: str  # <run>/model
    history: list[dict]  # one entry per epoch, from epoch 1
    best_epoch: int
    best: dict  # the history entry of best_epoch
    epochs_this_run: int
    elapsed_s: float
    exported_epoch: int = 0  # the epoch model/ holds: best_epoch, or the last with --export last


# ------------------------------------------------------------------------- the driver side


def shard_cache_fits(train_rows: int, val_rows: int, num_workers: int, height: int, width: int,
                     limit: int = CACHE_SHARD_MAX_BYTES) -> bool:
    """Whether one worker's train + val shards (uint8 image + label) fit in ``limit`` bytes."""
    rows = -(-train_rows // num_workers) + -(-val_rows // num_workers)
    return rows * height * width * 4 <= limit


def _args_text(args: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in args.items() if k not in ("in_channels", "num_classes"))


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
    if not 2 <= len(info.classes) <= 255:
        raise DatasetError(f"{config.data}: dataset.json lists {len(info.classes)} classes; training needs 2 to 255; "
                           "rerun jobs/prepare.py")
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


def _fit(config: TrainConfig, payload: WorkerPayload, info: DatasetInfo, progress=None):
    import ray.train
    from ray.train.torch import TorchTrainer

    fs, path = storage.resolve(storage.normalize(config.storage))
    resources = {"CPU": config.cpus_per_worker}
    if config.use_gpu:
        resources["GPU"] = 1
    datasets, shards = training_datasets(config.data, info, config.num_workers, payload.cache_shards)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"payload": payload, "progress": progress, "train_shards": shards},
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
        datasets=datasets,
        dataset_config=data_config(),
    )
    return trainer.fit()


def _best(result) -> tuple:
    """(checkpoint, metrics) with the highest val mIoU (the later epoch on ties)."""
    scored = [(c, m) for c, m in result.best_checkpoints if m and m.get(SCORE) is not None and not m.get("step")]
    if not scored:
        raise TrainError(f"{result.path}: no checkpoint with {SCORE} to export")
    return max(scored, key=lambda cm: (finite(cm[1][SCORE], -1.0), cm[1].get("epoch", 0)))


def export_rule(config: TrainConfig, info: DatasetInfo) -> str:
    """``best`` or ``last``: what ``--export`` (EXPORTS) means for this dataset."""
    if config.export == "auto":
        return "last" if info.val_in_train else "best"
    return config.export


def export(config: TrainConfig, info: DatasetInfo, result, start: float, done_before: int,
           bias: tuple[float, ...] | None = None) -> TrainResult:
    """The best (or, by ``--export``, the last) epoch's checkpoint -> ``<run>/model/`` (modelio),
    with ``bias`` (validation's, --logit-adjust) as its logit_bias; history -> ``<run>/metrics.json``."""
    rule = export_rule(config, info)
    if rule == "last":
        epochs = [(c, m) for c, m in result.best_checkpoints if m and not m.get("step")]
        best_ckpt, _ = max(epochs, key=lambda cm: cm[1].get("epoch", 0))
    else:
        best_ckpt, _ = _best(result)
    with best_ckpt.filesystem.open_input_stream(f"{best_ckpt.path}/{CHECKPOINT_FILE}") as f:
        state = modelio.load_tensors(f.read(), f"{best_ckpt.path}/{CHECKPOINT_FILE}")
    spec = modelio.ModelSpec(
        arch=state.get("arch", DEFAULT_ARCH),  # checkpoints from before the registry hold a U-Net
        model=state["model_config"],
        input_height=info.height,
        input_width=info.width,
        classes=list(info.classes),
        palette=[list(c) for c in info.palette],
        void_index=info.void_index,
        logit_bias=None if bias is None else list(bias),
    )
    model_uri = storage.join(config.run_uri, modelio.MODEL_DIR)
    modelio.save_model(model_uri, state["model"], spec)

    latest = _read_json(result.checkpoint, CHECKPOINT_META)
    history = latest["history"]  # the latest knows every epoch
    exported = next(h for h in history if h["epoch"] == state["epoch"])
    best = max(history, key=lambda h: (finite(h.get(SCORE), -1.0), h["epoch"])) if rule == "last" else exported
    elapsed = time.perf_counter() - start
    doc = {
        "run": config.run_uri,
        "data": storage.normalize(config.data),
        "model": model_uri,
        "epochs": len(history),
        "best_epoch": best["epoch"],
        "best": best,
        "final": history[-1],
        "exported": {"rule": rule, "epoch": exported["epoch"], "val_in_train": info.val_in_train},
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
                        (json.dumps(jsonable(doc), indent=2) + "\n").encode())
    return TrainResult(config.run_uri, model_uri, history, best["epoch"], best, len(history) - done_before, elapsed,
                       exported["epoch"])


def train(config: TrainConfig) -> TrainResult:
    """Train (or resume) the run ``<storage>/<name>`` and export its best model.

    Every check that can fail fast runs before any worker starts: the dataset, the storage,
    the size of the cluster. Connects to Ray (runtime.init_ray) if not connected yet."""
    from segray.runtime import check_shared_storage, init_ray

    start = time.perf_counter()
    config = dataclasses.replace(config, data=storage.normalize(config.data), storage=storage.normalize(config.storage))
    info = _check_dataset(config)
    check_run_folder(config.run_uri)
    init_ray(gpu=config.use_gpu)
    _check_cluster(config)
    check_shared_storage({"--data": config.data, "--storage": config.storage})
    storage.check_writable(config.run_uri)  # after the check above: it would create a local run folder

    current = recipe(config, info, dataset_sha256(config.data))
    previous, meta = _previous(config, current)  # refuses a resume that would mix two runs
    write_run_file(config.run_uri, current, meta)
    write_config_file(config.run_uri, config.to_dict())
    done = int(meta["epoch"]) if meta else 0
    if meta and meta.get("schedule"):
        knots = meta["schedule"]["knots"]
    elif meta:  # a checkpoint from before the knots: its schedule ran over its config's epochs
        knots = fresh_schedule((meta.get("config") or {}).get("epochs", done))
    else:
        knots = fresh_schedule(config.epochs)
    weights = class_weights(config.class_weighting, info.class_pixel_counts)
    bias = logit_bias(config.logit_adjust, weights)  # validation's and the export's (--logit-adjust)
    if info.val_in_train:
        print(f"train: {config.data} holds its val frames in train (prepare --train-on-val): val measures fit, not "
              f"unseen frames; model/ will be the {export_rule(config, info)} epoch", flush=True)
    print(
        f"train: {config.data} (train {info.splits[TRAIN_SPLIT]}, val {info.splits[VAL_SPLIT]} at "
        f"{info.height}x{info.width}) -> {config.run_uri}; {config.num_workers} worker{'s' if config.num_workers > 1 else ''}"
        f"{' with a GPU each' if config.use_gpu else f' x {config.cpus_per_worker} CPU'}, batch {config.batch_size}"
        f"/worker, lr {config.lr:g} ({config.lr_schedule}), {config.arch} {_args_text(current['model'])}",
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
        payload = WorkerPayload(
            arch=config.arch,
            model_args=current["model"],
            classes=tuple(info.classes),
            void_index=info.void_index,
            height=info.height,
            width=info.width,
            train_rows=info.splits[TRAIN_SPLIT],
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            weight_decay=config.weight_decay,
            lr_schedule=config.lr_schedule,
            seed=config.seed,
            threads=config.torch_threads,
            augmentation=config.augmentation,
            class_weights=None if weights is None else tuple(float(w) for w in weights),
            logit_bias=bias,
            lovasz=config.lovasz,
            cache_shards=shard_cache_fits(info.splits[TRAIN_SPLIT], info.splits[VAL_SPLIT], config.num_workers,
                                          info.height, info.width, config.shard_cache_bytes),
            schedule_knots=tuple((float(e), float(p)) for e, p in knots),
            recipe=current,
            config=jsonable(config.to_dict()),
            checkpoint_every_steps=config.checkpoint_every_steps,
            precision=config.precision,
            ema=config.ema,
        )
        steps = steps_per_epoch(payload.train_rows, config.num_workers, config.batch_size)
        # A mid-epoch checkpoint's steps too, unless another worker count restarts that epoch.
        at = done * steps + (int(meta.get("step", 0)) if meta and meta.get("world") == config.num_workers else 0)
        with console.Progress("train", f"epoch {done + 1}/{config.epochs}", config.epochs * steps, "step", at) as shown:
            result = _fit(config, payload, info, shown.handle)
    out = export(config, info, result, start, done_before=done, bias=bias)
    print(format_summary(out), flush=True)
    return out


def format_summary(r: TrainResult) -> str:
    b = r.best
    last = f"; exported the last epoch, {r.exported_epoch}" if r.exported_epoch not in (0, r.best_epoch) else ""
    return (
        f"train: done: best val mIoU {b[SCORE]:.4f} at epoch {r.best_epoch} (pixel accuracy "
        f"{b['val_pixel_accuracy']:.4f}){last}; {len(r.history)} epochs ({r.epochs_this_run} this run) in "
        f"{r.elapsed_s:.1f} s; model: {r.model}"
    )

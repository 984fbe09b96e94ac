"""The infer stage: a trained model over any image collection, streaming, into Parquet.

One Ray Data pass, memory flat in the number of frames::

    listing (driver: object names only, sources.list_inputs)
      -> plan_units       tasks   image files in groups; containers indexed, cut into ranges    (frames.py)
      -> load_units       tasks   read, decode, resize each unit's frames to the model's size  (frames.py)
                                  (with --tile: not resized)
      -> Predictor        actors  one model per replica (GPU with --use-gpu), argmax masks      (predictor.py)
                                  (--tta/--scales/--tile: segray/tta.py)
      -> postprocess      tasks   mask back to the frame's size (NEAREST), PNG, counts, confusion
      -> PredictionSink   tasks   predictions/ and errors/ Parquet; per-task summed counts     (here)

then ``metrics.parquet``, written last, from one confusion matrix summed inside Ray Data: by
the write tasks of a first run, or, when the output already held rows (a rerun), over every
row of ``predictions/`` (:func:`aggregate_predictions`). Never from predictions on the driver.

The output (``<output>/``: ``infer.json``, ``predictions/``, ``errors/``, ``metrics.parquet``,
``masks/``, ``overlays/``) and its readers and writers are the artifact module segray/predictions.py.
With ``--write-video``, one task per video then writes its overlay video (segray/overlay.py).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from segray import console, modelio, sources, storage
from segray import tta as testtime
from segray.classes import ClassTable
from segray.errors import SegrayError, describe
from segray.frames import COL_UNIT, listing_tables, load_units, plan_units, planned_rows
from segray.metrics import frequency_weighted_iou, iou_per_class, mean_class_accuracy, mean_dice, mean_iou, pixel_accuracy
from segray.predictions import (
    ERRORS_DIR,
    METRICS_FILE,
    PREDICTIONS_DIR,
    RUN_FILE,
    RUN_FORMAT,
    Totals,
    aggregate_predictions,
    done_uris,
    drop_retryable_errors,
    metrics_table,
    write_parquet,
    write_results,
)
from segray.layout import label_color_table
from segray.precision import PRECISIONS
from segray.predictor import ModelLoader, Predictor, postprocess
from segray.runtime import check_shared_storage


# CPUs reserved by a planning task (listing a block of files, indexing a container).
PLAN_CPUS = 0.5


class InferError(SegrayError, ValueError):
    """The job cannot run as asked; the message names the thing and the fix."""


@dataclass(frozen=True)
class InferConfig:
    model: str  # training run or its model/ folder
    images: str  # prefix of image files and/or .tar archives
    output: str
    labels: str | None = None  # prefix of label PNGs, paired by path (sources.py)
    use_gpu: bool = False
    batch_size: int = 16  # frames per model call (with a tile: windows)
    num_replicas: int = 1  # model actors; each takes one GPU with use_gpu
    write_masks: bool = False  # colour PNGs under <output>/masks/
    cpus_per_replica: float = 1.0  # CPUs Ray reserves for each CPU model actor
    threads: int | None = None  # torch threads of a CPU replica; None: cpu_threads_default()
    rows_per_file: int = 1000  # rows per Parquet part file (at least; the last may be smaller)
    every: int | None = None  # videos: keep every N-th frame
    fps: float | None = None  # videos: keep the frames nearest to this rate
    frames_per_task: int = 500  # a container with more frames is cut into ranges for parallel tasks
    write_video: bool = False  # an overlay video per input video under <output>/overlays/
    # Test-time options (segray/tta.py), each off by default.
    tta: str | None = None  # "flip": horizontal-flip averaging
    scales: tuple[float, ...] | None = None  # multi-scale averaging of the model-size batch
    tile: tuple[int, int] | None = None  # (h, w) windows at the frame's own size
    overlap: int | None = None  # pixels windows overlap; None with a tile: tta.default_overlap
    precision: str = "auto"  # compute dtype of the model's passes: segray/precision.py

    def __post_init__(self) -> None:
        try:  # normalised: tuples, the overlap resolved
            checked = testtime.check_options(self.tta, self.scales, self.tile, self.overlap)
        except testtime.TTAError as e:
            raise InferError(str(e)) from None
        for name, value in zip(("scales", "tile", "overlap"), checked):
            object.__setattr__(self, name, value)
        for name in ("batch_size", "num_replicas", "rows_per_file", "frames_per_task"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InferError(f"{_flag(name)} must be a positive integer, got {value!r}")
        if not isinstance(self.cpus_per_replica, (int, float)) or not self.cpus_per_replica > 0:
            raise InferError(f"--cpus-per-replica must be positive, got {self.cpus_per_replica!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise InferError(f"--threads must be a positive integer, got {self.threads!r}")
        if self.every is not None and (not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1):
            raise InferError(f"--every must be a positive integer, got {self.every!r}")
        if self.fps is not None and (not isinstance(self.fps, (int, float)) or not 0 < self.fps < float("inf")):
            raise InferError(f"--fps must be a positive number of frames per second, got {self.fps!r}")
        if self.precision not in PRECISIONS:
            raise InferError(f"--precision {self.precision!r} is unknown; valid: {', '.join(PRECISIONS)}")
        if self.every is not None and self.fps is not None:
            raise InferError("--every and --fps both select video frames; pass one of them")
        for name in ("model", "images", "output"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise InferError(f"{_flag(name)} is empty; pass s3://bucket/prefix or a local path")


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


# ----------------------------------------------------------------------------- progress


def _plan_counted(batch: pa.Table, progress, **kwargs):
    """plan_units, telling the job's progress display how many rows each unit will give."""
    for units in plan_units(batch, **kwargs):
        console.report(progress, total=sum(planned_rows(u) or 0 for u in units.column(COL_UNIT).to_pylist()))
        yield units


def _load_counted(batch: pa.Table, progress, **kwargs):
    """load_units; a compressed archive's rows join the total as they are read."""
    unknown = any(planned_rows(u) is None for u in batch.column(COL_UNIT).to_pylist())
    for frames in load_units(batch, **kwargs):
        if unknown:
            console.report(progress, total=frames.num_rows)
        yield frames


def _postprocess_counted(batch: pa.Table, progress, **kwargs) -> pa.Table:
    out = postprocess(batch, **kwargs)
    console.report(progress, done=out.num_rows)
    return out


# ----------------------------------------------------------------------------- stage 4: write


def _datasink_class():
    """PredictionSink, defined on first use: importing segray.infer must not import Ray Data."""
    from ray.data.block import BlockAccessor
    from ray.data.datasource import Datasink

    class PredictionSink(Datasink):
        """Writes each task's rows to predictions/ and errors/; sums the tasks' totals."""

        def __init__(self, output: str, num_classes: int, rows_per_file: int) -> None:
            self.output = output
            self.num_classes = num_classes
            self.rows_per_file = rows_per_file
            self.totals = Totals(num_classes)

        @property
        def min_rows_per_write(self) -> int:
            return self.rows_per_file

        def write(self, blocks, ctx) -> Totals:
            tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
            tables = [t for t in tables if t.num_rows]
            if not tables:
                return Totals(self.num_classes)
            totals = write_results(pa.concat_tables(tables), self.output, self.num_classes)
            return totals

        def on_write_complete(self, write_result) -> None:
            for t in write_result.write_returns:
                self.totals = self.totals + t

    return PredictionSink


# ----------------------------------------------------------------------------- metrics


# ----------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class InferSummary:
    output: str
    listed: int  # inputs handed to this run (archives count as one until expanded)
    skipped: int  # inputs already in the output (rerun)
    run: Totals  # rows this run wrote
    total: Totals  # every row in the output, this run's and earlier ones'
    unpaired: int  # predicted frames (all runs) that had no label, with --labels
    seconds: float
    with_labels: bool
    class_names: tuple[str, ...] = ()

    @property
    def frames_per_second(self) -> float:
        return (self.run.frames + self.run.errors) / self.seconds if self.seconds > 0 else 0.0


def format_summary(s: InferSummary) -> str:
    """The one-screen report printed at the end of a run."""
    t = s.total
    stages = ", ".join(f"{k} {v}" for k, v in sorted(s.run.stages.items())) or "none"
    lines = [
        (
            f"infer: done in {s.seconds:.1f} s: {s.run.frames + s.run.errors} inputs this run "
            f"({s.frames_per_second:.2f} frames/s), {s.skipped} already done"
        ),
        f"  predicted  {t.frames} frames ({s.run.frames} this run)",
        f"  errors     {t.errors} ({s.run.errors} this run: {stages})" + (
            f", see {storage.join(s.output, ERRORS_DIR)}" if t.errors else ""),
    ]
    if s.with_labels:
        lines.append(f"  labelled   {t.labelled} frames, {s.unpaired} without a label (predicted, not scored)")
        if t.cm.sum():
            iou = iou_per_class(t.cm)
            lines.append(f"  mIoU       {mean_iou(t.cm):.4f}   pixel accuracy {pixel_accuracy(t.cm):.4f}")
            lines.append(f"  mean acc   {mean_class_accuracy(t.cm):.4f}   mean Dice {mean_dice(t.cm):.4f}   "
                         f"fwIoU {frequency_weighted_iou(t.cm):.4f}")
            per_class = [f"{n} {'-' if np.isnan(v) else f'{v:.3f}'}" for n, v in zip(s.class_names, iou)]
            for k in range(0, len(per_class), 6):
                lines.append(("  IoU        " if k == 0 else "             ") + ", ".join(per_class[k : k + 6]))
    lines.append(f"  output     {s.output}: {PREDICTIONS_DIR}/ {ERRORS_DIR}/ {METRICS_FILE}")
    return "\n".join(lines)


def run_record(config: InferConfig, model_sha256: str, classes: ClassTable | None = None) -> dict:
    """What ``infer.json`` says made the output (URIs normalised), and the model's classes (for
    the readers of the output: names, colours and void of its masks)."""
    return {
        "format": RUN_FORMAT,
        "model": config.model,
        "model_sha256": model_sha256,
        "images": config.images,
        "labels": config.labels,
        # Masks are written with the rows: a rerun that adds --write-masks would leave the frames
        # of the earlier run without one, silently.
        "write_masks": config.write_masks,
        # Which frames of a video are kept: a rerun with another selection would mix two.
        "every": config.every,
        "fps": config.fps,
        # Test-time options change every mask: one output is made with one set of them.
        **testtime.record(config.tta, config.scales, config.tile, config.overlap),
        **({"classes": classes.to_fields()} if classes is not None else {}),
    }


def check_output(config: InferConfig, record: dict) -> bool:
    """Refuse an output that another model, collection or label set made; True when it holds an
    earlier run of this same job (a rerun), False when it is new or empty.

    An output folder that holds files but no ``infer.json`` is not segray's to write into."""
    run_file = storage.join(config.output, RUN_FILE)
    start_over = f"pass the same flags to complete it, or delete {config.output} or choose another --output to start over"
    if not storage.exists(run_file):
        others = [u for u in storage.list_files(config.output)]
        if others:
            raise InferError(
                f"--output {config.output} holds {len(others)} files (e.g. {others[0]}) but no {RUN_FILE}: it is not "
                "the output of a segray infer run (or one written before outputs recorded their model); choose an "
                "empty or new --output"
            )
        return False
    try:
        earlier = json.loads(storage.read_bytes(run_file))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InferError(f"{run_file}: not valid JSON ({e}); delete {config.output} or choose another --output") from None
    if not isinstance(earlier, dict) or earlier.get("format") != RUN_FORMAT:
        raise InferError(f"{run_file}: not a segray infer record; delete {config.output} or choose another --output")
    checks = (
        ("model_sha256", "--model", "the model (sha256 of its model.pt and config.json)"),
        ("images", "--images", "--images"),
        ("labels", "--labels", "--labels"),
        ("write_masks", "--write-masks", "--write-masks"),
        ("every", "--every", "--every"),
        ("fps", "--fps", "--fps"),
        *((key, f"--{key}", f"--{key}") for key in testtime.RECORD_KEYS),
    )
    for key, flag, what in checks:
        if earlier.get(key, False if key == "write_masks" else None) != record[key]:
            before, now = earlier.get(key), record[key]
            if key == "model_sha256":
                before = f"{earlier.get('model')} (sha256 {str(before)[:12]})"
                now = f"{record['model']} (sha256 {str(now)[:12]})"
            if key == "write_masks":
                raise InferError(f"--output {config.output} was made {'with' if before else 'without'} --write-masks, "
                                 f"this run is {'with' if now else 'without'}: some frames would have masks and "
                                 f"others not; {start_over}")
            if key in testtime.RECORD_KEYS:
                raise InferError(f"--output {config.output} was made with {flag} {testtime.shown(key, before)}, this "
                                 f"run has {flag} {testtime.shown(key, now)}: masks would mix two; {start_over}")
            raise InferError(
                f"--output {config.output} was made with {what} {before or 'none'}, this run has {flag} "
                f"{now or 'none'}; {start_over}"
            )
    return True


def _check_resources(config: InferConfig) -> None:
    import ray

    resources = ray.cluster_resources()
    if config.use_gpu and resources.get("GPU", 0) < config.num_replicas:
        raise InferError(
            f"--use-gpu with {config.num_replicas} replicas needs {config.num_replicas} GPUs; the cluster has "
            f"{resources.get('GPU', 0):g}; lower --num-replicas or drop --use-gpu"
        )
    cpus = resources.get("CPU", 0)
    # Decode and encode tasks take one whole CPU each: with less than one left over they would
    # never be scheduled and the job would wait forever.
    if not config.use_gpu and cpus - config.num_replicas * config.cpus_per_replica < 1:
        raise InferError(
            f"{config.num_replicas} CPU replicas x {config.cpus_per_replica:g} CPUs leave less than 1 of the "
            f"cluster's {cpus:g} CPUs for decoding; lower --num-replicas or --cpus-per-replica"
        )


def run_pipeline(
    config: InferConfig, listing: sources.Listing, spec: modelio.ModelSpec, loader: ModelLoader = modelio.load_model,
    progress=None,
) -> Totals:
    """The streaming pass over the listed inputs; returns the totals of the rows it wrote.
    ``progress``: a console.Progress handle the tasks report planned and finished rows into."""
    import ray

    num_classes = spec.num_classes
    # A map task's exception as itself, not as "UserCodeException: UDF failed to process a data
    # block." (segray turns every input's failure into a row; what is left is a system failure
    # whose own message the job's last line should show).
    ray.data.DataContext.get_current().raise_original_map_exception = True
    # The whole label index travels only when container frames need pairing in tasks.
    labels = listing.labels if listing.archives or listing.videos else None
    ds = ray.data.from_arrow(listing_tables(listing))
    ds = ds.map_batches(
        _plan_counted,
        fn_kwargs={"frames_per_task": config.frames_per_task, "images_root": config.images, "labels": labels,
                   "every": config.every, "fps": config.fps, "progress": progress},
        batch_size=None,
        batch_format="pyarrow",
        # Indexing a container is mostly reading; a reservation unlike the load tasks' also keeps
        # Ray Data from fusing the two, which would decode a container's ranges one after another.
        num_cpus=PLAN_CPUS,
    )
    # One unit per block: each range of a container is a load task of its own, in parallel.
    ds = ds.repartition(target_num_rows_per_block=1)
    ds = ds.map_batches(
        _load_counted,
        # Tiling predicts each frame at its own size: no resize (size None).
        fn_kwargs={"size": None if config.tile else spec.input_size, "images_root": config.images, "labels": labels,
                   "progress": progress},
        batch_size=None,
        batch_format="pyarrow",
    )
    # Blocks of exactly one model batch. This also keeps decoding in the tasks: Ray Data would
    # otherwise fuse a task map into the actor map after it, and decode inside the model's actor.
    ds = ds.repartition(target_num_rows_per_block=config.batch_size)
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={
            "model_uri": config.model,
            "use_gpu": config.use_gpu,
            "loader": loader,
            "threads": config.threads,
            "num_replicas": config.num_replicas,
            "tta": config.tta,
            "scales": config.scales,
            "tile": config.tile,
            "overlap": config.overlap,
            "batch_size": config.batch_size,
            "precision": config.precision,
        },
        compute=ray.data.ActorPoolStrategy(size=config.num_replicas),
        batch_size=config.batch_size,
        batch_format="pyarrow",
        num_gpus=1 if config.use_gpu else None,
        num_cpus=1 if config.use_gpu else config.cpus_per_replica,
    )
    ds = ds.map_batches(
        _postprocess_counted,
        fn_kwargs={
            "progress": progress,
            "model_size": None if config.tile else spec.input_size,  # None: masks at the frame's size
            "classes": spec.class_table,
            "color_table": label_color_table(config.labels),
            "images_root": config.images,
            "output": config.output,
            "write_masks": config.write_masks,
        },
        batch_size=None,
        batch_format="pyarrow",
    )
    # Blocks of one part file each. Unfused from the write, postprocessing streams batch by
    # batch behind the model instead of waiting for a whole file's rows.
    ds = ds.repartition(target_num_rows_per_block=config.rows_per_file)
    sink = _datasink_class()(config.output, num_classes, config.rows_per_file)
    ds.write_datasink(sink)
    return sink.totals


def write_overlays(config: InferConfig, videos: list[str], classes: ClassTable) -> int:
    """One Ray task per video writes its overlay video (segray/overlay.py); a video whose
    overlay cannot be written is a warning line, never the job's end. Returns how many failed."""
    import ray

    from segray.overlay import write_overlay

    task = ray.remote(num_cpus=1, max_retries=1)(write_overlay)
    pending = {task.remote(v, config.output, config.images, classes): v for v in videos}
    failed = 0
    for ref, uri in pending.items():
        try:
            frames = ray.get(ref)
            print(f"infer: overlay of {uri}: {frames} frames", flush=True)
        except Exception as e:  # noqa: BLE001 - the frames are predicted; only their overlay is missing
            failed += 1
            print(f"infer: WARNING: no overlay video for {uri}: {describe(e)}", flush=True)
    return failed


def infer(config: InferConfig, loader: ModelLoader = modelio.load_model) -> InferSummary:
    """Run the infer stage on the connected Ray cluster (module doc: outputs and reruns)."""
    start = time.perf_counter()
    config = dataclasses.replace(
        config,
        model=storage.normalize(config.model),
        images=storage.normalize(config.images),
        output=storage.normalize(config.output),
        labels=storage.normalize(config.labels) if config.labels else None,
    )
    # Replicas and tasks on other machines would read and write their own disks.
    check_shared_storage({"--model": config.model, "--images": config.images, "--labels": config.labels,
                          "--output": config.output})
    # The model is loaded and checked here, on the driver (weights-only, every tensor against the
    # network of config.json), before the output is touched: a model that cannot load must not
    # be found inside the actor after metrics.parquet of a finished output was deleted.
    _, spec = loader(config.model, "cpu")
    num_classes = spec.num_classes
    record = run_record(config, modelio.fingerprint(config.model), spec.class_table)
    _check_resources(config)
    rerun = check_output(config, record)
    # An input tree that yields nothing fails here, before anything is written.
    listing = sources.list_inputs(config.images, config.labels, done_uris(config.output) if rerun else set(),
                                  output=config.output)
    storage.check_writable(config.output)
    if not rerun:
        storage.write_bytes(storage.join(config.output, RUN_FILE), (json.dumps(record, indent=2) + "\n").encode())
    # From here on the output is incomplete until metrics.parquet is written again.
    storage.delete(storage.join(config.output, METRICS_FILE))
    retried = drop_retryable_errors(config.output) if rerun else 0
    if retried:
        # Those inputs are not done any more: list again, with them.
        listing = sources.list_inputs(config.images, config.labels, done_uris(config.output), output=config.output)
    done = rerun
    skipped = listing.skipped + sum(len(i.done) for i in listing.inputs)
    found = [f"{n} {what}" for n, what in ((listing.images, "image files"), (listing.archives, "archives"),
                                           (listing.videos, "videos"), (listing.others, "other files")) if n]
    print(
        f"infer: {config.images}: {', '.join(found) or 'nothing new'} to process; {skipped} inputs already in "
        f"{config.output}"
        + (f" ({retried} earlier read errors tried again)" if retried else "")
        + (f"; {len(listing.labels)} labels in {config.labels}" if config.labels else ""),
        flush=True,
    )
    print(f"infer: model {config.model}: input {spec.input_height}x{spec.input_width}, {num_classes} classes, "
          f"{config.num_replicas} replica(s) on {'GPU' if config.use_gpu else 'CPU'}, --precision {config.precision}",
          flush=True)
    options = testtime.describe(config.tta, config.scales, config.tile, config.overlap)
    if options:
        print(f"infer: test-time options: {options}", flush=True)

    run = Totals(num_classes)
    if listing.inputs:
        with console.Progress("infer", "frames", total=0, unit="frame") as shown:
            run = run_pipeline(config, listing, spec, loader, shown.handle)
            shown.finish(run.frames + run.errors)  # the rows the write tasks wrote
    if config.write_video:
        write_overlays(config, [i.uri for i in listing.inputs if i.kind == sources.KIND_VIDEO], spec.class_table)
    # A first run's totals are the sums its write tasks returned; after a rerun the earlier
    # rows count too, so every part file is summed again (two small columns only).
    total = aggregate_predictions(config.output, num_classes) if done else run
    write_parquet(storage.join(config.output, METRICS_FILE), metrics_table(total, list(spec.classes)))
    summary = InferSummary(
        output=config.output,
        listed=len(listing.inputs),
        skipped=skipped,
        run=run,
        total=total,
        unpaired=total.frames - total.labelled,
        seconds=time.perf_counter() - start,
        with_labels=bool(config.labels),
        class_names=tuple(spec.classes),
    )
    print(format_summary(summary), flush=True)
    if options:
        print(f"  test-time  {options}", flush=True)
    return summary

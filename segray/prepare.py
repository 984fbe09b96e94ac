"""The prepare stage: CamVid pairs in object storage -> resized Parquet shards + dataset.json.

The driver only lists the source (names, not pixels). Reading, decoding, resizing and
checking run as Ray Data tasks on every CPU of the cluster; each task reports bad inputs as
rows instead of raising, so the job can name *every* bad file in one message, and with
``skip_bad`` drop them and list them in ``dataset.json``.

**A job never deletes what it did not write.** Before anything is written or deleted:

- a ``dest`` that is the ``source``, lies inside it or contains it is refused (local paths are
  compared after resolving symlinks, path segment by path segment; S3 and local never overlap);
- a non-empty ``dest`` is used only if it is an earlier segray dataset (a ``dataset.json`` of
  segray's format) or holds only the leftovers of an interrupted prepare (see below); any
  other non-empty ``dest`` is refused. In an earlier dataset, files that its ``dataset.json``
  does not list (a README, notes) are kept untouched.

A run replaces an earlier dataset by writing beside it and swapping:

1. ``<dest>/.segray-prepare-<run>.json`` (the in-progress manifest) says that run ``<run>`` is
   writing ``<split>/<run>_*.parquet`` and replaces the files the old ``dataset.json`` lists;
   an old ``dataset.json`` without ``files`` is first rewritten with the list of its
   ``<split>/*.parquet`` (its content unchanged), so that new shards never join the old dataset;
2. the new shards are written under new names, ``<split>/<run>_<write>_<task>-<i>.parquet``;
3. the new ``dataset.json`` (listing exactly its files) replaces the old one in one put;
4. only then are the old dataset's files, the leftovers of earlier interrupted runs and finally
   the manifest deleted.

A run that fails with an exception deletes the shards it wrote and its manifest: the old
dataset is as it was. A run that is killed leaves the old dataset whole and readable (its
``dataset.json`` and its files) plus its manifest and some new shards, which no reader reads;
the next prepare into the same ``dest`` recognises them by the manifest and deletes them after
it has written its own dataset. ``skip_bad`` never writes an empty dataset: if no good pair is
left, or none of a split the source has, the run fails. Two prepares must not write into the
same ``dest`` at the same time.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from segray import console, storage
from segray.errors import describe
from segray.classes import CAMVID, ClassTable
from segray.dataset import (
    COL_HEIGHT,
    COL_IMAGE,
    COL_LABEL,
    COL_NAME,
    COL_SOURCE,
    COL_WIDTH,
    DATASET_FILE,
    SCHEMA,
    DatasetInfo,
    split_uri,
    write_info,
)
from segray.destination import (
    MANIFEST_FORMAT,
    PrepareError,
    _by_split,
    _discard_run,
    _delete_files,
    _new_run_id,
    _run_files,
    check_dest,
    check_dest_outside_source,
    is_manifest,
)
from segray.layout import ORIGINAL, SPLITS, Layout, detect, resplit
from segray.preprocess import (
    BadInputError,
    color_lookup,
    decode_image,
    decode_label,
    resize_image,
    resize_label,
)
from segray.runtime import check_shared_storage, node_id

log = logging.getLogger(__name__)

# Parquet files of roughly this many bytes: big enough for fast sequential reads, small
# enough that every training worker gets several files to read in parallel.
TARGET_FILE_BYTES = 32 * 1024 * 1024
PAIRS_PER_BATCH = 8

_COL_SPLIT = "split"
_COL_ERROR = "error"
_COL_COUNTS = "class_counts"  # 256 pixel counts, one per label value (classes and void)
_COL_UNMAPPED = "unmapped"
_COL_NODE = "node"  # the Ray node id of the task that processed the pair (dataset.json "nodes")

@dataclass(frozen=True)
class PrepareConfig:
    source: str
    dest: str
    size: tuple[int, int] | None = None  # (height, width); None: the first image's size
    skip_bad: bool = False
    holdout: tuple[str, ...] = ()  # name prefixes (sequences) of the train and val frames that become val
    train_on_val: bool = False  # train also gets every val frame (a final model; val then measures fit)

    def __post_init__(self) -> None:
        for flag, value in (("--source", self.source), ("--dest", self.dest)):
            if not isinstance(value, str) or not value:
                raise PrepareError(f"{flag} is empty; pass s3://bucket/prefix or a local path")
        if self.size is not None and (len(self.size) != 2 or any(
                not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in self.size)):
            raise PrepareError(f"--size must be HxW with positive sides, e.g. 176x240; got {self.size!r}")


def process_pair(
    image_bytes: bytes,
    label_bytes: bytes,
    image_uri: str,
    label_uri: str,
    size: tuple[int, int],
    lookup: tuple[np.ndarray, np.ndarray] | None,
    classes: ClassTable = CAMVID,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Decode, check and resize one pair -> image (h, w, 3), label (h, w), unmapped pixels.

    ``lookup`` is the colour table of the original layout (None: index labels of ``classes``)."""
    image = decode_image(image_bytes, image_uri)
    label, unmapped = decode_label(label_bytes, label_uri, classes, lookup)
    if label.shape != image.shape[:2]:
        raise BadInputError(
            f"{label_uri}: label is {label.shape[1]}x{label.shape[0]} but its image {image_uri} is "
            f"{image.shape[1]}x{image.shape[0]}; they must be the same size"
        )
    return resize_image(image, size), resize_label(label, size), unmapped


def _name_problem(source: str, pair) -> str:
    """Why a pair's file names cannot be read as listed (``a/../b.png``: the store would serve another
    key's bytes), or ''. Such a pair is a bad pair: named, and left out with --skip-bad."""
    from segray.sources import name_problem

    for uri in (pair.image, pair.label):
        problem = name_problem(storage.relative(source, uri))
        if problem:
            return f"{uri}: {problem}; rename the object"
    return ""


def _process_batch(batch: dict, size: tuple[int, int], colors: tuple | None, classes: ClassTable = CAMVID,
                   progress=None) -> pa.Table:
    """Read, check and resize one batch of pairs; ``progress``: a console.Progress handle."""
    lookup = color_lookup(colors) if colors else None
    h, w = size
    rows: dict[str, list] = {k: [] for k in (*SCHEMA.names, _COL_SPLIT, _COL_ERROR, _COL_COUNTS, _COL_UNMAPPED,
                                             _COL_NODE)}
    problems = batch.get("problem", [""] * len(batch["name"]))
    node = node_id() or ""
    for split, name, image_uri, label_uri, problem in zip(batch["split"], batch["name"], batch["image"], batch["label"],
                                                          problems):
        error, image, label, unmapped = "", b"", b"", 0
        counts = [0] * 256
        try:
            if problem:
                raise BadInputError(problem)
            img, lab, unmapped = process_pair(
                storage.read_bytes(image_uri), storage.read_bytes(label_uri), image_uri, label_uri, size, lookup, classes
            )
            image, label = img.tobytes(), lab.tobytes()
            counts = np.bincount(lab.ravel(), minlength=256).tolist()  # per label value: classes and void
        except (BadInputError, storage.StorageError) as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 - a mode PIL cannot convert, ...: that pair's error, not the job's
            error = f"{image_uri} / {label_uri}: cannot be used ({describe(e)})"
        for k, v in (
            (COL_NAME, str(name)),
            (COL_IMAGE, image),
            (COL_LABEL, label),
            (COL_HEIGHT, h),
            (COL_WIDTH, w),
            (COL_SOURCE, str(image_uri)),
            (_COL_SPLIT, str(split)),
            (_COL_ERROR, error),
            (_COL_COUNTS, counts),
            (_COL_UNMAPPED, unmapped),
            (_COL_NODE, node),
        ):
            rows[k].append(v)
    console.report(progress, done=len(rows[COL_NAME]))
    schema = SCHEMA.append(pa.field(_COL_SPLIT, pa.string())).append(pa.field(_COL_ERROR, pa.string()))
    schema = schema.append(pa.field(_COL_COUNTS, pa.list_(pa.int64()))).append(pa.field(_COL_UNMAPPED, pa.int64()))
    schema = schema.append(pa.field(_COL_NODE, pa.string()))
    return pa.Table.from_pydict(rows, schema=schema)


def _select_split(batch: pa.Table, split: str) -> pa.Table:
    keep = pc.and_(pc.equal(batch[_COL_SPLIT], split), pc.equal(batch[_COL_ERROR], ""))
    return batch.filter(keep).select(SCHEMA.names)


def _first_image_size(uri: str) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(storage.read_bytes(uri))) as img:
            return img.height, img.width
    except Exception as e:  # noqa: BLE001
        raise PrepareError(f"{uri}: cannot read its size ({e}); pass --size HxW or fix the file") from None


# ----------------------------------------------------------------------------------- the job


def check_paths(config: PrepareConfig) -> PrepareConfig:
    """Normalize ``source`` and ``dest`` and refuse a ``dest`` that prepare must not write into
    (see the module docstring); reads only. Returns the config with normalized URIs."""
    config = dataclasses.replace(config, source=storage.normalize(config.source), dest=storage.normalize(config.dest))
    check_dest_outside_source(config.source, config.dest)
    check_dest(config.dest)
    return config


def prepare(config: PrepareConfig) -> DatasetInfo:
    """Run the prepare stage on the connected Ray cluster; returns what dataset.json says."""
    import ray
    from ray.data.datasource import FilenameProvider

    start = time.perf_counter()
    config = check_paths(config)  # reads only: nothing is written or deleted before it passes
    # Tasks on other machines would read and write their own disks: local paths need one machine.
    check_shared_storage({"--source": config.source, "--dest": config.dest})
    layout: Layout = resplit(detect(config.source), config.holdout, config.train_on_val)
    size = config.size or _first_image_size(layout.pairs[0].image)
    counts = layout.split_counts()
    print(
        f"prepare: {config.source}: {layout.kind} layout, {len(layout.pairs)} pairs "
        f"({', '.join(f'{k} {v}' for k, v in counts.items())}), {layout.classes.num_classes} classes"
        f"{' (classes.json)' if layout.classes != CAMVID else ''}, resizing to {size[0]}x{size[1]}",
        flush=True,
    )
    if config.holdout:
        print(f"prepare: --holdout {','.join(config.holdout)}: val is the {counts.get('val', 0)} train and val frames "
              "whose names start with it, train the others", flush=True)
    if config.train_on_val:
        print("prepare: --train-on-val: train also holds every val frame; val no longer measures generalisation",
              flush=True)
    if layout.ignored_files:
        print(f"prepare: ignored {layout.ignored_files} files that are not PNG/JPEG images", flush=True)
    storage.check_writable(config.dest)  # writes and deletes only its own probe

    items = [{"split": p.split, "name": p.name, "image": p.image, "label": p.label,
              "problem": _name_problem(config.source, p)} for p in layout.pairs]
    colors = layout.label_colors if layout.kind == ORIGINAL else None
    num_blocks = max(1, min(len(items) // PAIRS_PER_BATCH, 512))
    with console.Progress("prepare", "pairs", total=len(items), unit="pair") as shown:
        ds = ray.data.from_items(items, override_num_blocks=num_blocks).map_batches(
            _process_batch,
            fn_kwargs={"size": size, "colors": colors, "classes": layout.classes, "progress": shown.handle},
            batch_size=PAIRS_PER_BATCH,
            batch_format="numpy",
        )
        ds = ds.materialize()
        shown.finish(ds.count())  # a row per pair, good or bad

    summary = ds.select_columns([_COL_SPLIT, _COL_ERROR, _COL_COUNTS, _COL_UNMAPPED, _COL_NODE]).to_pandas()
    bad = summary[summary[_COL_ERROR] != ""]
    if len(bad) and not config.skip_bad:
        first = bad[_COL_ERROR].iloc[0]
        more = f" (and {len(bad) - 1} more bad pairs)" if len(bad) > 1 else ""
        raise PrepareError(f"{first}{more}; fix or remove it, or pass --skip-bad to leave bad pairs out")
    _check_something_left(summary, counts)
    for message in bad[_COL_ERROR]:
        print(f"prepare: skipped: {message}", flush=True)

    # Again, right before writing: the processing above can take long, the folder may have changed.
    state = check_dest(config.dest)
    if state.foreign:
        print(
            f"prepare: kept {len(state.foreign)} files of {config.dest} that are not part of the dataset "
            f"(e.g. {state.foreign[0]})",
            flush=True,
        )
    if state.info is not None and not state.info.files:
        # An older dataset.json reads every <split>/*.parquet: pin its list first, so that the
        # new shards written beside it never become part of it, even if this run is killed. Only
        # "files" is added (the same dataset; its bytes, and so its sha256, do change).
        uri = storage.join(config.dest, DATASET_FILE)
        raw = json.loads(storage.read_bytes(uri))
        raw["files"] = _by_split(state.dataset)
        storage.write_bytes(uri, (json.dumps(raw, indent=2) + "\n").encode())
    run = _new_run_id()
    manifest_rel = f".segray-prepare-{run}.json"
    manifest = {
        "format": MANIFEST_FORMAT,
        "run": run,
        "note": f"segray prepare in progress: writes <split>/{run}_*.parquet, then dataset.json, then deletes "
        "the files listed in 'replaces'; if this file is still here, that run did not finish",
        "source": config.source,
        "replaces": state.dataset + [r for r in state.leftovers if not is_manifest(r)],
    }
    storage.write_bytes(storage.join(config.dest, manifest_rel), (json.dumps(manifest, indent=2) + "\n").encode())

    h, w = size
    try:
        rows: dict[str, int] = {}
        files: dict[str, list[str]] = {}
        rows_per_file = max(1, TARGET_FILE_BYTES // (h * w * 4))
        fs, _ = storage.resolve(config.dest)
        for split in SPLITS:
            n = int(((summary[_COL_SPLIT] == split) & (summary[_COL_ERROR] == "")).sum())
            if n == 0:
                continue
            part = ds.map_batches(_select_split, fn_kwargs={"split": split}, batch_format="pyarrow", batch_size=None)
            _, path = storage.resolve(split_uri(config.dest, split))
            part.write_parquet(
                path,
                filesystem=fs,
                min_rows_per_file=min(rows_per_file, n),
                filename_provider=FilenameProvider(dataset_uuid=run, file_format="parquet"),
            )
            rows[split] = n
        for rel in _run_files(config.dest, run):
            files.setdefault(rel.split("/", 1)[0], []).append(rel)

        good = summary[summary[_COL_ERROR] == ""]
        train = good[good[_COL_SPLIT] == "train"]
        classes = layout.classes
        class_counts = np.zeros(256, dtype=np.int64)
        for c in train[_COL_COUNTS]:
            class_counts += np.asarray(c, dtype=np.int64)
        unmapped = int(good[_COL_UNMAPPED].sum())
        info = DatasetInfo(
            height=h,
            width=w,
            splits=rows,
            class_pixel_counts=class_counts[: classes.num_classes].tolist(),
            void_pixel_count=int(class_counts[classes.void_index]),
            source=config.source,
            layout=layout.kind,
            unmapped_color_pixels=unmapped,
            skipped=sorted(bad[_COL_ERROR].tolist()),
            files=files,
            nodes={str(k): int(v) for k, v in sorted(summary[_COL_NODE].value_counts().items()) if k},
            holdout=list(config.holdout),
            val_in_train=config.train_on_val,
            **classes.to_fields(),
        )
        write_info(config.dest, info)  # the swap: from now on the new dataset is the dataset
    except BaseException:
        _discard_run(config.dest, run, manifest_rel)
        raise
    if unmapped:
        print(f"prepare: {unmapped} label pixels had colours outside label_colors.txt and became void", flush=True)
    # Only now: the files of the replaced dataset and of interrupted runs, then the manifest.
    new = {rel for rels in files.values() for rel in rels}
    _delete_files(config.dest, [r for r in manifest["replaces"] if r not in new])
    _delete_files(config.dest, [r for r in state.leftovers if r not in new] + [manifest_rel])
    elapsed = time.perf_counter() - start
    total = sum(rows.values())
    print(
        f"prepare: wrote {total} pairs ({', '.join(f'{k} {v}' for k, v in rows.items())}) at {h}x{w} to "
        f"{config.dest} in {elapsed:.1f} s ({total / elapsed:.1f} images/s)",
        flush=True,
    )
    return info


def _check_something_left(summary, counts: dict[str, int]) -> None:
    """With --skip-bad, refuse to write an empty dataset or to drop a whole split."""
    good = summary[summary[_COL_ERROR] == ""]
    if len(good) == 0:
        first = summary[_COL_ERROR].iloc[0] if len(summary) else "no pairs"
        raise PrepareError(
            f"nothing left to prepare: all {len(summary)} pairs are bad (first: {first}); "
            "--skip-bad does not write an empty dataset: fix the source"
        )
    for split, n in counts.items():
        left = good[good[_COL_SPLIT] == split]
        if len(left) == 0:
            first = summary[summary[_COL_SPLIT] == split][_COL_ERROR].iloc[0]
            raise PrepareError(
                f"nothing left of split {split!r}: all {n} of its pairs are bad (first: {first}); "
                f"--skip-bad does not drop a whole split: fix them, or remove {split}/ from the source"
            )

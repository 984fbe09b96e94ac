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
import os
import posixpath
import re
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from PIL import Image

from segray import storage
from segray.errors import describe
from segray.camvid import NUM_CLASSES, VOID_INDEX
from segray.dataset import (
    COL_HEIGHT,
    COL_IMAGE,
    COL_LABEL,
    COL_NAME,
    COL_SOURCE,
    COL_WIDTH,
    DATASET_FILE,
    SCHEMA,
    DatasetError,
    DatasetInfo,
    is_shard_path,
    listed_files,
    load_info,
    split_uri,
    write_info,
)
from segray.layout import ORIGINAL, SPLITS, Layout, detect
from segray.preprocess import (
    BadInputError,
    color_lookup,
    colors_to_index,
    decode_image,
    decode_index_label,
    resize_image,
    resize_label,
)

log = logging.getLogger(__name__)

# Parquet files of roughly this many bytes: big enough for fast sequential reads, small
# enough that every training worker gets several files to read in parallel.
TARGET_FILE_BYTES = 32 * 1024 * 1024
PAIRS_PER_BATCH = 8

_COL_SPLIT = "split"
_COL_ERROR = "error"
_COL_COUNTS = "class_counts"  # NUM_CLASSES + 1 (void last) pixel counts
_COL_UNMAPPED = "unmapped"

# The in-progress manifest of a run: ``<dest>/.segray-prepare-<run>.json``.
MANIFEST_FORMAT = "segray-prepare-run/1"
_MANIFEST = re.compile(r"^\.segray-prepare-([0-9A-Za-z-]+)\.json$")
# Files segray's own storage helpers may leave at the top of dest when killed (the write probe
# of storage.check_writable, the temporary name of storage.write_bytes): never counted as
# foreign, never deleted.
_OWN_TEMPORARY = re.compile(r"^(\.segray-write-probe-[0-9a-f]+|dataset\.json\.tmp-[0-9a-f]+)$")


class PrepareError(ValueError):
    """The source cannot be prepared; the message names the file(s) and the fix."""


@dataclass(frozen=True)
class PrepareConfig:
    source: str
    dest: str
    size: tuple[int, int] | None = None  # (height, width); None: the first image's size
    skip_bad: bool = False


def process_pair(
    image_bytes: bytes,
    label_bytes: bytes,
    image_uri: str,
    label_uri: str,
    size: tuple[int, int],
    lookup: tuple[np.ndarray, np.ndarray] | None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Decode, check and resize one pair -> image (h, w, 3), label (h, w), unmapped pixels.

    ``lookup`` is the colour table of the original layout (None: index labels)."""
    image = decode_image(image_bytes, image_uri)
    if lookup is None:
        label, unmapped = decode_index_label(label_bytes, label_uri), 0
    else:
        label, unmapped = colors_to_index(decode_image(label_bytes, label_uri), lookup)
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


def _process_batch(batch: dict, size: tuple[int, int], colors: tuple | None) -> pa.Table:
    lookup = color_lookup(colors) if colors else None
    h, w = size
    rows: dict[str, list] = {k: [] for k in (*SCHEMA.names, _COL_SPLIT, _COL_ERROR, _COL_COUNTS, _COL_UNMAPPED)}
    problems = batch.get("problem", [""] * len(batch["name"]))
    for split, name, image_uri, label_uri, problem in zip(batch["split"], batch["name"], batch["image"], batch["label"],
                                                          problems):
        error, image, label, unmapped = "", b"", b"", 0
        counts = [0] * (NUM_CLASSES + 1)
        try:
            if problem:
                raise BadInputError(problem)
            img, lab, unmapped = process_pair(
                storage.read_bytes(image_uri), storage.read_bytes(label_uri), image_uri, label_uri, size, lookup
            )
            image, label = img.tobytes(), lab.tobytes()
            counts = np.bincount(lab.ravel(), minlength=NUM_CLASSES + 1)[: NUM_CLASSES + 1].tolist()
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
        ):
            rows[k].append(v)
    schema = SCHEMA.append(pa.field(_COL_SPLIT, pa.string())).append(pa.field(_COL_ERROR, pa.string()))
    schema = schema.append(pa.field(_COL_COUNTS, pa.list_(pa.int64()))).append(pa.field(_COL_UNMAPPED, pa.int64()))
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


# ------------------------------------------------------------------------ where prepare writes


def _segments(uri: str) -> tuple[str, tuple[str, ...]]:
    """(scheme, path segments) of a normalized URI; local paths with symlinks resolved."""
    if storage.is_s3(uri):
        return "s3", tuple(p for p in uri[len(storage.S3_SCHEME):].split("/") if p)
    return "file", tuple(p for p in os.path.realpath(uri).split(os.sep) if p)


def check_dest_outside_source(source: str, dest: str) -> None:
    """Refuse a ``dest`` that is ``source``, lies inside it or contains it (normalized URIs)."""
    (s_scheme, s), (d_scheme, d) = _segments(source), _segments(dest)
    if s_scheme != d_scheme:
        return
    if s == d:
        where = f"--dest {dest} is the --source {source}"
    elif d[: len(s)] == s:
        where = f"--dest {dest} lies inside --source {source}"
    elif s[: len(d)] == d:
        where = f"--source {source} lies inside --dest {dest}"
    else:
        return
    raise PrepareError(
        f"{where}; prepare never writes where it reads (a rerun would replace files of the source): "
        "pass a --dest outside the source, e.g. a sibling folder such as "
        f"{_sibling(source)}"
    )


def _sibling(source: str) -> str:
    if storage.is_s3(source):
        parent, name = posixpath.split(source[len(storage.S3_SCHEME):].rstrip("/"))
        return storage.S3_SCHEME + posixpath.join(parent, f"{name}-prepared") if parent else f"{source}/../prepared"
    parent, name = os.path.split(source.rstrip(os.sep))
    return os.path.join(parent, f"{name}-prepared")


@dataclass
class DestState:
    """What an existing ``dest`` holds, as prepare sees it (relative ``/`` paths)."""

    info: DatasetInfo | None = None  # the earlier dataset's dataset.json, if any
    dataset: list[str] = field(default_factory=list)  # the files it lists
    leftovers: list[str] = field(default_factory=list)  # files of interrupted runs (manifests last)
    foreign: list[str] = field(default_factory=list)  # files segray did not write: never touched


def _read_manifest(dest: str, rel: str) -> dict | None:
    try:
        raw = json.loads(storage.read_bytes(storage.join(dest, rel)))
    except (ValueError, storage.StorageError):
        return None
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT or not isinstance(raw.get("replaces"), list):
        return None
    return raw


def inspect_dest(dest: str) -> DestState:
    """Sort the files below ``dest`` into the earlier dataset, leftovers of interrupted runs
    (named by an in-progress manifest) and foreign files; reads only. Raises PrepareError for
    a ``dest`` that is a file or has a ``dataset.json`` that segray did not write."""
    fs, path = storage.resolve(dest)
    if fs.get_file_info(path).type == pafs.FileType.File:
        raise PrepareError(f"--dest {dest} is a file; pass a folder (prefix) for the prepared dataset")
    rels = [storage.relative(dest, u) for u in storage.list_files(dest)]
    state = DestState()
    present = set(rels)
    if DATASET_FILE in present:
        try:
            state.info = load_info(dest)
            state.dataset = [rel for rel in listed_files(dest, state.info) if rel in present]
        except (DatasetError, TypeError) as e:
            raise PrepareError(
                f"--dest {dest} holds a {DATASET_FILE} that is not a segray dataset ({storage._first_line(e)}); "
                "prepare does not replace what it did not write: pass an empty or new --dest"
            ) from None
    live = set(state.dataset) | {DATASET_FILE}
    leftovers: list[str] = []
    manifests: list[str] = []
    for rel in rels:
        m = _MANIFEST.match(rel)
        manifest = _read_manifest(dest, rel) if m else None
        if manifest is None:
            continue
        run = m.group(1)
        manifests.append(rel)
        leftovers += [r for r in rels if r.split("/", 1)[0] in SPLITS and posixpath.basename(r).startswith(f"{run}_")]
        leftovers += [r for r in manifest["replaces"] if isinstance(r, str) and is_shard_path(r) and r in present]
    state.leftovers = sorted(set(leftovers) - live) + manifests
    known = live | set(state.leftovers)
    state.foreign = [r for r in rels if r not in known and not _OWN_TEMPORARY.match(r)]
    return state


def check_dest(dest: str) -> DestState:
    """``inspect_dest``, refusing a non-empty ``dest`` that is no segray dataset."""
    state = inspect_dest(dest)
    if state.foreign and state.info is None:
        more = f" and {len(state.foreign) - 1} more" if len(state.foreign) > 1 else ""
        raise PrepareError(
            f"--dest {dest} is not empty and not a segray dataset (no {DATASET_FILE}; it holds "
            f"{storage.join(dest, state.foreign[0])}{more}); prepare never deletes files it did not write: "
            "pass an empty or new --dest, or delete that folder yourself if nothing in it is needed"
        )
    return state


def _delete_files(dest: str, rels: list[str]) -> None:
    """Delete these files (never a folder) below ``dest``; missing ones are fine. Local split
    folders left empty are removed too (``rmdir`` removes only an empty folder)."""
    fs, root = storage.resolve(dest)
    for rel in rels:
        path = storage.resolve(storage.join(dest, *rel.split("/")))[1]
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)
    if isinstance(fs, pafs.LocalFileSystem):
        folders = {"/".join(rel.split("/")[:i]) for rel in rels for i in range(1, rel.count("/") + 1)}
        for folder in sorted(folders, key=len, reverse=True):
            try:
                os.rmdir(os.path.join(root, *folder.split("/")))
            except OSError:
                pass  # not empty (foreign files, other shards) or already gone


def _run_files(dest: str, run: str) -> list[str]:
    """The shard files that run ``run`` wrote, relative to ``dest``."""
    out = []
    for split in SPLITS:
        for u in storage.list_files(split_uri(dest, split)):
            rel = storage.relative(dest, u)
            if posixpath.basename(rel).startswith(f"{run}_"):
                out.append(rel)
    return sorted(out)


def _new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:12]


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
    layout: Layout = detect(config.source)
    size = config.size or _first_image_size(layout.pairs[0].image)
    counts = layout.split_counts()
    print(
        f"prepare: {config.source}: {layout.kind} layout, {len(layout.pairs)} pairs "
        f"({', '.join(f'{k} {v}' for k, v in counts.items())}), resizing to {size[0]}x{size[1]}",
        flush=True,
    )
    if layout.ignored_files:
        print(f"prepare: ignored {layout.ignored_files} files that are not PNG/JPEG images", flush=True)
    storage.check_writable(config.dest)  # writes and deletes only its own probe

    items = [{"split": p.split, "name": p.name, "image": p.image, "label": p.label,
              "problem": _name_problem(config.source, p)} for p in layout.pairs]
    colors = layout.label_colors if layout.kind == ORIGINAL else None
    num_blocks = max(1, min(len(items) // PAIRS_PER_BATCH, 512))
    ds = ray.data.from_items(items, override_num_blocks=num_blocks).map_batches(
        _process_batch,
        fn_kwargs={"size": size, "colors": colors},
        batch_size=PAIRS_PER_BATCH,
        batch_format="numpy",
    )
    ds = ds.materialize()

    summary = ds.select_columns([_COL_SPLIT, _COL_ERROR, _COL_COUNTS, _COL_UNMAPPED]).to_pandas()
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
        "replaces": state.dataset + [r for r in state.leftovers if not _MANIFEST.match(r)],
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
        class_counts = np.zeros(NUM_CLASSES + 1, dtype=np.int64)
        for c in train[_COL_COUNTS]:
            class_counts += np.asarray(c, dtype=np.int64)
        unmapped = int(good[_COL_UNMAPPED].sum())
        info = DatasetInfo(
            height=h,
            width=w,
            splits=rows,
            class_pixel_counts=class_counts[:NUM_CLASSES].tolist(),
            void_pixel_count=int(class_counts[VOID_INDEX]),
            source=config.source,
            layout=layout.kind,
            unmapped_color_pixels=unmapped,
            skipped=sorted(bad[_COL_ERROR].tolist()),
            files=files,
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


def _by_split(rels: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for rel in sorted(rels):
        out.setdefault(rel.split("/", 1)[0], []).append(rel)
    return out


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


def _discard_run(dest: str, run: str, manifest_rel: str) -> None:
    """After a failed run: delete the shards it wrote, then its manifest, unless some shard
    could not be deleted (the manifest then keeps them recognisable for the next run)."""
    try:
        _delete_files(dest, _run_files(dest, run))
        if not _run_files(dest, run):
            _delete_files(dest, [manifest_rel])
    except Exception as e:  # noqa: BLE001 - the original error is the one to report
        log.warning("prepare: could not clean up run %s in %s: %s", run, dest, e)

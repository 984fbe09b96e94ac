"""The prepare stage: CamVid pairs in object storage -> resized Parquet shards + dataset.json.

The driver only lists the source (names, not pixels). Reading, decoding, resizing and
checking run as Ray Data tasks on every CPU of the cluster; each task reports bad inputs as
rows instead of raising, so the job can name *every* bad file in one message, and with
``skip_bad`` drop them and list them in ``dataset.json``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from segray import storage
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
    DatasetInfo,
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


def _process_batch(batch: dict, size: tuple[int, int], colors: tuple | None) -> pa.Table:
    lookup = color_lookup(colors) if colors else None
    h, w = size
    rows: dict[str, list] = {k: [] for k in (*SCHEMA.names, _COL_SPLIT, _COL_ERROR, _COL_COUNTS, _COL_UNMAPPED)}
    for split, name, image_uri, label_uri in zip(batch["split"], batch["name"], batch["image"], batch["label"]):
        error, image, label, unmapped = "", b"", b"", 0
        counts = [0] * (NUM_CLASSES + 1)
        try:
            img, lab, unmapped = process_pair(
                storage.read_bytes(image_uri), storage.read_bytes(label_uri), image_uri, label_uri, size, lookup
            )
            image, label = img.tobytes(), lab.tobytes()
            counts = np.bincount(lab.ravel(), minlength=NUM_CLASSES + 1)[: NUM_CLASSES + 1].tolist()
        except (BadInputError, storage.StorageError) as e:
            error = str(e)
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


def prepare(config: PrepareConfig) -> DatasetInfo:
    """Run the prepare stage on the connected Ray cluster; returns what dataset.json says."""
    import ray

    start = time.perf_counter()
    config = dataclasses.replace(config, source=storage.normalize(config.source), dest=storage.normalize(config.dest))
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

    # From here on the destination is incomplete: remove dataset.json first, then stale shards.
    storage.check_writable(config.dest)
    storage.delete(storage.join(config.dest, DATASET_FILE))
    for split in SPLITS:
        storage.delete(split_uri(config.dest, split))

    items = [{"split": p.split, "name": p.name, "image": p.image, "label": p.label} for p in layout.pairs]
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
    for message in bad[_COL_ERROR]:
        print(f"prepare: skipped: {message}", flush=True)

    h, w = size
    rows_per_file = max(1, TARGET_FILE_BYTES // (h * w * 4))
    fs, _ = storage.resolve(config.dest)
    rows: dict[str, int] = {}
    for split in SPLITS:
        n = int(((summary[_COL_SPLIT] == split) & (summary[_COL_ERROR] == "")).sum())
        if n == 0:
            continue
        part = ds.map_batches(_select_split, fn_kwargs={"split": split}, batch_format="pyarrow", batch_size=None)
        _, path = storage.resolve(split_uri(config.dest, split))
        part.write_parquet(path, filesystem=fs, min_rows_per_file=min(rows_per_file, n))
        rows[split] = n

    good = summary[summary[_COL_ERROR] == ""]
    train = good[good[_COL_SPLIT] == "train"]
    class_counts = np.zeros(NUM_CLASSES + 1, dtype=np.int64)
    for c in train[_COL_COUNTS]:
        class_counts += np.asarray(c, dtype=np.int64)
    unmapped = int(good[_COL_UNMAPPED].sum())
    if unmapped:
        print(f"prepare: {unmapped} label pixels had colours outside label_colors.txt and became void", flush=True)
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
    )
    write_info(config.dest, info)  # last: only now is the dataset complete
    elapsed = time.perf_counter() - start
    total = sum(rows.values())
    print(
        f"prepare: wrote {total} pairs ({', '.join(f'{k} {v}' for k, v in rows.items())}) at {h}x{w} to "
        f"{config.dest} in {elapsed:.1f} s ({total / elapsed:.1f} images/s)",
        flush=True,
    )
    return info

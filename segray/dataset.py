"""The prepared dataset: Parquet shards per split plus ``dataset.json``.

Layout of ``<dest>/``::

    dataset.json          written last; a folder without it is incomplete and refused
    train/*.parquet       one row per frame
    val/*.parquet
    test/*.parquet        (each split only if the source has it)

``dataset.json`` lists the dataset's Parquet files (``files``: split -> paths relative to the
dataset folder); readers read exactly those (:func:`split_files`), so a folder may also hold
files that are not part of the dataset: files a user put there, or the shards of a rerun of
prepare that was interrupted before it wrote its ``dataset.json``. A ``dataset.json`` written
before the list existed has no ``files``; its dataset is every ``<split>/*.parquet`` (any depth
below the split folder). Prepare deletes only files a ``dataset.json`` or one of its own
in-progress manifests lists (see :mod:`segray.prepare`), never other files of the folder.

Parquet schema (plain Arrow types, readable without segray or Ray):

    name    string   relative path of the source image without extension
    image   binary   H*W*3 uint8, RGB, row-major (H, W, 3); not an encoded PNG
    label   binary   H*W uint8 class indices 0..K-1 and the void index, row-major (H, W)
    height  int32
    width   int32
    source  string   URI of the source image
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from segray import storage
from segray.classes import CAMVID, ClassTable
from segray.errors import SegrayError
from segray.layout import SPLITS

FORMAT = "segray-prepared-dataset/1"
DATASET_FILE = "dataset.json"

COL_NAME = "name"
COL_IMAGE = "image"
COL_LABEL = "label"
COL_HEIGHT = "height"
COL_WIDTH = "width"
COL_SOURCE = "source"

SCHEMA = pa.schema(
    [
        (COL_NAME, pa.string()),
        (COL_IMAGE, pa.binary()),
        (COL_LABEL, pa.binary()),
        (COL_HEIGHT, pa.int32()),
        (COL_WIDTH, pa.int32()),
        (COL_SOURCE, pa.string()),
    ]
)


class DatasetError(SegrayError, ValueError):
    """A prepared dataset that cannot be used; the message names the URI and the fix."""


@dataclass(frozen=True)
class DatasetInfo:
    """Contents of ``dataset.json``."""

    height: int
    width: int
    splits: dict[str, int]  # split -> rows
    class_pixel_counts: list[int]  # train split, per class 0..K-1 (void excluded)
    void_pixel_count: int  # train split
    source: str
    layout: str
    unmapped_color_pixels: int = 0  # original layout: label colours not in label_colors.txt
    skipped: list[str] = field(default_factory=list)  # bad pairs left out with --skip-bad, and why
    # split -> the dataset's Parquet files, relative to the dataset folder (``train/x.parquet``).
    # Readers read exactly these; files of the folder not listed here are not part of it. Empty
    # in datasets written before the list existed: then every ``<split>/*.parquet`` is read.
    files: dict[str, list[str]] = field(default_factory=dict)
    # The class table (classes.ClassTable.to_fields): the source's classes.json, else CamVid's 11.
    classes: list[str] = field(default_factory=lambda: list(CAMVID.names))
    palette: list[list[int]] = field(default_factory=lambda: CAMVID.palette)
    void_index: int = CAMVID.void_index
    void_name: str = CAMVID.void_name
    # Where the pairs were processed: Ray node id -> pairs (bad ones included). A record of the run,
    # not of the data: two prepares of one source differ here and in ``files`` only.
    nodes: dict[str, int] = field(default_factory=dict)
    # How the source's train and val were split again (prepare --holdout, --train-on-val): the
    # held-out name prefixes (val), and whether train also holds every val frame (then val
    # measures fit, not generalisation: train --export last picks the final epoch instead).
    holdout: list[str] = field(default_factory=list)
    val_in_train: bool = False
    format: str = FORMAT
    schema: dict[str, str] = field(default_factory=lambda: {f.name: str(f.type) for f in SCHEMA})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @property
    def class_table(self) -> ClassTable:
        return ClassTable.from_fields(self.classes, self.palette, self.void_index, self.void_name)


def split_uri(dataset_uri: str, split: str) -> str:
    return storage.join(dataset_uri, split)


def split_files(dataset_uri: str, info: DatasetInfo, split: str) -> list[str]:
    """URIs of the Parquet files of ``split``: those ``dataset.json`` lists, else (an older
    dataset) every ``*.parquet`` below ``<dataset>/<split>/``."""
    if info.files:
        return [storage.join(dataset_uri, *rel.split("/")) for rel in info.files.get(split, [])]
    return [u for u in storage.list_files(split_uri(dataset_uri, split)) if u.endswith(".parquet")]


def is_shard_path(rel: str) -> bool:
    """``rel`` (relative, ``/``-separated) is where prepare may keep a shard:
    ``<split>/.../<name>.parquet`` with no empty, ``.`` or ``..`` segment; anything else listed
    in a ``dataset.json`` (an absolute path, ``../x``) is refused rather than read or deleted."""
    parts = rel.split("/")
    return (
        len(parts) >= 2
        and parts[0] in SPLITS
        and rel.endswith(".parquet")
        and all(p not in ("", ".", "..") for p in parts)
        and "\\" not in rel
    )


def listed_files(dataset_uri: str, info: DatasetInfo) -> list[str]:
    """The dataset's files, relative to ``dataset_uri``: what ``files`` lists, else (an older
    dataset.json) every ``*.parquet`` below ``<dataset>/<split>/`` of every split."""
    if info.files:
        rels = [rel for split in sorted(info.files) for rel in info.files[split]]
        bad = [rel for rel in rels if not is_shard_path(rel)]
        if bad:
            raise DatasetError(
                f"{storage.join(dataset_uri, DATASET_FILE)}: lists {bad[0]!r}, which is not a Parquet file below "
                "a split folder of the dataset; this is not a dataset.json that segray wrote"
            )
        return rels
    return [storage.relative(dataset_uri, u) for split in SPLITS for u in split_files(dataset_uri, info, split)]


def write_info(dataset_uri: str, info: DatasetInfo) -> None:
    storage.write_bytes(storage.join(dataset_uri, DATASET_FILE), info.to_json().encode())


def load_info(dataset_uri: str) -> DatasetInfo:
    """Read ``dataset.json``; refuse a folder without it (an incomplete or foreign dataset)."""
    uri = storage.join(dataset_uri, DATASET_FILE)
    try:
        exists = storage.exists(uri)
    except Exception as e:  # noqa: BLE001 - say which URI failed and why
        raise DatasetError(f"{uri}: cannot be read ({storage._first_line(e)})") from e
    if not exists:
        hint = "is it the --dest of jobs/prepare.py? an interrupted prepare leaves no dataset.json; rerun it"
        raise DatasetError(f"{dataset_uri}: not a prepared dataset (no {DATASET_FILE}); {hint}")
    try:
        raw = json.loads(storage.read_bytes(uri))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{uri}: not valid JSON ({e}); rerun jobs/prepare.py") from None
    if raw.get("format") != FORMAT:
        raise DatasetError(f"{uri}: format {raw.get('format')!r}, expected {FORMAT!r}; rerun jobs/prepare.py")
    known = set(DatasetInfo.__dataclass_fields__)
    info = DatasetInfo(**{k: v for k, v in raw.items() if k in known})
    try:
        info.class_table  # noqa: B018 - the class fields must make a usable table
    except ValueError as e:
        raise DatasetError(f"{uri}: {e}; rerun jobs/prepare.py") from None
    return info


def rows_to_arrays(batch: dict, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch of Parquet rows -> images ``(N, H, W, 3) uint8`` and labels ``(N, H, W) uint8``."""
    images = np.frombuffer(b"".join(batch[COL_IMAGE]), dtype=np.uint8).reshape(-1, height, width, 3)
    labels = np.frombuffer(b"".join(batch[COL_LABEL]), dtype=np.uint8).reshape(-1, height, width)
    return images, labels

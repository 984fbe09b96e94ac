"""Stage 1 of infer: the listing as Ray Data blocks, and the tasks that read, expand and decode it.

Each listed input becomes frame rows (the frame resized to the model's input size) or error rows;
a container (segray/archives.py: its registered readers) is read, streaming, by one task, its
members leaving the task in blocks of FRAMES_PER_BLOCK. Nothing here raises for a bad input.
The columns between the stages (never stored) are defined here; the stored ones are
segray/predictions.py's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa

from segray import sources, storage
from segray.errors import describe
from segray.layout import is_image
from segray.predictions import (
    COL_HEIGHT,
    COL_LABEL_URI,
    COL_MESSAGE,
    COL_STAGE,
    COL_URI,
    COL_WIDTH,
    ERRORS_SCHEMA,
    PREDICTIONS_SCHEMA,
    STAGE_ARCHIVE,
    STAGE_DECODE,
    STAGE_LIST,
    STAGE_READ,
)
from segray.preprocess import BadInputError, decode_image, resize_image

# Between the stages (not stored): the listing, the decoded frames, the predicted masks.
COL_KIND = "kind"
COL_LABEL_KIND = "label_kind"
COL_DONE = "done"
COL_ERROR = "list_error"  # the listing's verdict on an input's name (sources.Input.error)
COL_TAKEN = "taken"  # URIs of other objects below an archive's URI (sources.Input.taken)
COL_IMAGE = "image"  # the frame resized to the model's input size, (h, w, 3) uint8 bytes
COL_PRED = "pred"  # the predicted mask at the model's size, (h, w) uint8 bytes
LISTING_SCHEMA = pa.schema(
    [
        (COL_URI, pa.string()),
        (COL_KIND, pa.string()),
        (COL_LABEL_URI, pa.string()),
        (COL_LABEL_KIND, pa.string()),
        (COL_DONE, pa.list_(pa.string())),
        (COL_ERROR, pa.string()),
        (COL_TAKEN, pa.list_(pa.string())),
    ]
)
FRAMES_SCHEMA = pa.schema(
    [
        (COL_URI, pa.string()),
        (COL_LABEL_URI, pa.string()),
        (COL_LABEL_KIND, pa.string()),
        (COL_HEIGHT, pa.int32()),
        (COL_WIDTH, pa.int32()),
        (COL_IMAGE, pa.binary()),
        (COL_STAGE, pa.string()),
        (COL_MESSAGE, pa.string()),
    ]
)
RESULTS_SCHEMA = pa.schema([*PREDICTIONS_SCHEMA, ERRORS_SCHEMA.field(COL_STAGE), ERRORS_SCHEMA.field(COL_MESSAGE)])

# Image files per load task: enough to amortise a task's start, few enough to spread a small
# collection over every CPU. An archive is always a task of its own.
FILES_PER_TASK = 16
# Frames per block out of load_frames: an archive's members leave its task in pieces this big.
FRAMES_PER_BLOCK = 16


def listing_tables(listing: sources.Listing) -> list[pa.Table]:
    """The listing as Ray Data input blocks: each archive alone, image files FILES_PER_TASK a block."""
    archives = [i for i in listing.inputs if i.kind == sources.KIND_ARCHIVE]
    files = [i for i in listing.inputs if i.kind != sources.KIND_ARCHIVE]
    groups = [[a] for a in archives] + [files[k : k + FILES_PER_TASK] for k in range(0, len(files), FILES_PER_TASK)]
    return [
        pa.Table.from_pylist(
            [
                {
                    COL_URI: i.uri,
                    COL_KIND: i.kind,
                    COL_LABEL_URI: i.label.uri if i.label else None,
                    COL_LABEL_KIND: i.label.kind if i.label else None,
                    COL_DONE: list(i.done),
                    COL_ERROR: i.error or None,
                    COL_TAKEN: list(i.taken),
                }
                for i in group
            ],
            schema=LISTING_SCHEMA,
        )
        for group in groups
    ]


def error_row(uri: str, stage: str, message: str) -> dict:
    return {COL_URI: storage.printable(uri), COL_STAGE: stage, COL_MESSAGE: storage.printable(message)}


def load_frame(data: bytes, uri: str, size: tuple[int, int]) -> tuple[np.ndarray, int, int]:
    """Encoded bytes -> the frame resized to ``size`` ``(h, w, 3) uint8``, and its own height, width.

    Raises BadInputError naming ``uri`` for anything that is not a readable image."""
    try:
        image = decode_image(data, uri)
    except BadInputError:
        raise
    except Exception as e:  # noqa: BLE001 - a mode PIL cannot convert is still a bad input
        raise BadInputError(f"{uri}: cannot convert to RGB ({type(e).__name__}: {e})") from None
    return resize_image(image, size), image.shape[0], image.shape[1]


def _frame_row(data: bytes, uri: str, size: tuple[int, int], label: sources.Label | None) -> dict:
    try:
        resized, height, width = load_frame(data, uri, size)
    except BadInputError as e:
        return error_row(uri, STAGE_DECODE, str(e))
    except Exception as e:  # noqa: BLE001 - whatever one frame does, it is that frame's error row
        return error_row(uri, STAGE_DECODE, f"{uri}: cannot be decoded ({describe(e)})")
    return {
        COL_URI: storage.printable(uri),
        COL_LABEL_URI: storage.printable(label.uri) if label else None,
        COL_LABEL_KIND: label.kind if label else None,
        COL_HEIGHT: height,
        COL_WIDTH: width,
        COL_IMAGE: resized.tobytes(),
    }


def _archive_rows(archive_uri: str, images_root: str, done: frozenset[str], taken: tuple[str, ...], size,
                  labels) -> Iterator[dict]:
    """Rows of one archive's members, streaming; never raises. Members read before damage keep
    their rows and the rest of the archive is one error row; an archive without a single
    member is one error row too (sources.iter_archive yields it), so that nothing vanishes."""
    archive_rel = sources.input_rel(images_root, archive_uri)
    try:
        for member in sources.iter_archive(archive_uri, skip=done, taken=taken):
            uri = sources.member_uri(archive_uri, member.path) if member.path else archive_uri
            try:
                if member.error:
                    yield error_row(uri, STAGE_LIST if member.path else STAGE_ARCHIVE, member.error)
                elif not is_image(member.path):
                    yield error_row(uri, STAGE_LIST, sources.not_an_image_message(uri))
                else:
                    label = sources.label_for_member(archive_rel, member.path, labels) if labels else None
                    yield _frame_row(member.data, uri, size, label)
            except Exception as e:  # noqa: BLE001 - one member's failure is that member's row
                yield error_row(uri, STAGE_DECODE, f"{uri}: {describe(e)}")
    except (FileNotFoundError, storage.StorageError) as e:
        if archive_uri not in done:
            yield error_row(archive_uri, STAGE_READ, f"{archive_uri}: cannot be read ({describe(e)})")
    except sources.ArchiveError as e:
        if archive_uri not in done:
            yield error_row(archive_uri, STAGE_ARCHIVE, f"{e}; the members before the damage were processed")
    except Exception as e:  # noqa: BLE001 - whatever else the stream raises: the archive's row
        if archive_uri not in done:
            yield error_row(archive_uri, STAGE_ARCHIVE, f"{archive_uri}: broken archive ({describe(e)}); "
                         "the members before the damage were processed")


def load_frames(
    batch: pa.Table,
    size: tuple[int, int],
    images_root: str,
    labels: dict[str, sources.Label] | None = None,
) -> Iterator[pa.Table]:
    """Listing rows -> frame rows (decoded, resized to ``size``) or error rows; never raises for
    a bad input. ``labels`` (the whole label index) is needed only to pair archive members."""
    rows: list[dict] = []
    for item in batch.to_pylist():
        uri, kind = item[COL_URI], item[COL_KIND]
        if item[COL_ERROR]:
            produced: Iterable[dict] = [error_row(uri, STAGE_LIST, item[COL_ERROR])]
        elif kind == sources.KIND_ARCHIVE:
            produced = _archive_rows(uri, images_root, frozenset(item[COL_DONE]), tuple(item[COL_TAKEN] or ()),
                                     size, labels)
        elif kind == sources.KIND_IMAGE:
            label = sources.Label(item[COL_LABEL_URI], item[COL_LABEL_KIND]) if item[COL_LABEL_URI] else None
            try:
                data = storage.read_bytes(uri)
            except Exception as e:  # noqa: BLE001 - unreadable now; a rerun tries it again
                produced = [error_row(uri, STAGE_READ, str(e) if isinstance(e, storage.StorageError)
                                   else f"{uri}: cannot be read ({describe(e)})")]
            else:
                produced = [_frame_row(data, uri, size, label)]
        else:
            produced = [error_row(uri, STAGE_LIST, sources.not_an_image_message(uri))]
        for row in produced:
            rows.append(row)
            if len(rows) >= FRAMES_PER_BLOCK:
                yield pa.Table.from_pylist(rows, schema=FRAMES_SCHEMA)
                rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=FRAMES_SCHEMA)

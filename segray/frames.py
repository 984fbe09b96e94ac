"""Stage 1 of infer: the listing as Ray Data blocks, cut into units of work, read and decoded.

Two kinds of task, so that one big container keeps every CPU busy:

- :func:`plan_units` turns a listing block into *units*: a block of image files is one unit; a
  container is indexed and cut into ranges of about ``frames_per_task`` frames, each a unit (a
  video: segray/video.py, ranges starting at keyframes; a plain tar: member ranges from an
  index of member offsets, segray/archives.py; a compressed tar, which cannot be entered in the
  middle, is one unit read as a stream). Problems found while planning are units of error rows.
- :func:`load_units` reads one unit: frame rows (the frame resized to the model's input size, or
  at its own size for --tile) or error rows, leaving the task in blocks of FRAMES_PER_BLOCK.

Nothing here raises for a bad input. A unit is a JSON document in one column (never stored).
The columns between the stages are defined here; the stored ones are segray/predictions.py's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from fractions import Fraction

import numpy as np
import pyarrow as pa

from segray import archives, sources, storage, video
from segray.errors import describe
from segray.layout import is_image
from segray.predictions import (
    COL_DECODE_NODE,
    COL_FRAME_INDEX,
    COL_HEIGHT,
    COL_LABEL_URI,
    COL_MESSAGE,
    COL_STAGE,
    COL_TIMESTAMP,
    COL_URI,
    COL_WIDTH,
    ERRORS_SCHEMA,
    PREDICTIONS_SCHEMA,
    STAGE_ARCHIVE,
    STAGE_DECODE,
    STAGE_LABEL,
    STAGE_LIST,
    STAGE_READ,
)
from segray.preprocess import BadInputError, decode_image, resize_image
from segray.runtime import node_id

# Between the stages (not stored): the listing, the units, the decoded frames, the masks.
COL_KIND = "kind"
COL_LABEL_KIND = "label_kind"
COL_DONE = "done"
COL_ERROR = "list_error"  # the listing's verdict on an input's name (sources.Input.error)
COL_TAKEN = "taken"  # URIs of other objects below an archive's URI (sources.Input.taken)
COL_UNIT = "unit"  # one unit of work, as JSON
COL_IMAGE = "image"  # the frame resized to the model's input size (--tile: its own), (h, w, 3) uint8 bytes
COL_PRED = "pred"  # the predicted mask at the model's size (--tile: the frame's), (h, w) uint8 bytes
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
UNITS_SCHEMA = pa.schema([(COL_UNIT, pa.string())])
FRAMES_SCHEMA = pa.schema(
    [
        (COL_URI, pa.string()),
        (COL_LABEL_URI, pa.string()),
        (COL_LABEL_KIND, pa.string()),
        (COL_HEIGHT, pa.int32()),
        (COL_WIDTH, pa.int32()),
        (COL_FRAME_INDEX, pa.int64()),
        (COL_TIMESTAMP, pa.float64()),
        (COL_IMAGE, pa.binary()),
        (COL_STAGE, pa.string()),
        (COL_MESSAGE, pa.string()),
        (COL_DECODE_NODE, pa.string()),
    ]
)
RESULTS_SCHEMA = pa.schema([*PREDICTIONS_SCHEMA, ERRORS_SCHEMA.field(COL_STAGE), ERRORS_SCHEMA.field(COL_MESSAGE)])

# Image files per load task: enough to amortise a task's start, few enough to spread a small
# collection over every CPU. A container is always planned by a task of its own.
FILES_PER_TASK = 16
# Frames per block out of load_units: a unit's frames leave its task in pieces this big.
FRAMES_PER_BLOCK = 16

# Unit kinds.
UNIT_FILES = "files"  # image files and odd files, read one by one
UNIT_STREAM = "stream"  # a whole archive read as one stream (compressed tars)
UNIT_TAR = "tar"  # a range of members of a plain tar, located by the index
UNIT_VIDEO = "video"  # a range of frames of a video
UNIT_ROWS = "rows"  # error rows found while planning


def listing_tables(listing: sources.Listing) -> list[pa.Table]:
    """The listing as Ray Data input blocks: each container alone, image files FILES_PER_TASK a block."""
    containers = [i for i in listing.inputs if i.kind in sources.CONTAINER_KINDS]
    files = [i for i in listing.inputs if i.kind not in sources.CONTAINER_KINDS]
    groups = [[c] for c in containers] + [files[k : k + FILES_PER_TASK] for k in range(0, len(files), FILES_PER_TASK)]
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


def _read_error(uri: str, e: BaseException) -> dict:
    """The retryable row of an object that could not be read now."""
    return error_row(uri, STAGE_READ, str(e) if isinstance(e, storage.StorageError) else f"{uri}: cannot be read ({describe(e)})")


# ----------------------------------------------------------------------------- planning


def _units(kind: str, **fields) -> pa.Table:
    return pa.Table.from_pylist([{COL_UNIT: json.dumps({"kind": kind, **fields})}], schema=UNITS_SCHEMA)


def _tar_units(uri: str, done: frozenset[str], taken: tuple[str, ...], frames_per_task: int) -> Iterator[pa.Table]:
    """A plain tar: its member index cut into ranges; a compressed one: one stream unit."""
    try:
        plain = archives.tar_compression(uri) == "tar"
    except (FileNotFoundError, storage.StorageError) as e:
        if uri not in done:
            yield _units(UNIT_ROWS, rows=[_read_error(uri, e)])
        return
    except Exception:  # noqa: BLE001 - not a tar at all: the stream unit gives its error row
        plain = False
    if not plain:
        yield _units(UNIT_STREAM, uri=uri, done=sorted(done), taken=list(taken))
        return
    refs: list[list] = []
    failure: dict | None = None
    try:
        for ref in archives.index_tar(uri, skip=done, taken=taken):
            refs.append([ref.path, ref.offset, ref.size, ref.error])
            if len(refs) >= frames_per_task:
                yield _units(UNIT_TAR, uri=uri, refs=refs, taken=list(taken))
                refs = []
    except (FileNotFoundError, storage.StorageError) as e:
        failure = _read_error(uri, e)
    except archives.ArchiveError as e:
        failure = error_row(uri, STAGE_ARCHIVE, f"{e}; the members before the damage were processed")
    except Exception as e:  # noqa: BLE001 - whatever else the stream raises: the archive's row
        failure = error_row(uri, STAGE_ARCHIVE, f"{uri}: broken archive ({describe(e)}); the members before the "
                            "damage were processed")
    if refs:
        yield _units(UNIT_TAR, uri=uri, refs=refs, taken=list(taken))
    if failure is not None and uri not in done:
        yield _units(UNIT_ROWS, rows=[failure])


def _video_units(uri: str, done: frozenset[str], frames_per_task: int, every: int | None, fps: float | None,
                 images_root: str, labels: dict | None, label_keys: list[str] | None) -> Iterator[pa.Table]:
    """A video: indexed, the frames to keep selected (--every/--fps, minus those done), cut into
    ranges at keyframes; ranges with nothing left to do are dropped."""
    try:
        index = video.index_video(uri)
    except (FileNotFoundError, storage.StorageError) as e:
        if uri not in done:
            yield _units(UNIT_ROWS, rows=[_read_error(uri, e)])
        return
    except Exception as e:  # noqa: BLE001 - not a video, no video stream, no decoder, ...
        if uri not in done:
            message = str(e) if isinstance(e, video.VideoError) else f"{uri}: not a readable video ({describe(e)})"
            yield _units(UNIT_ROWS, rows=[error_row(uri, STAGE_DECODE, message)])
        return
    done_frames = {k for d in done if (s := video.split_frame_uri(d)) and s[0] == uri for k in [s[1]]}
    selected = video.select_frames(index, every, fps)
    chosen = None if selected is None else set(selected)
    paired: dict[int, sources.Label] = {}
    clashes: dict[int, str] = {}
    if labels:
        paired, clashes = sources.video_labels(sources.input_rel(images_root, uri), labels, label_keys)
    for rng in video.plan_ranges(index, frames_per_task):
        end = rng.start + rng.count
        # Each range looks at its own frames only: linear in the video's length, whatever the ranges.
        keep = [k for k in range(rng.start, end) if (chosen is None or k in chosen) and k not in done_frames]
        tail = rng.last and bool(index.ending) and end not in done_frames
        if not keep and not tail:
            continue
        yield _units(
            UNIT_VIDEO, uri=uri, range=rng.to_dict(), keep=keep,
            done=[k for k in range(rng.start, end + 1) if k in done_frames],
            labels={str(k): [paired[k].uri, paired[k].kind] for k in keep if k in paired},
            clashes={str(k): clashes[k] for k in keep if k in clashes},
            time_base=[index.time_base.numerator, index.time_base.denominator], ending=index.ending,
        )


def plan_units(
    batch: pa.Table,
    frames_per_task: int,
    images_root: str,
    labels: dict[str, sources.Label] | None = None,
    every: int | None = None,
    fps: float | None = None,
) -> Iterator[pa.Table]:
    """Listing rows -> unit rows (module doc); never raises for a bad input. The files of a block
    are one unit; a container (alone in its block, in the job) is one unit per range."""
    items = batch.to_pylist()
    containers = [i for i in items if i[COL_KIND] in sources.CONTAINER_KINDS and not i[COL_ERROR]]
    files = [i for i in items if i[COL_KIND] not in sources.CONTAINER_KINDS or i[COL_ERROR]]
    if files:
        yield _units(UNIT_FILES, items=files)
    label_keys = sorted(labels) if labels else None
    for item in containers:
        uri, done = item[COL_URI], frozenset(item[COL_DONE] or ())
        if item[COL_KIND] == sources.KIND_VIDEO:
            yield from _video_units(uri, done, frames_per_task, every, fps, images_root, labels, label_keys)
        else:
            yield from _tar_units(uri, done, tuple(item[COL_TAKEN] or ()), frames_per_task)


# ----------------------------------------------------------------------------- loading


def load_frame(data: bytes, uri: str, size: tuple[int, int] | None) -> tuple[np.ndarray, int, int]:
    """Encoded bytes -> the frame resized to ``size`` ``(h, w, 3) uint8`` (None: as it is), and its
    own height, width.

    Raises BadInputError naming ``uri`` for anything that is not a readable image."""
    try:
        image = decode_image(data, uri)
    except BadInputError:
        raise
    except Exception as e:  # noqa: BLE001 - a mode PIL cannot convert is still a bad input
        raise BadInputError(f"{uri}: cannot convert to RGB ({type(e).__name__}: {e})") from None
    return (resize_image(image, size) if size else image), image.shape[0], image.shape[1]


def _row(uri: str, image: np.ndarray, height: int, width: int, label: sources.Label | None,
         frame_index: int | None = None, timestamp: float | None = None) -> dict:
    return {
        COL_URI: storage.printable(uri),
        COL_LABEL_URI: storage.printable(label.uri) if label else None,
        COL_LABEL_KIND: label.kind if label else None,
        COL_HEIGHT: height,
        COL_WIDTH: width,
        COL_FRAME_INDEX: frame_index,
        COL_TIMESTAMP: timestamp,
        COL_IMAGE: image.tobytes(),
    }


def _frame_row(data: bytes, uri: str, size: tuple[int, int], label: sources.Label | None) -> dict:
    try:
        resized, height, width = load_frame(data, uri, size)
    except BadInputError as e:
        return error_row(uri, STAGE_DECODE, str(e))
    except Exception as e:  # noqa: BLE001 - whatever one frame does, it is that frame's error row
        return error_row(uri, STAGE_DECODE, f"{uri}: cannot be decoded ({describe(e)})")
    return _row(uri, resized, height, width, label)


def _member_rows(archive_uri: str, members: Iterable[archives.Member], size, labels, images_root: str) -> Iterator[dict]:
    """Rows of an archive's members (from iter_archive or read_tar_members); raises what they raise."""
    archive_rel = sources.input_rel(images_root, archive_uri)
    for member in members:
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


def _archive_rows(archive_uri: str, members: Iterable[archives.Member], done: frozenset[str], size, labels,
                  images_root: str) -> Iterator[dict]:
    """Rows of an archive's members, streaming; never raises. Members read before damage keep
    their rows and the damage is one error row of the archive (unless that is done already)."""
    try:
        yield from _member_rows(archive_uri, members, size, labels, images_root)
    except (FileNotFoundError, storage.StorageError) as e:
        if archive_uri not in done:
            yield _read_error(archive_uri, e)
    except archives.ArchiveError as e:
        if archive_uri not in done:
            yield error_row(archive_uri, STAGE_ARCHIVE, f"{e}; the members before the damage were processed")
    except Exception as e:  # noqa: BLE001 - whatever else the stream raises: the archive's row
        if archive_uri not in done:
            yield error_row(archive_uri, STAGE_ARCHIVE, f"{archive_uri}: broken archive ({describe(e)}); "
                            "the members before the damage were processed")


def _tar_range_rows(uri: str, refs: list[archives.MemberRef], taken: list[str], size, labels,
                    images_root: str) -> Iterator[dict]:
    """Rows of one member range of a plain tar; never raises. When the range cannot be read by
    its offsets (a sparse member, or the archive changed since it was indexed) the rest of it is
    read from the archive's stream; a member that is not there either is one error row, named
    with how many after it in the range were not read."""
    read: list[str] = []

    def tracked(members: Iterable[archives.Member]) -> Iterator[archives.Member]:
        for member in members:
            read.append(member.path)
            yield member

    try:
        yield from _member_rows(uri, tracked(archives.read_tar_members(uri, refs)), size, labels, images_root)
        return
    except Exception:  # noqa: BLE001 - the stream below gives the rest, or the row saying why not
        rest = {r.path for r in refs[len(read):]}
    streamed = (m for m in archives.iter_archive(uri, taken=taken) if m.path in rest)
    try:
        yield from _member_rows(uri, tracked(streamed), size, labels, images_root)
        failure = None
    except Exception as e:  # noqa: BLE001
        failure = e
    missing = [r for r in refs if r.path in rest - set(read)]
    if missing:
        first = sources.member_uri(uri, missing[0].path) if missing[0].path else uri
        why = describe(failure) if failure else "no longer in the archive"
        stage = STAGE_READ if isinstance(failure, (FileNotFoundError, storage.StorageError)) else STAGE_ARCHIVE
        yield error_row(first, stage, f"{uri}: {why}; {first} and the {len(missing) - 1} members after it in this "
                        "range were not read")


def _video_rows(unit: dict, size: tuple[int, int]) -> Iterator[dict]:
    """Rows of one range of a video; never raises. Damage is one error row naming the first
    frame not decoded (unless done already); a range that cannot be read at all is a
    retryable row of its first frame to do."""
    uri = unit["uri"]
    rng = video.VideoRange.from_dict(unit["range"])
    keep = set(unit["keep"])
    paired = {int(k): sources.Label(*v) for k, v in unit["labels"].items()}
    clashes = {int(k): v for k, v in unit["clashes"].items()}
    try:
        for f in video.decode_range(uri, rng, size, keep, Fraction(*unit["time_base"]), unit["ending"]):
            furi = video.frame_uri(uri, f.index)
            if f.index in clashes:
                yield error_row(furi, STAGE_LABEL, f"{furi}: {clashes[f.index]}")
            else:
                yield _row(furi, f.image, f.height, f.width, paired.get(f.index), f.index, f.timestamp_s)
    except video.VideoDamage as e:
        if e.index not in set(unit["done"]):
            yield error_row(video.frame_uri(uri, e.index), STAGE_DECODE, str(e))
    except (FileNotFoundError, storage.StorageError) as e:
        yield _read_error(video.frame_uri(uri, min(keep, default=rng.start)), e)
    except Exception as e:  # noqa: BLE001 - the file changed since it was indexed, ...
        yield error_row(video.frame_uri(uri, min(keep, default=rng.start)), STAGE_DECODE,
                        f"{uri}: frames {rng.start}..{rng.start + rng.count - 1} could not be decoded ({describe(e)})")


def _files_rows(items: list[dict], size, labels, images_root: str) -> Iterator[dict]:
    for item in items:
        uri, kind = item[COL_URI], item[COL_KIND]
        if item[COL_ERROR]:
            yield error_row(uri, STAGE_LIST, item[COL_ERROR])
        elif kind == sources.KIND_IMAGE:
            label = sources.Label(item[COL_LABEL_URI], item[COL_LABEL_KIND]) if item[COL_LABEL_URI] else None
            try:
                data = storage.read_bytes(uri)
            except Exception as e:  # noqa: BLE001 - unreadable now; a rerun tries it again
                yield _read_error(uri, e)
            else:
                yield _frame_row(data, uri, size, label)
        else:
            yield error_row(uri, STAGE_LIST, sources.not_an_image_message(uri))


def planned_rows(unit_json: str) -> int | None:
    """How many rows a unit will give (one per frame or error; a damaged container may give
    fewer); None for a compressed archive, whose members are known only once it is read."""
    unit = json.loads(unit_json)
    kind = unit["kind"]
    if kind == UNIT_STREAM:
        return None
    return len(unit["items"] if kind == UNIT_FILES else unit["keep"] if kind == UNIT_VIDEO else
               unit["refs"] if kind == UNIT_TAR else unit["rows"])


def _unit_rows(unit: dict, size, labels, images_root: str) -> Iterator[dict]:
    kind = unit["kind"]
    if kind == UNIT_FILES:
        return _files_rows(unit["items"], size, labels, images_root)
    if kind == UNIT_VIDEO:
        return _video_rows(unit, size)
    if kind == UNIT_ROWS:
        return iter(unit["rows"])
    uri = unit["uri"]
    if kind == UNIT_TAR:
        return _tar_range_rows(uri, [archives.MemberRef(*r) for r in unit["refs"]], unit["taken"], size, labels,
                               images_root)
    done = frozenset(unit["done"])
    return _archive_rows(uri, archives.iter_archive(uri, skip=done, taken=unit["taken"]), done, size, labels,
                         images_root)


def load_units(
    batch: pa.Table,
    size: tuple[int, int] | None,
    images_root: str,
    labels: dict[str, sources.Label] | None = None,
) -> Iterator[pa.Table]:
    """Unit rows -> frame rows (decoded, resized to ``size``; None: at their own size) or error
    rows; never raises for a bad input. ``labels`` (the whole label index) is needed only to pair archive members. Each
    row records the node it was decoded on (COL_DECODE_NODE)."""
    node = node_id()
    rows: list[dict] = []
    for text in batch.column(COL_UNIT).to_pylist():
        for row in _unit_rows(json.loads(text), size, labels, images_root):
            rows.append({**row, COL_DECODE_NODE: node})
            if len(rows) >= FRAMES_PER_BLOCK:
                yield pa.Table.from_pylist(rows, schema=FRAMES_SCHEMA)
                rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=FRAMES_SCHEMA)


def load_frames(batch: pa.Table, size: tuple[int, int] | None, images_root: str, labels: dict[str, sources.Label] | None = None,
                frames_per_task: int = 1 << 30) -> Iterator[pa.Table]:
    """Listing rows -> frame or error rows in one task: plan_units then load_units (for tests and
    callers without Ray; the job runs the two as separate tasks)."""
    for units in plan_units(batch, frames_per_task, images_root, labels):
        yield from load_units(units, size, images_root, labels)

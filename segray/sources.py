"""What inference reads: the frames under ``--images`` and the labels under ``--labels``.

An *input* is one frame. Below ``--images`` (any nesting) there are three kinds of objects:

- an image file (``.png``, ``.jpg``, ``.jpeg``, any case): one input, its URI is the file's;
- a tar archive (``.tar``, ``.tar.gz``, ``.tgz``): one input per regular member, its URI is
  ``<archive uri>/<member path>``. Only the archive's *name* is listed on the driver; its
  members are read, streaming, in the Ray tasks that decode them (:func:`iter_archive`), so a
  100 GB archive costs the driver nothing;
- anything else (``.txt``, ``.DS_Store``, a ``.bmp``): one input too, that can only become an
  error row (stage ``list``). Nothing below ``--images`` is dropped without a trace, and
  ``rows(predictions) + rows(errors)`` counts every object (archives by their members).
  Odd members inside an archive are treated the same way.

Two exclusions, so that the folders a user points at can be nested: files under ``--labels``
and files under the job's own ``--output`` are never inputs.

Pairing with labels (``--labels`` prefix, label files are PNGs):

- the *key* of a label is its path relative to ``--labels`` without the extension, and
  without a trailing ``_L`` (``a/b/X_L.png`` is the colour-coded label of key ``a/b/X``,
  decoded with the CamVid colour table; ``a/b/X.png`` holds class indices). When both
  exist, the index label wins;
- an image file pairs by its path relative to ``--images`` without extension:
  ``<images>/a/b/X.jpg`` <-> ``<labels>/a/b/X.png`` (or ``X_L.png``);
- a tar member pairs first as if the archive were a folder of its own name:
  ``<images>/seq/01.tar`` member ``f/X.jpg`` <-> ``<labels>/seq/01/f/X.png``, and if there
  is no such label, by its path inside the archive alone: ``<labels>/f/X.png`` (shards of
  one collection, WebDataset style).

A frame without a label is still predicted; it has no confusion counts and is counted apart.
"""

from __future__ import annotations

import bisect
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from segray import storage
from segray.layout import IMAGE_EXTENSIONS, is_image

ARCHIVE_EXTENSIONS: tuple[str, ...] = (".tar", ".tar.gz", ".tgz")
# Bytes per read from storage while streaming an archive (one ranged GET on S3).
ARCHIVE_READ_BUFFER = 8 * 2**20
LABEL_EXTENSION = ".png"
COLOR_LABEL_SUFFIX = "_L"  # original CamVid: NAME_L.png is the colour-coded label of NAME.png

# What an input row is; see `Input`.
KIND_IMAGE = "image"
KIND_ARCHIVE = "archive"
KIND_OTHER = "other"

# How a label file encodes its classes.
LABEL_INDEX = "index"  # single-channel class indices 0..11
LABEL_COLOR = "color"  # RGB colours of the original CamVid release

# A member this big is not a video frame (a 4K PNG is ~25 MB); refusing it keeps a task's
# memory bounded whatever an archive holds.
MAX_MEMBER_BYTES = 256 * 1024 * 1024


class SourceError(ValueError):
    """``--images`` or ``--labels`` cannot be used; the message names the URI and the fix."""


@dataclass(frozen=True)
class Label:
    uri: str
    kind: str  # LABEL_INDEX or LABEL_COLOR


@dataclass(frozen=True)
class Input:
    """One row of the input listing (names only, no bytes).

    ``kind`` is KIND_IMAGE (``label`` paired on the driver), KIND_ARCHIVE (members paired in the
    task that expands it; ``done`` are member URIs already in the output, skipped) or
    KIND_OTHER (becomes an error row).
    """

    uri: str
    kind: str
    label: Label | None = None
    done: tuple[str, ...] = ()


@dataclass(frozen=True)
class Listing:
    inputs: tuple[Input, ...]
    images: int  # image files to process now
    archives: int  # archives to expand now
    others: int  # objects that are neither (each becomes an error row)
    skipped: int  # image files and odd files already in the output (rerun)
    labels: dict[str, Label] = field(default_factory=dict)  # key -> label, all of --labels


def is_archive(path: str) -> bool:
    return path.lower().endswith(ARCHIVE_EXTENSIONS)


def _strip_ext(rel: str) -> str:
    return posixpath.splitext(rel)[0]


def frame_key(rel: str) -> str:
    """``a/b/X.jpg`` -> ``a/b/X``: the key a frame is paired by."""
    return _strip_ext(rel)


def label_key(rel: str) -> tuple[str, str]:
    """``a/b/X.png`` -> (``a/b/X``, index); ``a/b/X_L.png`` -> (``a/b/X``, color)."""
    stem = _strip_ext(rel)
    if stem.endswith(COLOR_LABEL_SUFFIX):
        return stem[: -len(COLOR_LABEL_SUFFIX)], LABEL_COLOR
    return stem, LABEL_INDEX


def index_labels(labels_uri: str, files: list[str]) -> dict[str, Label]:
    """Label files (URIs below ``labels_uri``) -> {key: Label}; index labels win over colour ones."""
    index: dict[str, Label] = {}
    for uri in files:
        rel = storage.relative(labels_uri, uri)
        if not rel.lower().endswith(LABEL_EXTENSION):
            continue  # label_colors.txt, notes: not labels
        key, kind = label_key(rel)
        if key not in index or (kind == LABEL_INDEX and index[key].kind == LABEL_COLOR):
            index[key] = Label(uri, kind)
    return index


def archive_folder(archive_rel: str) -> str:
    """``seq/01.tar`` -> ``seq/01``: the folder an archive stands for when pairing its members."""
    lower = archive_rel.lower()
    for ext in sorted(ARCHIVE_EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext):
            return archive_rel[: -len(ext)]
    return archive_rel


def label_for_member(archive_rel: str, member: str, labels: dict[str, Label]) -> Label | None:
    """The label of member ``member`` of the archive at ``archive_rel`` (rule in the module doc)."""
    key = frame_key(member)
    return labels.get(f"{archive_folder(archive_rel)}/{key}") or labels.get(key)


def member_uri(archive_uri: str, member: str) -> str:
    return f"{archive_uri.rstrip('/')}/{member}"


def clean_member_name(name: str) -> str | None:
    """A member's path with ``./`` and leading ``/`` removed; None when it climbs out (``..``).

    Member paths end up in output paths (``masks/``), so one that leaves its folder is refused.
    """
    path = posixpath.normpath(name.lstrip("/"))
    if path in ("", ".") or path == ".." or path.startswith("../"):
        return None
    return path


def _below(uri: str, prefix: str | None) -> bool:
    if not prefix:
        return False
    prefix = prefix.rstrip("/")
    return uri == prefix or uri.startswith(prefix + "/")


def list_inputs(
    images: str,
    labels: str | None = None,
    done: set[str] | frozenset[str] = frozenset(),
    exclude: tuple[str, ...] = (),
) -> Listing:
    """List the inputs below ``images`` (object names only) and pair image files with labels.

    ``done``: input URIs already in the output; skipped (image files here, archive members by
    the task that expands the archive). ``exclude``: prefixes whose files are never inputs (the
    job's output, when it lies under ``images``). Files under ``labels`` are never inputs.
    """
    files = storage.list_files(images)
    if not files:
        raise SourceError(f"{images}: no files found; expected image files (PNG/JPEG) or .tar archives of frames")
    label_index: dict[str, Label] = {}
    if labels:
        label_files = storage.list_files(labels)
        if not label_files:
            raise SourceError(f"{labels}: no files found; expected label PNGs paired with the images by path")
        label_index = index_labels(labels, label_files)
        if not label_index:
            raise SourceError(f"{labels}: no .png label files among {len(label_files)} files")
    done_sorted = sorted(done)
    inputs: list[Input] = []
    counts = {KIND_IMAGE: 0, KIND_ARCHIVE: 0, KIND_OTHER: 0}
    skipped = 0
    for uri in files:
        if _below(uri, labels) or any(_below(uri, p) for p in exclude):
            continue
        rel = storage.relative(images, uri)
        if is_archive(rel):
            # The archive is expanded in a task; it carries the member URIs done before so that
            # the task skips them. Its own URI in `done` is an error row of a broken archive.
            lo = bisect.bisect_left(done_sorted, uri + "/")
            hi = bisect.bisect_left(done_sorted, uri + "0")  # '0' is the character after '/'
            inputs.append(Input(uri, KIND_ARCHIVE, done=tuple(done_sorted[lo:hi]) + ((uri,) if uri in done else ())))
            counts[KIND_ARCHIVE] += 1
            continue
        if uri in done:
            skipped += 1
            continue
        if is_image(rel):
            inputs.append(Input(uri, KIND_IMAGE, label=label_index.get(frame_key(rel))))
            counts[KIND_IMAGE] += 1
        else:
            inputs.append(Input(uri, KIND_OTHER))
            counts[KIND_OTHER] += 1
    return Listing(
        inputs=tuple(inputs),
        images=counts[KIND_IMAGE],
        archives=counts[KIND_ARCHIVE],
        others=counts[KIND_OTHER],
        skipped=skipped,
        labels=label_index,
    )


def not_an_image_message(uri: str) -> str:
    ext = posixpath.splitext(uri)[1] or "no extension"
    known = ", ".join(IMAGE_EXTENSIONS + ARCHIVE_EXTENSIONS)
    return f"{uri}: not an image or archive ({ext}); inputs are {known}"


@dataclass(frozen=True)
class Member:
    """One regular file of an archive: its cleaned path and bytes, or why it cannot be used."""

    path: str  # path inside the archive (cleaned), or the raw name when `error` says it is unsafe
    data: bytes = b""
    error: str = ""


def iter_archive(archive_uri: str, skip: frozenset[str] | set[str] = frozenset()) -> Iterator[Member]:
    """Stream the regular members of a tar archive, one at a time, in archive order.

    Members whose URI is in ``skip`` are passed over (their bytes are still streamed past: a
    tar has no index). Directories and links are not frames and are not yielded. A member
    that is too big or has an unsafe path comes with ``error`` set. A broken archive (not a
    tar, truncated) raises ``tarfile.TarError``/``OSError`` after the members read before it.
    """
    fs, path = storage.resolve(archive_uri)
    size = fs.get_file_info(path).size
    # "r|*": sequential reading (no seeks: one pass over an object-store stream) of a plain or
    # compressed tar. Buffered: tarfile reads 512 bytes to 10 KiB at a time, and every read of
    # a bare S3 stream is a GET of its own (218 ms a 300 KB frame in moto, docs/benchmarks.md).
    with fs.open_input_stream(path, buffer_size=ARCHIVE_READ_BUFFER) as stream, \
            tarfile.open(fileobj=stream, mode="r|*") as tar:
        yield from _members(tar, archive_uri, skip)
        # tarfile takes an archive cut inside a member header for its end; in a plain tar that
        # shows as a few bytes left past the last header it read.
        plain = getattr(tar.fileobj, "comptype", "tar") == "tar"
        if plain and size is not None and 0 < size - tar.offset < tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"truncated: {size - tar.offset} bytes of a member header at byte {tar.offset}")


def _members(tar: tarfile.TarFile, archive_uri: str, skip: frozenset[str] | set[str]) -> Iterator[Member]:
    for info in tar:
        if not info.isfile():
            continue
        name = clean_member_name(info.name)
        if name is None:
            yield Member(info.name, error=f"{member_uri(archive_uri, info.name)}: member path leaves the archive")
            continue
        if member_uri(archive_uri, name) in skip:
            continue
        if info.size > MAX_MEMBER_BYTES:
            yield Member(name, error=f"{member_uri(archive_uri, name)}: {info.size} bytes is over the "
                         f"{MAX_MEMBER_BYTES} bytes a frame may have")
            continue
        f = tar.extractfile(info)
        data = f.read() if f is not None else b""
        if len(data) != info.size:
            raise tarfile.ReadError(f"member {name} is truncated ({len(data)} of {info.size} bytes)")
        yield Member(name, data)

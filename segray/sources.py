"""What inference reads: the frames under ``--images`` and the labels under ``--labels``.

An *input* is one frame. Below ``--images`` (any nesting) there are three kinds of objects:

- an image file (``.png``, ``.jpg``, ``.jpeg``, any case): one input, its URI is the file's;
- a tar archive (``.tar``, ``.tar.gz``, ``.tgz``): one input per regular member, its URI is
  ``<archive uri>/<member path>``. Only the archive's *name* is listed on the driver; its
  members are read, streaming, in the Ray tasks that decode them (:func:`iter_archive`), so a
  100 GB archive costs the driver nothing;
- a video file (``.mp4``, ``.m4v``, ``.mov``, ``.mkv``, ``.webm``, ``.avi``): one input per
  decoded frame, its URI is ``<video uri>#frame=<k>`` (segray/video.py); only the name is
  listed here, the video is indexed and decoded in Ray tasks;
- anything else (``.txt``, ``.DS_Store``, a ``.bmp``): one input too, that can only become an
  error row (stage ``list``). Nothing below ``--images`` is dropped without a trace, and
  ``rows(predictions) + rows(errors)`` counts every object (archives by their members).
  Odd members inside an archive are treated the same way.

Names are taken exactly as the store gives them (an S3 key ``a//b.png`` is not ``a/b.png``).
A name that cannot be mirrored safely under ``--output/masks`` (an empty, ``.`` or ``..``
segment, a leading ``/``, a NUL, a segment over 255 bytes, or a name that is not UTF-8) is an
input that becomes an error row saying so; so are broken links, link loops, fifos, link
members of archives and duplicate member names. Masks keep the source's extension
(``a/X.jpg`` -> ``masks/a/X.jpg.png``), so two inputs never share a mask.

How the folders may nest (:func:`list_inputs`): ``--images`` may not be ``--output`` or lie
inside it, nor lie inside ``--labels``; an ``--output`` or ``--labels`` inside ``--images`` is
left out of the inputs; ``--labels`` equal to ``--images`` means CamVid's original layout,
where ``X_L.png`` beside a frame ``X.png``/``X.jpg`` is that frame's label.

Pairing with labels (``--labels`` prefix, label files are PNGs):

- the *key* of a label is its path relative to ``--labels`` without the extension, and
  without a trailing ``_L`` (``a/b/X_L.png`` is the colour-coded label of key ``a/b/X``,
  decoded with the CamVid colour table; ``a/b/X.png`` holds class indices). When both
  exist, the index label wins;
- an image file pairs by its path relative to ``--images`` without extension:
  ``<images>/a/b/X.jpg`` <-> ``<labels>/a/b/X.png`` (or ``X_L.png``);
- frame k of a video pairs with ``<labels>/<video path without extension>/<k>.png`` (k as an
  integer, zero padding allowed: ``a/clip.mp4`` frame 7 <-> ``a/clip/7.png`` or ``a/clip/0007.png``);
- a tar member pairs first as if the archive were a folder of its own name:
  ``<images>/seq/01.tar`` member ``f/X.jpg`` <-> ``<labels>/seq/01/f/X.png``, and if there
  is no such label, by its path inside the archive alone: ``<labels>/f/X.png`` (shards of
  one collection, WebDataset style).

A frame without a label is still predicted; it has no confusion counts and is counted apart.
"""

from __future__ import annotations

import bisect
import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field

from segray.errors import SegrayError
from segray import storage
from segray.archives import (  # noqa: F401 - re-exported: the listing's users read archives through here
    ARCHIVE_EXTENSIONS,
    ArchiveError,
    Member,
    is_archive,
    reader_for,
    iter_archive,
)
from segray.layout import IMAGE_EXTENSIONS, is_image
from segray.video import FRAME_MARK, VIDEO_EXTENSIONS, is_video, split_frame_uri, video_folder
from segray.names import (  # noqa: F401 - re-exported
    MASK_SUFFIX,
    clean_member_name,
    input_rel,
    lies_below,
    mask_rel,
    member_uri,
    name_problem,
    parents,
    unique,
)

LABEL_EXTENSION = ".png"
COLOR_LABEL_SUFFIX = "_L"  # original CamVid: NAME_L.png is the colour-coded label of NAME.png

# What an input row is; see `Input`.
KIND_IMAGE = "image"
KIND_ARCHIVE = "archive"
KIND_VIDEO = "video"
CONTAINER_KINDS = (KIND_ARCHIVE, KIND_VIDEO)  # inputs that hold many frames, each its own task
KIND_OTHER = "other"

# How a label file encodes its classes.
LABEL_INDEX = "index"  # single-channel class indices 0..11
LABEL_COLOR = "color"  # RGB colours of the original CamVid release



class SourceError(SegrayError, ValueError):
    """``--images`` or ``--labels`` cannot be used; the message names the URI and the fix."""


@dataclass(frozen=True)
class Label:
    uri: str
    kind: str  # LABEL_INDEX or LABEL_COLOR


@dataclass(frozen=True)
class Input:
    """One row of the input listing (names only, no bytes).

    ``kind`` is KIND_IMAGE (``label`` paired on the driver), KIND_ARCHIVE (members paired in the
    task that expands it; ``done`` are member URIs already in the output, skipped; ``taken``
    are URIs of listed objects below ``<archive uri>/`` that its members must not reuse: pass
    both to :func:`iter_archive`), KIND_VIDEO (frames paired in the tasks that decode it;
    ``done``: its frame URIs already in the output, and its own URI when it is an error row
    there) or KIND_OTHER (becomes an error row, stage ``list``, with
    message ``error``).
    """

    uri: str
    kind: str
    label: Label | None = None
    done: tuple[str, ...] = ()
    error: str = ""
    taken: tuple[str, ...] = ()


@dataclass(frozen=True)
class Listing:
    inputs: tuple[Input, ...]
    images: int  # image files to process now
    archives: int  # archives to expand now
    others: int  # objects that are neither (each becomes an error row)
    skipped: int  # image files and odd files already in the output (rerun)
    labels: dict[str, Label] = field(default_factory=dict)  # key -> label, all of --labels
    label_files: int = 0  # files below --images taken as labels, not inputs
    videos: int = 0  # video files to decode now


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
    """Label files (URIs below ``labels_uri``) -> {key: Label}; index labels win over colour ones.

    Files whose names fail :func:`name_problem` are left out (they could be read as another key)."""
    index: dict[str, Label] = {}
    for uri in files:
        rel = storage.relative(labels_uri, uri)
        if not rel.lower().endswith(LABEL_EXTENSION) or name_problem(rel):
            continue  # label_colors.txt, notes: not labels
        key, kind = label_key(rel)
        if key not in index or (kind == LABEL_INDEX and index[key].kind == LABEL_COLOR):
            index[key] = Label(uri, kind)
    return index


def archive_folder(archive_rel: str) -> str:
    """``seq/01.tar`` -> ``seq/01``: the folder an archive stands for when pairing its members."""
    reader = reader_for(archive_rel)
    if reader is None:
        return archive_rel
    lower = archive_rel.lower()
    ext = max((e for e in reader.extensions if lower.endswith(e)), key=len)
    return archive_rel[: -len(ext)]


def video_labels(video_rel: str, labels: dict[str, Label], keys: list[str] | None = None
                 ) -> tuple[dict[int, Label], dict[int, str]]:
    """The labels of the frames of the video at ``video_rel``: ``{k: Label}`` from the label keys
    ``<folder>/<digits>`` (``a/clip.mp4`` -> ``a/clip/7``, ``a/clip/0007``), and ``{k: why}`` for
    frames with two labels (``7.png`` and ``007.png``), which are left unpaired. ``keys``: the
    label keys sorted, when the caller has them."""
    folder = video_folder(video_rel) + "/"
    keys = sorted(labels) if keys is None else keys
    found: dict[int, Label] = {}
    clash: dict[int, str] = {}
    for key in keys[bisect.bisect_left(keys, folder):bisect.bisect_left(keys, folder[:-1] + "0")]:
        digits = key[len(folder):]
        if not (digits.isascii() and digits.isdigit()):
            continue
        k = int(digits)
        if k in found:
            clash[k] = f"two labels for frame {k}: {found[k].uri} and {labels[key].uri}; remove one"
        else:
            found[k] = labels[key]
    for k in clash:
        found.pop(k, None)
    return found, clash


def label_for_member(archive_rel: str, member: str, labels: dict[str, Label]) -> Label | None:
    """The label of member ``member`` of the archive at ``archive_rel`` (rule in the module doc)."""
    key = frame_key(member)
    return labels.get(f"{archive_folder(archive_rel)}/{key}") or labels.get(key)


def _location(uri: str) -> tuple[str, str]:
    if storage.is_s3(uri):
        return "s3", storage.normalize(uri)
    return "local", os.path.realpath(storage.resolve(uri)[1])


def _relation(a: str, b: str) -> str:
    """``"same"`` when ``a`` and ``b`` are one folder, ``"inside"`` when ``a`` lies strictly
    below ``b`` (local paths compared after resolving links), else ``""``."""
    (sa, pa), (sb, pb) = _location(a), _location(b)
    if sa != sb:
        return ""
    if pa == pb:
        return "same"
    return "inside" if pa.startswith(pb.rstrip("/") + "/") else ""


def _colour_labels_beside_frames(rels: Iterable[str]) -> set[str]:
    """The rels of ``X_L.png`` files whose frame ``X.png|jpg|jpeg`` is in the same folder and
    is itself a frame (not a label: ``X_L_L.png`` beside a label ``X_L.png`` is a frame)."""
    rels = set(rels)
    images_by_key: dict[str, list[str]] = {}
    for r in rels:
        if is_image(r):
            images_by_key.setdefault(frame_key(r), []).append(r)
    memo: dict[str, bool] = {}

    def is_label(r: str) -> bool:
        if r not in memo:
            key, kind = label_key(r)
            memo[r] = (kind == LABEL_COLOR and r.lower().endswith(LABEL_EXTENSION)
                       and any(not is_label(f) for f in images_by_key.get(key, ()) if f != r))
        return memo[r]

    # Shortest first: whether X_L.png is a label depends on X.png only, so the memo fills
    # without deep recursion.
    return {r for r in sorted(rels, key=len) if is_image(r) and is_label(r)}


def list_inputs(
    images: str,
    labels: str | None = None,
    done: set[str] | frozenset[str] = frozenset(),
    output: str | None = None,
) -> Listing:
    """List the inputs below ``images`` (object names only) and pair image files with labels.

    Every object below ``images`` is one Input (or skipped: in ``done``, input URIs already in
    the output), except the files under ``output`` or ``labels`` when those lie inside
    ``images``, and, when ``labels`` is ``images``, the ``X_L.png`` labels beside their frames.
    Objects that cannot be inputs are KIND_OTHER with ``error`` saying why. Raises SourceError
    when the folders overlap in a way that cannot work, or when there is nothing to do.
    """
    if output:
        where = _relation(images, output)
        if where:
            raise SourceError(f"{images}: --images is {'the' if where == 'same' else 'inside the'} --output folder "
                              f"{output}; the job would read its own results: choose an --output outside --images")
    same_folder = False
    prune: list[str] = []
    if output and _relation(output, images) == "inside":
        prune.append(output)
    if labels:
        where = _relation(images, labels)
        if where == "inside":
            raise SourceError(
                f"{images}: --images is inside --labels {labels}, so every frame would be taken for a label; point "
                f"--labels at the label folder itself, or at {images} when the labels are NAME_L.png beside the frames")
        same_folder = where == "same"
        if _relation(labels, images) == "inside":
            prune.append(labels)

    entries = storage.list_entries(images, tuple(prune))
    label_index: dict[str, Label] = {}
    label_files = 0
    if labels and not same_folder:
        label_entries = storage.list_entries(labels)
        if not label_entries:
            raise SourceError(f"{labels}: no files found; expected label PNGs paired with the images by path")
        # A label whose name the store resolves differently (``a/../b.png``) is never read: its
        # bytes could be another key's.
        label_index = index_labels(labels, [e.uri for e in label_entries if not e.error and not name_problem(e.rel)])
        if not label_index:
            raise SourceError(f"{labels}: no .png label files among {len(label_entries)} files")
        if labels in prune:
            label_files = len(label_entries)
    if not entries:
        if prune:
            raise SourceError(f"{images}: no files found outside {' and '.join(prune)} (--output/--labels inside "
                              "--images); expected image files (PNG/JPEG), .tar archives of frames or video files")
        raise SourceError(f"{images}: no files found; expected image files (PNG/JPEG), .tar archives of frames or video files")

    good = [e for e in entries if not e.error and e.rel and not name_problem(e.rel)]
    colour_labels: set[str] = set()
    if same_folder:
        colour_labels = _colour_labels_beside_frames(e.rel for e in good)
        for e in good:
            if e.rel in colour_labels:
                label_index[label_key(e.rel)[0]] = Label(e.uri, LABEL_COLOR)
        label_files = len(colour_labels)
    # Containers: their frames' URIs and masks are named below their own name.
    archive_rels = {e.rel for e in good if (is_archive(e.rel) or is_video(e.rel)) and e.rel not in colour_labels}

    # 1. Every entry -> (uri, kind, error); the same decisions whatever `done` holds, so that a
    #    rerun names every input as the first run did.
    decided: list[tuple[str, str, str, str]] = []  # (uri, kind, error, rel)
    seen: set[str] = set()
    taken_below: dict[str, list[str]] = {}  # archive rel -> URIs of listed objects below it
    for e in entries:
        if e.rel in colour_labels and not e.error:
            continue
        uri, rel, kind, error = e.uri, e.rel, "", ""
        problem = e.error or (name_problem(rel) if rel else "")
        above = next((p for p in parents(rel) if p in archive_rels), None) if rel and not problem else None
        if problem:
            kind, error = KIND_OTHER, f"{uri}: {problem}; rename the object" if not e.error else f"{uri}: {problem}"
        elif above is not None:
            kind, error = KIND_OTHER, (f"{uri}: lies below the name of the archive or video {member_uri(images, above)}, "
                                       "whose frames are named like it; rename the object or the container")
        elif is_archive(rel or uri):
            kind = KIND_ARCHIVE
        elif is_video(rel or uri):
            kind = KIND_VIDEO
        elif is_image(rel or uri):
            kind = KIND_IMAGE
        else:
            kind, error = KIND_OTHER, not_an_image_message(uri)
        frame = split_frame_uri(uri)
        if frame is not None and rel and input_rel(images, frame[0]) in archive_rels:
            # Named like frame k of a listed video (a file "clip.mp4#frame=3" beside clip.mp4):
            # its row must not take that frame's URI.
            kind, error = KIND_OTHER, (f"{uri}: named like frame {frame[1]} of the video {frame[0]}, whose frames "
                                       "are named so; rename the object")
            uri = unique(uri, seen | {uri})
        if uri in seen:
            renamed = unique(uri, seen)
            kind, error, uri = KIND_OTHER, f"{uri}: another object has the same name (as shown); rename one", renamed
        seen.add(uri)
        if above is not None:
            taken_below.setdefault(above, []).append(uri)
        decided.append((uri, kind, error, rel))

    # 2. A mask is a file: refuse the image whose mask path is a folder of other masks
    #    (X.jpg beside a folder X.jpg.png/ holding frames, or an archive named like it).
    mask_dirs: set[str] = set()
    for _, kind, _, rel in decided:
        if kind == KIND_IMAGE and rel:
            mask_dirs.update(parents(rel))
        elif kind in CONTAINER_KINDS and rel:
            mask_dirs.update(parents(rel) + [rel])
    for k, (uri, kind, _, rel) in enumerate(decided):
        if kind == KIND_IMAGE and rel and mask_rel(rel) in mask_dirs:
            decided[k] = (uri, KIND_OTHER, f"{uri}: its mask {mask_rel(rel)} would be a folder of other masks "
                          f"(there is a folder {mask_rel(rel)}/ of inputs); rename one", rel)

    # 3. Rows, without what is done already.
    done_sorted = sorted(done)
    inputs: list[Input] = []
    counts = {KIND_IMAGE: 0, KIND_ARCHIVE: 0, KIND_VIDEO: 0, KIND_OTHER: 0}
    skipped = 0
    for uri, kind, error, rel in decided:
        if kind in CONTAINER_KINDS:
            # The container is expanded in tasks; it carries the URIs of its frames done before
            # so that the tasks skip them. Its own URI in `done` is the error row of a broken one.
            prefix = uri + "/" if kind == KIND_ARCHIVE else uri + FRAME_MARK
            lo = bisect.bisect_left(done_sorted, prefix)
            hi = bisect.bisect_left(done_sorted, prefix[:-1] + chr(ord(prefix[-1]) + 1))
            inputs.append(Input(uri, kind, done=tuple(done_sorted[lo:hi]) + ((uri,) if uri in done else ()),
                                taken=tuple(taken_below.get(rel, ()))))
        elif uri in done:
            skipped += 1
            continue
        elif kind == KIND_IMAGE:
            inputs.append(Input(uri, KIND_IMAGE, label=label_index.get(frame_key(rel)) if rel else None))
        else:
            inputs.append(Input(uri, KIND_OTHER, error=error))
        counts[kind] += 1
    if not inputs and not skipped and not done:
        raise SourceError(f"{images}: nothing to process among its {len(entries)} files ({label_files} taken as "
                          f"labels of --labels {labels}); point --images at the frames")
    return Listing(
        inputs=tuple(inputs),
        images=counts[KIND_IMAGE],
        archives=counts[KIND_ARCHIVE],
        others=counts[KIND_OTHER],
        videos=counts[KIND_VIDEO],
        skipped=skipped,
        labels=label_index,
        label_files=label_files,
    )


def not_an_image_message(uri: str) -> str:
    ext = posixpath.splitext(uri)[1] or "no extension"
    known = ", ".join(IMAGE_EXTENSIONS + ARCHIVE_EXTENSIONS + VIDEO_EXTENSIONS)
    return f"{uri}: not an image, archive or video ({ext}); inputs are {known}"

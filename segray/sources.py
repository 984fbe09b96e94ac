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
- a tar member pairs first as if the archive were a folder of its own name:
  ``<images>/seq/01.tar`` member ``f/X.jpg`` <-> ``<labels>/seq/01/f/X.png``, and if there
  is no such label, by its path inside the archive alone: ``<labels>/f/X.png`` (shards of
  one collection, WebDataset style).

A frame without a label is still predicted; it has no confusion counts and is counted apart.
"""

from __future__ import annotations

import bisect
import bz2
import gzip
import lzma
import os
import posixpath
import tarfile
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from segray import storage
from segray.layout import IMAGE_EXTENSIONS, is_image

ARCHIVE_EXTENSIONS: tuple[str, ...] = (".tar", ".tar.gz", ".tgz")
# Bytes per read from storage while streaming an archive (one ranged GET on S3).
ARCHIVE_READ_BUFFER = 8 * 2**20
LABEL_EXTENSION = ".png"
COLOR_LABEL_SUFFIX = "_L"  # original CamVid: NAME_L.png is the colour-coded label of NAME.png
MASK_SUFFIX = ".png"  # appended to the input's path: a/X.jpg -> masks/a/X.jpg.png
# The longest file name of common file systems (ext4, XFS, APFS, NTFS: 255 bytes / UTF-16 units).
MAX_NAME_BYTES = 255

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


class ArchiveError(tarfile.TarError):
    """An archive that cannot be read to its end (not a tar, truncated, corrupt, unreadable).

    Raised by :func:`iter_archive` after the members read before the damage; ``str()`` is one
    line naming the archive's URI. A subclass of ``tarfile.TarError``."""

    def __init__(self, uri: str, message: str) -> None:
        super().__init__(f"{uri}: {message}")
        self.uri = uri
        self.message = message


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
    both to :func:`iter_archive`) or KIND_OTHER (becomes an error row, stage ``list``, with
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


def name_problem(rel: str) -> str:
    """Why the relative path ``rel`` cannot name an input, or ``""``.

    Refused: an empty path, a leading ``/``, an empty, ``.`` or ``..`` segment (S3 keys may
    hold them; the AWS SDK normalizes them away when reading, so another object would be read,
    and the mask would be written elsewhere), a NUL, text that is not UTF-8, a segment over
    MAX_NAME_BYTES bytes, or a last segment too long to take the mask's ``.png``."""
    if not rel:
        return "an empty name"
    if "\0" in rel:
        return "the name holds a NUL character"
    if storage.printable(rel) != rel:
        return "the name is not valid UTF-8"
    if rel.startswith("/"):
        return "the name starts with '/' (an empty folder name)"
    segments = rel.split("/")
    for seg in segments:
        if seg == "":
            return "the name has an empty folder segment ('//' or a trailing '/')"
        if seg in (".", ".."):
            return f"the name has a '{seg}' segment"
        if len(seg.encode("utf-8")) > MAX_NAME_BYTES:
            return f"a segment of the name is over {MAX_NAME_BYTES} bytes"
    if len(segments[-1].encode("utf-8")) + len(MASK_SUFFIX) > MAX_NAME_BYTES:
        return f"the file name is over {MAX_NAME_BYTES - len(MASK_SUFFIX)} bytes (its mask adds '{MASK_SUFFIX}')"
    return ""


def mask_rel(rel: str) -> str:
    """The mask's path below ``<output>/masks/`` for the input at relative path ``rel``
    (``a/b/X.jpg`` -> ``a/b/X.jpg.png``; archive members: ``<archive rel>/<member path>``).

    The source extension is kept, so ``X.jpg`` and ``X.png`` never share a mask. Only for
    names that pass :func:`name_problem` (every non-error input's); raises ValueError else."""
    problem = name_problem(rel)
    if problem:
        raise ValueError(f"no mask path for {rel!r}: {problem}")
    return rel + MASK_SUFFIX


def input_rel(images: str, uri: str) -> str:
    """An input's path relative to ``--images`` (what :func:`mask_rel` takes): exact, and the
    file's own name when ``--images`` is the file (or the archive) itself."""
    rel = storage.relative(images, uri)
    return rel or posixpath.basename(uri.rstrip("/"))


def _parents(rel: str) -> list[str]:
    """``a/b/c`` -> ``["a", "a/b"]``."""
    parts = rel.split("/")
    return ["/".join(parts[:k]) for k in range(1, len(parts))]


def _unique(name: str, taken: set[str]) -> str:
    """``name``, or ``name (duplicate N)`` with the smallest N >= 2 not in ``taken``."""
    if name not in taken:
        return name
    n = 2
    while f"{name} (duplicate {n})" in taken:
        n += 1
    return f"{name} (duplicate {n})"


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
                              "--images); expected image files (PNG/JPEG) or .tar archives of frames")
        raise SourceError(f"{images}: no files found; expected image files (PNG/JPEG) or .tar archives of frames")

    good = [e for e in entries if not e.error and e.rel and not name_problem(e.rel)]
    colour_labels: set[str] = set()
    if same_folder:
        colour_labels = _colour_labels_beside_frames(e.rel for e in good)
        for e in good:
            if e.rel in colour_labels:
                label_index[label_key(e.rel)[0]] = Label(e.uri, LABEL_COLOR)
        label_files = len(colour_labels)
    archive_rels = {e.rel for e in good if is_archive(e.rel) and e.rel not in colour_labels}

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
        above = next((p for p in _parents(rel) if p in archive_rels), None) if rel and not problem else None
        if problem:
            kind, error = KIND_OTHER, f"{uri}: {problem}; rename the object" if not e.error else f"{uri}: {problem}"
        elif above is not None:
            kind, error = KIND_OTHER, (f"{uri}: lies below the name of the archive {member_uri(images, above)}, whose "
                                       "members are named like it; rename the object or the archive")
        elif is_archive(rel or uri):
            kind = KIND_ARCHIVE
        elif is_image(rel or uri):
            kind = KIND_IMAGE
        else:
            kind, error = KIND_OTHER, not_an_image_message(uri)
        if uri in seen:
            unique = _unique(uri, seen)
            kind, error, uri = KIND_OTHER, f"{uri}: another object has the same name (as shown); rename one", unique
        seen.add(uri)
        if above is not None:
            taken_below.setdefault(above, []).append(uri)
        decided.append((uri, kind, error, rel))

    # 2. A mask is a file: refuse the image whose mask path is a folder of other masks
    #    (X.jpg beside a folder X.jpg.png/ holding frames, or an archive named like it).
    mask_dirs: set[str] = set()
    for _, kind, _, rel in decided:
        if kind == KIND_IMAGE and rel:
            mask_dirs.update(_parents(rel))
        elif kind == KIND_ARCHIVE and rel:
            mask_dirs.update(_parents(rel) + [rel])
    for k, (uri, kind, _, rel) in enumerate(decided):
        if kind == KIND_IMAGE and rel and mask_rel(rel) in mask_dirs:
            decided[k] = (uri, KIND_OTHER, f"{uri}: its mask {mask_rel(rel)} would be a folder of other masks "
                          f"(there is a folder {mask_rel(rel)}/ of inputs); rename one", rel)

    # 3. Rows, without what is done already.
    done_sorted = sorted(done)
    inputs: list[Input] = []
    counts = {KIND_IMAGE: 0, KIND_ARCHIVE: 0, KIND_OTHER: 0}
    skipped = 0
    for uri, kind, error, rel in decided:
        if kind == KIND_ARCHIVE:
            # The archive is expanded in a task; it carries the member URIs done before so that
            # the task skips them. Its own URI in `done` is an error row of a broken archive.
            lo = bisect.bisect_left(done_sorted, uri + "/")
            hi = bisect.bisect_left(done_sorted, uri + "0")  # '0' is the character after '/'
            inputs.append(Input(uri, KIND_ARCHIVE, done=tuple(done_sorted[lo:hi]) + ((uri,) if uri in done else ()),
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
        skipped=skipped,
        labels=label_index,
        label_files=label_files,
    )


def not_an_image_message(uri: str) -> str:
    ext = posixpath.splitext(uri)[1] or "no extension"
    known = ", ".join(IMAGE_EXTENSIONS + ARCHIVE_EXTENSIONS)
    return f"{uri}: not an image or archive ({ext}); inputs are {known}"


@dataclass(frozen=True)
class Member:
    """One member of an archive: its cleaned path and bytes, or why it cannot be used.

    With ``error`` set, ``path`` is the name as the archive has it (escaped to valid UTF-8,
    ``(duplicate N)`` appended when that is taken), so that every Member of one archive has a
    distinct URI ``member_uri(archive, path)``. ``path == ""`` (with ``error``): the archive
    itself holds no files; its row is the archive's URI.
    """

    path: str
    data: bytes = b""
    error: str = ""


# Compressed archives, by their first bytes; tarfile reads the decompressed stream.
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"))


class _Sniffed:
    """A stream with its first bytes read ahead (to tell the compression) and given back."""

    def __init__(self, raw, n: int = 6) -> None:
        self.raw = raw
        self.head = raw.read(n)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            data, self.head = self.head + self.raw.read(), b""
            return data
        if self.head:
            data, self.head = self.head[:n], self.head[n:]
            return data + (self.raw.read(n - len(data)) if len(data) < n else b"")
        return self.raw.read(n)


class _Counted:
    """The decompressed tar stream: counts the bytes handed to tarfile and keeps the last few
    reads, so that what follows the end of the archive can be checked."""

    KEEP = 64 * 1024  # tarfile reads at most 10 KiB past the header it stops at

    def __init__(self, f) -> None:
        self.f = f
        self.count = 0
        self.recent: deque[tuple[int, bytes]] = deque()  # (start offset, bytes), >= KEEP bytes
        self.kept = 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        if data:
            self.recent.append((self.count, data))
            self.count += len(data)
            self.kept += len(data)
            while self.kept - len(self.recent[0][1]) >= self.KEEP:
                self.kept -= len(self.recent.popleft()[1])
        return data


def _open_tar_stream(raw) -> tuple[_Counted, str]:
    sniffed = _Sniffed(raw)
    kind = next((name for magic, name in _MAGIC if sniffed.head.startswith(magic)), "tar")
    if kind == "gzip":
        f = gzip.GzipFile(fileobj=sniffed, mode="rb")
    elif kind == "bzip2":
        f = bz2.BZ2File(sniffed)
    elif kind == "xz":
        f = lzma.LZMAFile(sniffed)
    else:
        f = sniffed
    return _Counted(f), kind


def _broken(uri: str, e: BaseException) -> ArchiveError:
    text = (str(e).strip() or type(e).__name__).splitlines()[0]
    return ArchiveError(uri, f"broken or truncated archive ({type(e).__name__}: {text}); "
                        "the members before the damage were processed")


def _member_problem(info: tarfile.TarInfo) -> str:
    if info.isfile():
        return ""
    if info.issym():
        return f"a symbolic link (to {storage.printable(info.linkname)}), not a frame; archive the file itself"
    if info.islnk():
        return f"a hard link (to {storage.printable(info.linkname)}), not a frame; archive the file itself"
    if info.isfifo():
        return "a fifo, not a frame"
    if info.ischr() or info.isblk():
        return "a device, not a frame"
    return f"a member of type {info.type!r}, not a file"


def iter_archive(
    archive_uri: str, skip: Iterable[str] = frozenset(), taken: Iterable[str] = ()
) -> Iterator[Member]:
    """Stream the members of a tar archive (plain, gzip, bzip2 or xz), one at a time, in order.

    Every member that is not a directory is one Member (directories are no rows): a regular
    file with its bytes, or anything else with ``error`` set (a link, a fifo or device, a name
    that leaves the archive or is not UTF-8, a duplicate name after cleaning ``./``, an image
    whose mask would be a folder of other members' masks, a member over MAX_MEMBER_BYTES).
    Members whose URI is in ``skip`` are passed over (their bytes are still streamed past: a
    tar has no index). ``taken``: URIs of other objects below ``<archive_uri>/`` (an S3 key
    ``A.tar/x.png`` beside ``A.tar``, Input.taken) that members must not reuse. An archive
    without any file yields one ``Member("", error=...)`` (unless ``archive_uri`` is in ``skip``).

    Raises ArchiveError (after the members read before it) when the archive is not a tar, is
    truncated or corrupt (checked to its very end: compressed streams to their checksum, a
    plain tar's bytes after its end-of-archive marker must be zeros), or cannot be read;
    FileNotFoundError when the object does not exist.
    """
    skip = skip if isinstance(skip, (set, frozenset)) else frozenset(skip)
    archive_uri = archive_uri.rstrip("/")
    fs, path = storage.resolve(archive_uri)
    try:
        # compression=None: tarfile tells a compressed archive by its bytes; pyarrow would
        # decompress by extension (and a .tar.gz that is a plain tar would fail). Buffered:
        # tarfile reads 512 bytes to 10 KiB at a time, and every read of a bare S3 stream is a
        # GET of its own (218 ms a 300 KB frame in moto, docs/benchmarks.md).
        raw = fs.open_input_stream(path, compression=None, buffer_size=ARCHIVE_READ_BUFFER)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ArchiveError(archive_uri, f"cannot read ({storage._first_line(e)})") from e
    with raw:
        try:
            stream, _ = _open_tar_stream(raw)
            # "r|": sequential reading, no seeks: one pass over an object-store stream.
            tar = tarfile.open(fileobj=stream, mode="r|")
        except Exception as e:  # noqa: BLE001 - whatever the bytes are, the archive is broken
            raise _broken(archive_uri, e) from e
        seen: set[str] = set()
        for uri in taken:
            if uri.startswith(archive_uri + "/"):
                seen.add(uri[len(archive_uri) + 1:])
        mask_files: set[str] = set()
        mask_dirs: set[str] = set()
        files = 0
        while True:
            try:
                info = tar.next()
                tar.members.clear()  # a stream has no use for them; keeps memory flat over millions
            except Exception as e:  # noqa: BLE001
                raise _broken(archive_uri, e) from e
            if info is None:
                break
            if info.isdir():
                continue
            files += 1
            shown = storage.printable(info.name)
            # A name that is not UTF-8 (an archive made where names were Latin-1, say) is still a
            # frame whose bytes are in hand: it is predicted under its \xNN-escaped name, which
            # is the same on every run; a clash with a literal "\xNN" name is a duplicate below.
            name = clean_member_name(shown)
            problem = "member path leaves the archive" if name is None else name_problem(name)
            # The cleaned path when it is a sound name (also for a link: `./a.png` -> `a.png`),
            # else the name as the archive has it (named in the error, never used as a path).
            path = shown if problem or name is None else name
            problem = problem or _member_problem(info)
            if path in seen:
                how = f"{shown} is {path} once cleaned, the name" if shown != path else "the same name as"
                problem = problem or f"duplicate member name ({how} of an earlier member or object); rename one"
                path = _unique(path, seen)
            seen.add(path)
            if not problem and is_image(path):
                mask = mask_rel(path)
                if mask in mask_dirs or any(d in mask_files for d in _parents(path)):
                    problem = f"its mask {mask} would clash with the folder of another member's mask; rename one"
                else:
                    mask_files.add(mask)
                    mask_dirs.update(_parents(mask))
            uri = member_uri(archive_uri, path)
            if uri in skip:
                continue
            if not problem and info.size > MAX_MEMBER_BYTES:
                problem = f"{info.size} bytes is over the {MAX_MEMBER_BYTES} bytes a frame may have"
            if problem:
                yield Member(path, error=f"{uri}: {problem}")
                continue
            try:
                f = tar.extractfile(info)
                data = f.read() if f is not None else b""
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {path} is truncated ({len(data)} of {info.size} bytes)")
            except Exception as e:  # noqa: BLE001
                raise _broken(archive_uri, e) from e
            yield Member(path, data)
        try:
            _check_end(archive_uri, tar.offset, stream)
        except ArchiveError:
            raise
        except Exception as e:  # noqa: BLE001 - a compressed stream cut or corrupt past the last member
            raise _broken(archive_uri, e) from e
        if files == 0 and archive_uri not in skip:
            yield Member("", error=f"{archive_uri}: an empty archive (no files in it); remove it or add the frames")


def _check_end(archive_uri: str, offset: int, stream: _Counted) -> None:
    """What follows the last member must be the end-of-archive marker: zeros to the end of the
    (decompressed) stream, read to its end so that a compressed stream's checksum is checked.

    tarfile takes a header cut short, or a damaged one, for the end of the archive; what is left
    past it tells: a few bytes (less than a header) is a truncated archive, non-zero bytes a
    corrupt header or another archive appended."""
    pending = b"".join(data for start, data in stream.recent if start + len(data) > offset)
    first = next((start for start, data in stream.recent if start + len(data) > offset), stream.count)
    head = pending[max(0, offset - first):] if first <= offset else None
    nonzero = head is not None and head.strip(b"\0") != b""
    while True:
        chunk = stream.read(1 << 20)
        if not chunk:
            break
        nonzero = nonzero or chunk.strip(b"\0") != b""
    rest = stream.count - offset
    if 0 < rest < tarfile.BLOCKSIZE:
        raise ArchiveError(archive_uri, f"truncated: {rest} bytes of a member header at byte {offset}")
    if nonzero:
        raise ArchiveError(archive_uri, f"unreadable data after byte {offset} (a damaged member header, or "
                           "another archive appended); the members before it were processed")

"""Reading frame containers (today tar archives: ``.tar``, ``.tar.gz``, ``.tgz``) as a stream of members.

A container kind is one :class:`ContainerReader` in :data:`CONTAINER_READERS`: its extensions and
a function that streams a container's members (:class:`Member`). Listing (segray/sources.py)
and the load stage of infer (segray/frames.py) only ever call :func:`is_archive` and
:func:`iter_archive`, which dispatch on the name; adding a kind is one reader plus one entry.

Only the archive's name is listed on the driver (segray/sources.py); its members are read,
streaming, in the Ray task that decodes them (:func:`iter_archive`), so a 100 GB archive costs
the driver nothing. Compression is recognised by the bytes, not the name, and the archive is
read to its end, so damage anywhere is an :class:`ArchiveError` after the members before it.

A big plain tar can also be split between tasks: :func:`index_tar` makes the same pass (and the
same decisions) as :func:`iter_tar` but keeps only where each member's data lies
(:class:`MemberRef`), and :func:`read_tar_members` reads one range of those refs by offset.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from segray.errors import SegrayError
from segray import storage
from segray.layout import is_image
from segray.names import clean_member_name, mask_rel, member_uri, name_problem, parents, unique

# Bytes per read from storage while streaming an archive (one ranged GET on S3).
ARCHIVE_READ_BUFFER = 8 * 2**20
# A member this big is not a video frame (a 4K PNG is ~25 MB); refusing it keeps a task's
# memory bounded whatever an archive holds.
MAX_MEMBER_BYTES = 256 * 1024 * 1024


class ArchiveError(SegrayError, tarfile.TarError):
    """An archive that cannot be read to its end (not a tar, truncated, corrupt, unreadable).

    Raised by :func:`iter_archive` after the members read before the damage; ``str()`` is one
    line naming the archive's URI. A subclass of ``tarfile.TarError``."""

    def __init__(self, uri: str, message: str) -> None:
        super().__init__(f"{uri}: {message}")
        self.uri = uri
        self.message = message


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


@dataclass(frozen=True)
class MemberRef:
    """One member of a tar archive located by the index (:func:`index_tar`), without its bytes.

    ``path`` and ``error`` are exactly the Member's that :func:`iter_tar` gives for it;
    ``offset`` is where its data starts in the (decompressed) archive, -1 with ``error``."""

    path: str
    offset: int = -1
    size: int = 0
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


def _open(archive_uri: str, opener: Callable):
    """``opener()`` (a pyarrow open of the archive): FileNotFoundError as such, any other
    OSError an ArchiveError naming the archive."""
    try:
        return opener()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ArchiveError(archive_uri, f"cannot read ({storage._first_line(e)})") from e


def _tar_rows(
    archive_uri: str, skip: Iterable[str], taken: Iterable[str], keep: bool
) -> Iterator[tuple[str, tarfile.TarInfo | None, bytes, str]]:
    """The one pass behind :func:`iter_tar` and :func:`index_tar`: ``(path, info, data, error)``
    per row (``info`` None for the empty-archive row), every decision on names, links, masks,
    ``skip``, ``taken`` and sizes made here. A usable member's data is read whole when ``keep``,
    else streamed past (its length checked, so both raise at the same member)."""
    skip = skip if isinstance(skip, (set, frozenset)) else frozenset(skip)
    archive_uri = archive_uri.rstrip("/")
    fs, path = storage.resolve(archive_uri)
    # compression=None: tarfile tells a compressed archive by its bytes; pyarrow would
    # decompress by extension (and a .tar.gz that is a plain tar would fail). Buffered:
    # tarfile reads 512 bytes to 10 KiB at a time, and every read of a bare S3 stream is a
    # GET of its own (docs/benchmarks.md: "A bug this benchmark found").
    raw = _open(archive_uri, lambda: fs.open_input_stream(path, compression=None, buffer_size=ARCHIVE_READ_BUFFER))
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
                path = unique(path, seen)
            seen.add(path)
            if not problem and is_image(path):
                mask = mask_rel(path)
                if mask in mask_dirs or any(d in mask_files for d in parents(path)):
                    problem = f"its mask {mask} would clash with the folder of another member's mask; rename one"
                else:
                    mask_files.add(mask)
                    mask_dirs.update(parents(mask))
            uri = member_uri(archive_uri, path)
            if uri in skip:
                continue
            if not problem and info.size > MAX_MEMBER_BYTES:
                problem = f"{info.size} bytes is over the {MAX_MEMBER_BYTES} bytes a frame may have"
            if problem:
                yield path, info, b"", f"{uri}: {problem}"
                continue
            try:
                f = tar.extractfile(info) or io.BytesIO()
                data = f.read() if keep else b""
                got = len(data) if keep else sum(len(chunk) for chunk in iter(lambda: f.read(1 << 20), b""))
                if got != info.size:
                    raise tarfile.ReadError(f"member {path} is truncated ({got} of {info.size} bytes)")
            except Exception as e:  # noqa: BLE001
                raise _broken(archive_uri, e) from e
            yield path, info, data, ""
        try:
            _check_end(archive_uri, tar.offset, stream)
        except ArchiveError:
            raise
        except Exception as e:  # noqa: BLE001 - a compressed stream cut or corrupt past the last member
            raise _broken(archive_uri, e) from e
        if files == 0 and archive_uri not in skip:
            yield "", None, b"", f"{archive_uri}: an empty archive (no files in it); remove it or add the frames"


def iter_tar(
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
    for path, _, data, error in _tar_rows(archive_uri, skip, taken, keep=True):
        yield Member(path, data, error)


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


# ------------------------------------------------------------------------ index and range reads


def tar_compression(archive_uri: str) -> str:
    """``"tar"`` for a plain tar archive, else ``"gzip"``, ``"bzip2"`` or ``"xz"``: told by the
    first bytes, as :func:`iter_tar` does. Raises FileNotFoundError when the archive does not
    exist, ArchiveError when it cannot be read."""
    archive_uri = archive_uri.rstrip("/")
    fs, path = storage.resolve(archive_uri)
    with _open(archive_uri, lambda: fs.open_input_stream(path, compression=None)) as raw:
        head = _open(archive_uri, lambda: raw.read(6))
    return next((name for magic, name in _MAGIC if head.startswith(magic)), "tar")


def index_tar(
    archive_uri: str, skip: Iterable[str] = frozenset(), taken: Iterable[str] = ()
) -> Iterator[MemberRef]:
    """One MemberRef per Member that ``iter_tar(archive_uri, skip, taken)`` yields, in the same
    order, with the same ``path`` and ``error`` (the empty-archive row included): the same pass,
    streaming past the members' bytes instead of keeping them. Raises as iter_tar does, after
    the refs before the damage (the end of the archive checked too)."""
    for path, info, _, error in _tar_rows(archive_uri, skip, taken, keep=False):
        yield MemberRef(path, error=error) if error or info is None else MemberRef(path, info.offset_data, info.size)


class _Window:
    """Reads of ascending byte ranges of a random-access file through one window of at least
    ARCHIVE_READ_BUFFER bytes: each refill is one read (one ranged GET on S3), never a read per
    member; bytes between the ranges are skipped by starting the next window past them."""

    def __init__(self, archive_uri: str, f) -> None:
        self.uri, self.f, self.size = archive_uri, f, f.size()
        self.start, self.buf = 0, b""

    def read(self, offset: int, n: int) -> memoryview:
        if offset < 0 or offset + n > self.size:
            raise ArchiveError(self.uri, f"changed or truncated since it was indexed ({n} bytes at byte {offset} "
                               f"of an archive of {self.size} bytes)")
        end = self.start + len(self.buf)
        if not (self.start <= offset and offset + n <= end):
            keep = self.buf[offset - self.start:] if self.start <= offset < end else b""
            at = offset + len(keep)
            more = _open(self.uri, lambda: self.f.read_at(min(max(offset + n - at, ARCHIVE_READ_BUFFER),
                                                                self.size - at), at))
            self.start, self.buf = offset, keep + more
            if len(self.buf) < n:
                raise ArchiveError(self.uri, f"changed or truncated since it was indexed (byte {at + len(more)} "
                                   f"is its end, {self.size} bytes were expected)")
        return memoryview(self.buf)[offset - self.start:offset - self.start + n]


def read_tar_members(archive_uri: str, refs: Sequence[MemberRef]) -> Iterator[Member]:
    """The Members of ``refs`` (from :func:`index_tar`, in ascending offsets) of a plain tar: a
    ref with ``error`` is ``Member(path, error=error)``, any other ``size`` bytes read at its
    ``offset``, after its header there is checked (a regular file of that size).

    The archive is read from the first ref on, in windows of ARCHIVE_READ_BUFFER bytes (a few
    large ranged GETs on S3). Raises ArchiveError naming the archive when it is compressed
    (index it, but read it with iter_tar) or its bytes are not what the index says (changed or
    truncated since), FileNotFoundError when it does not exist."""
    archive_uri = archive_uri.rstrip("/")
    first = next((ref for ref in refs if not ref.error and ref.offset >= 0), None)
    if first is None:
        yield from (Member(ref.path, error=ref.error) for ref in refs)
        return
    fs, path = storage.resolve(archive_uri)
    with _open(archive_uri, lambda: fs.open_input_file(path)) as f:
        window = _Window(archive_uri, f)
        # The first bytes tell the compression: in the first window when it starts near them.
        near = first.offset - tarfile.BLOCKSIZE < ARCHIVE_READ_BUFFER // 16
        head = window.read(0, min(6, window.size)) if near else _open(archive_uri, lambda: f.read_at(6, 0))
        kind = next((name for magic, name in _MAGIC if bytes(head).startswith(magic)), "tar")
        if kind != "tar":
            raise ArchiveError(archive_uri, f"a {kind}-compressed archive: only a plain tar's members are "
                               "read by range; read it whole (iter_tar)")
        for ref in refs:
            if ref.error or ref.offset < 0:
                yield Member(ref.path, error=ref.error)
                continue
            try:
                block = bytes(window.read(ref.offset - tarfile.BLOCKSIZE, tarfile.BLOCKSIZE))
                header = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError:
                header = None
            if header is None or header.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE) \
                    or header.size != ref.size:
                raise ArchiveError(archive_uri, f"changed since it was indexed, or {ref.path} is a sparse file "
                                   f"(read those whole): no file of {ref.size} bytes at byte {ref.offset}")
            yield Member(ref.path, bytes(window.read(ref.offset, ref.size)))


# ------------------------------------------------------------------------ the registry


@dataclass(frozen=True)
class ContainerReader:
    """A kind of container of frames: the names it has and how its members are streamed.

    ``read(uri, skip, taken)`` yields every member once, in order, as :func:`iter_tar` documents
    (Members with ``error`` for what cannot be used, ``skip``: URIs already done, ``taken``: URIs
    of other objects below the container's URI) and raises ArchiveError for damage."""

    kind: str
    extensions: tuple[str, ...]  # lower case, with the dot
    read: Callable[[str, Iterable[str], Iterable[str]], Iterator[Member]]


CONTAINER_READERS: tuple[ContainerReader, ...] = (
    ContainerReader("tar", (".tar", ".tar.gz", ".tgz"), iter_tar),
)
ARCHIVE_EXTENSIONS: tuple[str, ...] = tuple(ext for r in CONTAINER_READERS for ext in r.extensions)


def reader_for(path: str) -> ContainerReader | None:
    """The reader of the container named ``path`` (by its longest matching extension), or None."""
    lower = path.lower()
    best = max(((len(ext), r) for r in CONTAINER_READERS for ext in r.extensions if lower.endswith(ext)),
               key=lambda t: t[0], default=None)
    return best[1] if best else None


def is_archive(path: str) -> bool:
    """Whether ``path`` names a container of frames that a registered reader reads."""
    return reader_for(path) is not None


def iter_archive(
    archive_uri: str, skip: Iterable[str] = frozenset(), taken: Iterable[str] = ()
) -> Iterator[Member]:
    """The members of the container at ``archive_uri``, streamed by its kind's reader (a name
    without a registered extension is read as a tar, which tells by the bytes)."""
    reader = reader_for(archive_uri) or CONTAINER_READERS[0]
    return reader.read(archive_uri, skip, taken)

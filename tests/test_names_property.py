"""Property test of the naming rules: random trees of odd names, listed and expanded as infer does.

For every seeded tree (dots, ``..``, unicode, names that are not UTF-8, long names, names that
differ only by extension, ``X_L.png`` beside frames, nested folders, archives with ``./``
duplicates, climbing names, links, folders and empty archives):

- rows = objects: every file is one listing row, or one row per archive member (an empty
  archive: one row), or a label (``--labels`` = ``--images``); nothing vanishes;
- every row's URI is valid UTF-8 and distinct from every other row's;
- every mask path of a row that is not an error stays below ``<output>/masks/``, is distinct,
  is no folder of another mask, and can really be written;
- a rerun with all those URIs done has nothing left to do, and names every row as before.
"""

from __future__ import annotations

import io
import os
import random
import re
import tarfile
from collections import Counter

import pytest

from segray import sources
from segray.layout import is_image

BASES = ["a", "X", "x", "..", "...", ".hidden", "é", "日本語", "sp ace", "q?#%", "a\\b", "caf\\xe9", "-", "x.jpg"]
EXTS = [".png", ".jpg", ".JPEG", ".txt", "", ".png.png", "_L.png", ".jpg.png", ".tar", ".tar.gz", ".tgz"]
NOT_UTF8 = b"caf\xe9"
DUPLICATE = re.compile(r"( \(duplicate \d+\))+$")
CLASHING_MEMBERS = ["a.png", "./a.png", "/a.png", "x.jpg", "x.jpg.png/y.png", "d/a.png", "d/./a.png", "x.jpg.png"]
MEMBER_PREFIXES = ["", "", "./", "/", "../", "a/../", "d/", "d/./", ".//"]


def _segment(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.06:
        return NOT_UTF8 + rng.choice([".png", ".tar", ".txt"]).encode()
    if roll < 0.09:  # prints like the one above
        return b"caf\\xe9" + rng.choice([".png", ".tar", ".txt"]).encode()
    if roll < 0.14:  # long: around the 255-byte limit of a name (and the 251 left for the mask's .png)
        ext = rng.choice([".png", ".jpg", ".txt"]).encode()
        return b"L" * (rng.randrange(240, 256) - len(ext)) + ext
    name = (rng.choice(BASES) + rng.choice(EXTS)).encode()
    return name if name not in (b".", b"..") else name + b".png"


def _archive(rng: random.Random) -> bytes:
    """A random archive (plain or gzip) of odd member names, links and folders; maybe empty."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=rng.choice(["w", "w:gz"]), format=tarfile.GNU_FORMAT) as tar:
        for _ in range(rng.randrange(0, 8)):
            roll = rng.random()
            if rng.random() < 0.5:  # names that clash: duplicates after cleaning, a mask and a folder
                name = rng.choice(CLASHING_MEMBERS)
            else:
                name = rng.choice(MEMBER_PREFIXES) + _segment(rng).decode("utf-8", "surrogateescape")
            info = tarfile.TarInfo(name)
            if roll < 0.1:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            if roll < 0.2:
                info.type, info.linkname = rng.choice([tarfile.SYMTYPE, tarfile.LNKTYPE]), "a.png"
                tar.addfile(info)
                continue
            data = rng.randbytes(rng.randrange(0, 50))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _tree(root: bytes, rng: random.Random) -> None:
    """Random files below ``root``."""
    for _ in range(rng.randrange(10, 40)):
        folder = root
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            folder = folder + b"/" + _segment(rng)
        path = folder + b"/" + _segment(rng)
        try:
            os.makedirs(folder, exist_ok=True)
            if os.path.lexists(path):
                continue
            if path.lower().endswith((b".tar", b".tar.gz", b".tgz")) and rng.random() < 0.8:
                data = _archive(rng)
            else:
                data = rng.randbytes(rng.randrange(0, 20))  # an archive's name on bytes that are none
            with open(path, "wb") as f:
                f.write(data)
        except (FileExistsError, NotADirectoryError):
            continue  # a file where a folder was drawn (or the reverse): draw again
        if rng.random() < 0.1:  # a frame beside it, or its colour label
            twin = path.rsplit(b".", 1)[0] + rng.choice([b".png", b".jpg", b"_L.png"])
            if not os.path.lexists(twin):
                with open(twin, "wb") as f:
                    f.write(b"t")
    if rng.random() < 0.3:
        os.symlink(root + b"/nowhere", root + b"/broken.png")


def _objects(root: bytes, output: str | None) -> list[tuple[str, int, bool]]:
    """What is on disk, seen without segray: every file (and link) below ``root`` but the
    output, as (its display URI, the rows it makes if expanded as an archive: its members that
    are not folders, at least 1; 1 for a tar that tarfile cannot read or anything else, whether
    its path is UTF-8)."""
    out = os.fsencode(output) if output else None
    objects: list[tuple[str, int, bool]] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(folder, d) != out]
        for name in files:
            path = os.path.join(folder, name)
            rows = 1
            try:
                with tarfile.open(path) as tar:
                    rows = max(1, sum(1 for m in tar.getmembers() if not m.isdir()))
            except (tarfile.TarError, OSError, EOFError):
                pass
            uri = path.decode("utf-8", "backslashreplace")
            objects.append((uri, rows, uri == path.decode("utf-8", "replace")))
    return sorted(objects)


def _rows(listing: sources.Listing, images: str, done: frozenset[str] = frozenset()) -> list[tuple[str, str | None]]:
    """(URI, mask rel or None for an error row) of every row the job makes, archives expanded."""
    rows: list[tuple[str, str | None]] = []
    for item in listing.inputs:
        if item.kind == sources.KIND_ARCHIVE:
            rel = sources.input_rel(images, item.uri)
            skip = set(item.done) | done
            try:
                for m in sources.iter_archive(item.uri, skip, item.taken):
                    uri = sources.member_uri(item.uri, m.path) if m.path else item.uri
                    ok = not m.error and is_image(m.path)
                    rows.append((uri, sources.mask_rel(f"{rel}/{m.path}") if ok else None))
            except sources.ArchiveError:
                if item.uri not in skip:  # its error row, unless made by an earlier run
                    rows.append((item.uri, None))
        elif item.kind == sources.KIND_IMAGE:
            rows.append((item.uri, sources.mask_rel(sources.input_rel(images, item.uri))))
        else:
            assert item.kind == sources.KIND_OTHER and item.error
            rows.append((item.uri, None))
    return rows


@pytest.mark.parametrize("seed", range(200))
def test_every_object_is_one_row_with_a_distinct_name_and_a_safe_distinct_mask(tmp_path, seed):
    rng = random.Random(seed)
    images = str(tmp_path / "img")
    _tree(os.fsencode(images), rng)
    same_folder = rng.random() < 0.3
    output = None
    if rng.random() < 0.3:  # the job's output inside --images, with files of an earlier run
        output = os.path.join(images, "out")
        os.makedirs(os.path.join(output, "masks"), exist_ok=True)
        with open(os.path.join(output, "masks", "old.png.png"), "wb") as f:
            f.write(b"m")
    try:
        listing = sources.list_inputs(images, labels=images if same_folder else None, output=output)
    except sources.SourceError as e:
        assert same_folder and "nothing to process" in str(e)  # a tree of labels only
        return
    rows = _rows(listing, images)
    uris = [u for u, _ in rows]
    # Each object on disk is one listing row (named by its URI, " (duplicate N)" added when two
    # names print alike) or a label; an archive row stands for its members.
    objects = _objects(os.fsencode(images), output)
    listed = Counter(DUPLICATE.sub("", i.uri) for i in listing.inputs)
    on_disk = Counter(u for u, _, _ in objects)
    assert not listed - on_disk
    labels = on_disk - listed
    assert sum(labels.values()) == listing.label_files and all(u.lower().endswith("_l.png") for u in labels)
    members = {u: n for u, n, utf8 in objects if utf8}
    assert len(rows) == sum(members[i.uri] if i.kind == sources.KIND_ARCHIVE else 1 for i in listing.inputs)
    assert len(set(uris)) == len(uris), [u for u in uris if uris.count(u) > 1]
    for u in uris:
        u.encode("utf-8")  # strict: a Parquet string

    out = str(tmp_path / "job-output")
    masks_root = os.path.join(out, "masks") + os.sep
    masks = [m for _, m in rows if m is not None]
    assert len(set(masks)) == len(masks)
    paths = sorted(os.path.normpath(os.path.join(masks_root, m)) for m in masks)
    for p in paths:
        assert p.startswith(masks_root) and p != masks_root.rstrip(os.sep)
    folders = {os.path.dirname(p) for p in paths}
    while len(folders) > 1:
        parents = {os.path.dirname(f) for f in folders} - folders
        if not parents - {os.path.dirname(masks_root.rstrip(os.sep))}:
            break
        folders |= parents
    assert not folders & set(paths)  # no mask is a folder of other masks
    for p in paths:  # and the file system agrees
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(b"m")

    # A rerun over the same output: nothing left, every row named as before.
    again = sources.list_inputs(images, labels=images if same_folder else None, output=output, done=frozenset(uris))
    assert again.skipped == sum(1 for i in listing.inputs if i.kind != sources.KIND_ARCHIVE)
    assert _rows(again, images, frozenset(uris)) == []
    assert [u for u, _ in _rows(sources.list_inputs(images, labels=images if same_folder else None, output=output),
                                images)] == uris

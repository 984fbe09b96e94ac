"""The rules for input names: which relative paths can name an input, and the mask path each gets.

An input's name ends up in an output path (``<output>/masks/``) and is read back from the store
by that name, so a name must be one that every store and file system reads as written: no
empty, ``.`` or ``..`` segment, no leading ``/``, no NUL, valid UTF-8, segments within
MAX_NAME_BYTES. Shared by the listing (segray/sources.py) and the archive reader
(segray/archives.py).
"""

from __future__ import annotations

import os
import posixpath

from segray import storage

MASK_SUFFIX = ".png"  # appended to the input's path: a/X.jpg -> masks/a/X.jpg.png
# The longest file name of common file systems (ext4, XFS, APFS, NTFS: 255 bytes / UTF-16 units).
MAX_NAME_BYTES = 255


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


def parents(rel: str) -> list[str]:
    """``a/b/c`` -> ``["a", "a/b"]``."""
    parts = rel.split("/")
    return ["/".join(parts[:k]) for k in range(1, len(parts))]


def unique(name: str, taken: set[str]) -> str:
    """``name``, or ``name (duplicate N)`` with the smallest N >= 2 not in ``taken``."""
    if name not in taken:
        return name
    n = 2
    while f"{name} (duplicate {n})" in taken:
        n += 1
    return f"{name} (duplicate {n})"


def lies_below(uri: str, root: str) -> bool:
    """``uri`` is a plain path strictly below ``root``: no ``.``/``..``/empty segment anywhere.
    The last check before an output is written at a path made from an input's name."""
    body = uri.split("://", 1)[-1].replace(os.sep, "/")
    top = root.split("://", 1)[-1].replace(os.sep, "/").rstrip("/")
    return posixpath.normpath(body) == body and body.startswith(top + "/")

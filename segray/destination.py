"""Where prepare writes: the rules of a prepared dataset's folder (``--dest``) that keep a job from
deleting or mixing what it did not write (segray/prepare.py's module docstring has the protocol).

A ``dest`` must lie outside the source; a non-empty one must be an earlier segray dataset or
hold only the leftovers of interrupted runs, which in-progress manifests
(``.segray-prepare-<run>.json``) name; anything else in it is foreign and never touched.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import time
import uuid
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from segray import storage
from segray.dataset import DATASET_FILE, DatasetError, DatasetInfo, is_shard_path, listed_files, load_info, split_uri
from segray.errors import SegrayError
from segray.layout import SPLITS

log = logging.getLogger(__name__)

# The in-progress manifest of a run: ``<dest>/.segray-prepare-<run>.json``.
MANIFEST_FORMAT = "segray-prepare-run/1"
_MANIFEST = re.compile(r"^\.segray-prepare-([0-9A-Za-z-]+)\.json$")
# Files segray's own storage helpers may leave at the top of dest when killed (the write probe
# of storage.check_writable, the temporary name of storage.write_bytes): never counted as
# foreign, never deleted.
_OWN_TEMPORARY = re.compile(r"^(\.segray-write-probe-[0-9a-f]+|dataset\.json\.tmp-[0-9a-f]+)$")


class PrepareError(SegrayError, ValueError):
    """The source cannot be prepared; the message names the file(s) and the fix."""



def _segments(uri: str) -> tuple[str, tuple[str, ...]]:
    """(scheme, path segments) of a normalized URI; local paths with symlinks resolved."""
    if storage.is_s3(uri):
        return "s3", tuple(p for p in uri[len(storage.S3_SCHEME):].split("/") if p)
    return "file", tuple(p for p in os.path.realpath(uri).split(os.sep) if p)


def check_dest_outside_source(source: str, dest: str) -> None:
    """Refuse a ``dest`` that is ``source``, lies inside it or contains it (normalized URIs)."""
    (s_scheme, s), (d_scheme, d) = _segments(source), _segments(dest)
    if s_scheme != d_scheme:
        return
    if s == d:
        where = f"--dest {dest} is the --source {source}"
    elif d[: len(s)] == s:
        where = f"--dest {dest} lies inside --source {source}"
    elif s[: len(d)] == d:
        where = f"--source {source} lies inside --dest {dest}"
    else:
        return
    raise PrepareError(
        f"{where}; prepare never writes where it reads (a rerun would replace files of the source): "
        "pass a --dest outside the source, e.g. a sibling folder such as "
        f"{_sibling(source)}"
    )


def _sibling(source: str) -> str:
    if storage.is_s3(source):
        parent, name = posixpath.split(source[len(storage.S3_SCHEME):].rstrip("/"))
        return storage.S3_SCHEME + posixpath.join(parent, f"{name}-prepared") if parent else f"{source}/../prepared"
    parent, name = os.path.split(source.rstrip(os.sep))
    return os.path.join(parent, f"{name}-prepared")


@dataclass
class DestState:
    """What an existing ``dest`` holds, as prepare sees it (relative ``/`` paths)."""

    info: DatasetInfo | None = None  # the earlier dataset's dataset.json, if any
    dataset: list[str] = field(default_factory=list)  # the files it lists
    leftovers: list[str] = field(default_factory=list)  # files of interrupted runs (manifests last)
    foreign: list[str] = field(default_factory=list)  # files segray did not write: never touched


def _read_manifest(dest: str, rel: str) -> dict | None:
    try:
        raw = json.loads(storage.read_bytes(storage.join(dest, rel)))
    except (ValueError, storage.StorageError):
        return None
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT or not isinstance(raw.get("replaces"), list):
        return None
    return raw


def inspect_dest(dest: str) -> DestState:
    """Sort the files below ``dest`` into the earlier dataset, leftovers of interrupted runs
    (named by an in-progress manifest) and foreign files; reads only. Raises PrepareError for
    a ``dest`` that is a file or has a ``dataset.json`` that segray did not write."""
    fs, path = storage.resolve(dest)
    if fs.get_file_info(path).type == pafs.FileType.File:
        raise PrepareError(f"--dest {dest} is a file; pass a folder (prefix) for the prepared dataset")
    rels = [storage.relative(dest, u) for u in storage.list_files(dest)]
    state = DestState()
    present = set(rels)
    if DATASET_FILE in present:
        try:
            state.info = load_info(dest)
            state.dataset = [rel for rel in listed_files(dest, state.info) if rel in present]
        except (DatasetError, TypeError) as e:
            raise PrepareError(
                f"--dest {dest} holds a {DATASET_FILE} that is not a segray dataset ({storage._first_line(e)}); "
                "prepare does not replace what it did not write: pass an empty or new --dest"
            ) from None
    live = set(state.dataset) | {DATASET_FILE}
    leftovers: list[str] = []
    manifests: list[str] = []
    for rel in rels:
        m = _MANIFEST.match(rel)
        manifest = _read_manifest(dest, rel) if m else None
        if manifest is None:
            continue
        run = m.group(1)
        manifests.append(rel)
        leftovers += [r for r in rels if r.split("/", 1)[0] in SPLITS and posixpath.basename(r).startswith(f"{run}_")]
        leftovers += [r for r in manifest["replaces"] if isinstance(r, str) and is_shard_path(r) and r in present]
    state.leftovers = sorted(set(leftovers) - live) + manifests
    known = live | set(state.leftovers)
    state.foreign = [r for r in rels if r not in known and not _OWN_TEMPORARY.match(r)]
    return state


def check_dest(dest: str) -> DestState:
    """``inspect_dest``, refusing a non-empty ``dest`` that is no segray dataset."""
    state = inspect_dest(dest)
    if state.foreign and state.info is None:
        more = f" and {len(state.foreign) - 1} more" if len(state.foreign) > 1 else ""
        raise PrepareError(
            f"--dest {dest} is not empty and not a segray dataset (no {DATASET_FILE}; it holds "
            f"{storage.join(dest, state.foreign[0])}{more}); prepare never deletes files it did not write: "
            "pass an empty or new --dest, or delete that folder yourself if nothing in it is needed"
        )
    return state


def _delete_files(dest: str, rels: list[str]) -> None:
    """Delete these files (never a folder) below ``dest``; missing ones are fine. Local split
    folders left empty are removed too (``rmdir`` removes only an empty folder)."""
    fs, root = storage.resolve(dest)
    for rel in rels:
        path = storage.resolve(storage.join(dest, *rel.split("/")))[1]
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)
    if isinstance(fs, pafs.LocalFileSystem):
        folders = {"/".join(rel.split("/")[:i]) for rel in rels for i in range(1, rel.count("/") + 1)}
        for folder in sorted(folders, key=len, reverse=True):
            try:
                os.rmdir(os.path.join(root, *folder.split("/")))
            except OSError:
                pass  # not empty (foreign files, other shards) or already gone


def _run_files(dest: str, run: str) -> list[str]:
    """The shard files that run ``run`` wrote, relative to ``dest``."""
    out = []
    for split in SPLITS:
        for u in storage.list_files(split_uri(dest, split)):
            rel = storage.relative(dest, u)
            if posixpath.basename(rel).startswith(f"{run}_"):
                out.append(rel)
    return sorted(out)


def is_manifest(rel: str) -> bool:
    """``rel`` is the name of an in-progress manifest at the top of a dest."""
    return bool(_MANIFEST.match(rel))


def _new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:12]


def _by_split(rels: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for rel in sorted(rels):
        out.setdefault(rel.split("/", 1)[0], []).append(rel)
    return out


def _discard_run(dest: str, run: str, manifest_rel: str) -> None:
    """After a failed run: delete the shards it wrote, then its manifest, unless some shard
    could not be deleted (the manifest then keeps them recognisable for the next run)."""
    try:
        _delete_files(dest, _run_files(dest, run))
        if not _run_files(dest, run):
            _delete_files(dest, [manifest_rel])
    except Exception as e:  # noqa: BLE001 - the original error is the one to report
        log.warning("prepare: could not clean up run %s in %s: %s", run, dest, e)

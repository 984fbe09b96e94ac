"""The one rule that turns a URI into a pyarrow filesystem and a path.

Every location in segray is a URI: ``s3://bucket/prefix`` or a local path (``file://`` allowed).
S3 settings come only from the standard AWS environment, read at call time in whichever
process runs the code (driver or Ray worker):

- ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``: endpoint of a non-AWS store (moto, MinIO);
- ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` or an instance role;
- ``AWS_REGION`` / ``AWS_DEFAULT_REGION``.

Nothing here holds or logs a secret.
"""

from __future__ import annotations

import functools
import mimetypes
import os
import posixpath
import re
import stat
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

from segray.errors import SegrayError

S3_SCHEME = "s3://"
# Object stores throttle (503 SlowDown) and drop connections; the AWS SDK's standard retry
# strategy with exponential back-off absorbs that, but its default of 3 attempts does not.
S3_MAX_ATTEMPTS = int(os.environ.get("SEGRAY_S3_MAX_ATTEMPTS", "10"))


class StorageError(SegrayError, RuntimeError):
    """A URI that cannot be read or written; the message names the URI and the fix."""


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


def _s3_settings() -> tuple[str | None, str | None, str | None]:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    # The key id is part of the cache key so that a change of credentials gets a new client;
    # it is never logged or stored.
    key_id = os.environ.get("AWS_ACCESS_KEY_ID")
    return endpoint, region, key_id


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3FileSystem with the retry strategy and timeouts kept across pickling.

    pyarrow (26) pickles an S3FileSystem without its ``retry_strategy`` and timeouts, so the
    copy that Ray sends to a Ray Data write task or a Ray Train worker (checkpoint uploads)
    would fall back to pyarrow's 3 attempts. This subclass pickles its own settings (never
    credentials: pyarrow reads those from the environment of the process that uses it)."""

    def __init__(self, settings: dict) -> None:
        self._segray_settings = dict(settings)
        kwargs = dict(settings)
        attempts = kwargs.pop("max_attempts")
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts), **kwargs)

    def __reduce__(self):
        return (RetryingS3FileSystem, (self._segray_settings,))


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None, key_id: str | None) -> pafs.S3FileSystem:
    kwargs: dict = {
        "max_attempts": S3_MAX_ATTEMPTS,
        "connect_timeout": 10.0,
        "request_timeout": 60.0,
        # Small objects in one idempotent PutObject instead of a multipart upload opened at
        # open(): a retried CompleteMultipartUpload whose first answer was lost can fail.
        "allow_delayed_open": True,
    }
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "http"
        # A custom endpoint (moto, MinIO) has no region lookup; AWS's default is us-east-1.
        kwargs["region"] = region or "us-east-1"
    elif region:
        kwargs["region"] = region
    return RetryingS3FileSystem(kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Turn ``s3://bucket/key`` or a local path into ``(filesystem, path)``.

    The path is ``bucket/key`` for S3 and an absolute path for local files.
    """
    if not uri:
        raise StorageError("empty URI: pass s3://bucket/prefix or a local path")
    if is_s3(uri):
        path = uri[len(S3_SCHEME):].strip("/")
        if not path:
            raise StorageError(f"{uri}: no bucket in the URI; use s3://bucket/prefix")
        return _s3_filesystem(*_s3_settings()), path
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    elif "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise StorageError(f"{uri}: unsupported scheme {scheme!r}; use s3://bucket/prefix or a local path")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def normalize(uri: str) -> str:
    """A URI every process of the cluster reads the same way: local paths become absolute
    (Ray workers run in other working directories than the driver)."""
    if is_s3(uri):
        return S3_SCHEME + uri[len(S3_SCHEME):].rstrip("/")
    _, path = resolve(uri)
    return path


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/`` (S3) or the local separator."""
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *[p.strip("/") for p in parts])
    return os.path.join(uri, *parts)


def relative(root: str, uri: str) -> str:
    """The part of ``uri`` below ``root``, exactly (one ``/`` separator removed, nothing else:
    an S3 key ``prefix//x.png`` is ``/x.png`` below ``prefix``, not ``x.png``, another object).
    ``""`` when ``uri`` is ``root`` itself."""
    root_s = root.rstrip("/") if root.rstrip("/") else root
    if uri == root_s or uri == root:
        return ""
    sep = "" if root_s.endswith("/") else "/"
    if not uri.startswith(root_s + sep):
        raise ValueError(f"{uri} is not below {root}")
    return uri[len(root_s) + len(sep):].replace(os.sep, "/")


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


# The AWS SDK writes an error answer's body into the buffer of a GetObject, which pyarrow sizes
# like the object: the ~250-byte XML of a 503 SlowDown does not fit the buffer of a smaller
# object, and the SDK reports INTERNAL_FAILURE, which it never retries (apache/doris#66557
# describes the same SDK behaviour). read_bytes retries that case itself.
_OVERFLOWED_ERROR_BODY = "Failed to flush response stream"


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        for attempt in range(S3_MAX_ATTEMPTS):
            try:
                # compression=None: pyarrow would otherwise decompress by extension ("x.png.gz").
                with fs.open_input_stream(path, compression=None) as f:
                    return f.read()
            except OSError as e:
                if isinstance(e, FileNotFoundError) or _OVERFLOWED_ERROR_BODY not in str(e) \
                        or attempt + 1 >= S3_MAX_ATTEMPTS:
                    raise
                time.sleep(min(0.05 * 2**attempt, 2.0))
        raise AssertionError("unreachable")
    except FileNotFoundError as e:
        if isinstance(fs, pafs.LocalFileSystem) and _undecodable_exists(path):
            raise StorageError(
                f"{uri}: the file name is not valid UTF-8 (shown with \\x escapes); rename the file"
            ) from None
        raise StorageError(f"{uri}: not found") from e


_ESCAPED_BYTE = re.compile(r"\\x([89a-f][0-9a-f])")


def printable(name: str) -> str:
    """A name as Python decoded it (a local path from os.walk, a tar member name: bytes that are
    not UTF-8 as surrogates) -> valid UTF-8 text, those bytes shown as ``\\xNN``. Parquet strings
    and S3 keys are UTF-8 only, so such a file can be named in messages and error rows, but a
    local one not read back by that name (see read_bytes)."""
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no byte made
        raw = name.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


def _undecodable_exists(path: str) -> bool:
    raw = _ESCAPED_BYTE.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)), path)
    return raw != path and os.path.lexists(raw)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object. Local files are written to a temporary name and renamed, so a
    reader never sees half a file (S3 puts are atomic already)."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path, metadata=content_metadata(path)) as f:
        f.write(data)


def content_metadata(path: str) -> dict[str, str]:
    """The object's ``Content-Type`` from its extension (``index.html`` -> ``text/html``, so that a
    browser shows a report from S3 instead of downloading it); {} for unknown extensions."""
    kind = _CONTENT_TYPES.get(posixpath.splitext(path)[1].lower()) or mimetypes.guess_type(path)[0]
    return {"Content-Type": kind} if kind else {}


_CONTENT_TYPES = {".parquet": "application/vnd.apache.parquet", ".json": "application/json", ".mp4": "video/mp4",
                  ".png": "image/png", ".html": "text/html", ".svg": "image/svg+xml"}


def write_file(uri: str, local_path: str) -> None:
    """Upload the local file ``local_path`` as the object ``uri``, 8 MiB at a time (never the whole
    file in memory). A local destination is written to a temporary name beside it and renamed,
    as in :func:`write_bytes`; on S3 the object appears when the upload completes."""
    chunk = 8 * 2**20
    fs, path = resolve(uri)
    with open(local_path, "rb") as src:
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    while data := src.read(chunk):
                        f.write(data)
                os.replace(tmp, path)
            finally:
                if os.path.lexists(tmp):
                    os.remove(tmp)
            return
        with fs.open_output_stream(path, metadata=content_metadata(path)) as f:
            while data := src.read(chunk):
                f.write(data)


def list_files(uri: str) -> list[str]:
    """All files below ``uri`` (any depth), as URIs, sorted. Empty if the prefix does not exist.

    The datasets' own listing (prepare, train); inference lists with :func:`list_entries`."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type == pafs.FileType.NotFound:
        return []
    out = []
    if isinstance(fs, pafs.LocalFileSystem):
        # os.walk, not pyarrow: pyarrow's listing fails as a whole on one file name that is not
        # UTF-8; here such a name is listed in its \\x-escaped form and fails alone when read.
        for folder, _, names in os.walk(path):
            for name in names:
                full = os.path.join(folder, name)
                if os.path.isfile(full):
                    out.append(join(uri, printable(os.path.relpath(full, path))))
        return sorted(out)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    for entry in fs.get_file_info(selector):
        if entry.type == pafs.FileType.File:
            # Exactly one separator off: "prefix//x.png" is "/x.png" below prefix, another object
            # than "prefix/x.png" (and not joined with join(), which strips slashes).
            rel = entry.path[len(path) + 1:]
            out.append(f"{uri.rstrip('/')}/{rel}")
    return sorted(out)


@dataclass(frozen=True)
class Entry:
    """One object below a listed URI, named exactly.

    ``rel``: its path below the listed URI as the store names it (S3: the key's tail, byte for
    byte, ``.``, ``..`` and empty segments included; local: the path through the followed
    folders, bytes that are not UTF-8 shown as ``\\xNN``); ``""`` when the URI is the object.
    ``uri``: the listed URI + ``/`` + ``rel``. ``error``: why it cannot be read as a file (a
    broken link, a link loop, a fifo, an unreadable folder, a name that is not UTF-8), else ``""``.
    """

    uri: str
    rel: str
    error: str = ""


def list_entries(uri: str, prune: tuple[str, ...] = ()) -> list[Entry]:
    """Every object below ``uri`` exactly once, sorted by URI; ``[]`` if nothing is there.

    Unlike :func:`list_files`, names are exact (S3 keys are listed with boto3: pyarrow folds a
    key ``a/`` into ``a``), local symlinked folders are followed (a link back to a folder being
    walked is one error entry, not a loop), and what cannot be read as a file is an entry with
    ``error`` instead of being left out. ``prune``: folders (URIs of the same store) whose files
    are not listed, whichever way they are reached (the job's output, a nested label folder).
    A zero-byte S3 key ending in ``/`` is a folder marker (what consoles create), not an object.
    """
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return _local_entries(uri, path, [resolve(p)[1] for p in prune if not is_s3(p)])
    return _s3_entries(uri, path, [resolve(p)[1] for p in prune if is_s3(p)])


# Why a local object is not a file, by its stat mode.
_SPECIAL_FILES = {stat.S_ISFIFO: "a fifo", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a character device",
                  stat.S_ISBLK: "a block device"}


def _local_entries(uri: str, path: str, prune: list[str]) -> list[Entry]:
    try:
        top = os.stat(path)
    except OSError:
        return []
    if not stat.S_ISDIR(top.st_mode):
        return [Entry(uri, "")] if stat.S_ISREG(top.st_mode) else [Entry(uri, "", _special(top.st_mode))]
    pruned = set()
    for p in prune:
        try:
            st = os.stat(p)
        except OSError:
            continue
        pruned.add((st.st_dev, st.st_ino))
    base = uri.rstrip("/") if uri.rstrip("/") else uri
    sep = "" if base.endswith("/") else "/"
    out: list[Entry] = []

    def entry(rel_raw: str, error: str = "") -> Entry:
        rel = printable(rel_raw)
        if not error and rel != rel_raw:
            error = "the name is not valid UTF-8 (shown with \\x escapes); rename the file"
        return Entry(f"{base}{sep}{rel}" if rel else uri, rel, error)

    # Depth first with an explicit stack (no recursion limit); `ancestors` are the (dev, inode)
    # of the folders on the way down, so that a link to one of them is reported, not followed.
    stack: list[tuple[str, str, frozenset]] = [(path, "", frozenset({(top.st_dev, top.st_ino)}))]
    while stack:
        folder, rel_folder, ancestors = stack.pop()
        try:
            with os.scandir(folder) as it:
                found = list(it)
        except OSError as e:
            out.append(entry(rel_folder, f"cannot list this folder ({e.strerror or e}); check its permissions"))
            continue
        for de in found:
            full, name = de.path, de.name
            rel = f"{rel_folder}/{name}" if rel_folder else name
            try:
                if de.is_file(follow_symlinks=False):  # the common case, from the folder listing alone
                    out.append(entry(rel))
                    continue
            except OSError:
                pass
            try:
                st = os.stat(full)  # follows links
            except OSError as e:
                if os.path.islink(full):
                    out.append(entry(rel, f"a broken symbolic link (to {printable(os.readlink(full))}); "
                                          "remove it or restore its target"))
                else:
                    out.append(entry(rel, f"cannot read ({e.strerror or e})"))
                continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in pruned:
                    continue
                if key in ancestors:
                    out.append(entry(rel, "a symbolic link to a folder that contains it (a loop); not followed"))
                    continue
                stack.append((full, rel, ancestors | {key}))
            elif stat.S_ISREG(st.st_mode):
                out.append(entry(rel))
            else:
                out.append(entry(rel, _special(st.st_mode)))
    return sorted(out, key=lambda e: (e.uri, e.error != ""))


def _special(mode: int) -> str:
    what = next((name for test, name in _SPECIAL_FILES.items() if test(mode)), "not a regular file")
    return f"{what}, not a file; remove it from the input folder"


@functools.lru_cache(maxsize=8)
def _s3_client(endpoint: str | None, region: str | None, key_id: str | None):
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS}, connect_timeout=10,
                    read_timeout=60, s3={"addressing_style": "path"} if endpoint else None)
    if endpoint and "://" not in endpoint:
        endpoint = f"http://{endpoint}"
    return boto3.client("s3", endpoint_url=endpoint, region_name=region or ("us-east-1" if endpoint else None),
                        config=config)


def _s3_entries(uri: str, path: str, prune: list[str]) -> list[Entry]:
    bucket, _, key = path.partition("/")
    client = _s3_client(*_s3_settings())
    from botocore.exceptions import ClientError

    if key:
        try:
            client.head_object(Bucket=bucket, Key=key)
            return [Entry(uri, "")]
        except ClientError:
            pass  # not an object (or not allowed to look): list it as a prefix
    prefix = f"{key}/" if key else ""
    pruned = [p.partition("/")[2] for p in prune if p.partition("/")[0] == bucket]
    base = f"{S3_SCHEME}{path}"
    out: list[Entry] = []
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", ()):
                k = obj["Key"]
                if k.endswith("/") and obj.get("Size", 0) == 0:
                    continue  # a folder marker
                if any(k.startswith(p + "/") for p in pruned):
                    continue
                out.append(Entry(f"{base}/{k[len(prefix):]}", k[len(prefix):]))
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return []
        raise StorageError(f"{uri}: cannot list ({code or _first_line(e)}); check the bucket and credentials") from e
    return sorted(out, key=lambda e: e.uri)


def delete(uri: str) -> None:
    """Delete a file or a whole prefix; no error if nothing is there."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def ensure_dir(uri: str) -> None:
    """Create a local folder and its parents. On S3 nothing is written: a prefix needs no folder,
    and pyarrow's create_dir would put a zero-byte ``key/`` marker at every level above it, that
    is, objects outside the job's output (a bucket that does not exist shows at the first write)."""
    fs, path = resolve(uri)
    if is_s3(uri):
        return
    fs.create_dir(path, recursive=True)


def check_writable(uri: str) -> None:
    """Write and delete a small probe object below ``uri``; raise StorageError naming the URI."""
    probe = join(uri, f".segray-write-probe-{uuid.uuid4().hex}")
    try:
        ensure_dir(uri)
        write_bytes(probe, b"ok")
        delete(probe)
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure means "not writable"; say why
        if is_s3(uri):
            bucket = uri[len(S3_SCHEME):].split("/", 1)[0]
            try:
                missing = resolve(S3_SCHEME + bucket)[0].get_file_info(bucket).type == pafs.FileType.NotFound
            except Exception:  # noqa: BLE001 - cannot tell; the general message below stands
                missing = False
            if missing:
                raise StorageError(f"{uri}: bucket {bucket!r} does not exist; create it first (segray never creates "
                                   "buckets)") from e
        raise StorageError(f"{uri}: not writable ({_first_line(e)}); check the path, bucket and credentials") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]

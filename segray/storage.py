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
import os
import posixpath
import uuid
from urllib.parse import urlparse

import pyarrow.fs as pafs

S3_SCHEME = "s3://"
# Object stores throttle (503 SlowDown) and drop connections; the AWS SDK's standard retry
# strategy with exponential back-off absorbs that, but its default of 3 attempts does not.
S3_MAX_ATTEMPTS = int(os.environ.get("SEGRAY_S3_MAX_ATTEMPTS", "10"))


class StorageError(RuntimeError):
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


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None, key_id: str | None) -> pafs.S3FileSystem:
    kwargs: dict = {
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
        "connect_timeout": 10.0,
        "request_timeout": 60.0,
    }
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "http"
        # A custom endpoint (moto, MinIO) has no region lookup; AWS's default is us-east-1.
        kwargs["region"] = region or "us-east-1"
    elif region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


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
    """The part of ``uri`` below ``root``, with ``/`` separators."""
    root_s, uri_s = root.rstrip("/"), uri
    if not uri_s.startswith(root_s):
        raise ValueError(f"{uri} is not below {root}")
    return uri_s[len(root_s):].lstrip("/").replace(os.sep, "/")


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise StorageError(f"{uri}: not found") from e


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
    with fs.open_output_stream(path) as f:
        f.write(data)


def list_files(uri: str) -> list[str]:
    """All files below ``uri`` (any depth), as URIs, sorted. Empty if the prefix does not exist."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type == pafs.FileType.NotFound:
        return []
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    out = []
    for entry in fs.get_file_info(selector):
        if entry.type == pafs.FileType.File:
            rel = entry.path[len(path):].lstrip("/")
            out.append(join(uri, rel))
    return sorted(out)


def delete(uri: str) -> None:
    """Delete a file or a whole prefix; no error if nothing is there."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def ensure_dir(uri: str) -> None:
    fs, path = resolve(uri)
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
        raise StorageError(f"{uri}: not writable ({_first_line(e)}); check the path, bucket and credentials") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]

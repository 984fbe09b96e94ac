import os

import pyarrow.fs as pafs
import pytest

from segray import storage


def test_resolve_local_and_file_scheme(tmp_path):
    fs, path = storage.resolve(str(tmp_path / "a"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "a")
    assert storage.resolve(f"file://{tmp_path}/a")[1] == str(tmp_path / "a")
    assert storage.normalize("rel/dir") == os.path.abspath("rel/dir")


def test_resolve_s3_uses_the_aws_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9999")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    fs, path = storage.resolve("s3://bucket/some/prefix/")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/some/prefix"
    assert fs.region == "eu-west-1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:8888")  # the S3-specific one wins
    fs2, _ = storage.resolve("s3://bucket")
    assert fs2 is not fs


def test_resolve_errors():
    with pytest.raises(storage.StorageError, match="no bucket"):
        storage.resolve("s3://")
    with pytest.raises(storage.StorageError, match="unsupported scheme 'gs'"):
        storage.resolve("gs://bucket/x")


def test_join_and_relative():
    assert storage.join("s3://b/p/", "x", "y.png") == "s3://b/p/x/y.png"
    assert storage.relative("s3://b/p", "s3://b/p/x/y.png") == "x/y.png"


def test_local_roundtrip(tmp_path):
    uri = str(tmp_path / "d" / "f.bin")
    storage.write_bytes(uri, b"abc")
    assert storage.read_bytes(uri) == b"abc" and storage.exists(uri)
    assert storage.list_files(str(tmp_path)) == [uri]
    assert not [p for p in os.listdir(tmp_path / "d") if ".tmp-" in p]  # atomic rename left nothing
    storage.delete(str(tmp_path / "d"))
    assert not storage.exists(uri)
    with pytest.raises(storage.StorageError, match="not found"):
        storage.read_bytes(uri)


def test_s3_roundtrip_against_moto_server(s3_prefix):
    uri = storage.join(s3_prefix, "a", "b.txt")
    storage.write_bytes(uri, b"hello")
    storage.write_bytes(storage.join(s3_prefix, "c.txt"), b"x")
    assert storage.read_bytes(uri) == b"hello"
    assert storage.list_files(s3_prefix) == [storage.join(s3_prefix, "a/b.txt"), storage.join(s3_prefix, "c.txt")]
    storage.check_writable(s3_prefix)
    storage.delete(s3_prefix)
    assert storage.list_files(s3_prefix) == []


def test_unwritable_destinations_name_the_uri(s3_server, tmp_path):
    with pytest.raises(storage.StorageError, match=r"s3://no-such-bucket-here/x: not writable"):
        storage.check_writable("s3://no-such-bucket-here/x")
    ro = tmp_path / "ro"
    ro.write_text("a file, not a folder")
    with pytest.raises(storage.StorageError, match="not writable"):
        storage.check_writable(str(ro / "sub"))

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


def test_s3_objects_carry_the_content_type_of_their_extension(s3_prefix, tmp_path):
    """A report's index.html on S3 opens in a browser instead of downloading (text/html)."""
    import boto3

    bucket, _, key = s3_prefix[len("s3://"):].partition("/")
    local = tmp_path / "clip.mp4"
    local.write_bytes(b"\0" * 10)
    storage.write_bytes(f"{s3_prefix}/report/index.html", b"<html></html>")
    storage.write_bytes(f"{s3_prefix}/report/a.png", b"png")
    storage.write_bytes(f"{s3_prefix}/p/part-1.parquet", b"PAR1")
    storage.write_bytes(f"{s3_prefix}/notes.unknownext", b"x")
    storage.write_file(f"{s3_prefix}/overlays/clip.mp4", str(local))
    s3 = boto3.client("s3")
    types = {name: s3.head_object(Bucket=bucket, Key=f"{key}/{name}")["ContentType"]
             for name in ("report/index.html", "report/a.png", "p/part-1.parquet", "overlays/clip.mp4", "notes.unknownext")}
    assert types["report/index.html"] == "text/html" and types["report/a.png"] == "image/png"
    assert types["p/part-1.parquet"] == "application/vnd.apache.parquet" and types["overlays/clip.mp4"] == "video/mp4"
    assert types["notes.unknownext"] not in ("text/html", "image/png")


def test_unwritable_destinations_name_the_uri(s3_server, tmp_path):
    with pytest.raises(storage.StorageError, match=r"s3://no-such-bucket-here/x: bucket 'no-such-bucket-here' does not exist"):
        storage.check_writable("s3://no-such-bucket-here/x")
    ro = tmp_path / "ro"
    ro.write_text("a file, not a folder")
    with pytest.raises(storage.StorageError, match="not writable"):
        storage.check_writable(str(ro / "sub"))


def test_relative_is_exact():
    assert storage.relative("s3://b/p", "s3://b/p//x.png") == "/x.png"  # another object than p/x.png
    assert storage.relative("s3://b/p/", "s3://b/p/a/../x.png") == "a/../x.png"
    assert storage.relative("s3://b/p", "s3://b/p") == ""
    assert storage.relative("/", "/x/y") == "x/y"
    with pytest.raises(ValueError):
        storage.relative("s3://b/p", "s3://b/pq/x.png")  # a sibling prefix, not below


def test_read_bytes_never_decompresses_by_extension(tmp_path):
    import gzip

    uri = str(tmp_path / "x.png.gz")
    data = gzip.compress(b"payload")
    storage.write_bytes(uri, data)
    assert storage.read_bytes(uri) == data  # pyarrow's default would hand back b"payload"


def test_s3_listings_keep_keys_exactly(s3_prefix):
    import boto3

    bucket, prefix = s3_prefix[len("s3://"):].split("/", 1)
    s3 = boto3.client("s3")
    keys = ["x.png", "a//x.png", "/x.png", "a/../x.png", "a/./x.png", "b.png/", "c\x01.png", "out/m.png", "outer.png"]
    for key in keys + ["folder/"]:
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=b"" if key == "folder/" else key.encode())
    entries = storage.list_entries(s3_prefix)
    assert [e.rel for e in entries] == sorted(keys)  # the zero-byte folder/ marker is no object
    assert all(e.uri == f"{s3_prefix}/{e.rel}" and not e.error for e in entries)
    assert "out/m.png" not in [e.rel for e in storage.list_entries(s3_prefix, prune=(f"{s3_prefix}/out",))]
    assert "outer.png" in [e.rel for e in storage.list_entries(s3_prefix, prune=(f"{s3_prefix}/out",))]
    # pyarrow's listing (list_files) no longer takes the key "<prefix>//x.png" for "<prefix>/x.png".
    assert f"{s3_prefix}//x.png" in storage.list_files(s3_prefix)
    assert storage.list_entries(f"{s3_prefix}/x.png") == [storage.Entry(f"{s3_prefix}/x.png", "")]
    assert storage.list_entries(f"s3://{bucket}/no-such-prefix") == []
    assert storage.list_entries("s3://no-such-bucket-anywhere/p") == []


def test_local_listing_follows_folder_links_and_reports_what_is_not_a_file(tmp_path):
    root, other = tmp_path / "root", tmp_path / "other"
    (root / "d").mkdir(parents=True)
    (other / "e").mkdir(parents=True)
    (root / "d" / "a.png").write_bytes(b"a")
    (other / "e" / "b.png").write_bytes(b"b")
    (root / "link").symlink_to(other)
    (root / "d" / "up").symlink_to(root)  # a loop
    (root / "gone.png").symlink_to(tmp_path / "missing")
    (root / "self").symlink_to(root / "self")  # a link to itself
    os.mkfifo(root / "fifo")
    with open(os.fsencode(root) + b"/caf\xe9.png", "wb") as f:
        f.write(b"x")
    entries = {e.rel: e for e in storage.list_entries(str(root))}
    assert set(entries) == {"d/a.png", "link/e/b.png", "d/up", "gone.png", "self", "fifo", "caf\\xe9.png"}
    assert not entries["d/a.png"].error and not entries["link/e/b.png"].error
    assert "loop" in entries["d/up"].error and "broken symbolic link" in entries["gone.png"].error
    assert "fifo" in entries["fifo"].error and "not valid UTF-8" in entries["caf\\xe9.png"].error
    assert entries["self"].error
    assert all(e.uri == f"{root}/{e.rel}" for e in entries.values())
    pruned = {e.rel for e in storage.list_entries(str(root), prune=(str(other),))}  # reached only through a link
    assert "link/e/b.png" not in pruned and "d/a.png" in pruned
    assert storage.list_entries(str(root / "d" / "a.png")) == [storage.Entry(str(root / "d" / "a.png"), "")]
    assert storage.list_entries(str(tmp_path / "nothing")) == []


def test_an_unreadable_folder_is_an_entry_not_a_gap(tmp_path, monkeypatch):
    (tmp_path / "r" / "locked").mkdir(parents=True)
    (tmp_path / "r" / "a.png").write_bytes(b"a")
    real = os.scandir

    def scandir(path):  # what a folder without read permission does (root reads any folder)
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    entries = storage.list_entries(str(tmp_path / "r"))
    assert [e.rel for e in entries] == ["a.png", "locked"] and "cannot list this folder" in entries[1].error


def test_check_writable_names_a_missing_bucket_and_writes_no_folder_markers(s3_server, s3_prefix):
    """segray's own message, not pyarrow's "enable the allow_bucket_creation option"; and a
    writable prefix gets no zero-byte ``key/`` objects at the levels above it."""
    import boto3

    from segray.errors import one_line

    with pytest.raises(storage.StorageError) as err:
        storage.check_writable("s3://no-such-bucket-here/out")
    assert one_line(err.value).startswith("StorageError: s3://no-such-bucket-here/out: bucket 'no-such-bucket-here' "
                                          "does not exist; create it")
    storage.check_writable(f"{s3_prefix}/a/b/out")
    bucket, prefix = s3_prefix[len("s3://"):].split("/", 1)
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    assert all(k.startswith(f"{prefix}/a/b/out") for k in keys), keys

import io
import tarfile

import pytest

from segray import sources


def _write(path, data: bytes = b"x") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def _tar(members: dict[str, bytes], dirs: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_keys_of_frames_and_labels():
    assert sources.frame_key("a/b/X.jpg") == "a/b/X"
    assert sources.label_key("a/b/X.png") == ("a/b/X", sources.LABEL_INDEX)
    assert sources.label_key("a/b/X_L.png") == ("a/b/X", sources.LABEL_COLOR)
    assert sources.archive_folder("seq/01.tar") == "seq/01"
    assert sources.archive_folder("seq/01.TAR.GZ") == "seq/01"
    assert sources.is_archive("x/A.Tar") and sources.is_archive("a.tgz") and not sources.is_archive("a.png")


def test_index_labels_prefers_index_over_colour_and_ignores_non_png(tmp_path):
    root = str(tmp_path)
    files = [f"{root}/a/X_L.png", f"{root}/a/X.png", f"{root}/Y_L.png", f"{root}/label_colors.txt", f"{root}/Z.jpg"]
    index = sources.index_labels(root, files)
    assert index == {
        "a/X": sources.Label(f"{root}/a/X.png", sources.LABEL_INDEX),
        "Y": sources.Label(f"{root}/Y_L.png", sources.LABEL_COLOR),
    }


def test_list_inputs_kinds_pairing_and_exclusions(tmp_path):
    images, labels = tmp_path / "img", tmp_path / "img" / "annot"  # labels nested inside images
    _write(images / "a" / "b" / "X.jpg")
    _write(images / "a" / "b" / "Y.PNG")  # extension case does not matter
    _write(images / "Z.jpeg")
    _write(images / "notes.txt")
    _write(images / "seq" / "01.tar", _tar({"f.png": b"1"}))
    _write(images / "out" / "predictions" / "part-1.parquet")  # the job's own output
    _write(labels / "a" / "b" / "X.png")
    _write(labels / "a" / "b" / "Y_L.png")
    listing = sources.list_inputs(str(images), str(labels), exclude=(str(images / "out"),))

    by_uri = {i.uri: i for i in listing.inputs}
    assert set(by_uri) == {
        str(images / "a/b/X.jpg"), str(images / "a/b/Y.PNG"), str(images / "Z.jpeg"),
        str(images / "notes.txt"), str(images / "seq/01.tar"),
    }
    assert by_uri[str(images / "a/b/X.jpg")].label == sources.Label(str(labels / "a/b/X.png"), sources.LABEL_INDEX)
    assert by_uri[str(images / "a/b/Y.PNG")].label == sources.Label(str(labels / "a/b/Y_L.png"), sources.LABEL_COLOR)
    assert by_uri[str(images / "Z.jpeg")].label is None  # unpaired: still an input
    assert by_uri[str(images / "notes.txt")].kind == sources.KIND_OTHER  # an error row later, never dropped
    assert by_uri[str(images / "seq/01.tar")].kind == sources.KIND_ARCHIVE
    assert (listing.images, listing.archives, listing.others, listing.skipped) == (3, 1, 1, 0)
    assert set(listing.labels) == {"a/b/X", "a/b/Y"}


def test_list_inputs_skips_done_files_and_hands_done_members_to_their_archive(tmp_path):
    images = tmp_path / "img"
    a, b = _write(images / "a.png"), _write(images / "b.png")
    t1 = _write(images / "t1.tar", _tar({"m.png": b"1"}))
    t10 = _write(images / "t10.tar", _tar({"m.png": b"1"}))
    done = {a, f"{t1}/m.png", f"{t1}/n.png", f"{t10}/m.png", t10}
    listing = sources.list_inputs(str(images), done=done)
    by_uri = {i.uri: i for i in listing.inputs}
    assert set(by_uri) == {b, t1, t10}
    assert by_uri[t1].done == (f"{t1}/m.png", f"{t1}/n.png")  # not t10's members
    assert by_uri[t10].done == (f"{t10}/m.png", t10)  # its own URI: an earlier archive error row
    assert listing.skipped == 1


def test_list_inputs_errors_name_the_uri(tmp_path):
    with pytest.raises(sources.SourceError, match="no files found"):
        sources.list_inputs(str(tmp_path / "nothing"))
    _write(tmp_path / "img" / "a.png")
    _write(tmp_path / "lab" / "readme.txt")
    with pytest.raises(sources.SourceError, match=r"lab: no \.png label files"):
        sources.list_inputs(str(tmp_path / "img"), str(tmp_path / "lab"))


def test_label_for_member_tries_the_archive_folder_then_the_member_path():
    labels = {
        "seq/01/f/X": sources.Label("s3://l/seq/01/f/X.png", sources.LABEL_INDEX),
        "f/X": sources.Label("s3://l/f/X.png", sources.LABEL_INDEX),
        "f/Y": sources.Label("s3://l/f/Y_L.png", sources.LABEL_COLOR),
    }
    assert sources.label_for_member("seq/01.tar", "f/X.jpg", labels).uri == "s3://l/seq/01/f/X.png"
    assert sources.label_for_member("seq/01.tar", "f/Y.png", labels).uri == "s3://l/f/Y_L.png"
    assert sources.label_for_member("seq/02.tar", "f/X.png", labels).uri == "s3://l/f/X.png"
    assert sources.label_for_member("seq/01.tar", "g/X.png", labels) is None


def test_clean_member_name():
    assert sources.clean_member_name("./a/b.png") == "a/b.png"
    assert sources.clean_member_name("/abs/b.png") == "abs/b.png"
    assert sources.clean_member_name("a/../b.png") == "b.png"
    assert sources.clean_member_name("../evil.png") is None
    assert sources.clean_member_name("a/../../evil.png") is None
    assert sources.member_uri("s3://b/x/A.tar", "f/X.png") == "s3://b/x/A.tar/f/X.png"


def test_iter_archive_streams_regular_members_and_skips_done(tmp_path):
    data = _tar({"./f/X.png": b"x" * 10, "f/Y.png": b"yy", "../evil.png": b"e", "notes.txt": b"t"}, dirs=("f",))
    uri = _write(tmp_path / "A.tar", data)
    members = list(sources.iter_archive(uri))
    assert [(m.path, m.data, bool(m.error)) for m in members] == [
        ("f/X.png", b"x" * 10, False),
        ("f/Y.png", b"yy", False),
        ("../evil.png", b"", True),  # named in the error, never used as a path
        ("notes.txt", b"t", False),  # an odd member: the caller makes it an error row
    ]
    assert [m.path for m in sources.iter_archive(uri, skip={f"{uri}/f/X.png"})] == ["f/Y.png", "../evil.png", "notes.txt"]


def test_iter_archive_raises_after_the_members_before_the_damage(tmp_path):
    data = _tar({"a.png": b"a" * 2000, "b.png": b"b" * 2000})
    uri = _write(tmp_path / "cut.tar", data[:4000])  # cut inside the data of b.png
    it = sources.iter_archive(uri)
    assert next(it).path == "a.png"
    with pytest.raises(tarfile.TarError):
        next(it)
    header_cut = _write(tmp_path / "header.tar", data[:2560 + 100])  # cut inside b.png's header
    with pytest.raises(tarfile.TarError, match="truncated"):
        list(sources.iter_archive(header_cut))
    # Cut at a member boundary: every member read is whole, tarfile's (and tar's) leniency holds.
    assert [m.path for m in sources.iter_archive(_write(tmp_path / "end.tar", data[:2560]))] == ["a.png"]
    not_tar = _write(tmp_path / "text.tar", b"hello, not a tar" * 100)
    with pytest.raises(tarfile.TarError):
        list(sources.iter_archive(not_tar))


def test_iter_archive_refuses_oversized_members(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_MEMBER_BYTES", 5)
    uri = _write(tmp_path / "A.tar", _tar({"big.png": b"123456", "ok.png": b"1"}))
    members = list(sources.iter_archive(uri))
    assert "over the 5 bytes" in members[0].error and members[1].data == b"1"

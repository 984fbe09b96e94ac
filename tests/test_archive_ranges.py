"""index_tar and read_tar_members (segray/archives.py): a tar indexed once, its members read by range.

The promise checked here: index_tar's refs are iter_tar's Members without their bytes (same
rows, paths and errors, same ArchiveError after the same rows), and the refs cut into ranges of
any size and read with read_tar_members give back exactly iter_tar's Members, in order.
"""

from __future__ import annotations

import io
import random
import shutil
import subprocess
import tarfile
import tracemalloc
import uuid

import pytest
from conftest import BUCKET
from faultproxy import FaultProxy

from segray import archives, storage
from segray.archives import ArchiveError, Member, MemberRef, index_tar, iter_tar, read_tar_members, tar_compression


def _info(name: str, kind: bytes, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def _tar(entries: list, mode: str = "w", fmt: int = tarfile.GNU_FORMAT) -> bytes:
    """A tar (``mode`` "w", "w:gz", ...) of (name, bytes) pairs and ready TarInfo objects, in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=fmt) as tar:
        for item in entries:
            if isinstance(item, tarfile.TarInfo):
                tar.addfile(item)
            else:
                info = tarfile.TarInfo(item[0])
                info.size = len(item[1])
                tar.addfile(info, io.BytesIO(item[1]))
    return buf.getvalue()


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


_rng = random.Random(3)
_MIXED = [("a.png", b"a" * 10), ("./b.png", _rng.randbytes(3000)), ("../evil.png", b"e" * 700),
          ("a.png", b"dup"), _info("s.png", tarfile.SYMTYPE, "a.png"), _info("d", tarfile.DIRTYPE),
          ("d/notes.txt", b"text"), ("x.jpg", b"x" * 1500), ("x.jpg.png/y.png", b"y"),  # y.png: a mask clash
          ("empty.png", b""), ("long/" + "n" * 120 + ".png", _rng.randbytes(999)),  # a GNU long name header
          _info("h.png", tarfile.LNKTYPE, "x.jpg"), ("z.png", _rng.randbytes(2500))]
ARCHIVES = {
    "mixed": _tar(_MIXED),
    "mixed-pax": _tar(_MIXED, fmt=tarfile.PAX_FORMAT),
    "empty": _tar([]),
    "dirs-only": _tar([_info("d", tarfile.DIRTYPE), _info("d/e", tarfile.DIRTYPE)]),
    "one": _tar([("only.png", b"1" * 5000)]),
    "many": _tar([(f"f/{k:03d}.png", _rng.randbytes(_rng.choice([0, 1, 511, 512, 513, 999, 1000, 1001, 4000])))
                  for k in range(60)]),
}


def _rows(members) -> list[tuple]:
    return [(m.path, m.data, m.error) for m in members]


def _ranges(uri: str, refs: list[MemberRef], k: int) -> list[tuple]:
    got: list[tuple] = []
    for i in range(0, len(refs), k):
        got += _rows(read_tar_members(uri, refs[i:i + k]))
    return got


@pytest.mark.parametrize("buffer", [1000, archives.ARCHIVE_READ_BUFFER])
@pytest.mark.parametrize("name", sorted(ARCHIVES))
def test_refs_are_iter_tar_members_and_ranges_of_every_size_read_them_back(tmp_path, monkeypatch, name, buffer):
    monkeypatch.setattr(archives, "ARCHIVE_READ_BUFFER", buffer)
    uri = _write(tmp_path / f"{name}.tar", ARCHIVES[name])
    members = list(iter_tar(uri))
    refs = list(index_tar(uri))
    assert [(r.path, r.error) for r in refs] == [(m.path, m.error) for m in members]
    assert all((r.offset, r.size) == (-1, 0) for r in refs if r.error)
    assert all(r.offset % 512 == 0 and r.size == len(m.data) for r, m in zip(refs, members) if not r.error)
    for k in range(1, len(refs) + 1):
        assert _ranges(uri, refs, k) == _rows(members), k
    if name == "mixed":
        assert [m.path for m in members if m.error] == ["../evil.png", "a.png (duplicate 2)", "s.png",
                                                        "x.jpg.png/y.png", "h.png"]
        assert [m.path for m in members if not m.error][:3] == ["a.png", "b.png", "d/notes.txt"]  # ./ cleaned
        assert any(len(m.data) > 1000 for m in members)
    if name in ("empty", "dirs-only"):
        assert [(r.path, "empty archive" in r.error) for r in refs] == [("", True)]


def test_skip_and_taken_are_honoured_like_iter_tar(tmp_path):
    uri = _write(tmp_path / "A.tar", ARCHIVES["mixed"])
    skip = {f"{uri}/a.png", f"{uri}/x.jpg", f"{uri}/s.png", f"{uri}/../evil.png"}
    taken = (f"{uri}/z.png", f"{tmp_path}/other.png")  # z.png: an object beside the archive
    members = list(iter_tar(uri, skip, taken))
    refs = list(index_tar(uri, skip, taken))
    assert [(r.path, r.error) for r in refs] == [(m.path, m.error) for m in members]
    assert "a.png" not in [r.path for r in refs] and "z.png (duplicate 2)" in [r.path for r in refs]
    # x.jpg is done (skipped), its mask still there: y.png's mask folder clashes as on the first run.
    assert "x.jpg.png/y.png" in [r.path for r in refs if r.error]
    for k in (1, 2, 5, len(refs)):
        assert _ranges(uri, refs, k) == _rows(members)
    empty = _write(tmp_path / "E.tar", ARCHIVES["empty"])
    assert list(index_tar(empty, skip={empty})) == [] == list(iter_tar(empty, skip={empty}))


def _outcome(it) -> tuple[list[tuple], str | None]:
    got = []
    try:
        for row in it:
            got.append((row.path, row.error))
    except ArchiveError as e:
        return got, str(e)
    return got, None


def test_index_raises_where_iter_tar_raises_after_the_same_refs(tmp_path):
    data = _tar([("a.png", b"a" * 2000), ("b.png", b"b" * 2000), ("../c.png", b"c" * 2000), ("d.png", b"d")])
    hdr = bytearray(data)
    hdr[512 + 2048 + 148] ^= 0x01  # b.png's header checksum: tarfile takes it for the end
    gz = _tar([(f"f{k}.png", random.Random(k).randbytes(3000)) for k in range(4)], mode="w:gz")
    cases = {
        "data-cut": data[:4000], "header-cut": data[:2560 + 100], "error-member-cut": data[:5120 + 1000],
        "appended": data + _tar([("e.png", b"e")]), "header": bytes(hdr), "not-tar": b"hello, not a tar" * 100,
        "zero": b"", "gz-cut": gz[: len(gz) // 2], "gz-end-cut": gz[:-4],
    }
    for name, blob in cases.items():
        uri = _write(tmp_path / f"{name}.tar", blob)
        expected = _outcome(iter_tar(uri))
        assert expected[1] is not None and uri in expected[1], name
        assert _outcome(index_tar(uri)) == expected, name
    assert _outcome(index_tar(str(tmp_path / "data-cut.tar")))[0] == [("a.png", "")]
    with pytest.raises(FileNotFoundError):
        list(index_tar(str(tmp_path / "missing.tar")))


def test_a_compressed_archive_is_indexed_in_its_decompressed_bytes_but_not_read_by_range(tmp_path):
    frames = [(f"f{k}.png", random.Random(k).randbytes(700 + k)) for k in range(4)]
    plain = _tar(frames)
    for mode, kind in (("w", "tar"), ("w:gz", "gzip"), ("w:bz2", "bzip2"), ("w:xz", "xz")):
        uri = _write(tmp_path / f"A-{kind}.tar", _tar(frames, mode=mode))
        assert tar_compression(uri) == kind
        refs = list(index_tar(uri))
        assert [plain[r.offset:r.offset + r.size] for r in refs] == [d for _, d in frames]
        if kind != "tar":
            with pytest.raises(ArchiveError, match=f"{kind}-compressed"):
                list(read_tar_members(uri, refs))
    assert tar_compression(_write(tmp_path / "plain.tar.gz", plain)) == "tar"  # by the bytes, not the name
    with pytest.raises(FileNotFoundError):
        tar_compression(str(tmp_path / "missing.tar"))


def test_read_tar_members_raises_when_the_archive_changed_since_it_was_indexed(tmp_path):
    data = _tar([("a.png", b"a" * 2000), ("b.png", b"b" * 2000), ("c.png", b"c" * 10)])
    uri = _write(tmp_path / "A.tar", data)
    refs = list(index_tar(uri))
    _write(tmp_path / "A.tar", data[:4000])  # cut inside b.png's data
    got = []
    with pytest.raises(ArchiveError, match=r"A\.tar: changed or truncated since it was indexed"):
        for m in read_tar_members(uri, refs):
            got.append(m.path)
    assert got == ["a.png"]
    _write(tmp_path / "A.tar", _tar([("a.png", b"a" * 2000), ("b.png", b"b" * 3000), ("c.png", b"c" * 10)]))
    with pytest.raises(ArchiveError, match=r"A\.tar: changed since it was indexed, .*: no file of 2000 bytes at byte 3072"):
        list(read_tar_members(uri, refs[1:2]))  # b.png's header now says 3000 bytes
    with pytest.raises(ArchiveError, match="changed since it was indexed"):
        list(read_tar_members(uri, refs[2:]))  # c.png's "header" is in the middle of b.png's bytes
    refs = list(index_tar(_write(tmp_path / "A.tar", _tar([("e.png", b"")]))))
    _write(tmp_path / "A.tar", _tar([_info("e.png", tarfile.SYMTYPE, "x.png")]))  # a header of size 0 too
    with pytest.raises(ArchiveError, match="changed since it was indexed"):
        list(read_tar_members(uri, refs))
    assert list(read_tar_members(uri, [MemberRef("x.png", error="e")])) == [Member("x.png", error="e")]
    with pytest.raises(FileNotFoundError):
        list(read_tar_members(str(tmp_path / "missing.tar"), refs))


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar makes the sparse members")
@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_a_sparse_member_is_refused_by_range_never_read_wrong(tmp_path, fmt):
    with open(tmp_path / "s.png", "wb") as f:
        f.write(b"A" * 1000)
        f.seek(1 << 20)
        f.write(b"B" * 1000)
    subprocess.run(["tar", "-cSf", "s.tar", f"--format={fmt}", "s.png"], cwd=tmp_path, check=True)
    uri = str(tmp_path / "s.tar")
    [member], [ref] = list(iter_tar(uri)), list(index_tar(uri))
    assert (ref.path, ref.size) == (member.path, len(member.data)) and member.data.endswith(b"B" * 1000)
    with pytest.raises(ArchiveError, match=r"s\.tar: changed since it was indexed, or s\.png is a sparse file"):
        list(read_tar_members(uri, [ref]))


class _CountingFs:
    """A filesystem whose input files record every read_at (offset, nbytes)."""

    def __init__(self, fs, reads: list) -> None:
        self.fs, self.reads = fs, reads

    def open_input_file(self, path):
        f, reads = self.fs.open_input_file(path), self.reads

        class Counting:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def size(self):
                return f.size()

            def read_at(self, n, offset):
                reads.append((offset, n))
                return f.read_at(n, offset)

        return Counting()


def test_a_range_is_read_in_a_few_buffer_sized_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(archives, "ARCHIVE_READ_BUFFER", 4096)
    uri = _write(tmp_path / "A.tar", _tar([(f"{k:03d}.png", bytes([k]) * 300) for k in range(100)]))
    refs = list(index_tar(uri))
    reads: list = []
    resolve = storage.resolve
    monkeypatch.setattr(storage, "resolve", lambda u: (_CountingFs(resolve(u)[0], reads), resolve(u)[1]))
    part = refs[50:80]  # 30 members of 300 bytes: 30 KiB with their headers
    assert [m.data for m in read_tar_members(uri, part)] == [bytes([k]) * 300 for k in range(50, 80)]
    # One small read of the first bytes (the range starts past the first window), then 4 KiB windows.
    assert reads[0] == (0, 6) and len(reads) <= 2 + 30 * 1024 // 4096, reads
    assert all(n >= 4096 for _, n in reads[1:-1]) and reads[1][0] == part[0].offset - 512
    reads.clear()
    gappy = refs[10:12] + refs[90:92]  # a gap bigger than a window: the next window starts past it
    assert [m.data for m in read_tar_members(uri, gappy)] == [bytes([k]) * 300 for k in (10, 11, 90, 91)]
    assert [offset for offset, _ in reads] == [0, refs[10].offset - 512, refs[90].offset - 512], reads
    reads.clear()
    assert [m.data for m in read_tar_members(uri, refs[0:2])] == [b"\x00" * 300, b"\x01" * 300]
    assert reads == [(0, 4096)]  # at the start: the first window holds the first bytes too


def test_index_keeps_no_member_bytes(tmp_path):
    uri = _write(tmp_path / "big.tar", _tar([("big.png", b"\x01" * (24 << 20)), ("small.png", b"s")]))
    tracemalloc.start()
    try:
        refs = list(index_tar(uri))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(r.path, r.size) for r in refs] == [("big.png", 24 << 20), ("small.png", 1)]
    assert peak < 8 << 20, peak  # chunks of 1 MiB, never the 24 MiB member


def test_an_s3_archive_is_indexed_and_read_by_range_in_a_few_gets(s3_server, monkeypatch):
    rng = random.Random(0)
    frames = [(f"f/{k:02d}.png", rng.randbytes(100_000)) for k in range(40)]
    uri = f"s3://{BUCKET}/ranges-{uuid.uuid4().hex[:8]}/a.tar"
    storage.write_bytes(uri, _tar(frames + [("../evil.png", b"e")]))  # 4 MB
    with FaultProxy(s3_server["AWS_ENDPOINT_URL"], rate=0.0) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        assert tar_compression(uri) == "tar"
        refs = list(index_tar(uri))
        assert [r.path for r in refs] == [n for n, _ in frames] + ["../evil.png"] and refs[-1].error
        got, requests = [], []
        for i in range(0, len(refs), 10):
            before = proxy.counts["pass"]
            got += _rows(read_tar_members(uri, refs[i:i + 10]))
            requests.append(proxy.counts["pass"] - before)
        assert got == _rows(iter_tar(uri))
        assert got[:-1] == [(n, d, "") for n, d in frames]
        # Per range of 1 MB: a HEAD (the size), a GET of the first bytes (the compression; none
        # for the first range, whose window starts there) and one GET of the range (not 10).
        assert requests == [2, 3, 3, 3, 0], requests
    for call in (tar_compression, index_tar, lambda u: read_tar_members(u, refs)):
        with pytest.raises(FileNotFoundError):
            list(call(uri + ".missing"))
        assert all(n <= 3 for n in requests), (requests, proxy.log)


def _load_rows(uri: str, root: str, frames_per_task: int, change=None) -> list[tuple]:
    """(uri, stage, height) rows of the archive through plan_units and load_units, one unit at a
    time; ``change()`` runs between planning and loading (the archive replaced meanwhile)."""
    import pyarrow as pa

    from segray import frames

    listing = pa.Table.from_pylist([{"uri": uri, "kind": "archive", "done": [], "taken": []}], schema=frames.LISTING_SCHEMA)
    units = list(frames.plan_units(listing, frames_per_task, root))
    if change:
        change()
    rows = [r for u in units for t in frames.load_units(u, (8, 8), root) for r in t.to_pylist()]
    return sorted((r["uri"], r["stage"], r["height"]) for r in rows)


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar makes the sparse members")
def test_a_range_that_cannot_be_read_by_offsets_is_read_from_the_stream(tmp_path):
    from PIL import Image

    for k in range(6):
        Image.new("RGB", (4 + k, 4)).save(tmp_path / f"{k}.png")
    with open(tmp_path / "2.png", "r+b") as f:  # a PNG with a hole after its end: GNU tar stores it sparse
        f.seek(1 << 20)
        f.write(b"end")
    subprocess.run(["tar", "-cSf", "a.tar", *[f"{k}.png" for k in range(6)]], cwd=tmp_path, check=True)
    uri, root = str(tmp_path / "a.tar"), str(tmp_path)
    whole = _load_rows(uri, root, 1000)
    assert [r[1] for r in whole] == [None] * 6
    assert next(iter_tar(uri)).path == "0.png" and any(i.issparse() for i in tarfile.open(uri).getmembers())
    assert _load_rows(uri, root, 2) == whole, "the sparse member's range was read from the stream"

    # The archive replaced between planning and loading: what is still there is read, the rest is
    # one row per range naming the first member missing.
    def shrink():
        subprocess.run(["tar", "-cf", "a.tar", "0.png", "1.png", "3.png"], cwd=tmp_path, check=True)

    changed = _load_rows(uri, root, 2, change=shrink)
    assert [(r[0].rsplit("/", 1)[-1], r[1]) for r in changed] == [
        ("0.png", None), ("1.png", None), ("2.png", "archive"), ("3.png", None), ("4.png", "archive")]

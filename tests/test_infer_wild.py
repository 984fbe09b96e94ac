"""Inputs from the wild, through ``jobs/infer.py`` on the session's Ray cluster (issue #14).

Each test feeds the job one class of input that real buckets and folders hold and checks the
promises of docs/reliability.md ("Inputs from the wild"): no input aborts the job, every input
is one row, no two inputs share a URI or a mask, nothing is written outside ``--output``, an
output is never mixed from two models or collections, and the last line names the cause.
"""

from __future__ import annotations

import gzip
import io
import os
import random
import shutil
import tarfile
import uuid
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from segray import storage
from segray.predictions import ERRORS_DIR, METRICS_FILE, PREDICTIONS_DIR, RUN_FILE, parquet_files
from segray.model import UNetConfig, build_model
from segray.modelio import ModelSpec, save_model

from conftest import BUCKET, tar_bytes
from faultproxy import FaultProxy

SIZE = (32, 48)


def png(h: int = 24, w: int = 40, seed: int = 0, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_model(dest: str, seed: int = 0) -> str:
    import torch

    torch.manual_seed(seed)
    cfg = UNetConfig(base_channels=4, depth=2)
    save_model(dest, build_model(cfg).state_dict(), ModelSpec(model=cfg.to_dict(), input_height=SIZE[0],
                                                             input_width=SIZE[1]))
    return dest


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("models")
    return make_model(str(root / "a")), make_model(str(root / "b"), seed=1)


def rows(output: str) -> tuple[list[dict], list[dict]]:
    """(prediction rows without mask bytes, error rows) of an infer output."""
    out = []
    for folder, cols in ((PREDICTIONS_DIR, ["uri", "height", "width", "label_uri"]), (ERRORS_DIR, None)):
        part = []
        for uri in parquet_files(storage.join(output, folder)):
            fs, path = storage.resolve(uri)
            part += pq.read_table(path, filesystem=fs, columns=cols).to_pylist()
        out.append(part)
    return out[0], out[1]


def last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def targz(members: dict[str, bytes]) -> bytes:
    return gzip.compress(tar_bytes(members))


def tar_with(entries: list[tuple[str, bytes | None, bytes]]) -> bytes:
    """A tar of (name as bytes, data or None for a link, tar type) entries; names are raw bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for raw, data, kind in entries:
            info = tarfile.TarInfo(raw.decode("utf-8", "surrogateescape"))
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.linkname = "target.png"
                tar.addfile(info)
    return buf.getvalue()


def test_no_single_input_aborts_the_job(run_job, models, tmp_path):
    """Archives with non-UTF-8, duplicate and link members, truncated/corrupt/empty compressed
    archives, a frame beside a folder of its mask's name, an unconvertible label: one row each."""
    images, labels, output = tmp_path / "images", tmp_path / "labels", tmp_path / "out"
    expected: dict[str, str] = {}  # uri (relative) -> "ok" or "error"
    write(images / "ok" / "a.png", png(seed=1))
    write(images / "ok" / "a.jpg", png(seed=2, fmt="JPEG"))  # same stem: masks must differ
    expected.update({"ok/a.png": "ok", "ok/a.jpg": "ok"})
    write(images / "clash" / "a.jpg", png(seed=3, fmt="JPEG"))
    write(images / "clash" / "a.png" / "b.png", png(seed=4))  # a folder named like a.jpg's old mask
    expected.update({"clash/a.jpg": "ok", "clash/a.png/b.png": "ok"})
    write(images / "arch" / "names.tar", tar_with([
        (b"\xff\xfe.png", png(seed=5), tarfile.REGTYPE),  # not UTF-8
        (b"good.png", png(seed=6), tarfile.REGTYPE),
        (b"./good.png", png(seed=7), tarfile.REGTYPE),  # the same name once cleaned
        (b"sym.png", None, tarfile.SYMTYPE),
        (b"hard.png", None, tarfile.LNKTYPE),
    ]))
    expected.update({"arch/names.tar/\\xff\\xfe.png": "ok", "arch/names.tar/good.png": "ok"})
    dup_and_links = 3  # ./good.png, sym.png, hard.png: error rows with URIs of their own
    whole = targz({f"f{i}.png": png(seed=10 + i) for i in range(4)})
    write(images / "arch" / "ok.tar.gz", whole)
    expected.update({f"arch/ok.tar.gz/f{i}.png": "ok" for i in range(4)})
    write(images / "arch" / "cut.tgz", whole[: len(whole) * 2 // 3])  # truncated gzip stream
    write(images / "arch" / "noise.tar.gz", os.urandom(3000))
    write(images / "arch" / "empty.tar", tar_bytes({}))
    expected.update({"arch/noise.tar.gz": "error", "arch/empty.tar": "error"})
    # A label PIL cannot convert to class indices (LAB TIFF bytes under a .png name).
    lab = io.BytesIO()
    Image.new("LAB", (40, 24)).save(lab, format="TIFF")
    write(labels / "clash" / "a.png", lab.getvalue())  # the label of clash/a.jpg
    expected["clash/a.jpg"] = "error"

    proc = run_job("infer", "--model", models[0], "--images", str(images), "--labels", str(labels),
                   "--output", str(output), "--write-masks")
    assert proc.returncode == 0, proc.stderr[-3000:]
    preds, errors = rows(str(output))
    uris = [r["uri"] for r in preds + errors]
    assert len(uris) == len(set(uris)), "two rows share a URI"
    rel = {storage.relative(str(images), u): u for u in uris}
    predicted = {r["uri"] for r in preds}
    for name, verdict in expected.items():
        assert name in rel, f"{name} has no row; rows: {sorted(rel)}"
        assert (rel[name] in predicted) == (verdict == "ok"), (name, verdict, errors)
    assert any(e["uri"].endswith("clash/a.jpg") and e["stage"] == "label" for e in errors), errors
    cut_rows = [u for u in rel if u.startswith("arch/cut.tgz")]
    assert "arch/cut.tgz" in cut_rows and 1 <= len(cut_rows) <= 5, cut_rows
    fixed = len(expected) + dup_and_links
    assert len(uris) == fixed + len(cut_rows), (len(uris), fixed, sorted(rel))
    for e in errors:
        assert e["message"] and e["stage"], e
    # One mask per prediction, none shared, all inside the output.
    masks = [p for p in (output / "masks").rglob("*") if p.is_file()]
    assert len(masks) == len(preds)
    assert {str(p.relative_to(output / "masks")) for p in masks} >= {"ok/a.jpg.png", "ok/a.png.png",
                                                                     "clash/a.png/b.png.png"}


def bucket_keys(s3) -> set[str]:
    """Every key of the test bucket (other tests' too: a climbing write could land anywhere)."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def test_odd_s3_keys_never_write_outside_the_output(run_job, models, s3_prefix):
    """Keys with ``..``, ``.`` and empty segments, a leading ``/`` and a segment over 255 bytes:
    error rows (stage list), the bytes of no other key read for them, no object written outside."""
    s3 = boto3.client("s3")
    prefix = s3_prefix[len(f"s3://{BUCKET}/"):]
    good = {f"{prefix}/in/b.png": png(16, 16, seed=1), f"{prefix}/in/e.png": png(20, 20, seed=2)}
    odd = [f"{prefix}/in/a/../b.png", f"{prefix}/in/./c.png", f"{prefix}/in//d.png", f"{prefix}/in/x/" + "y" * 300 + ".png",
           f"{prefix}/in/../escape.png"]
    for key, data in good.items():
        s3.put_object(Bucket=BUCKET, Key=key, Body=data)
    for key in odd:
        s3.put_object(Bucket=BUCKET, Key=key, Body=png(24, 24, seed=9))
    before = bucket_keys(s3)
    output = f"{s3_prefix}/in/out"  # inside --images, so a climbing mask would land among the inputs
    proc = run_job("infer", "--model", models[0], "--images", f"{s3_prefix}/in", "--output", output, "--write-masks")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = bucket_keys(s3)
    new = after - before
    assert new and all(k.startswith(f"{prefix}/in/out/") for k in new), sorted(k for k in new if "/in/out/" not in k)
    preds, errors = rows(output)
    assert {r["uri"] for r in preds} == {f"s3://{BUCKET}/{k}" for k in good}
    # Each object was read as itself: b.png is 16x16, the '..' key's bytes are 24x24.
    assert {(r["height"], r["width"]) for r in preds} == {(16, 16), (20, 20)}
    listed = [e for e in errors if e["stage"] == "list"]
    assert len(listed) == len(odd), errors
    assert len({e["uri"] for e in listed}) == len(odd)
    # Every written mask lies below <output>/masks/.
    assert sum(1 for k in new if k.startswith(f"{prefix}/in/out/masks/")) == len(preds)


def test_an_output_is_never_mixed_and_a_bad_model_touches_nothing(run_job, models, tmp_path):
    images, output = tmp_path / "images", tmp_path / "out"
    for i in range(3):
        write(images / f"f{i}.png", png(seed=i))
    first = run_job("infer", "--model", models[0], "--images", str(images), "--output", str(output))
    assert first.returncode == 0, first.stderr[-3000:]
    before = tree(output)
    assert RUN_FILE in before and METRICS_FILE in before

    other = run_job("infer", "--model", models[1], "--images", str(images), "--output", str(output))
    assert other.returncode != 0
    assert "--model" in last_line(other) and models[1] in last_line(other), last_line(other)
    write(tmp_path / "labels" / "f0.png", np.zeros((24, 40), np.uint8).tobytes())
    labelled = run_job("infer", "--model", models[0], "--images", str(images), "--labels", str(tmp_path / "labels"),
                       "--output", str(output))
    assert labelled.returncode != 0 and "--labels" in last_line(labelled), last_line(labelled)
    masks = run_job("infer", "--model", models[0], "--images", str(images), "--output", str(output), "--write-masks")
    assert masks.returncode != 0 and "without --write-masks" in last_line(masks), last_line(masks)
    assert tree(output) == before  # not a byte changed, metrics.parquet still there

    broken = tmp_path / "broken"
    shutil.copytree(models[0], broken)
    weights = broken / "model.pt"
    weights.write_bytes(weights.read_bytes()[:200])
    bad = run_job("infer", "--model", str(broken), "--images", str(images), "--output", str(output))
    assert bad.returncode != 0
    line = last_line(bad)
    assert "model.pt" in line and "ModelError" in line and not line.endswith("Exception"), line
    assert tree(output) == before


def test_a_tree_that_yields_nothing_is_an_error(run_job, models, tmp_path):
    out = tmp_path / "out"
    inside = out / "frames"
    write(inside / "a.png", png())
    proc = run_job("infer", "--model", models[0], "--images", str(inside), "--output", str(out))
    assert proc.returncode != 0 and "--output" in last_line(proc), last_line(proc)
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_job("infer", "--model", models[0], "--images", str(empty), "--output", str(tmp_path / "o2"))
    assert proc.returncode != 0 and str(empty) in last_line(proc), last_line(proc)
    assert not (tmp_path / "o2" / PREDICTIONS_DIR).exists()


def test_frames_and_colour_labels_in_one_folder(run_job, models, tmp_path):
    """Original-layout CamVid keeps X.png and X_L.png side by side: --images = --labels works,
    and evaluate reads exactly the part files infer counts (a killed write's .tmp is ignored)."""
    from segray.camvid import ORIGINAL_COLORS

    folder, output = tmp_path / "701_StillsRaw", tmp_path / "out"
    sky = next(c for c, n in ORIGINAL_COLORS if n == "Sky")
    for i in range(2):
        write(folder / f"0001TP_{i:06d}.png", png(seed=i))
        write(folder / f"0001TP_{i:06d}_L.png", png_of(np.full((24, 40, 3), sky, np.uint8)))
    proc = run_job("infer", "--model", models[0], "--images", str(folder), "--labels", str(folder),
                   "--output", str(output))
    assert proc.returncode == 0, proc.stderr[-3000:]
    preds, errors = rows(str(output))
    assert len(preds) == 2 and not errors, (preds, errors)
    assert all(r["label_uri"] and r["label_uri"].endswith("_L.png") for r in preds)
    write(output / PREDICTIONS_DIR / f"part-{uuid.uuid4().hex}.parquet.tmp-{uuid.uuid4().hex}", b"half a file")
    report = run_job("evaluate", "--predictions", str(output), "--dest", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr[-3000:]
    assert (tmp_path / "report" / "index.html").exists()
    again = run_job("evaluate", "--predictions", str(output), "--dest", str(tmp_path / "report"))
    assert again.returncode == 0, again.stderr[-3000:]  # its own earlier report is replaced
    # A folder with someone's page in it is not overwritten.
    write(tmp_path / "site" / "index.html", b"<html>my page</html>")
    foreign = run_job("evaluate", "--predictions", str(output), "--dest", str(tmp_path / "site"))
    assert foreign.returncode != 0 and "--dest" in last_line(foreign), last_line(foreign)
    assert tree(tmp_path / "site") == {"index.html": b"<html>my page</html>"}


def png_of(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class FailGets(FaultProxy):
    """Answers 503 SlowDown to every GET of a key containing ``marker`` while ``failing``."""

    def __init__(self, upstream: str, marker: str) -> None:
        super().__init__(upstream, rate=0.0)
        self.marker, self.failing = marker, True

    def decide(self, method: str, path: str) -> str:
        if self.failing and method == "GET" and self.marker in path:
            with self._lock:
                self.log.append((method, path, "slowdown"))
            return "slowdown"
        return super().decide(method, path)


def test_read_errors_of_an_earlier_run_are_retried(run_job, models, s3_server, s3_prefix):
    images, output = f"{s3_prefix}/frames", f"{s3_prefix}/out"
    for i in range(3):
        storage.write_bytes(f"{images}/f{i}.png", png(seed=i))
    storage.write_bytes(f"{images}/flaky.png", png(seed=9))
    with FailGets(s3_server["AWS_ENDPOINT_URL"], marker="flaky.png") as proxy:
        env = {"AWS_ENDPOINT_URL": proxy.url, "SEGRAY_S3_MAX_ATTEMPTS": "2"}
        first = run_job("infer", "--model", models[0], "--images", images, "--output", output, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    preds, errors = rows(output)
    assert len(preds) == 3 and [e["stage"] for e in errors] == ["read"], errors
    second = run_job("infer", "--model", models[0], "--images", images, "--output", output)
    assert second.returncode == 0, second.stderr[-3000:]
    preds, errors = rows(output)
    assert sorted(r["uri"].rsplit("/", 1)[-1] for r in preds) == ["f0.png", "f1.png", "f2.png", "flaky.png"]
    assert errors == []


ODD_PARTS = ["a", "b.c", "..x", "x..", ".hidden", "ü", "日本", "sp ace", "q#1", "%41", "L" * 120, "a.b.c"]


def random_tree(root: Path, rng: random.Random) -> int:
    """Files and archives with odd, colliding and long names below ``root``; returns the number
    of inputs (files, with each archive counted by its regular members, or 1 when it has none)."""
    inputs = 0
    for _ in range(18):
        depth = rng.randint(0, 3)
        parts = [rng.choice(ODD_PARTS) for _ in range(depth)]
        stem = rng.choice(ODD_PARTS)
        kind = rng.random()
        if kind < 0.55:
            name = stem + rng.choice([".png", ".jpg", ".PNG", ".jpeg", ".txt", ""])
            data = png(12, 16, seed=rng.randint(0, 99), fmt="JPEG" if name.lower().endswith((".jpg", ".jpeg")) else "PNG")
        else:
            members = {}
            for _ in range(rng.randint(0, 4)):
                m = "/".join(rng.choice(ODD_PARTS + [".", ".."]) for _ in range(rng.randint(1, 3))) + ".png"
                members[rng.choice(["", "./", "/"]) + m] = png(12, 16, seed=rng.randint(0, 99))
            if rng.random() < 0.3:  # an archive inside the archive: a member, not a frame
                members["nested.tar"] = tar_bytes({"inner.png": png(12, 16)})
            raw = tar_bytes(members)
            name = stem + rng.choice([".tar", ".tar.gz", ".tgz"])
            data = gzip.compress(raw) if name.endswith("gz") else raw
        path = root.joinpath(*parts, name)
        if path.exists() or any(p.is_file() for p in path.parents if p != root and root in p.parents):
            continue
        try:
            write(path, data)
        except (OSError, NotADirectoryError):
            continue
    for p in root.rglob("*"):
        if not p.is_file():
            continue
        if p.name.endswith((".tar", ".tar.gz", ".tgz")):
            with tarfile.open(p) as t:
                n = sum(1 for m in t.getmembers() if not m.isdir())
            inputs += max(1, n)
        else:
            inputs += 1
    return inputs


@pytest.mark.parametrize("seed", [3])
def test_random_trees_stay_inside_the_output(run_job, models, tmp_path, seed):
    """Property check on one seeded random tree (tests/test_names_property.py runs many without Ray)."""
    images = tmp_path / "images"
    expected = random_tree(images, random.Random(seed))
    output = images / "out"  # inside --images: excluded from the inputs, never read back
    before = tree(tmp_path)
    proc = run_job("infer", "--model", models[0], "--images", str(images), "--output", str(output), "--write-masks")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = tree(tmp_path)
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed and all(k.startswith("images/out/") for k in changed), sorted(changed)
    preds, errors = rows(str(output))
    uris = [r["uri"] for r in preds + errors]
    assert len(uris) == len(set(uris)) == expected, (len(uris), len(set(uris)), expected)
    masks = [p for p in (output / "masks").rglob("*") if p.is_file()] if (output / "masks").exists() else []
    assert len(masks) == len(preds)

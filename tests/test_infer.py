"""The infer stage's pieces, without Ray: load, predict, postprocess, write, metrics."""

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tar_bytes
import torch
from PIL import Image

from segray import frames as load_stage
from segray import infer, modelio, sources
from segray import predictions as artifact
from segray import predictor as predict_stage
from segray.classes import CAMVID
from segray.layout import label_color_table
from segray.camvid import CLASSES, NUM_CLASSES, ORIGINAL_COLORS, ORIGINAL_TO_11, PALETTE, VOID_INDEX
from segray.model import UNetConfig, build_model
from segray.modelio import ModelSpec

MODEL_SIZE = (16, 24)


def png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def odd_images(h: int = 20, w: int = 30) -> dict[str, bytes]:
    """Valid images in every mode decode_image converts, keyed by file name."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    palette = Image.fromarray(rgb).quantize(colors=8)
    buf_p, buf_jpg = io.BytesIO(), io.BytesIO()
    palette.save(buf_p, format="PNG")
    Image.fromarray(rgb).save(buf_jpg, format="JPEG")
    gray16 = Image.fromarray((rng.integers(0, 65536, (h, w))).astype(np.uint16))
    buf16 = io.BytesIO()
    gray16.save(buf16, format="PNG")
    return {
        "rgb.png": png(rgb),
        "gray.png": png(rgb[..., 0]),
        "rgba.png": png(np.dstack([rgb, np.full((h, w), 128, np.uint8)])),
        "gray16.png": buf16.getvalue(),
        "palette.png": buf_p.getvalue(),
        "photo.JPG": buf_jpg.getvalue(),
    }


def bad_images() -> dict[str, bytes]:
    good = png(np.zeros((20, 30, 3), np.uint8))
    return {"zero.png": b"", "text.png": b"this is not a png\n" * 10, "truncated.png": good[: len(good) // 2]}


def tiny_loader(calls: list | None = None):
    """A model loader for tests: a random tiny U-Net (the real one reads model.pt)."""

    def load(uri, device):
        if calls is not None:
            calls.append(uri)
        torch.manual_seed(0)
        cfg = UNetConfig(base_channels=4, depth=2)
        spec = ModelSpec(model=cfg.to_dict(), input_height=MODEL_SIZE[0], input_width=MODEL_SIZE[1])
        return build_model(cfg).eval().to(device), spec

    return load


def listing_table(tmp_path, files: dict[str, bytes], labels=None) -> tuple[pa.Table, str]:
    root = tmp_path / "img"
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    listing = sources.list_inputs(str(root), labels)
    return pa.concat_tables(load_stage.listing_tables(listing)), str(root)


def stages_by_name(table: pa.Table) -> dict[str, str | None]:
    return {os.path.basename(u): s for u, s in zip(table.column("uri").to_pylist(), table.column("stage").to_pylist())}


def test_load_frames_decodes_odd_images_and_turns_bad_inputs_into_error_rows(tmp_path):
    files = {**odd_images(), **bad_images(), "notes.txt": b"hello"}
    files["seq/A.tar"] = tar_bytes({"./m/X.png": odd_images()["rgb.png"], "m/readme.md": b"#", "m/bad.png": b"x"})
    table, root = listing_table(tmp_path, files)
    out = pa.concat_tables(load_stage.load_frames(table, MODEL_SIZE, root))

    stages = stages_by_name(out)
    assert stages == {
        "rgb.png": None, "gray.png": None, "rgba.png": None, "gray16.png": None, "palette.png": None,
        "photo.JPG": None, "zero.png": "decode", "text.png": "decode", "truncated.png": "decode",
        "notes.txt": "list", "X.png": None, "readme.md": "list", "bad.png": "decode",
    }  # fmt: skip
    assert f"{root}/seq/A.tar/m/X.png" in out.column("uri").to_pylist()  # member URI: <archive>/<member>
    ok = out.filter(pa.compute.is_null(out.column("stage")))
    assert set(ok.column("height").to_pylist()) == {20} and set(ok.column("width").to_pylist()) == {30}
    assert {len(b) for b in ok.column("image").to_pylist()} == {MODEL_SIZE[0] * MODEL_SIZE[1] * 3}
    messages = dict(zip(out.column("uri").to_pylist(), out.column("message").to_pylist()))
    assert messages[f"{root}/zero.png"] == f"{root}/zero.png: empty file (0 bytes)"  # names the file


def test_load_frames_reports_a_broken_archive_once_and_a_vanished_file(tmp_path):
    a = odd_images()["rgb.png"]
    members = tar_bytes({"a.png": a, "b.png": odd_images()["gray.png"]})
    cut = 512 + -(-len(a) // 512) * 512 + 600  # inside the data of b.png
    table, root = listing_table(tmp_path, {"cut.tar": members[:cut], "gone.png": b"x"})
    os.remove(f"{root}/gone.png")  # deleted between listing and reading
    out = pa.concat_tables(load_stage.load_frames(table, MODEL_SIZE, root))
    assert stages_by_name(out) == {"a.png": None, "cut.tar": "archive", "gone.png": "read"}


def test_predictor_loads_once_and_passes_error_rows_through(tmp_path):
    table, root = listing_table(tmp_path, {**odd_images(), "zero.png": b""})
    frames = pa.concat_tables(load_stage.load_frames(table, MODEL_SIZE, root))
    calls: list = []
    predictor = predict_stage.Predictor("s3://bucket/run", loader=tiny_loader(calls))
    out = predictor(frames)
    predictor(frames)
    assert calls == ["s3://bucket/run"]  # once per replica, not per batch
    assert "image" not in out.column_names and out.num_rows == frames.num_rows
    for stage, pred in zip(out.column("stage").to_pylist(), out.column("pred").to_pylist()):
        if stage is None:
            mask = np.frombuffer(pred, np.uint8)
            assert mask.size == MODEL_SIZE[0] * MODEL_SIZE[1] and mask.max() < NUM_CLASSES
        else:
            assert pred is None


def _postprocess(batch: pa.Table, root: str, output: str, write_masks: bool = False) -> pa.Table:
    return predict_stage.postprocess(
        batch, MODEL_SIZE, CAMVID, label_color_table(None), root, output, write_masks,
    )  # fmt: skip


def test_postprocess_brings_masks_back_to_the_frame_size_and_counts_against_labels(tmp_path):
    h, w = 20, 30
    rng = np.random.default_rng(1)
    label = rng.integers(0, VOID_INDEX + 1, (h, w), dtype=np.uint8)
    # One colour of the original release per class (void last), to write a colour-coded label.
    original = [next(rgb for rgb, n in ORIGINAL_COLORS if ORIGINAL_TO_11[n] == c) for c in range(VOID_INDEX + 1)]
    labels = tmp_path / "lab"
    labels.mkdir()
    (labels / "rgb.png").write_bytes(png(label))
    (labels / "gray_L.png").write_bytes(png(np.array(original, np.uint8)[label]))  # colour-coded label of gray.png
    (labels / "rgba.png").write_bytes(png(label[:10]))  # wrong size
    table, root = listing_table(tmp_path, odd_images(h, w), str(labels))
    frames = pa.concat_tables(load_stage.load_frames(table, MODEL_SIZE, root))
    out = _postprocess(predict_stage.Predictor("m", loader=tiny_loader())(frames), root, str(tmp_path / "out"), True)

    rows = {os.path.basename(r["uri"]): r for r in out.to_pylist()}
    assert rows["rgba.png"]["stage"] == "label" and "label is 30x10 but the frame is 30x20" in rows["rgba.png"]["message"]
    for name in ("rgb.png", "gray.png", "gray16.png", "palette.png", "photo.JPG"):
        row = rows[name]
        mask = np.asarray(Image.open(io.BytesIO(row["mask_png"])))
        assert Image.open(io.BytesIO(row["mask_png"])).mode == "L"
        assert mask.shape == (h, w) == (row["height"], row["width"])
        assert mask.max() < NUM_CLASSES
        assert row["class_pixel_counts"] == np.bincount(mask.ravel(), minlength=NUM_CLASSES).tolist()
        colour_mask = np.asarray(Image.open(tmp_path / "out" / "masks" / (name + ".png")))
        assert np.array_equal(colour_mask, np.array(PALETTE, np.uint8)[mask])
    # With a label (index or colour): its confusion counts, computed here with numpy.
    for name in ("rgb.png", "gray.png"):
        mask = np.asarray(Image.open(io.BytesIO(rows[name]["mask_png"])))
        keep = label != VOID_INDEX
        cm = np.bincount(label[keep].astype(int) * NUM_CLASSES + mask[keep], minlength=NUM_CLASSES**2)
        assert rows[name]["confusion"] == cm.tolist()
        assert rows[name]["pixel_accuracy"] == pytest.approx((label[keep] == mask[keep]).mean())
    assert rows["gray16.png"]["label_uri"] is None and rows["gray16.png"]["confusion"] is None


def test_finish_frame_uses_nearest_and_never_invents_classes():
    pred = np.array([[0, 3], [7, 10]], np.uint8)
    result = predict_stage.finish_frame(pred, (4, 6), NUM_CLASSES, VOID_INDEX, np.full((4, 6), VOID_INDEX, np.uint8))
    assert result.mask.shape == (4, 6) and set(np.unique(result.mask)) == {0, 3, 7, 10}
    assert sum(result.class_pixel_counts) == 24 and result.pixel_accuracy is None  # all void: no ratio


def test_write_results_splits_rows_and_names_parts_by_content(tmp_path):
    table = pa.Table.from_pylist(
        [
            {"uri": "a", "height": 1, "width": 1, "mask_png": b"p", "class_pixel_counts": [1] + [0] * 10,
             "confusion": [1] + [0] * 120, "pixel_accuracy": 1.0, "label_uri": "la"},
            {"uri": "b", "height": 1, "width": 1, "mask_png": b"p", "class_pixel_counts": [0, 1] + [0] * 9},
            {"uri": "c", "stage": "decode", "message": "c: empty file (0 bytes)"},
        ],
        schema=load_stage.RESULTS_SCHEMA,
    )  # fmt: skip
    out = str(tmp_path / "out")
    totals = artifact.write_results(table, out, NUM_CLASSES)
    first = sorted(p for d in ("predictions", "errors") for p in os.listdir(f"{out}/{d}"))
    artifact.write_results(table, out, NUM_CLASSES)  # a retried task: the same files, rewritten
    assert sorted(p for d in ("predictions", "errors") for p in os.listdir(f"{out}/{d}")) == first
    assert len(first) == 2
    predictions = pq.read_table(f"{out}/predictions")
    assert predictions.schema == artifact.PREDICTIONS_SCHEMA and predictions.column("uri").to_pylist() == ["a", "b"]
    assert pq.read_table(f"{out}/errors").to_pylist() == [{"uri": "c", "stage": "decode", "message": "c: empty file (0 bytes)"}]
    assert (totals.frames, totals.labelled, totals.errors, totals.stages) == (2, 1, 1, {"decode": 1})
    assert totals.cm[0, 0] == 1 and totals.class_pixels.tolist()[:2] == [1, 1]
    assert artifact.done_uris(out) == {"a", "b", "c"}


def test_metrics_table_reads_every_ratio_from_the_summed_matrix():
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    cm[0, 0], cm[0, 1], cm[1, 1], cm[2, 0] = 6, 2, 3, 1  # class 2 is never predicted right
    totals = artifact.Totals(NUM_CLASSES, frames=3, labelled=2, errors=1, cm=cm, class_pixels=np.arange(NUM_CLASSES))
    rows = artifact.metrics_table(totals, list(CLASSES)).to_pylist()
    assert len(rows) == NUM_CLASSES + 1
    assert rows[0]["iou"] == pytest.approx(6 / (8 + 7 - 6)) and rows[1]["iou"] == pytest.approx(3 / (3 + 5 - 3))
    assert rows[2]["iou"] == 0.0 and rows[3]["iou"] is None  # absent class: no IoU, not 0
    overall = rows[-1]
    assert overall["class_name"] == "overall" and overall["class_index"] is None
    assert overall["miou"] == pytest.approx((6 / 9 + 3 / 5 + 0) / 3)
    assert overall["pixel_accuracy"] == pytest.approx(9 / 12)
    assert (overall["images"], overall["labelled_images"], overall["error_images"]) == (3, 2, 1)
    assert overall["mask_pixels"] == sum(range(NUM_CLASSES)) and rows[4]["mask_pixels"] == 4
    # rows (labelled) 8, 3, 1, then 0; columns (predicted) 7, 5, 0, then 0; total 12.
    # Class accuracy cm[c,c] / row_c: 6/8, 3/3, 0/1; none for the 8 classes nobody labelled.
    assert [r["class_accuracy"] for r in rows[:3]] == pytest.approx([3 / 4, 1.0, 0.0])
    # Dice 2 cm[c,c] / (row_c + col_c): 12/(8+7) = 4/5, 6/(3+5) = 3/4, 0/(1+0) = 0.
    assert [r["dice"] for r in rows[:3]] == pytest.approx([4 / 5, 3 / 4, 0.0])
    assert all(r["class_accuracy"] is None and r["dice"] is None for r in rows[3:-1])
    assert overall["class_accuracy"] is None and overall["dice"] is None  # per-class columns
    assert overall["mean_class_accuracy"] == pytest.approx((3 / 4 + 1 + 0) / 3)  # 7/12
    assert overall["mean_dice"] == pytest.approx((4 / 5 + 3 / 4 + 0) / 3)  # 31/60
    # IoU 6/9, 3/5, 0 weighted by 8/12, 3/12, 1/12: 4/9 + 3/20 = 107/180
    assert overall["fwiou"] == pytest.approx(8 / 12 * 6 / 9 + 3 / 12 * 3 / 5 + 1 / 12 * 0)
    assert all(r["mean_class_accuracy"] is None and r["mean_dice"] is None and r["fwiou"] is None for r in rows[:-1])
    # Columns are only ever added: the ones readers of earlier files know come first, unchanged.
    assert artifact.METRICS_SCHEMA.names[:13] == [
        "class_index", "class_name", "iou", "miou", "pixel_accuracy", "intersection", "label_pixels",
        "predicted_pixels", "mask_pixels", "images", "labelled_images", "error_images", "confusion"]

    unlabelled = artifact.metrics_table(artifact.Totals(NUM_CLASSES, frames=2), list(CLASSES)).to_pylist()
    assert unlabelled[-1]["miou"] is None and unlabelled[-1]["pixel_accuracy"] is None and unlabelled[-1]["images"] == 2
    for key in ("mean_class_accuracy", "mean_dice", "fwiou"):
        assert unlabelled[-1][key] is None, key
    assert all(r["class_accuracy"] is None and r["dice"] is None for r in unlabelled[:-1])


def test_mask_uri_mirrors_the_input_path_and_keeps_its_extension():
    assert predict_stage.mask_uri("s3://b/out", "s3://b/img", "s3://b/img/a/X.jpg") == "s3://b/out/masks/a/X.jpg.png"
    assert predict_stage.mask_uri("/o", "/i", "/i/s/A.tar/m/X.png") == "/o/masks/s/A.tar/m/X.png.png"
    assert predict_stage.mask_uri("/o", "/i", "/i/X.png") != predict_stage.mask_uri("/o", "/i", "/i/X.jpg")


@pytest.mark.parametrize("rel", ["a/../../x.png", "../x.png", "a//b.png", "./a.png", "/abs.png"])
def test_mask_uri_never_leaves_the_output(rel):
    with pytest.raises(ValueError):
        predict_stage.mask_uri("s3://b/out", "s3://b/img", f"s3://b/img/{rel}")


def test_config_is_checked():
    with pytest.raises(infer.InferError, match="--batch-size must be a positive integer, got 0"):
        infer.InferConfig(model="m", images="i", output="o", batch_size=0)
    with pytest.raises(infer.InferError, match="--num-replicas"):
        infer.InferConfig(model="m", images="i", output="o", num_replicas=-1)
    with pytest.raises(infer.InferError, match="--threads must be a positive integer, got 0"):
        infer.InferConfig(model="m", images="i", output="o", threads=0)


def test_cpu_threads_default_shares_the_cores_among_replicas(monkeypatch):
    monkeypatch.setattr(predict_stage.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert predict_stage.cpu_threads_default(1, 1) == 8  # one replica: every core, decode interleaves
    assert predict_stage.cpu_threads_default(3, 1) == 2
    assert predict_stage.cpu_threads_default(16, 1) == 1
    assert predict_stage.cpu_threads_default(4, 4) == 4  # never fewer than the CPUs Ray reserved


def test_predictor_uses_the_threads_asked_for_and_channels_last(tmp_path):
    table, root = listing_table(tmp_path, odd_images())
    frames = pa.concat_tables(load_stage.load_frames(table, MODEL_SIZE, root))
    before = torch.get_num_threads()
    try:
        predictor = predict_stage.Predictor("m", loader=tiny_loader(), threads=1)
        assert torch.get_num_threads() == 1
        out_nhwc = predictor(frames).column("pred").to_pylist()
    finally:
        torch.set_num_threads(before)
    # The channels-last replica predicts what the plain NCHW model predicts.
    model, spec = tiny_loader()("m", torch.device("cpu"))
    h, w = spec.input_size
    good = [i for i, st in enumerate(frames.column("stage").to_pylist()) if st is None]
    images = np.stack([np.frombuffer(frames.column("image")[i].as_py(), np.uint8).reshape(h, w, 3) for i in good])
    with torch.inference_mode():
        ref = model(modelio.images_to_tensor(images.copy())).argmax(1).to(torch.uint8).numpy()
    for k, i in enumerate(good):
        assert np.mean(np.frombuffer(out_nhwc[i], np.uint8) == ref[k].ravel()) > 0.999


def test_format_summary_fits_a_screen():
    cm = np.eye(NUM_CLASSES, dtype=np.int64)
    run = artifact.Totals(NUM_CLASSES, frames=5, labelled=5, errors=1, cm=cm, stages={"decode": 1})
    text = infer.format_summary(
        infer.InferSummary("s3://b/o", 6, 0, run, run, 0, 2.0, True, tuple(CLASSES))
    )
    assert "3.00 frames/s" in text and "mIoU       1.0000" in text and "decode 1" in text
    assert len(text.splitlines()) <= 12
    # Three classes, everything predicted as class 0: [[2, 0, 0], [3, 0, 0], [0, 0, 0]].
    cm = np.array([[2, 0, 0], [3, 0, 0], [0, 0, 0]], np.int64)
    run = artifact.Totals(3, frames=1, labelled=1, cm=cm)
    text = infer.format_summary(infer.InferSummary("o", 1, 0, run, run, 0, 1.0, True, ("a", "b", "c")))
    # class accuracy 2/2, 0/3 (c unlabelled): mean 0.5; Dice 4/7, 0 (c absent): mean 2/7 = 0.2857;
    # IoU 2/5, 0: fwIoU 2/5 * 2/5 + 3/5 * 0 = 0.16
    assert "  mean acc   0.5000   mean Dice 0.2857   fwIoU 0.1600" in text.splitlines()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_predictor_on_gpu_agrees_with_cpu(tmp_path):
    table, root = listing_table(tmp_path, odd_images())
    frames = pa.concat_tables(load_stage.load_frames(table, MODEL_SIZE, root))
    cpu = predict_stage.Predictor("m", loader=tiny_loader())(frames).column("pred").to_pylist()
    gpu = predict_stage.Predictor("m", use_gpu=True, loader=tiny_loader())(frames).column("pred").to_pylist()
    agree = np.mean([np.mean(np.frombuffer(a, np.uint8) == np.frombuffer(b, np.uint8)) for a, b in zip(cpu, gpu)])
    assert agree > 0.9  # bf16 autocast moves a few argmax ties, no more


def test_replicas_must_leave_a_whole_cpu_for_decoding(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 1.0})
    # Half a CPU left: decode tasks (1 CPU each) would never be scheduled, the job would hang.
    with pytest.raises(infer.InferError, match="leave less than 1 of the cluster's 1 CPUs for decoding"):
        infer._check_resources(infer.InferConfig(model="m", images="i", output="o", cpus_per_replica=0.5))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    infer._check_resources(infer.InferConfig(model="m", images="i", output="o"))  # 1 for the replica, 1 left
    with pytest.raises(infer.InferError, match="lower --num-replicas or --cpus-per-replica"):
        infer._check_resources(infer.InferConfig(model="m", images="i", output="o", num_replicas=2))


@pytest.mark.parametrize("uri, ok", [
    ("s3://b/out/masks/a/X.png.png", True), ("/o/masks/a.png", True), ("s3://b/out/masks/../x.png", False),
    ("/o/masks/a/../../x.png", False), ("/o/masks//a.png", False), ("/o/masks/./a.png", False), ("/o/masks", False),
    ("/o/masksx/a.png", False),
])
def test_the_last_check_before_a_mask_write(uri, ok):
    """mask_uri's own check (behind sources.mask_rel's): the joined path lies plainly below masks/."""
    root = "s3://b/out/masks" if uri.startswith("s3://") else "/o/masks"
    assert sources.lies_below(uri, root) is ok

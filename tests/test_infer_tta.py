"""Infer's test-time options (--tta, --scales, --tile/--overlap): the replica and postprocessing
without Ray, the run record, and jobs/infer.py end to end on the session's Ray cluster
(two jobs and one refused rerun; local paths, a briefly trained tiny model)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from segray import frames as load_stage
from segray import infer, modelio, storage, tta
from segray import predictor as predict_stage
from segray.camvid import NUM_CLASSES
from segray.classes import CAMVID
from segray.layout import label_color_table
from segray.preprocess import decode_image, resize_image, resize_label

from test_infer import listing_table, odd_images, tiny_loader
from test_infer_e2e import Collection, check_output, encode, read_folder, train_tiny_model
from videos import lossless_mkv, scenes

# ----------------------------------------------------------------------------- without Ray


def reference_masks(model, spec, images: list[np.ndarray], **options) -> list[np.ndarray]:
    """Argmax masks of the plain (NCHW, float32) model through segray.tta, one frame at a time."""
    out = []
    with torch.inference_mode():
        for image in images:
            x = modelio.images_to_tensor(image[None].copy(), spec.mean, spec.std)
            if options.get("tile"):
                logits = tta.tiled_logits(model, x, options["tile"], options["overlap"], 4, options.get("flip", False))
            else:
                logits = tta.augmented_logits(model, x, options.get("flip", False), options.get("scales"))
            out.append(logits.argmax(1)[0].to(torch.uint8).numpy())
    return out


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.mean(a == b))


def conv_loader(uri, device):
    """A random 5x5 conv: argmax masks with many classes, and not mirror-symmetric."""
    torch.manual_seed(0)
    return torch.nn.Conv2d(3, NUM_CLASSES, 5, padding=2).eval().to(device), tiny_loader()(uri, device)[1]


def test_predictor_tiles_frames_of_several_sizes_at_their_own_size(tmp_path):
    rng = np.random.default_rng(0)
    files = {f"f{h}x{w}.png": encode(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
             for h, w in [(40, 60), (9, 70), (40, 60), (33, 29)]}
    files["zero.png"] = b""
    table, root = listing_table(tmp_path, files)
    frames = pa.concat_tables(load_stage.load_frames(table, None, root))  # None: no resize
    good = [i for i, st in enumerate(frames.column("stage").to_pylist()) if st is None]
    sizes = [(frames.column("height")[i].as_py(), frames.column("width")[i].as_py()) for i in good]
    assert sorted(len(frames.column("image")[i].as_py()) for i in good) == sorted(h * w * 3 for h, w in sizes)

    predictor = predict_stage.Predictor("m", loader=conv_loader, threads=1, tta="flip", tile=(16, 24), batch_size=5)
    assert predictor.overlap == 4  # the default: a quarter of the smaller side
    out = predictor(frames)
    model, spec = conv_loader("m", torch.device("cpu"))
    images = [np.frombuffer(frames.column("image")[i].as_py(), np.uint8).reshape(*sizes[k], 3)
              for k, i in enumerate(good)]
    expected = reference_masks(model, spec, images, tile=(16, 24), overlap=4, flip=True)
    for k, i in enumerate(good):
        mask = np.frombuffer(out.column("pred")[i].as_py(), np.uint8).reshape(sizes[k])
        assert agreement(mask, expected[k]) > 0.999
        assert len(np.unique(mask)) > 3  # a mask of many classes: the agreement means something
    assert out.column("pred")[frames.column("stage").to_pylist().index("decode")].as_py() is None

    # Postprocessing keeps each mask at its frame's size (no model size to come back from).
    rows = predict_stage.postprocess(out, None, CAMVID, label_color_table(None), root, str(tmp_path / "o"), False)
    for row in rows.to_pylist():
        if row["stage"] is None:
            mask = np.asarray(Image.open(io.BytesIO(row["mask_png"])))
            assert mask.shape == (row["height"], row["width"])


def test_predictor_flip_and_scales_average_at_the_model_size(tmp_path):
    table, root = listing_table(tmp_path, odd_images())
    model, spec = conv_loader("m", torch.device("cpu"))
    size = spec.input_size
    frames = pa.concat_tables(load_stage.load_frames(table, size, root))
    images = [np.frombuffer(b, np.uint8).reshape(*size, 3) for b in frames.column("image").to_pylist()]
    plain = reference_masks(model, spec, images)
    for options in ({"tta": "flip"}, {"scales": (0.5, 1.0, 1.5)}, {"tta": "flip", "scales": (0.75, 1.25)}):
        got = predict_stage.Predictor("m", loader=conv_loader, threads=1, **options)(frames).column("pred")
        expected = reference_masks(model, spec, images, flip="tta" in options, scales=options.get("scales"))
        masks = [np.frombuffer(b.as_py(), np.uint8).reshape(size) for b in got]
        assert all(agreement(m, e) > 0.999 for m, e in zip(masks, expected)), options
        # The option did change the masks (so the agreement above is not the plain model's).
        assert sum(np.sum(e != p) for e, p in zip(expected, plain)) > 0, options


def test_config_checks_the_options_naming_the_flag():
    config = dict(model="m", images="i", output="o")
    with pytest.raises(infer.InferError, match="^--scales: every factor must be a positive finite number, got 0$"):
        infer.InferConfig(**config, scales=(1.0, 0.0))
    with pytest.raises(infer.InferError, match="^--tile and --scales cannot be combined"):
        infer.InferConfig(**config, tile=(64, 64), scales=(1.0,))
    with pytest.raises(infer.InferError, match="^--overlap must be an integer from 0 to less than both sides"):
        infer.InferConfig(**config, tile=(64, 32), overlap=32)
    with pytest.raises(infer.InferError, match="^--tta 'flop'"):
        infer.InferConfig(**config, tta="flop")
    tiled = infer.InferConfig(**config, tile=[64, 96])
    assert (tiled.tile, tiled.overlap) == ((64, 96), 16)
    assert infer.InferConfig(**config, scales=[1, 2]).scales == (1.0, 2.0)


def test_the_run_record_holds_the_options_and_a_rerun_must_repeat_them(tmp_path):
    out = str(tmp_path / "out")
    base = dict(model="m", images=str(tmp_path / "img"), output=out)
    plain = infer.InferConfig(**base)
    record = infer.run_record(plain, "abc")
    assert {k: record[k] for k in ("tta", "scales", "tile", "overlap")} == dict.fromkeys(("tta", "scales", "tile",
                                                                                          "overlap"))
    assert not infer.check_output(plain, record)  # new output
    flipped = infer.InferConfig(**base, tta="flip", scales=(0.75, 1.0))
    storage.write_bytes(f"{out}/infer.json", json.dumps(infer.run_record(flipped, "abc")).encode())
    assert infer.check_output(flipped, infer.run_record(flipped, "abc"))  # the same options: a rerun
    for other, flag, words in [
        (plain, "--tta", "--tta flip, this run has --tta none"),
        (infer.InferConfig(**base, tta="flip"), "--scales", "--scales 0.75,1, this run has --scales none"),
        (infer.InferConfig(**base, tta="flip", scales=(1.0, 0.75)), "--scales", "--scales 0.75,1, this run has --scales 1,0.75"),
    ]:
        with pytest.raises(infer.InferError, match=f"was made with {words}") as e:
            infer.check_output(other, infer.run_record(other, "abc"))
        assert flag in str(e.value)
    tiled = infer.InferConfig(**base, tile=(32, 48), overlap=0)
    storage.write_bytes(f"{out}/infer.json", json.dumps(infer.run_record(tiled, "abc")).encode())
    assert infer.check_output(tiled, infer.run_record(tiled, "abc"))
    other = infer.InferConfig(**base, tile=(32, 48))
    with pytest.raises(infer.InferError, match="was made with --overlap 0, this run has --overlap 8"):
        infer.check_output(other, infer.run_record(other, "abc"))
    # An output recorded before the options existed: made without them.
    old = {k: v for k, v in infer.run_record(plain, "abc").items() if k not in ("tta", "scales", "tile", "overlap")}
    storage.write_bytes(f"{out}/infer.json", json.dumps(old).encode())
    assert infer.check_output(plain, infer.run_record(plain, "abc"))
    with pytest.raises(infer.InferError, match="--tile none, this run has --tile 32x48"):
        infer.check_output(tiled, infer.run_record(tiled, "abc"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_pass_runs_under_bf16_autocast_on_gpu_and_agrees_with_cpu(tmp_path):
    rng = np.random.default_rng(2)
    table, root = listing_table(tmp_path, {f"f{k}.png": encode(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
                                           for k in range(3)})
    seen: list = []

    def loader(uri, device):
        model, spec = conv_loader(uri, device)
        model.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        return model, spec

    for options, size in (({"tta": "flip", "scales": (0.75, 1.0)}, (16, 24)), ({"tta": "flip", "tile": (16, 24)}, None)):
        frames = pa.concat_tables(load_stage.load_frames(table, size, root))
        cpu = predict_stage.Predictor("m", loader=conv_loader, threads=1, **options)(frames).column("pred").to_pylist()
        seen.clear()
        gpu = predict_stage.Predictor("m", use_gpu=True, loader=loader, **options)(frames).column("pred").to_pylist()
        assert seen and set(seen) == {torch.bfloat16}, options  # every pass, flipped and scaled too
        agree = np.mean([np.mean(np.frombuffer(a, np.uint8) == np.frombuffer(b, np.uint8)) for a, b in zip(cpu, gpu)])
        assert agree > 0.9, options  # bf16 moves a few argmax ties, no more


# ----------------------------------------------------------------------------- the job


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    run = str(tmp_path_factory.mktemp("tta-model") / "runs" / "tiny")
    train_tiny_model(f"{run}/model")
    return run


def job_masks(out: str) -> dict[str, np.ndarray]:
    rows = read_folder(f"{out}/predictions").to_pylist()
    return {r["uri"]: np.asarray(Image.open(io.BytesIO(r["mask_png"]))) for r in rows}


def test_flip_and_scales_job_and_a_rerun_with_other_options(tiny_model, run_job, tmp_path):
    c = Collection(str(tmp_path))
    c.frame("a/f0.png")
    c.frame("a/f1.png", size=(40, 60))
    c.frame("b/f2.png", size=(24, 36), label_rel=None)
    c.bad("bad/zero.png", b"", "decode")
    out = str(tmp_path / "out")
    args = ("--model", tiny_model, "--images", c.images, "--labels", c.labels, "--output", out, "--batch-size", "2")
    proc = run_job("infer", *args, "--tta", "flip", "--scales", "0.75,1,1.25", check=True)
    assert "infer: test-time options: flip, scales 0.75,1,1.25; 6 model pass(es) per frame" in proc.stdout
    assert "  test-time  flip, scales 0.75,1,1.25" in proc.stdout and "mIoU" in proc.stdout
    check_output(out, c)  # one row per input, masks at each frame's size, metrics from them
    record = json.loads(storage.read_bytes(f"{out}/infer.json"))
    assert (record["tta"], record["scales"], record["tile"], record["overlap"]) == ("flip", [0.75, 1.0, 1.25], None,
                                                                                   None)
    # The masks are the flip-and-scales masks of the model, not its plain ones.
    model, spec = modelio.load_model(tiny_model)
    masks = job_masks(out)
    tta_diff = plain_diff = 0
    for uri, size in c.predicted.items():
        image = resize_image(decode_image(storage.read_bytes(uri)), spec.input_size)
        (averaged,) = reference_masks(model, spec, [image], flip=True, scales=(0.75, 1.0, 1.25))
        (plain,) = reference_masks(model, spec, [image])
        tta_diff += np.sum(masks[uri] != resize_label(averaged, size))
        plain_diff += np.sum(masks[uri] != resize_label(plain, size))
    assert plain_diff > 10 * tta_diff and tta_diff <= 0.002 * sum(h * w for h, w in c.predicted.values())

    # A rerun into the same output with other options is refused before anything is touched.
    proc = run_job("infer", *args, "--tta", "flip")
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"infer: error: InferError: --output {out} was made with --scales 0.75,1,1.25, this run "
                           "has --scales none"), line
    check_output(out, c)


def test_tile_job_predicts_frames_at_their_own_size(tiny_model, run_job, tmp_path):
    c = Collection(str(tmp_path))
    c.frame("a/big.png", size=(64, 96))
    c.frame("a/odd.png", size=(45, 50))
    c.frame("b/flat.png", size=(20, 120), label_rel=None)  # lower than the tile: one row of windows
    c.frame("b/f.jpg", size=(72, 100))
    c.bad("bad/zero.png", b"", "decode")
    clip = scenes(3, 40, 56, seed=4)
    video = f"{c.images}/v/clip.mkv"
    storage.write_bytes(video, lossless_mkv([im for im, _ in clip]))
    c.predicted.update({f"{video}#frame={k}": (40, 56) for k in range(3)})
    out = str(tmp_path / "out")
    proc = run_job("infer", "--model", tiny_model, "--images", c.images, "--labels", c.labels, "--output", out,
                   "--batch-size", "4", "--tile", "32x48", "--tta", "flip", check=True)
    assert "tile 32x48 overlap 8 (frames at their own size); 2 model pass(es) per window" in proc.stdout
    check_output(out, c)
    record = json.loads(storage.read_bytes(f"{out}/infer.json"))
    assert (record["tta"], record["scales"], record["tile"], record["overlap"]) == ("flip", None, [32, 48], 8)
    # Each mask is the tiled prediction at the frame's own size, not the resized frame's.
    model, spec = modelio.load_model(tiny_model)
    masks = job_masks(out)
    tile_diff = plain_diff = 0
    for uri, size in c.predicted.items():
        # A video frame decodes to its source exactly (lossless FFV1), at its own size.
        image = clip[int(uri.rsplit("=", 1)[1])][0] if "#frame=" in uri else decode_image(storage.read_bytes(uri))
        (tiled,) = reference_masks(model, spec, [image], tile=(32, 48), overlap=8, flip=True)
        (plain,) = reference_masks(model, spec, [resize_image(image, spec.input_size)])
        tile_diff += np.sum(masks[uri] != tiled)
        plain_diff += np.sum(masks[uri] != resize_label(plain, size))
        assert masks[uri].max() < NUM_CLASSES
    assert plain_diff > 10 * tile_diff
    assert tile_diff <= 0.002 * sum(h * w for h, w in c.predicted.values())

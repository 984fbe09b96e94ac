"""Test-time options of infer (issue #19) on real frames: mIoU through the job, frames/s of the model.

    python bench/tta_bench.py --model /tmp/q/runs/final --images ../shared/camvid/val [--precision bf16] \
        --labels ../shared/camvid/valannot --work /tmp/q/tta

For each setting (none, ``--tta flip``, ``--scales 0.75,1,1.25``, both, ``--tile`` at the
frames' own resolution with and without flip) it reports:

- **mIoU, pixel accuracy, mean class accuracy, mean Dice, fwIoU**: from one run of
  ``python jobs/infer.py --labels`` per setting, read from the job's ``metrics.parquet``
  (segray.predictions.read_confusion), so the numbers are the product's own;
- **frames/s of the model**: the same frames through segray.tta's functions in this process
  (the replica's code path without Ray: start-up and decoding excluded, which for a hundred
  frames are most of a job's wall time), median of ``--rounds`` rounds, rounds interleaved over
  the settings so that load on a shared machine falls on all of them alike, and the ratio to
  the plain model measured in the same rounds;
- the job's own wall time and frames/s (start-up included), for completeness.

Tiling needs frames larger than the model's input: ``--tile`` defaults to the model's input size.
``--work`` must be empty, absent, or a folder this script wrote before (``tta_bench.json``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.benchlib import median, print_table, run_cmd  # noqa: E402
from segray import modelio, tta  # noqa: E402
from segray.precision import PRECISIONS  # noqa: E402
from segray.predictor import Predictor  # noqa: E402
from segray.metrics import summarize  # noqa: E402
from segray.predictions import read_confusion  # noqa: E402
from segray.frames import load_frame  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MARKER = "tta_bench.json"


def settings(tile: str, overlap: int) -> dict[str, list[str]]:
    return {
        "none": [],
        "flip": ["--tta", "flip"],
        "scales": ["--scales", "0.75,1,1.25"],
        "flip+scales": ["--tta", "flip", "--scales", "0.75,1,1.25"],
        "tile": ["--tile", tile, "--overlap", str(overlap)],
        "tile+flip": ["--tile", tile, "--overlap", str(overlap), "--tta", "flip"],
    }


def frames(images: Path, size: tuple[int, int] | None) -> list[np.ndarray]:
    """The folder's PNG/JPEG frames, sorted, resized to ``size`` as the job's load stage does (or
    at their own size)."""
    out = []
    for p in sorted(q for q in images.rglob("*") if q.suffix.lower() in (".png", ".jpg", ".jpeg")):
        out.append(load_frame(p.read_bytes(), str(p), size)[0])
    return out


def model_seconds(model, spec, batch: list[np.ndarray], flags: list[str], batch_size: int) -> float:
    """Seconds for the model to map ``batch`` (frames of one size) under ``flags``."""
    value = dict(zip(flags[::2], flags[1::2]))  # every setting is "--flag value" pairs
    flip = value.get("--tta") == tta.FLIP
    scales = tta.parse_scales(value["--scales"]) if "--scales" in value else None
    tile = tta.parse_tile(value["--tile"]) if "--tile" in value else None
    overlap = int(value["--overlap"]) if tile else 0
    start = time.perf_counter()
    with torch.inference_mode():
        for k in range(0, len(batch), batch_size):
            x = modelio.images_to_tensor(np.stack(batch[k:k + batch_size]), spec.mean, spec.std, channels_last=True)
            if tile:
                logits = tta.tiled_logits(model, x, tile, overlap, batch_size, flip)
            else:
                logits = tta.augmented_logits(model, x, flip, scales)
            logits.argmax(1)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a training run or its model/ folder")
    ap.add_argument("--images", required=True, type=Path)
    ap.add_argument("--labels", required=True, type=Path)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--tile", default=None, help="HxW (default: the model's input size)")
    ap.add_argument("--overlap", type=int, default=None, help="default: segray.tta.default_overlap")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma-separated setting names (default: all)")
    ap.add_argument("--precision", choices=PRECISIONS, default="auto",
                    help="the jobs' --precision, and the same compute dtype for the model timing (default auto: fp32 "
                    "on a CPU)")
    args = ap.parse_args()

    if args.work.exists() and any(args.work.iterdir()) and not (args.work / MARKER).exists():
        sys.exit(f"{args.work} holds files this script did not write; pass an empty or new --work")
    args.work.mkdir(parents=True, exist_ok=True)
    # The replica itself, without Ray: its model, threads, precision and pass (Predictor._forward).
    replica = Predictor(args.model, threads=args.threads, precision=args.precision)
    spec, forward, precision = replica.spec, replica._forward, replica.precision
    tile = args.tile or f"{spec.input_size[0]}x{spec.input_size[1]}"
    overlap = args.overlap if args.overlap is not None else tta.default_overlap(tta.parse_tile(tile))
    chosen = settings(tile, overlap)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    (args.work / MARKER).write_text(json.dumps({"model": args.model, "settings": chosen}) + "\n")

    rows = {name: {"setting": " ".join(flags) or "(none)"} for name, flags in chosen.items()}
    for name, flags in chosen.items():  # the job: the product's own metrics
        out = args.work / name
        shutil.rmtree(out, ignore_errors=True)  # this script's own output folder (checked above)
        start = time.perf_counter()
        result = run_cmd([sys.executable, str(REPO / "jobs/infer.py"), "--model", args.model, "--images",
                          str(args.images), "--labels", str(args.labels), "--output", str(out),
                          "--precision", args.precision, *flags], timeout=3600)
        wall = time.perf_counter() - start
        (args.work / f"{name}.log").write_text(result.out)
        if result.rc != 0:
            sys.exit(f"infer {name} failed ({result.rc}); see {args.work / name}.log")
        cm, names = read_confusion(str(out))
        s = summarize(cm, names)
        job_fps = re.search(r"\(([\d.]+) frames/s\)", result.out)
        rows[name].update(miou=round(s["miou"], 4), pixel_acc=round(s["pixel_accuracy"], 4),
                          mean_acc=round(s["mean_class_accuracy"], 4), mean_dice=round(s["mean_dice"], 4),
                          fwiou=round(s["fwiou"], 4), job_s=round(wall, 1),
                          job_fps=float(job_fps.group(1)) if job_fps else None)

    at_model = frames(args.images, spec.input_size)
    native = frames(args.images, None)
    if len({f.shape for f in native}) != 1:
        sys.exit("the frames differ in size; the timing below assumes one size")
    seconds: dict[str, list[float]] = {name: [] for name in chosen}
    for _ in range(args.rounds):
        for name, flags in chosen.items():
            batch = native if "--tile" in flags else at_model
            seconds[name].append(model_seconds(forward, spec, batch, flags, 16))
    base = median(seconds["none"]) if "none" in seconds else None
    for name in chosen:
        fps = len(at_model) / median(seconds[name])
        rows[name].update(model_fps=round(fps, 2), vs_none=round(base / median(seconds[name]), 3) if base else None)
    table = list(rows.values())
    print_table(table, title=f"{args.model} on {args.images} ({len(at_model)} frames, model input "
                f"{spec.input_size[0]}x{spec.input_size[1]}, frames {native[0].shape[0]}x{native[0].shape[1]}, "
                f"{args.threads} torch threads, {precision}, median of {args.rounds} rounds)")
    record = {"model": args.model, "precision": precision, "settings": chosen, "rows": table}
    (args.work / MARKER).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

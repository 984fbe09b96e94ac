"""The infer stage's work in one plain PyTorch process: the baseline for jobs/infer.py's frames/s.

Same steps and the same functions as segray.infer (read, decode, resize, predict, mask back to
the frame's size, PNG, class counts, confusion against the label, Parquet), without Ray: one
process, frames in order, torch on every core. Image files and ``.tar`` archives of frames
(members streamed with segray.sources.iter_archive, as the job does; no labels for members).
The last line is machine-readable (``BENCH_JSON {...}``) for bench/infer_bench.py.

    MALLOC_MMAP_THRESHOLD_=2000000000 MALLOC_TRIM_THRESHOLD_=2000000000 \\
    python bench/infer_plain.py --model /tmp/runs/cv16 --images ../shared/camvid/val \\
        --labels ../shared/camvid/valannot --output /tmp/plain-out
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from segray import frames, modelio, predictions, predictor, sources, storage  # noqa: E402
from segray.layout import label_color_table  # noqa: E402
from segray.metrics import mean_iou, pixel_accuracy  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", required=True, help="a prefix of image files and/or .tar archives of frames")
    parser.add_argument("--labels", default=None)
    parser.add_argument("--output", required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--channels-last", action="store_true",
                        help="model and input in channels_last (NHWC) memory format (default: off, as the job on CPU)")
    parser.add_argument("--device", default="cpu",
                        help="cpu, or cuda: bf16 autocast and channels_last, as the job's GPU replica (default cpu)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    channels_last = args.channels_last or gpu

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    images, labels = storage.normalize(args.images), storage.normalize(args.labels) if args.labels else None
    model, spec = modelio.load_model(args.model, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    listing = sources.list_inputs(images, labels)
    num_classes = spec.num_classes
    table = label_color_table(labels)
    load_s = time.perf_counter() - start

    rows, total_cm, t0 = [], np.zeros((num_classes, num_classes), np.int64), time.perf_counter()
    for batch in batches(encoded(listing), args.batch_size):
        loaded = [frames.load_frame(data, uri, spec.input_size) for uri, data, _ in batch]
        x = np.stack([f[0] for f in loaded])
        with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=gpu):
            x = modelio.images_to_tensor(x, spec.mean, spec.std, device, channels_last=channels_last)
            preds = model(x).argmax(1).to(torch.uint8).cpu().numpy()
        for (uri, _, item_label), (_, height, width), pred in zip(batch, loaded, preds):
            label = predictor.load_label(item_label.uri, item_label.kind, table) if item_label else None
            r = predictor.finish_frame(pred, (height, width), num_classes, spec.void_index, label)
            if r.confusion is not None:
                total_cm += np.asarray(r.confusion, np.int64).reshape(num_classes, num_classes)
            rows.append({"uri": uri, "height": height, "width": width, "mask_png": r.mask_png,
                         "class_pixel_counts": r.class_pixel_counts, "label_uri": item_label.uri if item_label else None,
                         "confusion": r.confusion, "pixel_accuracy": r.pixel_accuracy})  # fmt: skip
    predictions.write_parquet(
        storage.join(args.output, "predictions", "part-0.parquet"),
        pa.Table.from_pylist(rows, schema=predictions.PREDICTIONS_SCHEMA),
    )
    seconds = time.perf_counter() - t0
    print(
        f"plain: {len(rows)} frames in {seconds:.1f} s = {len(rows) / seconds:.2f} frames/s "
        f"({args.threads} torch threads; model load and listing {load_s:.1f} s not counted; "
        f"with them {len(rows) / (seconds + load_s):.2f} frames/s)"
    )
    if total_cm.sum():
        print(f"plain: mIoU {mean_iou(total_cm):.4f}, pixel accuracy {pixel_accuracy(total_cm):.4f}")
    print("BENCH_JSON " + json.dumps({"bench": "infer_plain", "frames": len(rows), "seconds": seconds,
                                      "load_s": load_s, "threads": args.threads,
                                      "channels_last": channels_last, "device": args.device}), flush=True)
    return 0


def encoded(listing: sources.Listing):
    """(uri, encoded bytes, label or None) of every frame: image files, then archive members."""
    for item in listing.inputs:
        if item.kind == sources.KIND_IMAGE:
            yield item.uri, storage.read_bytes(item.uri), item.label
        elif item.kind == sources.KIND_ARCHIVE:
            for member in sources.iter_archive(item.uri, skip=frozenset(item.done)):
                if not member.error:
                    yield sources.member_uri(item.uri, member.path), member.data, None


def batches(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


if __name__ == "__main__":
    sys.exit(main())

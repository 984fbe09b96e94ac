"""CamVid val as a video (issue #16): the same frames through jobs/infer.py as images and as videos.

    python bench/camvid_video.py --val ../shared/camvid/val --valannot ../shared/camvid/valannot \
        --model /tmp/q/runs/sqrt50 --work /tmp/cvv/bench

The val split of the SegNet layout is one sequence (0016E5, every other frame of the 30 fps
original, 101 frames at 360x480). Its frames, sorted in sequence order (by the frame number in
``0016E5_<number>.png``), are encoded as

- ``h264``: libx264, yuv420p, crf 18, preset medium, 30 fps, in ``.mp4`` (lossy: chroma at half
  resolution plus quantisation; B-frames, so frames are stored out of presentation order);
- ``ffv1``: FFV1 (level 3) in ``.mkv``, pix_fmt bgr0 (8-bit RGB; this FFmpeg's FFV1 encoder has
  no 8-bit gbrp): lossless;
- ``x264rgb``: libx264rgb, qp 0, preset medium, in ``.mp4``, pix_fmt rgb24: lossless H.264;

and frame k of each video is labelled by ``<work>/video_labels/0016E5/<k>.png``, a byte copy of
the k-th label of ``--valannot`` in the same order. Both x264 encodings run with ``threads=1``:
with its default threads, libx264 here gave two different files from the same frames on two
encodes (1553574 and 1553160 bytes), so the lossy row could move between runs; one thread gives
the same file every time. RGB to yuv420p is swscale's default (BT.601, limited range, untagged),
and the job decodes it back with the same default. Then ``python jobs/infer.py --labels`` runs on
the image folder and on each video (one job each, each with its own local Ray instance), and the
table compares them: frames, errors, mIoU and pixel accuracy from the job's ``metrics.parquet``
(segray.predictions.read_confusion), frames/s as the job reports it (start-up and listing
included) and the wall time of the command.

Checks, printed below the table:

- decode: the videos decoded here with PyAV (rgb24, as the job decodes them) against the PNGs:
  max abs difference (0 for the lossless ones) and PSNR;
- per frame: frame k of each video against its image in the image run: how many masks differ
  (pixels) and the difference of the summed confusion matrices (zero when decoding is lossless);
- the job output: lines that look like crashed workers (SIGABRT, SIGSEGV, "core dumped",
  "Fatal Python error", worker died), counted per run, logs kept under ``<work>/logs/``.

``--work`` must be empty, absent, or a folder this script wrote before (it holds
``camvid_video.json``): its outputs are then deleted and made again.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MARKER = "camvid_video.json"
CLIP = "0016E5"
FPS = 30
DONE = re.compile(r"infer: done in ([\d.]+) s: (\d+) inputs this run \(([\d.]+) frames/s\)")
CRASH = re.compile(r"SIGABRT|SIGSEGV|SIGBUS|Aborted|core dumped|Fatal Python error|died unexpectedly|"
                   r"WorkerCrashedError|ActorDiedError|RayTaskError|worker crashed|died or was killed", re.I)

# name -> (container extension, codec, pix_fmt, codec options, description)
ENCODINGS = {
    "h264": (".mp4", "libx264", "yuv420p", {"crf": "18", "preset": "medium", "threads": "1"},
             "libx264, yuv420p, crf 18, preset medium, threads 1, 30 fps, .mp4"),
    "ffv1": (".mkv", "ffv1", "bgr0", {"level": "3"},
             "ffv1 level 3, bgr0 (RGB), 30 fps, .mkv (lossless)"),
    "x264rgb": (".mp4", "libx264rgb", "rgb24", {"qp": "0", "preset": "medium", "threads": "1"},
                "libx264rgb, rgb24, qp 0, preset medium, threads 1, 30 fps, .mp4 (lossless)"),
}


def frame_order(val: Path) -> list[str]:
    """The val PNGs in sequence order: by sequence name, then the frame number of ``SEQ_<n>``."""
    names = [p.name for p in val.iterdir() if p.suffix.lower() == ".png"]
    if not names:
        sys.exit(f"camvid_video: no PNG in {val}")

    def key(name: str):
        stem = name[: -len(".png")]
        seq, _, num = stem.rpartition("_")
        if not num.isdigit():
            sys.exit(f"camvid_video: {name} is not named <sequence>_<frame number>.png")
        return seq, int(num)

    names.sort(key=key)
    seqs = sorted({key(n)[0] for n in names})
    if len(seqs) != 1:
        print(f"camvid_video: WARNING: {len(seqs)} sequences in {val} ({', '.join(seqs)}); "
              "they are concatenated into one video", flush=True)
    return names


def read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def encode(frames: list[np.ndarray], dest: Path, name: str) -> dict:
    import av

    ext, codec, pix_fmt, options, _ = ENCODINGS[name]
    h, w = frames[0].shape[:2]
    t0 = time.perf_counter()
    with av.open(str(dest), mode="w") as out:
        stream = out.add_stream(codec, rate=FPS, options=dict(options))
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            for packet in stream.encode(frame):  # PyAV converts rgb24 to the stream's pix_fmt
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return {"seconds": time.perf_counter() - t0, "bytes": dest.stat().st_size}


def decode_check(video: Path, frames: list[np.ndarray]) -> dict:
    """Decode ``video`` as the job does (frame.to_ndarray(format="rgb24"), presentation order) and
    compare with the source frames."""
    import av

    with av.open(str(video)) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    out = {"frames": len(decoded), "max_abs_diff": None, "psnr_db": None}
    if len(decoded) != len(frames):
        return out
    diff = max(int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) for a, b in zip(decoded, frames))
    mse = float(np.mean([np.mean((a.astype(np.float64) - b) ** 2) for a, b in zip(decoded, frames)]))
    out["max_abs_diff"] = diff
    out["psnr_db"] = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    return out


def run_infer(name: str, model: str, images: str, labels: str, output: Path, logs: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, str(REPO / "jobs" / "infer.py"), "--model", model, "--images", images,
           "--labels", labels, "--output", str(output), *extra]
    print(f"camvid_video: {name}: {' '.join(cmd)}", flush=True)
    log = logs / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    done = DONE.findall(text)
    crash_lines = [line for line in text.splitlines() if CRASH.search(line)]
    if rc != 0:
        print(f"camvid_video: {name}: infer exited {rc}; last lines of {log}:", flush=True)
        print("\n".join(text.splitlines()[-15:]), flush=True)
    return {"rc": rc, "wall_s": wall, "job_s": float(done[-1][0]) if done else None,
            "job_fps": float(done[-1][2]) if done else None, "log": str(log), "crash_lines": crash_lines}


def read_metrics(output: Path) -> dict:
    import pyarrow.parquet as pq

    from segray.metrics import mean_iou, pixel_accuracy
    from segray.predictions import read_confusion

    cm, names = read_confusion(str(output))
    overall = next(r for r in pq.read_table(output / "metrics.parquet").to_pylist() if r["class_name"] == "overall")
    return {"cm": cm, "names": names, "miou": mean_iou(cm), "pixel_accuracy": pixel_accuracy(cm),
            "miou_table": overall["miou"], "images": overall["images"], "labelled": overall["labelled_images"],
            "errors": overall["error_images"]}


def per_frame(output: Path) -> dict[str, tuple[bytes, np.ndarray]]:
    import pyarrow.parquet as pq

    files = sorted((output / "predictions").glob("*.parquet"))
    table = pq.read_table([str(f) for f in files], columns=["uri", "mask_png", "confusion"])
    return {r["uri"]: (r["mask_png"], np.asarray(r["confusion"] or [], dtype=np.int64))
            for r in table.to_pylist()}


def mask_array(png: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im)


def compare_frames(image_rows: dict, video_rows: dict, order: list[str], video_uri: str) -> dict:
    """Frame k of the video against image ``order[k]`` of the image run."""
    by_name = {Path(u).name: v for u, v in image_rows.items()}
    differing_frames = differing_pixels = missing = 0
    cm_diff = None
    for k, name in enumerate(order):
        a, b = by_name.get(name), video_rows.get(f"{video_uri}#frame={k}")
        if a is None or b is None:
            missing += 1
            continue
        d = b[1] - a[1]
        cm_diff = np.abs(d) if cm_diff is None else cm_diff + np.abs(d)
        if a[0] != b[0]:
            n = int((mask_array(a[0]) != mask_array(b[0])).sum())
            if n:
                differing_frames += 1
                differing_pixels += n
    return {"missing": missing, "frames_with_other_mask": differing_frames, "other_mask_pixels": differing_pixels,
            "abs_confusion_diff": int(cm_diff.sum()) if cm_diff is not None else None}


def prepare_work(work: Path) -> None:
    if work.exists() and any(work.iterdir()) and not (work / MARKER).exists():
        sys.exit(f"camvid_video: {work} holds files and is not a folder this script wrote ({MARKER}); "
                 "choose an empty or new --work")
    work.mkdir(parents=True, exist_ok=True)
    for sub in ("videos", "video_labels", "out", "logs"):
        shutil.rmtree(work / sub, ignore_errors=True)
    (work / MARKER).write_text(json.dumps({"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))


def fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="CamVid val frames through jobs/infer.py as images and as videos (H.264 and lossless), "
                    "with labels; prints frames, mIoU, pixel accuracy and frames/s per input.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Encoder settings:\n" + "\n".join(f"  {k:8s} {v[4]}" for k, v in ENCODINGS.items()))
    parser.add_argument("--val", required=True, help="folder of the val PNGs (SEQ_<frame number>.png)")
    parser.add_argument("--valannot", required=True, help="folder of the val label PNGs, same names")
    parser.add_argument("--model", required=True, help="a training run (<storage>/<name>) or its model/ folder")
    parser.add_argument("--work", required=True, help="work folder (videos, labels, infer outputs, logs)")
    parser.add_argument("--encodings", default=",".join(ENCODINGS),
                        help=f"comma-separated subset of {','.join(ENCODINGS)} (default: all)")
    parser.add_argument("--infer-arg", action="append", default=[],
                        help="extra argument for every infer run (repeat), e.g. --infer-arg=--threads=2")
    args = parser.parse_args(argv)

    encodings = [e for e in args.encodings.split(",") if e]
    unknown = [e for e in encodings if e not in ENCODINGS]
    if unknown:
        parser.error(f"unknown encodings {unknown}; known: {', '.join(ENCODINGS)}")
    val, valannot, work = Path(args.val).resolve(), Path(args.valannot).resolve(), Path(args.work).resolve()
    order = frame_order(val)
    missing = [n for n in order if not (valannot / n).is_file()]
    if missing:
        sys.exit(f"camvid_video: {len(missing)} frames without a label in {valannot}, e.g. {missing[0]}")
    prepare_work(work)

    frames = [read_rgb(val / n) for n in order]
    sizes = {f.shape[:2] for f in frames}
    if len(sizes) != 1:
        sys.exit(f"camvid_video: the frames have several sizes {sorted(sizes)}; a video needs one")
    h, w = frames[0].shape[:2]
    print(f"camvid_video: {len(order)} frames {h}x{w}, {order[0]} .. {order[-1]} (sequence order)", flush=True)

    labels_root = work / "video_labels"
    (labels_root / CLIP).mkdir(parents=True)
    for k, n in enumerate(order):
        shutil.copyfile(valannot / n, labels_root / CLIP / f"{k}.png")

    runs = [("images", str(val), str(valannot), None)]
    encoded: dict[str, dict] = {}
    for name in encodings:
        folder = work / "videos" / name
        folder.mkdir(parents=True)
        video = folder / f"{CLIP}{ENCODINGS[name][0]}"
        enc = encode(frames, video, name)
        enc["decode"] = decode_check(video, frames)
        encoded[name] = enc
        d = enc["decode"]
        print(f"camvid_video: {name}: {video} {enc['bytes'] / 1e6:.2f} MB in {enc['seconds']:.1f} s; decoded "
              f"{d['frames']} frames, max |diff| {d['max_abs_diff']}, PSNR {fmt(d['psnr_db'], '.2f')} dB", flush=True)
        runs.append((name, str(folder), str(labels_root), str(video)))

    logs = work / "logs"
    logs.mkdir()
    results = {}
    for name, images, labels, _video in runs:
        out = work / "out" / name
        r = run_infer(name, args.model, images, labels, out, logs, args.infer_arg)
        if r["rc"] == 0:
            r.update(read_metrics(out))
            r["rows"] = per_frame(out)
        results[name] = r

    base = results["images"]
    print()
    print("| input | encoder settings | size (MB) | frames | errors | mIoU | pixel acc. | ΔmIoU vs images | "
          "frames/s (job) | wall (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, images, _labels, video in runs:
        r = results[name]
        settings = "PNG (the val folder)" if video is None else ENCODINGS[name][4]
        size = sum(p.stat().st_size for p in Path(images).glob("*.png")) if video is None else encoded[name]["bytes"]
        if r["rc"] != 0:
            print(f"| {name} | {settings} | {size / 1e6:.1f} | failed (rc {r['rc']}) | | | | | | {r['wall_s']:.0f} |")
            continue
        delta = r["miou"] - base["miou"] if base["rc"] == 0 else None
        print(f"| {name} | {settings} | {size / 1e6:.1f} | {r['images']} | {r['errors']} | {r['miou']:.4f} | "
              f"{r['pixel_accuracy']:.4f} | {fmt(delta, '+.4f')} | {fmt(r['job_fps'], '.2f')} | {r['wall_s']:.0f} |")
    print()

    summary = {"frames": len(order), "size": [h, w], "first": order[0], "last": order[-1], "runs": {}}
    for name, _images, _labels, video in runs:
        r = results[name]
        entry = {k: r.get(k) for k in ("rc", "wall_s", "job_s", "job_fps", "miou", "miou_table", "pixel_accuracy",
                                       "images", "labelled", "errors", "log")}
        entry["crash_lines"] = len(r["crash_lines"])
        if video is not None:
            entry["encoding"] = ENCODINGS[name][4]
            entry["encode"] = encoded[name]
        if r["rc"] == 0 and base["rc"] == 0:
            entry["miou_minus_images"] = r["miou"] - base["miou"]
            entry["pixel_accuracy_minus_images"] = r["pixel_accuracy"] - base["pixel_accuracy"]
            if video is not None:
                entry["per_frame"] = compare_frames(base["rows"], r["rows"], order, video)
                entry["cm_equal"] = bool(np.array_equal(r["cm"], base["cm"]))
        if r.get("labelled") is not None and r["labelled"] != len(order):
            print(f"camvid_video: WARNING: {name}: {r['labelled']} of {len(order)} frames had a label", flush=True)
        if r.get("errors"):
            print(f"camvid_video: WARNING: {name}: {r['errors']} error rows, see {work / 'out' / name / 'errors'}",
                  flush=True)
        summary["runs"][name] = entry

    for name, entry in summary["runs"].items():
        if "per_frame" in entry:
            pf = entry["per_frame"]
            print(f"{name}: mIoU - images = {entry['miou_minus_images']:+.6f}, pixel acc. - images = "
                  f"{entry['pixel_accuracy_minus_images']:+.6f}; confusion matrix equal: {entry['cm_equal']}; "
                  f"frames whose mask differs from the image's: {pf['frames_with_other_mask']} "
                  f"({pf['other_mask_pixels']} pixels), sum |Δconfusion| {pf['abs_confusion_diff']}, "
                  f"unmatched frames {pf['missing']}")
    for name in results:
        lines = results[name]["crash_lines"]
        print(f"{name}: {len(lines)} crash-like lines in {results[name]['log']}")
        for line in lines[:10]:
            print(f"    {line[:300]}")
    (work / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"\ncamvid_video: details in {work / 'summary.json'}", flush=True)
    return 0 if all(r["rc"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Infer stage: a trained model over a collection of frames -> masks, errors and metrics in Parquet.

    python jobs/infer.py --model s3://bucket/runs/cv16 --images s3://bucket/frames \
        --output s3://bucket/predictions/cv16 [--labels s3://bucket/labels] [--use-gpu]
        [--tta flip] [--scales 0.75,1,1.25 | --tile HxW [--overlap PX]]
"""

from __future__ import annotations

import argparse
import re
import sys

from segray.infer import InferConfig
from segray.precision import PRECISION_HELP, PRECISIONS
from segray.jobs import add_version, defaults, run_job
from segray.tta import TTA_CHOICES, TTAError, parse_scales, parse_tile

D = defaults(InferConfig)  # every flag's default comes from InferConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Segment every frame below --images (PNG/JPEG files at any nesting, .tar archives of "
        "frames, video files: .mp4 .m4v .mov .mkv .webm .avi) with a trained model, and write "
        "<output>/predictions/ (one row per frame: mask PNG at the "
        "frame's size, class pixel counts, and with --labels confusion counts), <output>/errors/ (one row per "
        "input that could not be used) and <output>/metrics.parquet (IoU per class, mIoU, pixel accuracy).",
        epilog="URIs are s3://bucket/prefix or local paths; S3 settings come from the AWS_* environment. "
        "Rerunning the same command over the same --output skips the inputs already there (inputs whose reading "
        "failed are tried again), so an interrupted run is completed without duplicates; a rerun with another "
        "model, --images, --labels or test-time options is refused (<output>/infer.json records them): to start over, delete the "
        "output or choose another. Every input that cannot be used is a row of <output>/errors/, never the end "
        "of the job.",
    )
    parser.add_argument("--model", required=True, help="a training run (<storage>/<name>) or its model/ folder")
    parser.add_argument("--images", required=True,
                        help="prefix of frames: image files, .tar archives and/or video files (frame k of a video "
                        "is <video uri>#frame=<k>)")
    parser.add_argument("--output", required=True, help="where to write predictions/, errors/, metrics.parquet")
    parser.add_argument("--labels", default=None,
                        help="prefix of label PNGs (class indices, or colour-coded NAME_L.png) paired with the "
                        "frames by relative path and stem (frame k of a/clip.mp4: a/clip/<k>.png); with it, metrics "
                        "are computed")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per model replica (bf16, channels-last)")
    parser.add_argument("--batch-size", type=int, default=D["batch_size"],
                        help="frames per model call; with --tile, windows (default %(default)s)")
    parser.add_argument("--num-replicas", type=int, default=D["num_replicas"],
                        help="model replicas (actors); each takes a GPU with --use-gpu, else --cpus-per-replica")
    parser.add_argument("--cpus-per-replica", type=float, default=D["cpus_per_replica"],
                        help="CPUs Ray reserves per CPU replica (default %(default)s)")
    parser.add_argument("--threads", type=int, default=D["threads"],
                        help="torch threads per CPU replica (default: the machine's cores / --num-replicas, at least "
                        "--cpus-per-replica; decoding shares the cores)")
    parser.add_argument("--precision", choices=PRECISIONS, default=D["precision"], help=PRECISION_HELP)
    parser.add_argument("--rows-per-file", type=int, default=D["rows_per_file"],
                        help="rows per Parquet part file of predictions/ and errors/ (default %(default)s)")
    parser.add_argument("--write-masks", action="store_true",
                        help="also write colour PNGs to <output>/masks/, mirroring the input paths (video frames: "
                        "masks/<video path>/<k>.png)")
    select = parser.add_mutually_exclusive_group()
    select.add_argument("--every", type=int, default=D["every"], metavar="N",
                        help="videos: predict every N-th frame (0, N, 2N, ...); default every frame")
    select.add_argument("--fps", type=float, default=D["fps"], metavar="F",
                        help="videos: predict the frames nearest to a rate of F frames per second")
    parser.add_argument("--frames-per-task", type=int, default=D["frames_per_task"],
                        help="a video or plain .tar with more frames is cut into ranges of about this many, "
                        "decoded by parallel tasks (default %(default)s)")
    parser.add_argument("--write-video", action="store_true",
                        help="also write <output>/overlays/<video path>.mp4 per input video: its predicted frames "
                        "with the colour mask blended in (H.264)")
    tta = parser.add_argument_group(
        "test-time options", "each off by default; they cost model time and change every mask, so an output is "
        "made with one setting of them (recorded in <output>/infer.json; a rerun with others is refused)")
    tta.add_argument("--tta", choices=TTA_CHOICES, default=D["tta"],
                     help="flip: average the logits of each frame and of its horizontal mirror (mirrored back); "
                     "2x the model time")
    tta.add_argument("--scales", type=_option(parse_scales), default=D["scales"], metavar="S1,S2,...",
                     help="multi-scale: average the logits of the model-size frame resized by each factor (bilinear, "
                     "logits resized back), e.g. 0.75,1,1.25; model time about the sum of s^2 (x2 with --tta flip)")
    tta.add_argument("--tile", type=_option(parse_tile), default=D["tile"], metavar="HxW",
                     help="sliding window at each frame's own resolution (no resize): HxW windows on a grid, the "
                     "last one in each dimension at the frame's edge, logits averaged where windows overlap; "
                     "model time: the number of windows per frame (each window flipped too with --tta flip); "
                     "not with --scales")
    tta.add_argument("--overlap", type=int, default=D["overlap"], metavar="PX",
                     help="pixels adjacent --tile windows share (stride = tile side - PX); 0 <= PX < both tile sides "
                     "(default: a quarter of the tile's smaller side)")
    add_version(parser)
    args = parser.parse_args(argv)

    from segray.infer import infer

    config = None

    def configured() -> None:
        # Checked before connecting to Ray: a bad combination of flags is one line at once.
        nonlocal config
        config = InferConfig(
            model=args.model,
            images=args.images,
            output=args.output,
            labels=args.labels,
            use_gpu=args.use_gpu,
            batch_size=args.batch_size,
            num_replicas=args.num_replicas,
            cpus_per_replica=args.cpus_per_replica,
            threads=args.threads,
            write_masks=args.write_masks,
            rows_per_file=args.rows_per_file,
            every=args.every,
            fps=args.fps,
            frames_per_task=args.frames_per_task,
            write_video=args.write_video,
            tta=args.tta,
            scales=args.scales,
            tile=args.tile,
            overlap=args.overlap,
            precision=args.precision,
        )

    return run_job("infer", lambda: infer(config), gpu=args.use_gpu, preflight=configured, verbose=args.verbose)


def _option(parse):
    """An argparse type from a segray.tta parser: its message (naming the flag) as argparse's error."""

    def convert(text: str):
        try:
            return parse(text)
        except TTAError as e:
            # argparse names the flag itself: "argument --scales: ..."
            raise argparse.ArgumentTypeError(re.sub(r"^--[a-z-]+:? ", "", str(e))) from None

    convert.__name__ = parse.__name__
    return convert


if __name__ == "__main__":
    sys.exit(main())

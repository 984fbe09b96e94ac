"""Train stage: a U-Net on a prepared dataset with Ray Train (DDP), checkpoints in object storage.

    python jobs/train.py --data s3://bucket/prepared --storage s3://bucket/runs --name unet --epochs 40

Rerunning the same command (same --storage and --name) resumes after the latest checkpoint. A
rerun that changes what the run is made from (--data or its content, --lr, --weight-decay,
--lr-schedule, --batch-size, --class-weighting, --no-augment, --crop, --scale-range, --seed,
--base-channels) is refused before any worker starts; a higher --epochs continues the LR schedule
without a jump (segray/train.py's docstring).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segray.jobs import run_job  # noqa: E402
from segray.preprocess import parse_size  # noqa: E402
from segray.train import CLASS_WEIGHTINGS, SCALE_RANGE, SCHEDULES, TrainConfig  # noqa: E402


def _scale_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LO,HI, e.g. 0.75,1.5") from None
    return lo, hi


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train a U-Net on a prepared dataset (jobs/prepare.py --dest) with Ray Train: one data shard "
        "and one DDP replica per worker, validation (mIoU, pixel accuracy) and a checkpoint every epoch in "
        "<storage>/<name>/, the best model exported to <storage>/<name>/model/ and the history to metrics.json.",
        epilog="Rerunning the same command resumes after the latest checkpoint; a higher --epochs trains on, "
        "the rest of the LR schedule stretched over the new epochs (no jump). A rerun with another --data (or the "
        "same one re-prepared), --lr, --weight-decay, --lr-schedule, --batch-size, --class-weighting, --no-augment, "
        "--crop, --scale-range, --seed or --base-channels is refused: pass the recorded value (run.json in the run "
        "folder) or a new --name. --num-workers, --use-gpu, --cpus-per-worker, --threads, --max-failures and "
        "--keep-checkpoints may change. URIs are s3://bucket/prefix or local paths; S3 settings come from the "
        "AWS_* environment.",
    )
    parser.add_argument("--data", required=True, help="prepared dataset (the --dest of jobs/prepare.py)")
    parser.add_argument("--storage", required=True, help="where run folders live (s3://... or a local path)")
    parser.add_argument("--name", required=True,
                        help="run folder name below --storage; the same name resumes (with the same recipe)")
    parser.add_argument("--epochs", type=int, default=10, help="total epochs of the run (default 10)")
    parser.add_argument("--num-workers", type=int, default=2, help="Ray Train workers, one model replica each (default 2)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker (bf16, SyncBatchNorm, channels_last)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per worker and step (default 8)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 0.001)")
    parser.add_argument("--lr-schedule", choices=SCHEDULES, default="constant",
                        help="learning rate over the run (default constant)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay, AdamW (default 0)")
    parser.add_argument("--base-channels", type=int, default=64,
                        help="U-Net width: channels of the first level (default 64 as in the paper; 16 on CPU)")
    parser.add_argument("--class-weighting", choices=CLASS_WEIGHTINGS, default="sqrt_median_freq",
                        help="cross-entropy class weights from dataset.json pixel counts: median_freq (median/freq, "
                        "capped at 50), sqrt_median_freq (its square root: softer, the default: +0.06 val mIoU on CamVid, "
                        "docs/quality.md), none")
    parser.add_argument("--no-augment", dest="augment", action="store_false",
                        help="turn off random flip, scale-crop and colour jitter of training images")
    parser.add_argument("--scale-range", type=_scale_range, default=SCALE_RANGE, metavar="LO,HI",
                        help="random scale of the scale-crop augmentation, log-uniform (default %s,%s)" % SCALE_RANGE)
    parser.add_argument("--crop", type=parse_size, default=None, metavar="HxW",
                        help="train on random HxW windows of the (scaled) frames: a cheaper step, more epochs in "
                        "the same time; validation uses whole frames (default: whole frames)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of weights, shuffling, augmentation (default 0)")
    parser.add_argument("--max-failures", type=int, default=0,
                        help="restart the workers from the latest checkpoint this many times on failure (default 0)")
    parser.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs reserved per worker (default 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per CPU worker (default: --cpus-per-worker)")
    parser.add_argument("--keep-checkpoints", type=int, default=2,
                        help="checkpoints kept, the best by val mIoU; the latest is kept too (default 2)")
    args = parser.parse_args(argv)

    def body() -> None:
        from segray.train import train

        train(TrainConfig(**vars(args)))

    # train() connects to Ray itself, after the checks that need no cluster.
    return run_job("train", body, connect=False)


if __name__ == "__main__":
    sys.exit(main())

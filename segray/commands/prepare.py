"""Prepare stage: CamVid image/label pairs -> resized Parquet shards + dataset.json.

    python jobs/prepare.py --source s3://bucket/camvid --dest s3://bucket/prepared --size 176x240

--dest must lie outside --source and be empty, new, or an earlier segray dataset (a rerun
replaces it: the new dataset is written beside the old one, and only the files the old
dataset.json lists are deleted after the new one is complete). The job never deletes files
it did not write.
"""

from __future__ import annotations

import argparse
import sys

from segray.jobs import add_version, run_job
from segray.preprocess import parse_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Read CamVid (SegNet or original layout) from a URI, resize it (labels with NEAREST) "
        "and write Parquet shards per split plus dataset.json.",
        epilog="URIs are s3://bucket/prefix or local paths; S3 settings come from the AWS_* environment. "
        "--dest must lie outside --source and be empty, new, or an earlier segray dataset, which a rerun "
        "replaces; files segray did not write are never deleted.",
    )
    parser.add_argument("--source", required=True, help="CamVid source prefix (s3://... or a local path)")
    parser.add_argument("--dest", required=True,
                        help="where to write the prepared dataset: outside --source; empty, new, or an earlier "
                        "segray dataset (replaced)")
    parser.add_argument("--size", type=parse_size, default=None, metavar="HxW",
                        help="output size, e.g. 176x240 (default: the first image's size)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave out unreadable or inconsistent pairs (listed in dataset.json) instead of failing; "
                        "still fails if no pair, or no pair of a split, is left")
    parser.add_argument("--holdout", default=None, metavar="PREFIXES",
                        help="validate on unseen streets: the train and val frames whose names start with one of "
                        "these comma-separated prefixes (CamVid sequences, e.g. 0006R0) become val, all other train "
                        "and val frames train; @FILE reads one name or prefix a line (local or s3://)")
    parser.add_argument("--train-on-val", action="store_true",
                        help="train also gets every val frame (val stays, as a measure of fit): for a final model "
                        "with an epoch count fixed beforehand (jobs/train.py exports its last epoch then)")
    add_version(parser)
    args = parser.parse_args(argv)

    from segray.layout import parse_holdout
    from segray.prepare import PrepareConfig, check_paths, prepare

    config: list[PrepareConfig] = []

    def preflight() -> None:
        # A bad flag, an unreadable --holdout list or a --dest that prepare must not write into
        # is refused before connecting to Ray.
        holdout = parse_holdout(args.holdout) if args.holdout is not None else ()
        config.append(check_paths(PrepareConfig(source=args.source, dest=args.dest, size=args.size,
                                                skip_bad=args.skip_bad, holdout=holdout,
                                                train_on_val=args.train_on_val)))

    return run_job("prepare", lambda: prepare(config[0]), preflight=preflight, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())

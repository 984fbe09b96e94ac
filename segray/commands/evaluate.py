"""Evaluate: the HTML report of a model on labelled frames, from an infer output.

    python jobs/infer.py --model RUN --images s3://b/camvid/val --labels s3://b/camvid/valannot --output OUT
    python jobs/evaluate.py --predictions OUT --run RUN --dest s3://b/reports/run1
"""

from __future__ import annotations

import argparse
import sys

from segray.jobs import add_version, run_job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write an HTML report (per-class IoU, mIoU, pixel accuracy, confusion matrix, training "
        "curves, best and worst frames with their masks overlaid, small objects by size) from the output "
        "of jobs/infer.py run with --labels.",
    )
    parser.add_argument("--predictions", required=True, help="the --output of jobs/infer.py (with --labels)")
    parser.add_argument("--dest", required=True, help="where to write index.html and its PNGs")
    parser.add_argument("--run", default=None, help="the training run (<storage>/<name>), for its curves")
    parser.add_argument("--title", default="segray evaluation", help="page title")
    parser.add_argument("--examples", type=int, default=6, help="frames to show (half best, half worst)")
    add_version(parser)
    args = parser.parse_args(argv)

    from segray.evaluate import build_report

    def body() -> None:
        page = build_report(args.predictions, args.dest, run=args.run, title=args.title, examples=args.examples)
        print(f"evaluate: report written to {page}", flush=True)

    return run_job("evaluate", body, connect=False)


if __name__ == "__main__":
    sys.exit(main())

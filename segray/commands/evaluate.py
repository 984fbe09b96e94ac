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
        description="Write an HTML report from the output of jobs/infer.py run with --labels: the run's facts "
        "(network and its arguments, input size, classes, training recipe, dataset, versions), mIoU and pixel "
        "accuracy, per-class IoU, the confusion matrix, training curves (loss, validation mIoU and pixel "
        "accuracy, learning rate), the best and worst frames with their masks and error maps, and small "
        "objects by size. index.html, PNG and SVG files; a --dest holding files but no earlier segray report "
        "is refused.",
    )
    parser.add_argument("--predictions", required=True, help="the --output of jobs/infer.py (with --labels)")
    parser.add_argument("--dest", required=True, help="where to write index.html and its charts and frames")
    parser.add_argument("--run", default=None,
                        help="the training run (<storage>/<name>), for its settings and curves (default: the model "
                        "the predictions' infer.json names, if it is still the same model by its sha256)")
    parser.add_argument("--title", default="segray evaluation", help="page title")
    parser.add_argument("--examples", type=int, default=6, help="frames to show (half best, half worst)")
    add_version(parser)
    args = parser.parse_args(argv)

    from segray.evaluate import build_report

    def body() -> None:
        page = build_report(args.predictions, args.dest, run=args.run, title=args.title, examples=args.examples)
        print(f"evaluate: report written to {page}", flush=True)

    return run_job("evaluate", body, connect=False, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate: the HTML report of a model on labelled frames, from an infer output.

    python jobs/infer.py --model RUN --images s3://b/camvid/val --labels s3://b/camvid/valannot --output OUT
    python jobs/evaluate.py --predictions OUT --run RUN --dest s3://b/reports/run1
"""

# The command lives in segray/commands/evaluate.py (also `segray evaluate` and `python -m segray evaluate`);
# this file stays so that `ray job submit --working-dir . -- python jobs/evaluate.py ...` runs it
# from a checkout without installing segray.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segray.commands.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

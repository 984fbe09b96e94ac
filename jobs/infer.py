"""Infer stage: a trained model over a collection of frames -> masks, errors and metrics in Parquet.

    python jobs/infer.py --model s3://bucket/runs/cv16 --images s3://bucket/frames \
        --output s3://bucket/predictions/cv16 [--labels s3://bucket/labels] [--use-gpu]
"""

# The command lives in segray/commands/infer.py (also `segray infer` and `python -m segray infer`);
# this file stays so that `ray job submit --working-dir . -- python jobs/infer.py ...` runs it
# from a checkout without installing segray.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segray.commands.infer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

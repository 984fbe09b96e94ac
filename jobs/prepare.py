"""Prepare stage: CamVid image/label pairs -> resized Parquet shards + dataset.json.

    python jobs/prepare.py --source s3://bucket/camvid --dest s3://bucket/prepared --size 176x240

--dest must lie outside --source and be empty, new, or an earlier segray dataset (a rerun
replaces it: the new dataset is written beside the old one, and only the files the old
dataset.json lists are deleted after the new one is complete). The job never deletes files
it did not write.
"""

# The command lives in segray/commands/prepare.py (also `segray prepare` and `python -m segray prepare`);
# this file stays so that `ray job submit --working-dir . -- python jobs/prepare.py ...` runs it
# from a checkout without installing segray.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segray.commands.prepare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

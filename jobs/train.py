"""Train stage: a segmentation network (--arch) on a prepared dataset with Ray Train (DDP),
checkpoints in object storage.

    python jobs/train.py --data s3://bucket/prepared --storage s3://bucket/runs --name unet --epochs 40

Rerunning the same command (same --storage and --name) resumes after the latest checkpoint. A
rerun that changes what the run is made from (--data or its content, --lr, --weight-decay,
--lr-schedule, --batch-size, --class-weighting, an augmentation setting, --seed, --arch and its
arguments, --base-channels) is refused before any worker starts; a higher --epochs continues the
LR schedule without a jump (segray/recipe.py's docstring).
"""

# The command lives in segray/commands/train.py (also `segray train` and `python -m segray train`);
# this file stays so that `ray job submit --working-dir . -- python jobs/train.py ...` runs it
# from a checkout without installing segray.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segray.commands.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

"""``python jobs/train.py ...``: the train command of segray/commands/train.py (its usage and flags are there)."""

# The command lives in segray/commands/train.py (also `segray train` and `python -m segray train`);
# this file stays so that `ray job submit --working-dir . -- python jobs/train.py ...` runs it
# from a checkout without installing segray.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segray.commands.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

"""``python jobs/evaluate.py ...``: the evaluate command of segray/commands/evaluate.py (its usage and flags are there)."""

# The command lives in segray/commands/evaluate.py (also `segray evaluate` and `python -m segray evaluate`);
# this file stays so that `ray job submit --working-dir . -- python jobs/evaluate.py ...` runs it
# from a checkout without installing segray.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segray.commands.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
